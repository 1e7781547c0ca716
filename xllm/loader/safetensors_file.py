"""A small reader for the safetensors format (Hugging Face's weight files).

Layout: 8 bytes little-endian u64 N, then N bytes of JSON describing each
tensor ({"name": {"dtype": "BF16", "shape": [r, c], "data_offsets": [b, e]}},
plus an optional "__metadata__" entry of string -> string), then the raw
little-endian tensor bytes; offsets count from the end of the JSON.  We map
the file and read tensors straight out of it.

The header is checked exactly as the `safetensors` library checks it (its
`read_metadata` and `Metadata::validate`, in Rust), so a file is refused here
iff that library refuses it:

* N is at most 100,000,000 and 8 + N is within the file;
* the header is UTF-8 JSON, as strict as Rust's serde_json: no NaN, no number
  beyond float range, no lone UTF-16 surrogate, at most 127 nested containers;
* an object whose entries are tensors, each with a known dtype, a shape of
  integers in [0, 2^64), and data_offsets [begin, end] of such integers
  (duplicate fields refused, unknown fields ignored; the library also reads an
  entry written as the list [dtype, shape, data_offsets]);
* sorted by offsets, the tensors tile the data section: each begins where the
  previous one ended (the first at 0), holds exactly the bytes its dtype and
  shape need (no intermediate product overflowing 64 bits, no partial byte),
  and the last ends at the end of the file.

A header that is a few bytes short or long, overlapping or gapped tensors,
trailing bytes: all fail the last rule.  Only then does xllm add its own rule:
it reads F32, F16, BF16 and F64 tensors (`get` refuses the others), and I8
ones as the integers of a quantized weight (`get_int8`).
"""

from __future__ import annotations

import json
import mmap
import os

import numpy as np

from ..errors import ModelFormatError

# safetensors dtype -> (numpy dtype of the stored values, bytes per value), for the dtypes xllm reads
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}

# Every dtype the safetensors library (0.8) knows, with its size in bits.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

MAX_HEADER = 100_000_000       # the library's MAX_HEADER_SIZE
MAX_DEPTH = 127                # serde_json refuses the 128th nested container
_U64 = 1 << 64
_FIELDS = ("dtype", "shape", "data_offsets")


class _Pairs(list):
    """A JSON object as its list of (key, value) pairs, so duplicate keys stay visible."""


def _int(text: str):
    """serde_json's integers: u64 or i64 when they fit, else a float ("-0" is a float too)."""
    value = int(text)
    if text == "-0" or not -(1 << 63) <= value < _U64:
        value = float(text)
        if value in (float("inf"), float("-inf")):
            raise ValueError(f"number out of range: {text[:20]}...")
    return value


def _float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number out of range: {text}")
    return value


def _constant(text: str):
    raise ValueError(f"{text} is not JSON")


def _parse_json(text: str):
    """The header as serde_json would read it (objects as _Pairs); ValueError when it would not."""
    try:
        root = json.loads(text, object_pairs_hook=_Pairs, parse_int=_int, parse_float=_float,
                          parse_constant=_constant)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_DEPTH} levels") from None
    # Walk without recursion: depth, and strings Rust could not hold (lone surrogates).
    stack = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            value.encode("utf-8")       # UnicodeEncodeError (a ValueError) on a lone surrogate
        elif isinstance(value, list):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            items = [x for pair in value for x in pair] if isinstance(value, _Pairs) else value
            stack.extend((item, depth + 1) for item in items)
    return root


def _u64(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64


class SafetensorsFile:
    """The tensors of one .safetensors file: `.tensors` maps name -> (dtype, shape, start, end)."""

    def __init__(self, path):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise ModelFormatError(path, f"truncated safetensors file: {size} bytes, expected at least 8")
        with open(path, "rb") as f:
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        n = int.from_bytes(self._buf[:8], "little")
        if n > MAX_HEADER:
            raise ModelFormatError(
                path, f"not a safetensors file: header length (first 8 bytes): expected at most {MAX_HEADER}, "
                      f"found {n}")
        if 8 + n > size:
            raise ModelFormatError(
                path, f"truncated safetensors file: header length {n} needs {8 + n} bytes, found {size}")
        try:
            root = _parse_json(self._buf[8:8 + n].decode("utf-8"))
        except ValueError as e:     # also UnicodeDecodeError / UnicodeEncodeError
            raise ModelFormatError(path, f"not a safetensors file: bad JSON header ({e})") from None
        if not isinstance(root, _Pairs):
            raise ModelFormatError(path, f"not a safetensors file: header: expected a JSON object, "
                                         f"found {type(root).__name__}")
        self.data_start = 8 + n
        self.metadata = self._read_metadata([v for k, v in root if k == "__metadata__"])
        entries = {}
        for name, info in root:
            if name != "__metadata__":
                entries[name] = self._tensor_info(name, info)    # a repeated name: the last one counts
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        end = 0
        for name, (dtype, shape, start, stop) in sorted(entries.items(), key=lambda e: e[1][2:]):
            if start != end or stop < start:
                raise ModelFormatError(
                    path, f"tensor '{name}': data_offsets: expected to start at {end} (where the previous "
                          f"tensor ends), found {[start, stop]}")
            nbits = DTYPE_BITS[dtype]
            count = 1
            for dim in shape:
                count *= dim
                if count >= _U64:
                    raise ModelFormatError(path, f"tensor '{name}': shape {list(shape)} overflows 64 bits")
            if count * nbits >= _U64 or count * nbits % 8:
                raise ModelFormatError(
                    path, f"tensor '{name}': shape {list(shape)} of {dtype} is not a whole number of bytes "
                          f"below 2^64")
            if stop - start != count * nbits // 8:
                raise ModelFormatError(
                    path, f"tensor '{name}': data_offsets {[start, stop]}: expected {count * nbits // 8} bytes "
                          f"for {dtype} {list(shape)}, found {stop - start}")
            self.tensors[name] = (dtype, shape, start, stop)
            end = stop
        if self.data_start + end != size:
            problem = "truncated safetensors file" if self.data_start + end > size else "bad safetensors file"
            raise ModelFormatError(
                path, f"{problem}: header (length {n}) and tensors: expected {self.data_start + end} bytes, "
                      f"found {size}")

    def _read_metadata(self, found: list) -> dict:
        """The "__metadata__" entry: absent, null, or an object of strings."""
        if len(found) > 1:
            raise ModelFormatError(self.path, "header: field __metadata__ appears twice")
        if not found or found[0] is None:
            return {}
        meta = found[0]
        if not isinstance(meta, _Pairs) or not all(isinstance(v, str) for _, v in meta):
            raise ModelFormatError(self.path, f"header: field __metadata__: expected an object of strings, "
                                              f"found {json.dumps(meta)[:80]}")
        return dict(meta)

    def _tensor_info(self, name: str, info) -> tuple[str, tuple[int, ...], int, int]:
        """(dtype, shape, start, end) of one header entry, checked field by field."""
        where = f"tensor '{name}'"
        if isinstance(info, _Pairs):
            fields = {}
            for key, value in info:
                if key in _FIELDS:
                    if key in fields:
                        raise ModelFormatError(self.path, f"{where}: field {key} appears twice")
                    fields[key] = value
            missing = [k for k in _FIELDS if k not in fields]
            if missing:
                raise ModelFormatError(self.path, f"{where}: missing field {missing[0]}")
            dtype, shape, offsets = (fields[k] for k in _FIELDS)
        elif isinstance(info, list) and len(info) == 3:
            dtype, shape, offsets = info
        else:
            raise ModelFormatError(
                self.path, f"{where}: expected an object with dtype, shape and data_offsets, "
                           f"found {json.dumps(info)[:80]}")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise ModelFormatError(self.path, f"{where}: field dtype: expected one of {', '.join(DTYPE_BITS)}, "
                                              f"found {dtype!r}")
        if not isinstance(shape, list) or not all(_u64(d) for d in shape):
            raise ModelFormatError(self.path, f"{where}: field shape: expected a list of integers from 0 to "
                                              f"2^64-1, found {json.dumps(shape)[:80]}")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_u64(o) for o in offsets):
            raise ModelFormatError(self.path, f"{where}: field data_offsets: expected [begin, end], two integers "
                                              f"from 0 to 2^64-1, found {json.dumps(offsets)[:80]}")
        return dtype, tuple(shape), offsets[0], offsets[1]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def dtype(self, name: str) -> str:
        return self.tensors[name][0]

    def get(self, name: str, keep_16: bool = False) -> np.ndarray:
        """The tensor as a new C-contiguous float32 array.

        keep_16: a matrix (2-D) stored as F16 comes back as float16, half the
        bytes, the same values; one stored as BF16 too when every value is
        exactly a float16 (bfloat16 has 3 fewer mantissa bits but 3 more
        exponent bits: tiny or huge values may not fit) -- else float32.
        """
        dtype, shape, start, end = self.tensors[name]
        if dtype not in DTYPES:
            raise ModelFormatError(
                self.path, f"tensor '{name}': dtype: expected one of {', '.join(DTYPES)} (what xllm reads), "
                           f"found {dtype}")
        np_dtype, size = DTYPES[dtype]
        raw = np.frombuffer(self._buf, dtype=np_dtype, count=(end - start) // size, offset=self.data_start + start)
        keep_16 = keep_16 and len(shape) == 2
        if dtype == "F16" and keep_16:
            return raw.copy().reshape(shape)      # a copy, so the file can be closed
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: shift the bits into place.
            out = (raw.astype(np.uint32) << 16).view(np.float32)
            if keep_16:
                half = out.astype(np.float16)
                if np.array_equal(half.astype(np.float32), out, equal_nan=True):
                    return half.reshape(shape)
        else:
            out = raw.astype(np.float32)  # always a copy, so the file can be closed
        return out.reshape(shape)

    def get_int8(self, name: str) -> np.ndarray:
        """An I8 tensor as a new C-contiguous int8 array (the integers of a quantized weight)."""
        dtype, shape, start, end = self.tensors[name]
        if dtype != "I8":
            raise ModelFormatError(self.path, f"tensor '{name}': dtype: expected I8, found {dtype}")
        return np.frombuffer(self._buf, dtype=np.int8, count=end - start, offset=self.data_start + start
                             ).copy().reshape(shape)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like PyTorch."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def write_safetensors(path, tensors: dict[str, np.ndarray], dtype: str = "F32", metadata: dict | None = None) -> None:
    """Write arrays as one safetensors file: float ones stored as `dtype` (F32, F16 or BF16),
    int8 ones (quantized weights) as I8."""
    if dtype not in ("F32", "F16", "BF16"):
        raise ValueError(f"unsupported dtype {dtype}")
    header, offset, stored = {}, 0, {}
    for name, a in tensors.items():
        stored[name] = "I8" if a.dtype == np.int8 else dtype
        nbytes = a.size * DTYPE_BITS[stored[name]] // 8
        header[name] = {"dtype": stored[name], "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, a in tensors.items():
            if stored[name] == "I8":
                f.write(np.ascontiguousarray(a).tobytes())
            elif dtype == "BF16":
                f.write(to_bf16_bits(a).astype("<u2").tobytes())
            else:
                f.write(np.ascontiguousarray(a, dtype=DTYPES[dtype][0]).tobytes())
