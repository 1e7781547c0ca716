"""A small reader for the safetensors format (Hugging Face's weight files).

Layout: 8 bytes little-endian u64 N, then N bytes of JSON describing each
tensor ({"name": {"dtype": "BF16", "shape": [r, c], "data_offsets": [b, e]}},
plus an optional "__metadata__" entry), then the raw little-endian tensor
bytes; offsets count from the end of the JSON.  We map the file and read
tensors straight out of it.
"""

from __future__ import annotations

import json
import math
import mmap
import os

import numpy as np

from ..errors import ModelFormatError

# safetensors dtype -> (numpy dtype of the stored values, bytes per value)
DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "F64": ("<f8", 8)}

_MAX_HEADER = 100 * 1024 * 1024


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
        if n > _MAX_HEADER:
            raise ModelFormatError(path, f"not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise ModelFormatError(
                path, f"truncated safetensors file: header needs {8 + n} bytes, found {size}")
        try:
            header = json.loads(self._buf[8:8 + n])
        except ValueError as e:
            raise ModelFormatError(path, f"not a safetensors file (bad JSON header: {e})") from None
        if not isinstance(header, dict):
            raise ModelFormatError(path, "not a safetensors file (header is not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        self.tensors: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype, shape, (start, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise ModelFormatError(path, f"tensor '{name}': malformed header entry {info!r}") from None
            if dtype not in DTYPES:
                raise ModelFormatError(
                    path, f"tensor '{name}' has unsupported dtype {dtype} (supported: {', '.join(DTYPES)})")
            nbytes = math.prod(shape) * DTYPES[dtype][1]
            if end - start != nbytes or start < 0:
                raise ModelFormatError(
                    path, f"tensor '{name}': data_offsets {[start, end]} hold {end - start} bytes, "
                          f"but {dtype} {list(shape)} needs {nbytes}")
            if self.data_start + end > size:
                raise ModelFormatError(
                    path, f"truncated safetensors file: tensor '{name}' needs {self.data_start + end} bytes, "
                          f"found {size}")
            self.tensors[name] = (dtype, shape, start, end)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a new float32 C-contiguous array."""
        dtype, shape, start, end = self.tensors[name]
        np_dtype, size = DTYPES[dtype]
        raw = np.frombuffer(self._buf, dtype=np_dtype, count=(end - start) // size, offset=self.data_start + start)
        if dtype == "BF16":
            # bfloat16 is the top half of a float32: shift the bits into place.
            out = (raw.astype(np.uint32) << 16).view(np.float32)
        else:
            out = raw.astype(np.float32)  # always a copy, so the file can be closed
        return out.reshape(shape)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even like PyTorch."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def write_safetensors(path, tensors: dict[str, np.ndarray], dtype: str = "F32", metadata: dict | None = None) -> None:
    """Write float arrays as one safetensors file, stored as `dtype` (F32, F16 or BF16)."""
    if dtype not in ("F32", "F16", "BF16"):
        raise ValueError(f"unsupported dtype {dtype}")
    header, offset = {}, 0
    for name, a in tensors.items():
        nbytes = a.size * DTYPES[dtype][1]
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)   # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for a in tensors.values():
            if dtype == "BF16":
                f.write(to_bf16_bits(a).astype("<u2").tobytes())
            else:
                f.write(np.ascontiguousarray(a, dtype=DTYPES[dtype][0]).tobytes())
