"""SentencePiece BPE, the tokenizer of Llama 2 (and Mistral, TinyLlama...).

How a text becomes ids (the same steps as `sentencepiece`'s C++ code):

1. normalize (`spm_normalizer.py`): spaces become "▁" (U+2581) and a "▁" is
   put in front of the text, the *dummy prefix*:
   "Hello world" -> "▁Hello▁world";
2. cut into characters: "▁ H e l l o ▁ w o r l d";
3. merge: among adjacent pairs whose concatenation is a vocabulary piece,
   merge the one whose piece has the highest *score* (ties: leftmost), and
   repeat (`bpe.py`). Llama 2's scores make "▁Hello" and "▁world" win;
4. look each final symbol up. A character that is not in the vocabulary
   (a rare CJK character, an emoji) is *byte fallback*-encoded: one `<0xXX>`
   token per UTF-8 byte, e.g. "😀" -> <0xF0> <0x9F> <0x98> <0x80>. Without
   byte fallback it becomes `<unk>` (a run of unknown characters gives one).

Control tokens (`<s>`, `</s>`) are never produced from text unless the caller
passes `allow_special=True`, and a text cut by special tokens gets a dummy
prefix on each part, as llama.cpp and Hugging Face's Llama tokenizer do.
User-defined pieces are always kept whole and never merged further.

Decoding reverses the steps: "▁" -> " ", byte tokens are joined and read as
UTF-8 (one U+FFFD per malformed byte, sentencepiece's rule), and the space
that the dummy prefix created is removed from the first piece of the text:
decode(encode(" Hi")) == " Hi", decode(encode("Hi")) == "Hi".

Speed: no piece of Llama 2's vocabulary holds a "▁" after another character,
so merges never cross the start of a "▁" run; the normalized text is cut
there into words ("▁Hello", "▁world") and each distinct word is merged once
and cached. (When a vocabulary breaks that rule the whole text is merged at
once, which is still O(n log n).)

Also accepted: merges by rank instead of scores (a Hugging Face
tokenizer.json of this family), and the "unused" pieces of sentencepiece
(merged, then split back into the pair that formed them). Not handled:
unigram models, BPE dropout, `treat_whitespace_as_suffix`.
"""

from __future__ import annotations

import re
from typing import Optional

from .base import BYTE, CONTROL, NORMAL, UNKNOWN, UNUSED, USER_DEFINED, Tokenizer
from .bpe import bpe_merge
from .spm_normalizer import SPACE_SYMBOL, SentencePieceNormalizer

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# A word: a run of "▁" and what follows up to the next "▁", or a first word without "▁".
_WORD = re.compile(f"{SPACE_SYMBOL}+[^{SPACE_SYMBOL}]*|[^{SPACE_SYMBOL}]+")


class SentencePieceBPE(Tokenizer):
    """SentencePiece-style BPE tokenizer (see module doc).

    scores: id -> score (a tokenizer.model or GGUF), or merges: ranked
    (left, right) pairs (a tokenizer.json); one of the two.
    prefix_scheme: where the dummy prefix goes when special tokens cut the
    text: "always" (each part; llama.cpp, HF legacy) or "first" (only at the
    start of the text; HF Metaspace prepend_scheme="first").
    """

    family = "sentencepiece"
    _utf8_errors = "xllm_replace_each_byte"

    def __init__(self, pieces: list[str], token_types: list[int], *,
                 scores: Optional[list[float]] = None,
                 merges: Optional[list[tuple[str, str]]] = None,
                 add_dummy_prefix: bool = True, remove_extra_whitespaces: bool = False,
                 escape_whitespaces: bool = True, byte_fallback: bool = True,
                 unk_surface: str = " \u2047 ", normalization: str = "identity",
                 precompiled_charsmap: bytes = b"", prefix_scheme: str = "always",
                 **common):
        super().__init__(pieces, token_types, **common)
        if (scores is None) == (merges is None):
            raise ValueError("give exactly one of scores and merges")
        if prefix_scheme not in ("always", "first"):
            raise ValueError(f"prefix_scheme must be 'always' or 'first', not {prefix_scheme!r}")
        types = self.token_types
        self.scores = None if scores is None else [float(s) for s in scores]
        self.merges = None if merges is None else [(str(a), str(b)) for a, b in merges]
        self.add_dummy_prefix = bool(add_dummy_prefix)
        self.remove_extra_whitespaces = bool(remove_extra_whitespaces)
        self.escape_whitespaces = bool(escape_whitespaces)
        self.byte_fallback = bool(byte_fallback)
        self.unk_surface = unk_surface
        self.normalization = normalization
        self.precompiled_charsmap = bytes(precompiled_charsmap or b"")
        self.prefix_scheme = prefix_scheme

        user_defined = [p for p, t in zip(self.pieces, types) if t == USER_DEFINED]
        self.normalizer = SentencePieceNormalizer(
            self.precompiled_charsmap, add_dummy_prefix=self.add_dummy_prefix,
            remove_extra_whitespaces=self.remove_extra_whitespaces,
            escape_whitespaces=self.escape_whitespaces, user_defined=user_defined)
        # User-defined pieces are matched whole, longest first, and never merged.
        self._user_re = (re.compile("(" + "|".join(re.escape(u) for u in sorted(user_defined, key=len, reverse=True)) + ")")
                         if user_defined else None)

        # The pieces BPE may produce (sentencepiece's `pieces_`): normal,
        # user-defined and unused ones; control, unknown and byte pieces are
        # reachable only by id.
        if self.scores is not None:
            if len(self.scores) != self.vocab_size:
                raise ValueError(f"{len(self.scores)} scores for {self.vocab_size} pieces")
            self._mergeable = {p: i for i, p in enumerate(self.pieces) if types[i] in (NORMAL, USER_DEFINED, UNUSED)}
            # Merging (left, right) makes the piece left+right; its priority is
            # minus that piece's score. Listed for every way to cut each piece.
            priorities: dict[tuple[str, str], float] = {}
            for p, i in self._mergeable.items():
                for k in range(1, len(p)):
                    priorities[(p[:k], p[k:])] = -self.scores[i]
            products = list(self._mergeable)
        else:
            self._mergeable = {p: i for i, p in enumerate(self.pieces) if types[i] != CONTROL}
            priorities = {}
            for r, pair in enumerate(self.merges):
                priorities.setdefault(pair, r)
            products = [a + b for a, b in self.merges]
        self._priorities = priorities
        self._has_unused = UNUSED in types
        # Merges never cross the start of a "▁" run unless some piece has "▁"
        # right after another character (see module doc).
        lone = re.compile(f"[^{SPACE_SYMBOL}]{SPACE_SYMBOL}")
        self._split_words = not any(lone.search(p) for p in products + user_defined)

        self._byte_ids: list[Optional[int]] = [None] * 256
        for i, (p, t) in enumerate(zip(self.pieces, types)):
            m = _BYTE_PIECE.fullmatch(p)
            if m and (t == BYTE or (self.byte_fallback and t != CONTROL)):
                self._byte_ids[int(m.group(1), 16)] = i
        if self.byte_fallback and None in self._byte_ids:
            raise ValueError("byte_fallback is on but some of the 256 <0x..> byte pieces are missing")
        if self.unk_id is None:
            self.unk_id = next((i for i, t in enumerate(types) if t == UNKNOWN), None)
        if not self.byte_fallback and self.unk_id is None:
            raise ValueError("the vocabulary has no unknown piece and no byte fallback")
        self._cache: dict[str, tuple[int, ...]] = {}

        # Decoding: id -> bytes.
        self._id_bytes: list[bytes] = []
        for p, t in zip(self.pieces, types):
            m = _BYTE_PIECE.fullmatch(p)
            if t == BYTE and m:
                self._id_bytes.append(bytes([int(m.group(1), 16)]))
            elif t == UNKNOWN:
                self._id_bytes.append(unk_surface.encode("utf-8"))
            elif t == CONTROL:
                self._id_bytes.append(p.encode("utf-8"))
            else:
                self._id_bytes.append(p.replace(SPACE_SYMBOL, " ").encode("utf-8"))
        self._strip_first_space = self.add_dummy_prefix or self.remove_extra_whitespaces

    # ---------------------------------------------------------------- encode
    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        norm = self.normalizer.normalize(text, add_prefix=at_start or self.prefix_scheme == "always")
        if not norm:
            return []
        ids = self._encode_cached(_WORD.findall(norm) if self._split_words else (norm,), self._encode_word)
        if not self.byte_fallback and self.unk_id is not None:
            ids = _fuse_runs(ids, self.unk_id)
        return ids

    def _encode_word(self, word: str) -> tuple[int, ...]:
        ids: list[int] = []
        parts = self._user_re.split(word) if self._user_re else (word,)
        for k, part in enumerate(parts):
            if k % 2:  # a user-defined piece
                ids.append(self._mergeable[part])
            elif part:
                pushed: Optional[dict[str, tuple[str, str]]] = {} if self._has_unused else None
                for sym in bpe_merge(list(part), self._priorities, pushed):
                    self._emit(sym, ids, pushed)
        return tuple(ids)

    def _emit(self, sym: str, ids: list[int], pushed) -> None:
        i = self._mergeable.get(sym)
        if i is None:  # a character outside the vocabulary
            if self.byte_fallback:
                ids.extend(self._byte_ids[b] for b in sym.encode("utf-8"))
            else:
                ids.append(self.unk_id)
        elif pushed is not None and self.token_types[i] == UNUSED and sym in pushed:
            left, right = pushed[sym]  # split an unused piece back into its pair
            self._emit(left, ids, pushed)
            self._emit(right, ids, pushed)
        else:
            ids.append(i)

    # ---------------------------------------------------------------- decode
    def _decode_state(self) -> list:
        # [at_start]: nothing written yet and no dummy-prefix space consumed
        return [True]

    def _token_bytes(self, token_id: int, state: list, skip_special: bool) -> bytes:
        t = self.token_types[token_id]
        b = self._id_bytes[token_id]
        if t == CONTROL:
            if skip_special:
                return b""
        elif state[0] and t != BYTE and t != UNKNOWN and self._strip_first_space and b[:1] == b" " \
                and self.pieces[token_id].startswith(SPACE_SYMBOL):
            # The first piece of the text: drop the space the dummy prefix made.
            b = b[1:]
            if not self.remove_extra_whitespaces:
                state[0] = False
        if b:
            state[0] = False
        return b

    # ---------------------------------------------------------------- export
    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(family=self.family, scores=self.scores,
                 merges=None if self.merges is None else [[a, b] for a, b in self.merges],
                 add_dummy_prefix=self.add_dummy_prefix,
                 remove_extra_whitespaces=self.remove_extra_whitespaces,
                 escape_whitespaces=self.escape_whitespaces, byte_fallback=self.byte_fallback,
                 unk_surface=self.unk_surface, normalization=self.normalization,
                 precompiled_charsmap=self.precompiled_charsmap.hex(),
                 prefix_scheme=self.prefix_scheme)
        return d

    @classmethod
    def from_dict(cls, d: dict, common: dict) -> "SentencePieceBPE":
        merges = d.get("merges")
        return cls(d["pieces"], d["token_types"], scores=d.get("scores"),
                   merges=None if merges is None else [tuple(m) for m in merges],
                   add_dummy_prefix=bool(d.get("add_dummy_prefix", True)),
                   remove_extra_whitespaces=bool(d.get("remove_extra_whitespaces", False)),
                   escape_whitespaces=bool(d.get("escape_whitespaces", True)),
                   byte_fallback=bool(d.get("byte_fallback", True)),
                   unk_surface=d.get("unk_surface", " \u2047 "),
                   normalization=d.get("normalization", "identity"),
                   precompiled_charsmap=bytes.fromhex(d.get("precompiled_charsmap") or ""),
                   prefix_scheme=d.get("prefix_scheme", "always"), **common)


def _fuse_runs(ids: list[int], unk: int) -> list[int]:
    """Collapse each run of `unk` into one (sentencepiece merges adjacent unknowns)."""
    out: list[int] = []
    for i in ids:
        if i == unk and out and out[-1] == unk:
            continue
        out.append(i)
    return out
