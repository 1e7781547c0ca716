"""Text normalizers: rewrite the text before it is cut into tokens.

Most Llama-family tokenizers need none (Llama 2's SentencePiece model uses
the "identity" rule; GPT-2, Llama 3 and SmolLM2 have no normalizer). A few
`tokenizer.json` files ask for one, e.g. Qwen 2's Unicode NFC. A normalizer
is a list of steps, each a plain dict (so it can be exported)::

    {"type": "nfc"} / {"type": "nfkc"} / {"type": "nfd"} / {"type": "nfkd"}
    {"type": "lowercase"}
    {"type": "replace", "pattern": " ", "content": "▁"}   # literal strings only
    {"type": "prepend", "prepend": "▁"}                   # only if text is not empty

    >>> Normalizer([{"type": "replace", "pattern": " ", "content": "▁"},
    ...             {"type": "prepend", "prepend": "▁"}])("Hi there")
    '▁Hi▁there'

Unicode normal forms follow the running Python's `unicodedata` version.
"""

from __future__ import annotations

import unicodedata
from typing import Callable


def _step(spec: dict) -> Callable[[str], str]:
    kind = spec.get("type", "").lower()
    if kind in ("nfc", "nfkc", "nfd", "nfkd"):
        form = kind.upper()
        return lambda s: unicodedata.normalize(form, s)
    if kind == "lowercase":
        return str.lower
    if kind == "replace":
        old, new = spec["pattern"], spec["content"]
        return lambda s: s.replace(old, new)
    if kind == "prepend":
        pre = spec["prepend"]
        return lambda s: pre + s if s else s
    raise ValueError(f"unsupported normalizer step {kind!r}")


class Normalizer:
    """Applies its steps in order (see module doc)."""

    def __init__(self, spec: list[dict]):
        self.spec = [dict(s) for s in spec]
        self._steps = [_step(s) for s in self.spec]

    def __call__(self, text: str) -> str:
        for step in self._steps:
            text = step(text)
        return text

    def __bool__(self) -> bool:
        return bool(self._steps)
