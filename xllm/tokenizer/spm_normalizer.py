"""SentencePiece's text normalizer, including its precompiled character map.

Before BPE, SentencePiece rewrites the text (normalizer.cc):

1. each character is replaced by the *precompiled charsmap*, if the model
   has one (models trained with the default rule "nmt_nfkc" do: roughly
   Unicode NFKC plus a few fixes; Llama 2 uses "identity" and has none);
2. with `remove_extra_whitespaces`, leading, trailing and repeated spaces go;
3. spaces become "▁" (`escape_whitespaces`), and a "▁" is put in front
   (`add_dummy_prefix`) so that "world" and "hello world" both give "▁world".

The charsmap is a byte string: a uint32 trie size, a *darts-clone double
array* trie over UTF-8 byte strings, then the replacement strings, each
ending in NUL. The trie is an array of uint32 "units"; walking it for one
input byte b from node `pos` is `pos ^= offset(unit); pos ^= b`, and the
step is valid when the unit reached has label b. A unit with its leaf bit
set marks the end of a key; the value unit then gives where its replacement
starts. SentencePiece replaces the *longest* key that prefixes the rest of
the input, and copies one character when no key matches.

    >>> n = SentencePieceNormalizer(b"", add_dummy_prefix=True, remove_extra_whitespaces=True)
    >>> n.normalize("  Hello   world ", add_prefix=True)
    '▁Hello▁world'
"""

from __future__ import annotations

import struct
from typing import Optional

SPACE_SYMBOL = "\u2581"  # ▁


def _utf8_len(lead: int) -> int:
    if lead < 0x80:
        return 1
    if lead >= 0xF0:
        return 4
    if lead >= 0xE0:
        return 3
    if lead >= 0xC0:
        return 2
    return 1


class CharsMap:
    """A precompiled charsmap: longest-prefix replacement over UTF-8 bytes."""

    def __init__(self, blob: bytes):
        if len(blob) <= 4:
            raise ValueError("precompiled charsmap is too short")
        (trie_size,) = struct.unpack_from("<I", blob, 0)
        if trie_size >= len(blob) or trie_size % 4:
            raise ValueError("precompiled charsmap trie size is invalid")
        self.units = struct.unpack_from(f"<{trie_size // 4}I", blob, 4)
        self.normalized = blob[4 + trie_size:]
        self._cache: dict[str, tuple[bytes, int]] = {}

    def longest_prefix(self, data: bytes, pos: int) -> tuple[int, int]:
        """(length, value) of the longest key that is a prefix of data[pos:], or (0, 0)."""
        units = self.units
        unit = units[0]
        node = (unit >> 10) << ((unit & (1 << 9)) >> 6)  # offset of the root
        best_len, best_value = 0, 0
        for i in range(pos, len(data)):
            b = data[i]
            node ^= b
            if node >= len(units):
                break
            unit = units[node]
            if unit & ((1 << 31) | 0xFF) != b:  # label mismatch: no such edge
                break
            node ^= (unit >> 10) << ((unit & (1 << 9)) >> 6)
            if (unit >> 8) & 1:  # has a leaf: data[pos:i+1] is a key
                best_len, best_value = i + 1 - pos, units[node] & 0x7FFFFFFF
        return best_len, best_value

    def replacement(self, value: int) -> bytes:
        end = self.normalized.find(b"\0", value)
        return self.normalized[value:end if end >= 0 else len(self.normalized)]


class SentencePieceNormalizer:
    """Normalizes text exactly as sentencepiece's `Normalizer::Normalize` (see
    module doc). `user_defined`: pieces that are copied untouched."""

    def __init__(self, precompiled_charsmap: bytes = b"", *, add_dummy_prefix: bool = True,
                 remove_extra_whitespaces: bool = False, escape_whitespaces: bool = True,
                 user_defined: Optional[list[str]] = None):
        self.charsmap = CharsMap(precompiled_charsmap) if precompiled_charsmap else None
        self.add_dummy_prefix = add_dummy_prefix
        self.remove_extra_whitespaces = remove_extra_whitespaces
        self.escape_whitespaces = escape_whitespaces
        self._user = sorted({u.encode("utf-8") for u in (user_defined or []) if u}, key=len, reverse=True)

    def _prefix(self, data: bytes, pos: int) -> tuple[bytes, int]:
        """sentencepiece's NormalizePrefix: (replacement, bytes consumed)."""
        for u in self._user:
            if data.startswith(u, pos):
                return u, len(u)
        if self.charsmap is not None:
            length, value = self.charsmap.longest_prefix(data, pos)
            if length:
                return self.charsmap.replacement(value), length
        n = _utf8_len(data[pos])
        return data[pos:pos + n], n

    def normalize(self, text: str, add_prefix: bool = True) -> str:
        """The normalized text; `add_prefix`: put the dummy "▁" in front (if the
        model's add_dummy_prefix is on)."""
        if not text:
            return ""
        space = SPACE_SYMBOL if self.escape_whitespaces else " "
        if self.charsmap is None and not self._user:
            # Fast path (identity rule): only the whitespace handling.
            if self.remove_extra_whitespaces:
                text = " ".join(w for w in text.split(" ") if w)
                if not text:
                    return ""
            if self.escape_whitespaces:
                text = text.replace(" ", SPACE_SYMBOL)
            return space + text if add_prefix and self.add_dummy_prefix else text
        data = text.encode("utf-8", "replace")
        pos, n = 0, len(data)
        if self.remove_extra_whitespaces:  # leading spaces
            while pos < n:
                rep, length = self._prefix(data, pos)
                if rep != b" ":
                    break
                pos += length
            if pos == n:
                return ""
        out: list[bytes] = []
        if add_prefix and self.add_dummy_prefix:
            out.append(space.encode())
        is_prev_space = self.remove_extra_whitespaces
        space_b = space.encode()
        while pos < n:
            rep, length = self._prefix(data, pos)
            while is_prev_space and rep.startswith(b" "):
                rep = rep[1:]
            if rep:
                out.append(rep.replace(b" ", space_b) if self.escape_whitespaces else rep)
                is_prev_space = rep.endswith(b" ")
            pos += length
            if not self.remove_extra_whitespaces:
                is_prev_space = False
        result = b"".join(out)
        if self.remove_extra_whitespaces:
            while result.endswith(space_b):
                result = result[:-len(space_b)]
        return result.decode("utf-8", "replace")
