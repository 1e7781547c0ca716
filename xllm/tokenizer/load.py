"""`load_tokenizer(path)`: find out what kind of tokenizer file `path` is and load it.

    path                          what is read
    ----------------------------  --------------------------------------------------
    model.gguf                    the GGUF's tokenizer.ggml.* metadata (gguf_loader.py)
    a directory                   tokenizer.json if present, else tokenizer.model,
                                  else tokenizer.bin / tokenizer.xllm.json
    tokenizer.json                a Hugging Face tokenizers file (hf_json.py)
    *.xllm.json / xllm JSON       the file convert/export_tokenizer.py writes
    tokenizer.model               a SentencePiece model (spm_model.py)
    tokenizer.bin                 a llama2.c tokenizer (spm_model.py)

The kind is decided from the content where the name does not tell (a GGUF
starts with b"GGUF", JSON with "{"). Every failure is one `ModelFormatError`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

from ..errors import ModelFormatError
from .base import Tokenizer

XLLM_FORMAT = "xllm-tokenizer"
XLLM_FORMAT_VERSION = 1

_DIR_CANDIDATES = ("tokenizer.json", "tokenizer.model", "tokenizer.xllm.json", "tokenizer.bin")


def load_tokenizer(path: Union[str, Path]) -> Tokenizer:
    """The tokenizer stored at `path` (see module doc for what is accepted)."""
    p = Path(path)
    if p.is_dir():
        for name in _DIR_CANDIDATES:
            if (p / name).is_file():
                return load_tokenizer(p / name)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        raise ModelFormatError(p, "no tokenizer file in this directory (looked for "
                                  + ", ".join(_DIR_CANDIDATES) + ")")
    if not p.exists():
        raise ModelFormatError(p, "no such tokenizer file")
    try:
        with open(p, "rb") as f:
            head = f.read(64)
    except OSError as e:
        raise ModelFormatError(p, f"cannot read: {e.strerror or e}")
    if head[:4] == b"GGUF":
        from .gguf_loader import load_gguf_tokenizer
        return load_gguf_tokenizer(p)
    if p.suffix == ".json" or (head.lstrip().startswith(b"{") and p.suffix not in (".model", ".bin")):
        data = _read_json(p)
        if data.get("format") == XLLM_FORMAT:
            return tokenizer_from_dict(data, path=p)
        from .hf_json import tokenizer_from_hf_json
        return tokenizer_from_hf_json(data, path=p)
    from .spm_model import load_llama2c_tokenizer, load_sentencepiece_model, looks_like_llama2c
    if p.suffix == ".bin" or looks_like_llama2c(p):
        return load_llama2c_tokenizer(p)
    return load_sentencepiece_model(p)


def _read_json(p: Path) -> dict:
    try:
        with open(p, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(p, f"not valid JSON: {e}")
    except RecursionError:
        raise ModelFormatError(p, "not valid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ModelFormatError(p, "a tokenizer JSON file must hold an object")
    return data


def tokenizer_from_dict(d: dict, path: Union[str, Path] = "<dict>") -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` output (the xllm file format)."""
    try:
        version = d.get("version", XLLM_FORMAT_VERSION)
        if version != XLLM_FORMAT_VERSION:
            raise ModelFormatError(path, f"xllm tokenizer format version {version} is not supported "
                                         f"(this xllm reads version {XLLM_FORMAT_VERSION})")
        common = {k: d.get(k) for k in ("bos_id", "eos_id", "unk_id", "pad_id", "name")}
        common.update(eos_ids=d.get("eos_ids") or (), add_bos=bool(d.get("add_bos")),
                      add_eos=bool(d.get("add_eos")))
        family = d.get("family")
        if family == "byte_level":
            from .byte_level import ByteLevelBPE
            return ByteLevelBPE(d["pieces"], d["token_types"], [tuple(m) for m in d["merges"]],
                                pretokenizer_spec=d["pretokenizer"], normalizer_spec=d.get("normalizer"),
                                ignore_merges=bool(d.get("ignore_merges")), **common)
        if family == "sentencepiece":
            from .sentencepiece import SentencePieceBPE
            return SentencePieceBPE.from_dict(d, common)
        raise ModelFormatError(path, f"unknown tokenizer family {family!r}")
    except ModelFormatError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFormatError(path, f"malformed xllm tokenizer file ({type(e).__name__}: {e})")


def save_tokenizer(tok: Tokenizer, path: Union[str, Path]) -> None:
    """Write `tok` in the xllm tokenizer format (JSON), loadable by `load_tokenizer`."""
    d = {"format": XLLM_FORMAT, "version": XLLM_FORMAT_VERSION}
    d.update(tok.to_dict())
    with open(path, "w", encoding="utf-8") as f:
        json.dump(d, f, ensure_ascii=False, separators=(",", ":"))
        f.write("\n")
