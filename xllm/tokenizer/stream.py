"""Streaming detokenization: text for one new token id at a time.

A chat front-end prints each token as soon as it is sampled. Decoding each id
on its own is wrong in two ways:

1. A character may be split over several tokens. "é" is the bytes C3 A9; a
   byte-level model may emit them as two tokens, and SentencePiece's byte
   fallback emits `<0xC3>` `<0xA9>`. Decoding `<0xC3>` alone would print a
   U+FFFD and then another one for `<0xA9>`.
2. SentencePiece drops the space that opens the first word of a text
   ("▁Hello" -> "Hello"), but not of later words.

`StreamDecoder` keeps the per-sequence state of `Tokenizer._token_bytes`
(which knows rule 2) and feeds the bytes to Python's incremental UTF-8
decoder, which holds back an incomplete character until its last byte
arrives. Hence the guarantee: the concatenation of everything `push` and
`flush` return equals `tokenizer.decode(all ids)`, and no returned chunk ends
in a broken character.

With Llama 2, "😀" is four byte tokens; the first three print nothing::

    >>> dec = llama2.stream_decoder()                             # doctest: +SKIP
    >>> [dec.push(i) for i in llama2.encode("née 😀")] + [dec.flush()]  # doctest: +SKIP
    ['n', 'ée', ' ', '', '', '', '😀', '']
"""

from __future__ import annotations

import codecs
from typing import Iterable, TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Tokenizer


class StreamDecoder:
    """Incremental decoder of one token sequence (see module doc)."""

    def __init__(self, tokenizer: "Tokenizer", skip_special: bool = False,
                 prefix_ids: Iterable[int] = ()):
        self._tok = tokenizer
        self._skip = skip_special
        self._state = tokenizer._decode_state()
        self._utf8 = codecs.getincrementaldecoder("utf-8")(tokenizer._utf8_errors)
        # The prefix (e.g. the prompt) moves the state along; its text is not returned.
        for i in prefix_ids:
            self._utf8.decode(tokenizer._token_bytes(int(i), self._state, skip_special))

    def push(self, token_id: int) -> str:
        """Text that `token_id` completes; "" while a character is unfinished."""
        tok = self._tok
        data = tok._token_bytes(tok._check_decode_id(int(token_id)), self._state, self._skip)
        return self._utf8.decode(data) if data else ""

    def flush(self) -> str:
        """The end of the stream: an unfinished character becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)
