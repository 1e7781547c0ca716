"""Reading SentencePiece `tokenizer.model` files (and llama2.c `tokenizer.bin`) by hand.

A `tokenizer.model` is one serialized protobuf message, `ModelProto`
(sentencepiece_model.proto). Rather than depend on `protobuf` and
`sentencepiece`, we read the few fields we need with a 40-line decoder.

Protobuf wire format in brief: a message is a sequence of (key, value)
records. The key is a varint `field_number << 3 | wire_type`; a varint is
7 bits per byte, low bits first, high bit set on all but the last byte. Wire
type 0 is a varint value, 1 a fixed 8-byte value, 2 a length-prefixed byte
string (strings, bytes and nested messages), 5 a fixed 4-byte value (float).
Unknown fields are skipped, absent fields take their default.

The fields used (field numbers from sentencepiece_model.proto)::

    ModelProto      1 pieces (repeated SentencePiece)   2 trainer_spec   3 normalizer_spec
    SentencePiece   1 piece (string)   2 score (float)   3 type (enum, default NORMAL=1)
    TrainerSpec     3 model_type (1 unigram, 2 BPE, 3 word, 4 char)   24 treat_whitespace_as_suffix
                    35 byte_fallback   44 unk_surface   45 unk_piece   46 bos_piece
                    47 eos_piece   48 pad_piece
    NormalizerSpec  1 name   2 precompiled_charsmap   3 add_dummy_prefix (default true)
                    4 remove_extra_whitespaces (default true)   5 escape_whitespaces (default true)

    >>> list(iter_fields(bytes([0x0a, 0x02, 0x68, 0x69, 0x10, 0x96, 0x01])))
    [(1, 2, b'hi'), (2, 0, 150)]

llama2.c's `tokenizer.bin` is simpler: a uint32 max piece length, then for
each id a float32 score, a uint32 byte length and the UTF-8 piece, with "▁"
written as a space and BOS/EOS written as "\\n<s>\\n" / "\\n</s>\\n".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Union

from ..errors import ModelFormatError
from .base import BYTE, CONTROL, NORMAL, UNKNOWN


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode the varint at `pos`: (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def iter_fields(buf: bytes) -> Iterator[tuple[int, int, Union[int, bytes]]]:
    """(field_number, wire_type, value) for each record of one message."""
    pos, n = 0, len(buf)
    while pos < n:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > n:
                raise ValueError("truncated length-delimited field")
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            if pos + 4 > n:
                raise ValueError("truncated 32-bit field")
            value, pos = buf[pos:pos + 4], pos + 4
        elif wire == 1:
            if pos + 8 > n:
                raise ValueError("truncated 64-bit field")
            value, pos = buf[pos:pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if number == 0:
            raise ValueError("field number 0")
        yield number, wire, value


@dataclass
class SentencePieceModel:
    """The parts of a ModelProto that tokenization needs."""

    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = 1  # unigram is the proto default
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    unk_surface: str = " \u2047 "
    unk_piece: str = "<unk>"
    bos_piece: str = "<s>"
    eos_piece: str = "</s>"
    pad_piece: str = "<pad>"
    normalizer_name: str = ""
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


def _text(v: Union[int, bytes]) -> str:
    if not isinstance(v, bytes):
        raise ValueError("expected a string field")
    return v.decode("utf-8")


def parse_model_proto(buf: bytes) -> SentencePieceModel:
    """Decode a serialized ModelProto (raises ValueError when malformed)."""
    m = SentencePieceModel()
    for number, wire, value in iter_fields(buf):
        if number == 1 and wire == 2:  # SentencePiece
            piece, score, typ = None, 0.0, NORMAL
            for n2, w2, v2 in iter_fields(value):
                if n2 == 1 and w2 == 2:
                    piece = _text(v2)
                elif n2 == 2 and w2 == 5:
                    score = struct.unpack("<f", v2)[0]
                elif n2 == 3 and w2 == 0:
                    typ = v2
            if piece is None:
                raise ValueError(f"piece {len(m.pieces)} has no text")
            m.pieces.append(piece)
            m.scores.append(score)
            m.types.append(typ)
        elif number == 2 and wire == 2:  # TrainerSpec
            for n2, w2, v2 in iter_fields(value):
                if w2 == 0 and n2 == 3:
                    m.model_type = v2
                elif w2 == 0 and n2 == 24:
                    m.treat_whitespace_as_suffix = bool(v2)
                elif w2 == 0 and n2 == 35:
                    m.byte_fallback = bool(v2)
                elif w2 == 2 and n2 == 44:
                    m.unk_surface = _text(v2)
                elif w2 == 2 and n2 == 45:
                    m.unk_piece = _text(v2) or m.unk_piece
                elif w2 == 2 and n2 == 46:
                    m.bos_piece = _text(v2) or m.bos_piece
                elif w2 == 2 and n2 == 47:
                    m.eos_piece = _text(v2) or m.eos_piece
                elif w2 == 2 and n2 == 48:
                    m.pad_piece = _text(v2) or m.pad_piece
        elif number == 3 and wire == 2:  # NormalizerSpec
            for n2, w2, v2 in iter_fields(value):
                if w2 == 2 and n2 == 1:
                    m.normalizer_name = _text(v2)
                elif w2 == 2 and n2 == 2:
                    m.precompiled_charsmap = bytes(v2)
                elif w2 == 0 and n2 == 3:
                    m.add_dummy_prefix = bool(v2)
                elif w2 == 0 and n2 == 4:
                    m.remove_extra_whitespaces = bool(v2)
                elif w2 == 0 and n2 == 5:
                    m.escape_whitespaces = bool(v2)
    return m


_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}


def tokenizer_from_model_proto(m: SentencePieceModel, path: Union[str, Path] = "<model>"):
    """A `SentencePieceBPE` for a parsed model (BPE models only)."""
    from .sentencepiece import SentencePieceBPE

    if not m.pieces:
        raise ModelFormatError(path, "the SentencePiece model has no pieces")
    if m.model_type != 2:
        raise ModelFormatError(path, f"SentencePiece model type {_MODEL_TYPES.get(m.model_type, m.model_type)} "
                                     "is not supported (only BPE, as used by Llama)")
    if m.treat_whitespace_as_suffix:
        raise ModelFormatError(path, "treat_whitespace_as_suffix=true is not supported")

    def control_id(piece: str):
        for i, (p, t) in enumerate(zip(m.pieces, m.types)):
            if p == piece and t == CONTROL:
                return i
        return None

    unk = next((i for i, t in enumerate(m.types) if t == UNKNOWN), None)
    try:
        return SentencePieceBPE(
            m.pieces, m.types, scores=m.scores,
            add_dummy_prefix=m.add_dummy_prefix,
            remove_extra_whitespaces=m.remove_extra_whitespaces,
            escape_whitespaces=m.escape_whitespaces,
            byte_fallback=m.byte_fallback,
            unk_surface=m.unk_surface,
            normalization=m.normalizer_name or "identity",
            precompiled_charsmap=m.precompiled_charsmap,
            bos_id=control_id(m.bos_piece), eos_id=control_id(m.eos_piece),
            pad_id=control_id(m.pad_piece), unk_id=unk, add_bos=True,
            name=Path(str(path)).name)
    except ValueError as e:
        raise ModelFormatError(path, str(e))


def load_sentencepiece_model(path: Union[str, Path]):
    """Load a SentencePiece `tokenizer.model` file."""
    try:
        buf = Path(path).read_bytes()
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e.strerror or e}")
    try:
        m = parse_model_proto(buf)
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelFormatError(path, f"not a SentencePiece model file ({e})")
    return tokenizer_from_model_proto(m, path)


# ---------------------------------------------------------------- llama2.c


def _parse_llama2c(buf: bytes) -> tuple[list[str], list[float]]:
    if len(buf) < 4:
        raise ValueError("too short")
    (max_len,) = struct.unpack_from("<I", buf, 0)
    if not 0 < max_len < 4096:
        raise ValueError(f"implausible max token length {max_len}")
    pos, pieces, scores = 4, [], []
    while pos < len(buf):
        if pos + 8 > len(buf):
            raise ValueError("truncated entry")
        score, n = struct.unpack_from("<fI", buf, pos)
        pos += 8
        if n > max_len or pos + n > len(buf):
            raise ValueError(f"entry {len(pieces)} has length {n} (max {max_len})")
        pieces.append(buf[pos:pos + n].decode("utf-8"))
        scores.append(score)
        pos += n
    return pieces, scores


def looks_like_llama2c(path: Union[str, Path]) -> bool:
    """True if the file parses as a llama2.c tokenizer.bin."""
    try:
        _parse_llama2c(Path(path).read_bytes())
        return True
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return False


def load_llama2c_tokenizer(path: Union[str, Path]):
    """Load a llama2.c `tokenizer.bin` (a Llama-2-style SentencePiece vocabulary
    with scores). Types are inferred: id 0 `<unk>`, "\\n<s>\\n" and
    "\\n</s>\\n" control, `<0x..>` bytes, the rest normal."""
    from .sentencepiece import SentencePieceBPE

    try:
        raw, scores = _parse_llama2c(Path(path).read_bytes())
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e.strerror or e}")
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise ModelFormatError(path, f"not a llama2.c tokenizer.bin nor a SentencePiece model ({e})")
    pieces, types = [], []
    bos = eos = unk = None
    for i, t in enumerate(raw):
        if t == "\n<s>\n":
            pieces.append("<s>"), types.append(CONTROL)
            bos = i
        elif t == "\n</s>\n":
            pieces.append("</s>"), types.append(CONTROL)
            eos = i
        elif t == "<unk>" and unk is None:
            pieces.append(t), types.append(UNKNOWN)
            unk = i
        elif len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
            pieces.append(t), types.append(BYTE)
        else:
            pieces.append(t.replace(" ", "\u2581")), types.append(NORMAL)
    return SentencePieceBPE(pieces, types, scores=scores, byte_fallback=BYTE in types,
                            remove_extra_whitespaces=False, bos_id=bos, eos_id=eos, unk_id=unk,
                            add_bos=True, name=Path(str(path)).name)
