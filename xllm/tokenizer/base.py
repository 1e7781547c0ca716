"""What every xllm tokenizer shares: the vocabulary, special tokens, decoding.

A tokenizer maps text to a list of token ids and back. The two families
(`byte_level.ByteLevelBPE`, `sentencepiece.SentencePieceBPE`) differ in how
they cut ordinary text into pieces (`_encode_ordinary`) and in how a token
turns back into bytes (`_token_bytes`); the rest lives here:

* **Token types.** Every id has a type, numbered as in SentencePiece and GGUF
  (`tokenizer.ggml.token_type`): NORMAL 1, UNKNOWN 2, CONTROL 3 (`<s>`,
  `<|im_start|>`), USER_DEFINED 4, UNUSED 5, BYTE 6 (`<0x0A>`).
* **Special tokens in text.** `encode(text)` treats `text` as something a
  user typed: a literal "<|im_end|>" in it is encoded as the characters
  `<`, `|`, `im`, ... and never as the control token, so a user cannot forge
  the end of a chat turn. The chat template, which knows where the real
  special tokens go, calls `encode(..., allow_special=True)`; then every
  CONTROL (and UNKNOWN) token's text is recognised, longest first.

      >>> tok.encode("<|im_end|>")                      # doctest: +SKIP
      [44, 108, 306, 79, 486, 108, 46]
      >>> tok.encode("<|im_end|>", allow_special=True)  # doctest: +SKIP
      [2]

  USER_DEFINED tokens of a byte-level model are matched in all text, as
  Hugging Face `tokenizers` and llama.cpp do; in a SentencePiece model they
  are matched by the BPE itself, as `sentencepiece` does.
* **Decoding.** Each id becomes bytes, the bytes are joined and read as
  UTF-8. A token may hold part of a character (byte tokens, or byte-level
  pieces of an emoji), so only the joined bytes are decodable; malformed
  sequences become U+FFFD. `decode(ids, skip_special=True)` drops CONTROL
  tokens (BOS, EOS, `<|im_start|>`...); otherwise they appear as their text.
* **Streaming.** `stream_decoder()` returns an object that takes one id at a
  time and returns only complete characters (see `StreamDecoder`).
"""

from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING, Iterable, Optional

if TYPE_CHECKING:
    from .stream import StreamDecoder

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

WORD_CACHE_LIMIT = 200_000   # distinct words `_encode_cached` keeps before it restarts

#: Texts of end-of-turn tokens: generation stops on them too when present.
END_OF_TURN_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|endoftext|>",
    "<|end|>", "<end_of_turn>", "</s>",
)


def _replace_each_byte(err: UnicodeDecodeError) -> tuple[str, int]:
    """UTF-8 error handler: one U+FFFD per malformed byte (sentencepiece's rule).

    Python's own "replace" writes one U+FFFD per *maximal malformed
    subsequence* (b"\\xe2\\x82" -> one U+FFFD), which is what Hugging Face
    byte-level decoding does; sentencepiece writes one per byte."""
    return "\ufffd" * (err.end - err.start), err.end


codecs.register_error("xllm_replace_each_byte", _replace_each_byte)


class Tokenizer:
    """Base class; use `load_tokenizer()` to get one.

    Attributes a caller may read: `vocab_size`, `bos_id`, `eos_id`,
    `eos_ids` (every id that ends generation), `add_bos` (whether the model
    expects BOS before a prompt), `add_eos`, `unk_id`, `pad_id`, `family`
    ("byte_level" or "sentencepiece"), `pieces` (id -> piece string),
    `token_types` (id -> type, see module doc).
    """

    family = ""
    #: errors= argument for bytes.decode: how malformed UTF-8 becomes text.
    _utf8_errors = "replace"

    def __init__(self, pieces: list[str], token_types: list[int], *,
                 bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 eos_ids: Iterable[int] = (), unk_id: Optional[int] = None,
                 pad_id: Optional[int] = None, add_bos: bool = False,
                 add_eos: bool = False, name: str = ""):
        if len(pieces) != len(token_types):
            raise ValueError(f"{len(pieces)} pieces but {len(token_types)} token types")
        self.pieces = list(pieces)
        self.token_types = [int(t) for t in token_types]
        self.vocab_size = len(self.pieces)
        self.name = name
        # piece -> id; if a piece occurs twice the first id wins.
        self._piece_to_id: dict[str, int] = {}
        for i, p in enumerate(self.pieces):
            self._piece_to_id.setdefault(p, i)
        self.bos_id = self._check_id(bos_id)
        self.eos_id = self._check_id(eos_id)
        self.unk_id = self._check_id(unk_id)
        self.pad_id = self._check_id(pad_id)
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.add_eos = bool(add_eos) and self.eos_id is not None
        stops = [self.eos_id] + [self._check_id(i) for i in eos_ids]
        stops += [self._piece_to_id[t] for t in END_OF_TURN_TEXTS
                  if t in self._piece_to_id and self.token_types[self._piece_to_id[t]] == CONTROL]
        self.eos_ids: tuple[int, ...] = tuple(dict.fromkeys(i for i in stops if i is not None))

        # Special tokens recognised in text with allow_special=True: CONTROL
        # and UNKNOWN ones, plus those of `_always_matched()`.
        always = self._always_matched()
        special = {p: i for i, p in enumerate(self.pieces)
                   if self.token_types[i] in (CONTROL, UNKNOWN) or i in always}
        self._special_re = _alternation(special)
        self._special_ids = {p: special[p] for p in special}
        self._always_re = _alternation({self.pieces[i]: i for i in always})

    # ---------------------------------------------------------------- helpers
    def _check_id(self, i) -> Optional[int]:
        if i is None:
            return None
        i = int(i)
        return i if 0 <= i < len(self.pieces) else None

    def _always_matched(self) -> set[int]:
        """Ids matched in any text, even without allow_special (family-specific)."""
        return set()

    # ---------------------------------------------------------------- lookup
    def token_to_id(self, piece: str) -> Optional[int]:
        """The id of the vocabulary piece `piece` (as stored: "<|im_start|>",
        "Ġthe", "▁the", "<0x0A>"), or None."""
        return self._piece_to_id.get(piece)

    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary piece of `token_id`, as stored in the vocabulary."""
        return self.pieces[token_id]

    def is_special(self, token_id: int) -> bool:
        """True for CONTROL tokens (what `skip_special=True` drops)."""
        return self.token_types[token_id] == CONTROL

    # ---------------------------------------------------------------- encode
    def encode(self, text: str, add_bos: bool = False, allow_special: bool = False,
               add_eos: bool = False) -> list[int]:
        """Token ids of `text`.

        add_bos / add_eos: put BOS first / EOS last (the model's own convention
        is in `self.add_bos`). allow_special: recognise the text of special
        tokens (e.g. "<|im_start|>") as those tokens; leave False for text a
        user typed."""
        try:
            return self._encode(text, add_bos, allow_special, add_eos)
        except UnicodeEncodeError:
            # Lone surrogates ("\ud800") are not text UTF-8 can hold: read them
            # as U+FFFD (valid surrogate pairs become their character).
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return self._encode(text, add_bos, allow_special, add_eos)

    def _encode(self, text: str, add_bos: bool, allow_special: bool, add_eos: bool) -> list[int]:
        ids: list[int] = []
        if add_bos and self.bos_id is not None:
            ids.append(self.bos_id)
        rx = self._special_re if allow_special else self._always_re
        if rx is None:
            if text:
                ids.extend(self._encode_ordinary(text, True))
        else:
            # re.split with one capturing group: [text, special, text, special, ..., text]
            parts = rx.split(text)
            for k, part in enumerate(parts):
                if k % 2:
                    ids.append(self._special_ids[part])
                elif part:
                    ids.extend(self._encode_ordinary(part, k == 0))
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode_ordinary(self, text: str, at_start: bool) -> list[int]:
        """Ids of text that holds no special token. `at_start`: the text opens
        the input (rather than following a special token)."""
        raise NotImplementedError

    def _encode_cached(self, words, encode_word) -> list[int]:
        """The ids of each word in turn, each distinct word encoded once with
        `encode_word` and remembered (text repeats words: this is most of the
        speed). The cache restarts past WORD_CACHE_LIMIT distinct words."""
        cache = self._cache
        ids: list[int] = []
        for word in words:
            got = cache.get(word)
            if got is None:
                got = encode_word(word)
                if len(cache) >= WORD_CACHE_LIMIT:
                    cache.clear()
                cache[word] = got
            ids.extend(got)
        return ids

    # ---------------------------------------------------------------- decode
    def _decode_state(self) -> list:
        """Mutable per-sequence state `_token_bytes` may use (SentencePiece's
        leading-space rule needs to know whether anything was written yet)."""
        return []

    def _token_bytes(self, token_id: int, state: list, skip_special: bool) -> bytes:
        """The bytes that `token_id` adds to the output."""
        raise NotImplementedError

    def _check_decode_id(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id

    def decode_bytes(self, ids: Iterable[int], skip_special: bool = False) -> bytes:
        """The raw bytes of `ids`, before UTF-8 decoding."""
        state = self._decode_state()
        tb, check = self._token_bytes, self._check_decode_id
        return b"".join([tb(check(int(i)), state, skip_special) for i in ids])

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of `ids`. Special tokens appear as their text unless
        `skip_special`; malformed UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, skip_special).decode("utf-8", self._utf8_errors)

    def stream_decoder(self, skip_special: bool = False, prefix_ids: Iterable[int] = ()) -> "StreamDecoder":
        """An incremental decoder: `.push(id)` returns the new text (maybe "")
        and `.flush()` the rest. `prefix_ids`: ids already shown (the prompt);
        the stream then yields only what the new ids add after them (this
        matters for SentencePiece, which drops the leading space of the first
        word of a text but not of a continuation)."""
        from .stream import StreamDecoder
        return StreamDecoder(self, skip_special=skip_special, prefix_ids=prefix_ids)

    # ---------------------------------------------------------------- export
    def to_dict(self) -> dict:
        """Everything needed to rebuild this tokenizer (see `from_dict`)."""
        return {
            "pieces": self.pieces,
            "token_types": self.token_types,
            "bos_id": self.bos_id,
            "eos_id": self.eos_id,
            "eos_ids": list(self.eos_ids),
            "unk_id": self.unk_id,
            "pad_id": self.pad_id,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
            "name": self.name,
        }

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, add_bos={self.add_bos})")


def _alternation(tokens: dict[str, int]) -> Optional[re.Pattern]:
    """One capturing regex matching any of `tokens`, longest first (so that
    "<|im_start|>" wins over a shorter token that is its prefix)."""
    alts = sorted((t for t in tokens if t), key=lambda t: (-len(t), t))
    if not alts:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in alts) + ")")
