"""Build a tokenizer from a Hugging Face `tokenizer.json`.

A `tokenizer.json` describes a pipeline: `normalizer` -> `pre_tokenizer` ->
`model` -> `post_processor`, and a `decoder`, plus `added_tokens`. Only BPE
models are accepted, and the family is recognised from the pipeline:

* a `ByteLevel` pre-tokenizer or decoder: byte-level BPE (GPT-2, Llama 3,
  SmolLM2, Qwen 2). `Split` regexes, `Digits` and `ByteLevel` pre-tokenizer
  steps and the NFC/NFKC/Lowercase/Replace/Prepend normalizers are supported;
* a normalizer that replaces " " by "▁", or a `Metaspace` pre-tokenizer:
  SentencePiece-style BPE (Llama 2, Mistral), merged by merge rank.

Added tokens with `"special": true` become CONTROL tokens (recognised only
with `allow_special=True`), the others USER_DEFINED. Whether BOS is added
comes from the `TemplateProcessing` post-processor, or from a
`tokenizer_config.json` beside the file; `generation_config.json`, when
present, adds its `eos_token_id`s to `eos_ids`.

Anything else (WordPiece, Unigram, a `Whitespace` pre-tokenizer...) raises
`ModelFormatError` naming the unsupported part. Known gaps: added tokens'
`lstrip` / `rstrip` / `single_word` / `normalized` options are ignored;
non-special added tokens of a SentencePiece-style file are kept whole inside
the text (sentencepiece's user-defined rule) rather than cut out before
normalization; `Metaspace(split=true)` is read like `split=false` (the same
ids whenever no vocabulary piece has a "▁" after another character, true of
Llama-family vocabularies).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import ModelFormatError
from .base import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer
from .pretokenize import GPT2_PATTERN
from .spm_normalizer import SPACE_SYMBOL


class _Unsupported(Exception):
    pass


def _flatten(node: Optional[dict], list_key: str) -> list[dict]:
    """A Sequence node's children (recursively), or [node], or []."""
    if not node:
        return []
    if node.get("type") == "Sequence":
        return [c for child in node.get(list_key, []) for c in _flatten(child, list_key)]
    return [node]


def _pattern(node: dict) -> tuple[str, bool]:
    """(pattern, is_literal) of a Split/Replace pattern {"Regex": ..} / {"String": ..}."""
    pat = node.get("pattern", {})
    if "Regex" in pat:
        return pat["Regex"], False
    if "String" in pat:
        return pat["String"], True
    raise _Unsupported(f"pattern {pat!r}")


def _byte_level_pretokenizer(node: Optional[dict]) -> list[dict]:
    steps: list[dict] = []
    nodes = _flatten(node, "pretokenizers")
    for k, n in enumerate(nodes):
        kind = n.get("type")
        if kind == "Split":
            pattern, literal = _pattern(n)
            steps.append({"type": "regex", "pattern": pattern, "literal": literal,
                          "behavior": str(n.get("behavior", "Isolated")).lower(),
                          "invert": bool(n.get("invert", False))})
        elif kind == "Digits":
            steps.append({"type": "digits", "individual": bool(n.get("individual_digits", False))})
        elif kind == "ByteLevel":
            if k != len(nodes) - 1:
                raise _Unsupported("a ByteLevel pre-tokenizer that is not the last step")
            if n.get("add_prefix_space", False):
                steps.append({"type": "prefix_space"})
            if n.get("use_regex", True):
                steps.append({"type": "regex", "pattern": GPT2_PATTERN})
        else:
            raise _Unsupported(f"pre-tokenizer {kind}")
    return steps


def _normalizer_steps(node: Optional[dict]) -> list[dict]:
    steps: list[dict] = []
    for n in _flatten(node, "normalizers"):
        kind = n.get("type")
        if kind in ("NFC", "NFKC", "NFD", "NFKD", "Lowercase"):
            steps.append({"type": kind.lower()})
        elif kind == "Replace":
            pattern, literal = _pattern(n)
            if not literal:
                raise _Unsupported("a Replace normalizer with a regex")
            steps.append({"type": "replace", "pattern": pattern, "content": n.get("content", "")})
        elif kind == "Prepend":
            steps.append({"type": "prepend", "prepend": n.get("prepend", "")})
        else:
            raise _Unsupported(f"normalizer {kind}")
    return steps


def _token_text(v: Any) -> Optional[str]:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _read_side_json(path: Path, name: str) -> dict:
    p = path.parent / name
    if not p.is_file():
        return {}
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def tokenizer_from_hf_json(data: dict, path: Union[str, Path] = "tokenizer.json") -> Tokenizer:
    """The tokenizer a parsed tokenizer.json describes (see module doc)."""
    try:
        return _build(data, Path(str(path)))
    except _Unsupported as e:
        raise ModelFormatError(path, f"unsupported tokenizer.json: {e}")
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelFormatError(path, f"malformed tokenizer.json ({type(e).__name__}: {e})")


def _build(data: dict, path: Path) -> Tokenizer:
    model = data.get("model") or {}
    if model.get("type", "BPE") != "BPE":
        raise _Unsupported(f"model type {model.get('type')} (only BPE)")
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise _Unsupported("BPE with continuing_subword_prefix / end_of_word_suffix")

    # id -> piece, from the model vocabulary and the added tokens
    by_id: dict[int, str] = {int(i): p for p, i in model["vocab"].items()}
    added = data.get("added_tokens") or []
    for t in added:
        by_id[int(t["id"])] = t["content"]
    size = max(by_id) + 1
    pieces = [by_id.get(i, f"<xllm_missing_{i}>") for i in range(size)]
    types = [NORMAL] * size
    for i in range(size):
        if i not in by_id:
            types[i] = CONTROL  # a hole in the ids: unreachable from text
    for t in added:
        types[int(t["id"])] = CONTROL if t.get("special", False) else USER_DEFINED
    unk_text = model.get("unk_token")
    unk_id = model["vocab"].get(unk_text) if unk_text is not None else None
    if unk_id is not None and types[unk_id] == NORMAL:
        types[unk_id] = UNKNOWN

    merges = []
    for m in model.get("merges", []):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise ValueError(f"malformed merge {m!r}")
            merges.append((parts[0], parts[1]))
        else:
            merges.append((m[0], m[1]))

    # BOS / EOS: post-processor template, then tokenizer_config.json
    piece_id = {p: i for i, p in reversed(list(enumerate(pieces)))}
    bos_id = eos_id = None
    add_bos = add_eos = False
    for proc in _flatten(data.get("post_processor"), "processors"):
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            specials = proc.get("special_tokens") or {}

            def special_id(item):
                name = item.get("SpecialToken", {}).get("id")
                ids = specials.get(name, {}).get("ids") if name in specials else None
                return ids[0] if ids else piece_id.get(name)
            if single and "SpecialToken" in single[0]:
                bos_id, add_bos = special_id(single[0]), True
            if len(single) > 1 and "SpecialToken" in single[-1]:
                eos_id, add_eos = special_id(single[-1]), True
    config = _read_side_json(path, "tokenizer_config.json")
    if _token_text(config.get("bos_token")) in piece_id:
        bos_id = piece_id[_token_text(config["bos_token"])]
    if _token_text(config.get("eos_token")) in piece_id:
        eos_id = piece_id[_token_text(config["eos_token"])]
    if "add_bos_token" in config:
        add_bos = bool(config["add_bos_token"])
    if "add_eos_token" in config:
        add_eos = bool(config["add_eos_token"])
    if bos_id is None:
        bos_id = next((piece_id[p] for p in ("<s>", "<|begin_of_text|>", "<|startoftext|>") if p in piece_id), None)
    if eos_id is None:
        eos_id = next((piece_id[p] for p in ("</s>", "<|end_of_text|>", "<|endoftext|>") if p in piece_id), None)
    gen = _read_side_json(path, "generation_config.json").get("eos_token_id")
    eos_ids = gen if isinstance(gen, list) else ([gen] if isinstance(gen, int) else [])
    pad_text = _token_text(config.get("pad_token"))
    common = dict(bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids, unk_id=unk_id,
                  pad_id=piece_id.get(pad_text) if pad_text else None,
                  add_bos=add_bos, add_eos=add_eos, name=path.parent.name or path.name)

    pre = data.get("pre_tokenizer")
    decoder_types = {d.get("type") for d in _flatten(data.get("decoder"), "decoders")}
    pre_types = {p.get("type") for p in _flatten(pre, "pretokenizers")}
    if "ByteLevel" in pre_types or "ByteLevel" in decoder_types:
        from .byte_level import ByteLevelBPE
        return ByteLevelBPE(pieces, types, merges,
                            pretokenizer_spec=_byte_level_pretokenizer(pre),
                            normalizer_spec=_normalizer_steps(data.get("normalizer")),
                            ignore_merges=bool(model.get("ignore_merges", False)), **common)

    # SentencePiece family
    norm = _flatten(data.get("normalizer"), "normalizers")
    prefix_scheme = None
    escape = False
    for n in norm:
        kind = n.get("type")
        if kind == "Prepend" and n.get("prepend") == SPACE_SYMBOL:
            prefix_scheme = "always"
        elif kind == "Replace" and _pattern(n) == (" ", True) and n.get("content") == SPACE_SYMBOL:
            escape = True
        else:
            raise _Unsupported(f"normalizer {kind} in a SentencePiece-style tokenizer")
    for p in _flatten(pre, "pretokenizers"):
        if p.get("type") != "Metaspace":
            raise _Unsupported(f"pre-tokenizer {p.get('type')} in a SentencePiece-style tokenizer")
        escape = True
        scheme = p.get("prepend_scheme")
        if scheme is None:  # older files: add_prefix_space
            scheme = "always" if p.get("add_prefix_space", True) else "never"
        prefix_scheme = None if scheme == "never" else scheme
    if not escape:
        raise _Unsupported("neither a byte-level nor a SentencePiece-style BPE (no ByteLevel, no '▁' handling)")
    if unk_id is not None:
        types[unk_id] = UNKNOWN  # "<unk>" decodes as sentencepiece's " \u2047 "
    byte_fallback = bool(model.get("byte_fallback", False))
    if byte_fallback:
        for i, p in enumerate(pieces):
            if len(p) == 6 and p.startswith("<0x") and p.endswith(">") and types[i] == NORMAL:
                types[i] = BYTE
    from .sentencepiece import SentencePieceBPE
    return SentencePieceBPE(pieces, types, merges=merges,
                            add_dummy_prefix=prefix_scheme is not None,
                            prefix_scheme=prefix_scheme or "always",
                            remove_extra_whitespaces=False, byte_fallback=byte_fallback, **common)
