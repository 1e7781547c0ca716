"""Byte-level BPE, the tokenizer of GPT-2, Llama 3, Qwen 2 and SmolLM2.

How a text becomes ids:

1. (rare) a normalizer rewrites the text (`normalize.py`);
2. the pre-tokenizer regex cuts it into pieces (`pretokenize.py`):
   "Hello world!" -> ["Hello", " world", "!"];
3. each piece is turned into its UTF-8 bytes and every byte into one
   *printable* character, so that the vocabulary can be stored as text.
   Bytes that are printable Latin-1 characters stand for themselves; the 68
   others (controls, space, soft hyphen...) are moved to U+0100 and up, in
   order. So the space byte 0x20 is written "Ġ" (U+0120) and the newline
   0x0A is "Ċ" (U+010A): " world" -> "Ġworld";
4. BPE merges adjacent symbols by rank (`bpe.py`): "Ġ w o r l d" ->
   "Ġworld" if the merges allow; each final symbol is a vocabulary piece.

Because every byte normally has a vocabulary entry, any text encodes without
an unknown token. (Some vocabularies lack a few bytes: SmolLM2 has no piece
for 21 of them, e.g. 0x04 and 0xFF. Such a byte is dropped before merging,
exactly as Hugging Face `tokenizers` does; `missing_bytes` lists them.)
Decoding is the reverse table: piece -> bytes, join, read as UTF-8 (one
U+FFFD per malformed subsequence, as Hugging Face does).

Speed: most text is made of a few thousand distinct words, so the ids of
each piece are cached; the merge loop runs once per distinct piece.

What is not handled: BPE dropout, `continuing_subword_prefix` /
`end_of_word_suffix` (WordPiece-style BPE), added tokens with
`lstrip`/`rstrip`/`single_word` options.

    >>> BYTE_TO_CHAR[0x20], BYTE_TO_CHAR[0x0A], BYTE_TO_CHAR[ord("a")]
    ('Ġ', 'Ċ', 'a')
"""

from __future__ import annotations

from typing import Optional

from .base import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer
from .bpe import bpe_merge
from .normalize import Normalizer
from .pretokenize import PreTokenizer


def _bytes_to_chars() -> list[str]:
    """GPT-2's byte -> printable character table (see module doc, step 3)."""
    printable = (set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
                 | set(range(ord("®"), ord("ÿ") + 1)))
    table, moved = [], 0
    for b in range(256):
        if b in printable:
            table.append(chr(b))
        else:
            table.append(chr(256 + moved))
            moved += 1
    return table


#: byte value -> the character that stands for it in the vocabulary
BYTE_TO_CHAR: list[str] = _bytes_to_chars()
#: the reverse table
CHAR_TO_BYTE: dict[str, int] = {c: b for b, c in enumerate(BYTE_TO_CHAR)}
# str.translate table: after bytes.decode("latin-1") each byte b is chr(b).
_LATIN1_TO_VOCAB = {b: c for b, c in enumerate(BYTE_TO_CHAR)}


def piece_to_bytes(piece: str) -> bytes:
    """The bytes a byte-level vocabulary piece stands for ("Ġworld" -> b" world").

    A piece with a character outside the table (an added token written in
    plain text) stands for its own UTF-8, as in Hugging Face's decoder."""
    try:
        return bytes([CHAR_TO_BYTE[c] for c in piece])
    except KeyError:
        return piece.encode("utf-8")


class ByteLevelBPE(Tokenizer):
    """Byte-level BPE tokenizer (see module doc).

    merges: the ranked merge list, best first, each a (left, right) pair of
    vocabulary pieces. pretokenizer_spec / normalizer_spec: see `PreTokenizer`
    and `Normalizer`. ignore_merges: a piece that is itself in the vocabulary
    is one token, without merging (Llama 3's tokenizer.json sets this).
    """

    family = "byte_level"
    _utf8_errors = "replace"

    def __init__(self, pieces: list[str], token_types: list[int],
                 merges: list[tuple[str, str]], *,
                 pretokenizer_spec: list[dict], normalizer_spec: Optional[list[dict]] = None,
                 ignore_merges: bool = False, **common):
        super().__init__(pieces, token_types, **common)
        self.merges = [(str(a), str(b)) for a, b in merges]
        ranks: dict[tuple[str, str], int] = {}
        for rank, pair in enumerate(self.merges):
            ranks.setdefault(pair, rank)  # a repeated merge keeps its best rank
        self._ranks = ranks
        self.pretokenizer = PreTokenizer(pretokenizer_spec)
        self.normalizer = Normalizer(normalizer_spec or [])
        self.ignore_merges = bool(ignore_merges)
        self._cache: dict[str, tuple[int, ...]] = {}
        # id -> bytes for decoding
        self._id_bytes = [piece_to_bytes(p) if t in (NORMAL, BYTE, UNKNOWN) else p.encode("utf-8")
                          for p, t in zip(self.pieces, self.token_types)]
        #: bytes that have no piece: text holding them cannot round-trip
        self.missing_bytes = bytes(b for b, c in enumerate(BYTE_TO_CHAR) if c not in self._piece_to_id)
        self._to_vocab = dict(_LATIN1_TO_VOCAB)
        for b in self.missing_bytes:
            self._to_vocab[b] = None

    def _always_matched(self) -> set[int]:
        return {i for i, t in enumerate(self.token_types) if t == USER_DEFINED}

    # ---------------------------------------------------------------- encode
    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        if self.normalizer:
            text = self.normalizer(text)
        return self._encode_cached(self.pretokenizer.split(text), self._encode_piece)

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        """Ids of one pre-tokenizer piece: bytes -> vocabulary characters -> BPE."""
        # A byte the vocabulary lacks (SmolLM2 has no piece for some ASCII
        # control bytes) is dropped here, before merging, as Hugging Face
        # does (its neighbours may then merge): `_to_vocab` deletes it.
        chars = piece.encode("utf-8").decode("latin-1").translate(self._to_vocab)
        vocab = self._piece_to_id
        if self.ignore_merges and chars in vocab:
            return (vocab[chars],)
        return tuple(map(vocab.__getitem__, bpe_merge(list(chars), self._ranks)))

    # ---------------------------------------------------------------- decode
    def _token_bytes(self, token_id: int, state: list, skip_special: bool) -> bytes:
        if skip_special and self.token_types[token_id] == CONTROL:
            return b""
        return self._id_bytes[token_id]

    def decode_bytes(self, ids, skip_special: bool = False) -> bytes:
        # The same as the base class, without the per-token method call.
        idb, types, n = self._id_bytes, self.token_types, self.vocab_size
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                self._check_decode_id(i)
            if skip_special and types[i] == CONTROL:
                continue
            out.append(idb[i])
        return b"".join(out)

    # ---------------------------------------------------------------- export
    def to_dict(self) -> dict:
        d = super().to_dict()
        d.update(family=self.family, merges=[[a, b] for a, b in self.merges],
                 pretokenizer=self.pretokenizer.spec, normalizer=self.normalizer.spec,
                 ignore_merges=self.ignore_merges)
        return d
