"""Turning GGUF tensor bytes into float32 arrays.

GGUF stores most weights in *block* formats: a row is cut into blocks of 32
(or 256 for the "K" formats) values, and each block keeps one or two float16
scale factors plus small integers.  Dequantizing is `value = scale * q` (or
`scale * q + min`).  The `gguf` package has numpy reference versions of all of
these, but they make several passes with large temporaries; loading the
default SmolLM2 model with them takes over 2 s.  The kernels below do one
pass per block with Numba and produce bit-identical results (the tests check
that against `gguf.quants.dequantize`).  Formats without a kernel here fall
back to the `gguf` package.

`keep_blocks` is the other way to read a tensor: for the formats the matrix
kernels compute with directly (Q8_0, Q4_0, Q4_1) it keeps the integers as
they are and only widens the scales, giving a `xllm.weights.QuantWeight`.

Each kernel gets the raw blocks as a 2-D uint8 array [n_blocks, block_bytes],
the float16 scales already widened to float32 by numpy (Numba has no
convenient float16), and writes `out` [n_blocks, values_per_block].
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
from gguf.quants import dequantize as gguf_dequantize
from numba import njit

from ..weights import QuantWeight

# Tensor types a GGUF loaded by xllm may contain.
SUPPORTED = (
    Q.F32, Q.F16, Q.BF16,
    Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1,
    Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
)

# Tensor types `keep_blocks` can keep, and the QuantWeight format each becomes.
KEEPABLE = {Q.Q8_0: "q8_0", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1"}


def _f16_at(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 stored at byte `offset` of every block, as float32."""
    return blocks[:, offset:offset + 2].copy().view("<f2").astype(np.float32).ravel()


@njit(cache=True)
def _q8_0(blocks, d, out):
    # block: d (f16) | 32 x int8
    for b in range(blocks.shape[0]):
        for j in range(32):
            q = np.int32(blocks[b, 2 + j])
            if q > 127:
                q -= 256
            out[b, j] = np.float32(q) * d[b]


@njit(cache=True)
def _q4_0(blocks, d, out):
    # block: d (f16) | 16 bytes; low nibbles are values 0..15, high nibbles 16..31; value = d * (q - 8)
    for b in range(blocks.shape[0]):
        for j in range(16):
            byte = blocks[b, 2 + j]
            out[b, j] = d[b] * np.float32(np.int32(byte & 15) - 8)
            out[b, j + 16] = d[b] * np.float32(np.int32(byte >> 4) - 8)


@njit(cache=True)
def _q4_1(blocks, d, m, out):
    # block: d (f16) | m (f16) | 16 bytes of nibbles as in Q4_0; value = d * q + m
    for b in range(blocks.shape[0]):
        for j in range(16):
            byte = blocks[b, 4 + j]
            out[b, j] = d[b] * np.float32(byte & 15) + m[b]
            out[b, j + 16] = d[b] * np.float32(byte >> 4) + m[b]


@njit(cache=True)
def _k_scale_min(sc_bytes, b, k):
    """Scale and min (6 bits each) of sub-block k of a Q4_K/Q5_K block.

    The 12 scale bytes pack 8 scales and 8 mins: bytes 0-3 hold scales 0-3 in
    their low 6 bits, bytes 4-7 the mins 0-3; scales/mins 4-7 take their low 4
    bits from bytes 8-11 and their top 2 bits from the spare top bits of
    bytes 0-7.
    """
    if k < 4:
        sc = sc_bytes[b, k] & 63
        mn = sc_bytes[b, k + 4] & 63
    else:
        sc = (sc_bytes[b, k + 4] & 15) | ((sc_bytes[b, k - 4] >> 6) << 4)
        mn = (sc_bytes[b, k + 4] >> 4) | ((sc_bytes[b, k] >> 6) << 4)
    return np.float32(sc), np.float32(mn)


@njit(cache=True)
def _k_group_scales(sc_bytes, d, dmin, b, g):
    """(d1, m1, d2, m2): the scales and mins of group g's two sub-blocks (2g and
    2g + 1) of Q4_K/Q5_K block b, times the block's d and dmin."""
    sc1, mn1 = _k_scale_min(sc_bytes, b, 2 * g)
    sc2, mn2 = _k_scale_min(sc_bytes, b, 2 * g + 1)
    return d[b] * sc1, dmin[b] * mn1, d[b] * sc2, dmin[b] * mn2


@njit(cache=True)
def _q4_k(blocks, d, dmin, out):
    # block (144 bytes, 256 values): d | dmin | 12 scale bytes | 128 bytes of nibbles.
    # Values come in 4 groups of 64: the low nibbles of 32 bytes, then their high nibbles.
    scales = blocks[:, 4:16]
    for b in range(blocks.shape[0]):
        for g in range(4):
            d1, m1, d2, m2 = _k_group_scales(scales, d, dmin, b, g)
            for j in range(32):
                byte = blocks[b, 16 + 32 * g + j]
                out[b, 64 * g + j] = d1 * np.float32(byte & 15) - m1
                out[b, 64 * g + 32 + j] = d2 * np.float32(byte >> 4) - m2


@njit(cache=True)
def _q5_k(blocks, d, dmin, out):
    # block (176 bytes): d | dmin | 12 scale bytes | 32 bytes of 5th bits | 128 bytes of nibbles.
    # Like Q4_K; sub-block k takes its 5th bit from bit k of the qh byte.
    scales = blocks[:, 4:16]
    for b in range(blocks.shape[0]):
        for g in range(4):
            d1, m1, d2, m2 = _k_group_scales(scales, d, dmin, b, g)
            for j in range(32):
                byte = blocks[b, 48 + 32 * g + j]
                high = blocks[b, 16 + j]
                lo = (byte & 15) | (((high >> (2 * g)) & 1) << 4)
                hi = (byte >> 4) | (((high >> (2 * g + 1)) & 1) << 4)
                out[b, 64 * g + j] = d1 * np.float32(lo) - m1
                out[b, 64 * g + 32 + j] = d2 * np.float32(hi) - m2


@njit(cache=True)
def _q6_k(blocks, d, out):
    # block (210 bytes, 256 values): 128 bytes low nibbles | 64 bytes of 2-bit highs |
    # 16 int8 scales (one per 16 values) | d.  Two halves of 128 values each.
    for b in range(blocks.shape[0]):
        for h in range(2):
            for j in range(32):
                lo_a = blocks[b, 64 * h + j]
                lo_b = blocks[b, 64 * h + 32 + j]
                high = blocks[b, 128 + 32 * h + j]
                q = (
                    (lo_a & 15) | ((high & 3) << 4),
                    (lo_b & 15) | (((high >> 2) & 3) << 4),
                    (lo_a >> 4) | (((high >> 4) & 3) << 4),
                    (lo_b >> 4) | (((high >> 6) & 3) << 4),
                )
                for k in range(4):
                    v = 128 * h + 32 * k + j
                    s = np.int32(blocks[b, 192 + v // 16])
                    if s > 127:
                        s -= 256
                    out[b, v] = (d[b] * np.float32(s)) * np.float32(np.int32(q[k]) - 32)


def dequantize(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 C-contiguous array of `shape` from the raw bytes of one GGUF tensor.

    `raw` is a 1-D uint8 array of exactly the tensor's byte size.
    """
    if qtype == Q.F32:
        return raw.view("<f4").reshape(shape).copy()
    if qtype == Q.F16:
        return raw.view("<f2").astype(np.float32).reshape(shape)
    if qtype == Q.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(shape)

    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(-1, block_bytes)
    out = np.empty((blocks.shape[0], block_values), np.float32)
    if qtype == Q.Q8_0:
        _q8_0(blocks, _f16_at(blocks, 0), out)
    elif qtype == Q.Q4_0:
        _q4_0(blocks, _f16_at(blocks, 0), out)
    elif qtype == Q.Q4_1:
        _q4_1(blocks, _f16_at(blocks, 0), _f16_at(blocks, 2), out)
    elif qtype == Q.Q4_K:
        _q4_k(blocks, _f16_at(blocks, 0), _f16_at(blocks, 2), out)
    elif qtype == Q.Q5_K:
        _q5_k(blocks, _f16_at(blocks, 0), _f16_at(blocks, 2), out)
    elif qtype == Q.Q6_K:
        _q6_k(blocks, _f16_at(blocks, 208), out)
    else:
        # No kernel of our own: the gguf package's numpy version.
        return np.ascontiguousarray(gguf_dequantize(blocks, qtype), dtype=np.float32).reshape(shape)
    return out.reshape(shape)


def keep_blocks(raw: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> QuantWeight:
    """A QuantWeight of `shape` (N, K) from the raw bytes of one Q8_0/Q4_0/Q4_1 tensor.

    GGUF interleaves scales and integers block by block:

        Q8_0  d (f16) | 32 x int8                    34 bytes per block
        Q4_0  d (f16) | 16 bytes of nibbles          18 bytes
        Q4_1  d (f16) | m (f16) | 16 bytes           20 bytes

    QuantWeight keeps the integers of a row together and the scales apart
    (see xllm/weights.py), so this copies each part out: the result owns its
    arrays and holds no reference to `raw` (or the file mapped behind it).
    """
    if qtype not in KEEPABLE:
        raise ValueError(f"keep_blocks: {qtype.name} is not one of {[t.name for t in KEEPABLE]}")
    if len(shape) != 2:
        raise ValueError(f"keep_blocks: need a matrix, got shape {shape}")
    N, K = shape
    nb = K // 32
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(N * nb, block_bytes)
    d = _f16_at(blocks, 0).reshape(N, nb)
    if qtype == Q.Q8_0:
        qs = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).reshape(N, K)
        return QuantWeight("q8_0", qs, d)
    if qtype == Q.Q4_0:
        return QuantWeight("q4_0", np.ascontiguousarray(blocks[:, 2:]).reshape(N, K // 2), d)
    m = _f16_at(blocks, 2).reshape(N, nb)
    return QuantWeight("q4_1", np.ascontiguousarray(blocks[:, 4:]).reshape(N, K // 2), d, m)
