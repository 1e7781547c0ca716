"""How a weight matrix is stored: float32, float16, or the blocks of a GGUF file.

Decode reads every weight once per token, so its speed is the number of bytes
the weights take. The operators (`linear`, `logits`, `embedding`) accept a
weight in any of these formats and compute with exactly the float32 values it
stands for; `weight_format(w)` names the format, and the registry
(`xllm.ops.Ops`) picks each device's kernel by that name, once per call:

    "f32"   a float32 array [N, K]                            4 bytes a weight
    "f16"   a float16 array [N, K] (the GPU's default for     2 bytes
            float checkpoints); the kernels read its bits
    "q8_0", "q4_0", "q4_1"   a `QuantWeight` (below)           1.125 / 0.625 / 0.75
    "w8a8"  a `QuantWeight`: int8 with one scale per row         1 (+ 4 per row)
            (per output channel), made by `xllm.quantize`

The loader makes these (`xllm.loader`), a device's `upload_weight` moves them
into its memory; the arrays of a QuantWeight may then be device arrays.

Block formats. A GGUF model stores its matrices in *block* formats: each
row is cut into blocks of 32 consecutive values, and a block keeps small
integers q plus one or two scale factors. `QuantWeight` holds such a matrix
as it is, and the CPU kernels (`xllm.ops.cpu.qmatmul`) turn the integers back
into numbers inside the matrix product, so the float32 matrix never exists
in memory. The numbers they compute with are exactly those of
`QuantWeight.dequantize()`: keeping the blocks loses nothing.

The formats, for a matrix [N, K] (K a multiple of 32, block b of row n holds
columns 32b .. 32b+31):

    format  qs                          scales (float32 [N, K/32])   value
    q8_0    int8  [N, K]                d                            d * q
    q4_0    uint8 [N, K/2], two per     d                            d * (q - 8)
    q4_1      byte (see below)          d, m                         d * q + m

    w8a8    int8  [N, K]                d  float32 [N, 1]            d * q

Bytes per weight: q8_0 1.125, q4_0 0.625, q4_1 0.75 (float32 is 4).

w8a8 is q8_0 with one block per row: a symmetric per-output-channel scale,
as in SmoothQuant and the "compressed-tensors" checkpoints. Its name says how
the CPU multiplies it: the activations are quantized to int8 too, one scale
per token row, and the dot products run on integers (xllm/ops/reference.py,
`linear_int`). The GGUF formats are multiplied the same way (with int16
activations) unless exactness is asked for; see `xllm.ops.get_ops(..., exact=True)`.

Packing of the 4-bit formats, as in GGUF: the 16 bytes of a block hold its
32 values as nibbles, byte j holding value j in its low 4 bits and value
j + 16 in its high 4 bits:

    byte j of block b  =  q[32b + j]  |  q[32b + 16 + j] << 4      (j = 0..15)

GGUF stores the scales as float16; here they are float32, converted once at
load time (every float16 is exactly a float32, so nothing changes), because
Numba has no convenient float16 arithmetic.

Exactness. A float16 scale has 11 significant bits and q at most 8, so d * q
always fits in float32's 24 bits: it is computed without rounding. The only
rounding in any format is q4_1's "+ m". This is why `dequantize` equals the
`gguf` package's numpy dequantizers bit for bit, and why q4_0 may be computed
as d * q + (-8 d), the form of q4_1 with m = -8 d (the kernels do that).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

BLOCK = 32                                     # values per block, in every format
FORMATS = ("q8_0", "q4_0", "q4_1", "w8a8")     # the formats of QuantWeight
WEIGHT_FORMATS = ("f32", "f16") + FORMATS      # every format an operator accepts
_QS_DTYPE = {"q8_0": np.int8, "q4_0": np.uint8, "q4_1": np.uint8, "w8a8": np.int8}
_HAS_MIN = {"q8_0": False, "q4_0": False, "q4_1": True, "w8a8": False}
_INT8 = ("q8_0", "w8a8")                       # one int8 per value (the others pack two nibbles)


def blocks_per_row(format: str, K: int) -> int:
    """Scales per row of length K: K/32, or 1 for w8a8 (one scale per row)."""
    return 1 if format == "w8a8" else K // BLOCK


@dataclass(frozen=True, eq=False)
class QuantWeight:
    """A [N, K] weight matrix in one of the block formats of the module docstring.

    qs   the quantized integers, row-major: int8 [N, K] (q8_0, w8a8) or
         packed uint8 [N, K/2] (q4_0, q4_1)
    d    float32 [N, K/32]: the scale of each block ([N, 1] for w8a8)
    m    float32 [N, K/32]: the offset of each block (q4_1 only, else None)

    All arrays are C-contiguous: numpy arrays, or a device's arrays after
    `map_arrays(ops.upload)`. Treat a QuantWeight as read-only, like the
    float32 weights (the arrays may be memory-mapped).
    """

    format: str
    qs: np.ndarray
    d: np.ndarray
    m: np.ndarray | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"QuantWeight: unknown format {self.format!r}; known: {', '.join(FORMATS)}")
        qs, d, m = self.qs, self.d, self.m
        want = _QS_DTYPE[self.format]
        if qs.ndim != 2 or qs.dtype != want:
            raise ValueError(f"QuantWeight {self.format}: qs must be a 2-D {np.dtype(want).name} array, "
                             f"got {qs.dtype} {qs.shape}")
        N, K = self.shape
        if K % BLOCK:
            raise ValueError(f"QuantWeight {self.format}: row length {K} is not a multiple of {BLOCK}")
        nb = blocks_per_row(self.format, K)
        scales = [("d", d)] + ([("m", m)] if _HAS_MIN[self.format] else [])
        if not _HAS_MIN[self.format] and m is not None:
            raise ValueError(f"QuantWeight {self.format}: this format has no offsets m")
        for name, s in scales:
            if s is None or s.dtype != np.float32 or s.shape != (N, nb):
                got = "None" if s is None else f"{s.dtype} {s.shape}"
                raise ValueError(f"QuantWeight {self.format}: {name} must be float32 {(N, nb)}, got {got}")
        for name, a in [("qs", qs)] + scales:
            if not a.flags["C_CONTIGUOUS"]:       # item access: device arrays' flags are a dict
                raise ValueError(f"QuantWeight {self.format}: {name} must be C-contiguous")

    # ------------------------------------------------------------------ array-like facts

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): the shape of the float32 matrix this stands for."""
        N, cols = self.qs.shape
        return (N, cols if self.format in _INT8 else 2 * cols)

    ndim = 2

    @cached_property
    def blocks(self) -> np.ndarray:
        """qs viewed as [N, blocks per row, bytes per block]: [N, K/32, 32] for q8_0,
        [N, K/32, 16] for the 4-bit formats, [N, 1, K] for w8a8.

        Block b of row n is blocks[n, b]. The CPU kernels take this view (see
        xllm/ops/cpu/qmatmul.py); it is made once and kept.
        """
        N = self.qs.shape[0]
        nb = self.d.shape[1]
        return self.qs.reshape(N, nb, self.qs.shape[1] // nb if nb else 0)

    @property
    def nbytes(self) -> int:
        """Bytes held (what a matrix product reads): integers plus scales."""
        return self.qs.nbytes + self.d.nbytes + (self.m.nbytes if self.m is not None else 0)

    def __repr__(self) -> str:
        return f"QuantWeight({self.format}, shape={self.shape}, {self.nbytes} bytes)"

    # ------------------------------------------------------------------ the values

    def dequantize(self) -> np.ndarray:
        """The float32 matrix [N, K] (the specification the kernels follow).

        Plain numpy, one formula per format; equal bit for bit to
        `gguf.quants.dequantize` of the file's blocks.
        """
        N, K = self.shape
        nb = self.d.shape[1]
        d = self.d[:, :, None]                                   # [N, nb, 1]
        if self.format in _INT8:
            q = self.qs.reshape(N, nb, K // nb if nb else 0).astype(np.float32)
            return (d * q).reshape(N, K)
        packed = self.qs.reshape(N, nb, BLOCK // 2)
        q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.float32)   # [N, nb, 32]
        if self.format == "q4_0":
            return (d * (q - np.float32(8))).reshape(N, K)
        return (d * q + self.m[:, :, None]).reshape(N, K)

    # ------------------------------------------------------------------ building new ones

    def rows(self, idx) -> "QuantWeight":
        """A new QuantWeight of the rows `idx` (any numpy row index: a permutation, a subset).

        Row n of the result is row idx[n] of this one: `w.rows(p).dequantize()
        == w.dequantize()[p]`. The loader uses it to reorder the rows of wq/wk.
        """
        idx = np.asarray(idx)
        if idx.size == 0:
            idx = idx.astype(np.intp)                  # np.asarray([]) is float64
        if idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise ValueError(f"QuantWeight.rows: need a 1-D integer index, got {idx.dtype} {idx.shape}")
        if idx.size and (idx.min() < -self.shape[0] or idx.max() >= self.shape[0]):
            raise IndexError(f"QuantWeight.rows: index out of range for {self.shape[0]} rows")
        take = lambda a: None if a is None else np.ascontiguousarray(a[idx])  # noqa: E731
        return QuantWeight(self.format, take(self.qs), take(self.d), take(self.m))

    @classmethod
    def concat(cls, parts) -> "QuantWeight":
        """Stack matrices of the same format and row length along N (like np.concatenate).

        The model stacks wq|wk|wv and w_gate|w_up this way. Mixing formats
        raises ValueError: convert with `dequantize()` first if you must.
        """
        parts = list(parts)
        if not parts:
            raise ValueError("QuantWeight.concat: nothing to concatenate")
        fmt, K = parts[0].format, parts[0].shape[1]
        for p in parts:
            if not isinstance(p, QuantWeight):
                raise ValueError(f"QuantWeight.concat: {type(p).__name__} is not a QuantWeight")
            if p.format != fmt:
                raise ValueError(f"QuantWeight.concat: formats differ ({fmt} and {p.format})")
            if p.shape[1] != K:
                raise ValueError(f"QuantWeight.concat: row lengths differ ({K} and {p.shape[1]})")
        cat = lambda name: np.concatenate([getattr(p, name) for p in parts])  # noqa: E731
        return cls(fmt, cat("qs"), cat("d"), cat("m") if _HAS_MIN[fmt] else None)

    def map_arrays(self, fn) -> "QuantWeight":
        """The same matrix with `fn` applied to each array (e.g. a device's `upload`)."""
        return QuantWeight(self.format, fn(self.qs), fn(self.d), None if self.m is None else fn(self.m))

    # ------------------------------------------------------------------ saving

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The arrays to save: {"qs", "d"} plus "m" for q4_1 (see `from_arrays`)."""
        out = {"qs": self.qs, "d": self.d}
        if self.m is not None:
            out["m"] = self.m
        return out

    @classmethod
    def from_arrays(cls, format: str, shape, arrays: dict[str, np.ndarray]) -> "QuantWeight":
        """The inverse of `to_arrays`. Arrays may come flat (e.g. slices of one
        saved buffer): they are reshaped from `shape` (N, K) and viewed, not copied."""
        N, K = (int(s) for s in shape)
        if format not in FORMATS:
            raise ValueError(f"QuantWeight: unknown format {format!r}; known: {', '.join(FORMATS)}")
        cols = K if format in _INT8 else K // 2
        nb = blocks_per_row(format, K)
        qs = np.asarray(arrays["qs"]).view(_QS_DTYPE[format]).reshape(N, cols)
        d = np.asarray(arrays["d"]).view(np.float32).reshape(N, nb)
        m = np.asarray(arrays["m"]).view(np.float32).reshape(N, nb) if _HAS_MIN[format] else None
        return cls(format, qs, d, m)


def is_quant(w) -> bool:
    """True for a QuantWeight, False for a plain (float32 or float16) array."""
    return isinstance(w, QuantWeight)


def weight_format(w) -> str:
    """The format name of a weight (see the module docstring): "f32", "f16", "q8_0", ...

    Works for numpy and device arrays alike (anything with a numpy `dtype`).
    """
    if isinstance(w, QuantWeight):
        return w.format
    dtype = np.dtype(w.dtype)
    if dtype == np.float32:
        return "f32"
    if dtype == np.float16:
        return "f16"
    raise ValueError(f"a weight must be float32, float16 or a QuantWeight, got {dtype} {tuple(w.shape)}")


def concat(parts) -> QuantWeight:
    """`QuantWeight.concat`: stack quantized matrices of one format along N."""
    return QuantWeight.concat(parts)
