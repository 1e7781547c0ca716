"""Build a tokenizer from GGUF metadata (the `tokenizer.ggml.*` keys).

A GGUF model file carries its tokenizer as metadata, written by llama.cpp's
converters:

    tokenizer.ggml.model         "gpt2" (byte-level BPE) or "llama" (SentencePiece BPE)
    tokenizer.ggml.pre           which pre-tokenizer regex ("smollm", "llama-bpe", ...)
    tokenizer.ggml.tokens        id -> piece
    tokenizer.ggml.token_type    id -> type (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte)
    tokenizer.ggml.merges        ranked merges "left right" (gpt2 only)
    tokenizer.ggml.scores        id -> score (llama only)
    tokenizer.ggml.bos_token_id / eos_token_id / unknown_token_id / padding_token_id
    tokenizer.ggml.eot_token_id / eom_token_id   (end of turn / message, when known)
    tokenizer.ggml.add_bos_token / add_eos_token / add_space_prefix
    tokenizer.ggml.remove_extra_whitespaces

Only "gpt2" and "llama" models are supported; any other (e.g. "bert",
"t5") or a `tokenizer.ggml.pre` this module does not know raises
`ModelFormatError`, rather than silently producing wrong ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Union

from ..errors import ModelFormatError
from .base import Tokenizer
from .pretokenize import PRESETS


def _get(meta: dict, key: str, default: Any = None) -> Any:
    v = meta.get(key, default)
    return default if v is None else v


def tokenizer_from_gguf_metadata(meta: dict, path: Union[str, Path] = "<gguf metadata>") -> Tokenizer:
    """The tokenizer described by a GGUF metadata dict (key -> plain value,
    as `{k: f.contents() for k, f in GGUFReader(p).fields.items()}` gives).

        >>> tok = tokenizer_from_gguf_metadata(meta, path="model.gguf")   # doctest: +SKIP
        >>> tok.encode("Hello world")                                       # doctest: +SKIP
        [19556, 905]
    """
    model = _get(meta, "tokenizer.ggml.model")
    if model is None:
        raise ModelFormatError(path, "no tokenizer in the GGUF metadata (tokenizer.ggml.model is missing)")
    tokens = _get(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelFormatError(path, "tokenizer.ggml.tokens is missing or empty")
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    types = list(_get(meta, "tokenizer.ggml.token_type", [1] * n))
    if len(types) != n:
        raise ModelFormatError(path, f"tokenizer.ggml.token_type has {len(types)} entries, expected {n}")

    eos_ids = [_get(meta, k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    common = dict(
        bos_id=_get(meta, "tokenizer.ggml.bos_token_id"),
        eos_id=_get(meta, "tokenizer.ggml.eos_token_id"),
        eos_ids=[i for i in eos_ids if i is not None],
        unk_id=_get(meta, "tokenizer.ggml.unknown_token_id"),
        pad_id=_get(meta, "tokenizer.ggml.padding_token_id"),
        add_eos=bool(_get(meta, "tokenizer.ggml.add_eos_token", False)),
        name=str(_get(meta, "general.name", "")),
    )

    if model == "gpt2":
        from .byte_level import ByteLevelBPE

        pre = str(_get(meta, "tokenizer.ggml.pre", "default"))
        if pre not in PRESETS:
            raise ModelFormatError(
                path, f"unsupported pre-tokenizer tokenizer.ggml.pre={pre!r} "
                      f"(supported: {', '.join(sorted(PRESETS))})")
        merges_raw = _get(meta, "tokenizer.ggml.merges")
        if not merges_raw:
            raise ModelFormatError(path, "tokenizer.ggml.merges is missing (a gpt2 tokenizer needs its merges)")
        merges = []
        for m in merges_raw:
            parts = str(m).split(" ")
            if len(parts) != 2:
                raise ModelFormatError(path, f"malformed merge {m!r} in tokenizer.ggml.merges")
            merges.append((parts[0], parts[1]))
        return ByteLevelBPE(
            tokens, types, merges,
            pretokenizer_spec=PRESETS[pre],
            ignore_merges=pre in ("llama3", "llama-v3", "llama-bpe"),
            add_bos=bool(_get(meta, "tokenizer.ggml.add_bos_token", False)),
            **common)

    if model == "llama":
        from .sentencepiece import SentencePieceBPE

        scores = _get(meta, "tokenizer.ggml.scores")
        if scores is None or len(scores) != n:
            raise ModelFormatError(path, "tokenizer.ggml.scores is missing or has the wrong length")
        return SentencePieceBPE(
            tokens, types, scores=[float(s) for s in scores],
            add_dummy_prefix=bool(_get(meta, "tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=bool(_get(meta, "tokenizer.ggml.remove_extra_whitespaces", False)),
            byte_fallback=any(t == 6 for t in types),
            add_bos=bool(_get(meta, "tokenizer.ggml.add_bos_token", True)),
            **common)

    raise ModelFormatError(path, f"unsupported tokenizer model tokenizer.ggml.model={model!r} "
                                 "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")


def read_gguf_tokenizer_metadata(path: Union[str, Path]) -> dict:
    """The metadata of a GGUF file (key -> plain Python value), from the
    loader's GGUF header parser: only the header is read, not the tensors."""
    from ..loader.gguf_file import read_gguf

    return read_gguf(path)[0]


def load_gguf_tokenizer(path: Union[str, Path]) -> Tokenizer:
    return tokenizer_from_gguf_metadata(read_gguf_tokenizer_metadata(path), path=path)


__all__ = ["tokenizer_from_gguf_metadata", "load_gguf_tokenizer", "read_gguf_tokenizer_metadata"]
