"""linear on integers: integer activations times q8_0, q4_0, q4_1 or w8a8 weights.

The specification is `reference.linear_int`; the quantization of the
activations and the plain form of the dot products are the bodies of
xllm/ops/kernels/qdot.py. This is the CPU's default for those formats
(`get_ops("cpu")`); `get_ops("cpu", exact=True)` multiplies in float32
instead (qmatmul.py).

Each call does two passes, in one compiled call from Python (`run_i8`,
`run_i4`: a decode step's linear costs a few microseconds beyond its work,
and each call from Python and each start of the threads is one of them):

  1. quantize every token's x once: integer blocks, their scales and sums
     (`qdot.quantize_row`; int16 per 32 values for the GGUF formats, int8
     per row for w8a8, as `reference.linear_int` says and explains), on the
     calling thread for fewer than QUANTIZE_PARALLEL_ROWS tokens;
  2. threads take groups of four weight rows (`qblock.group4`) and compute
     their dot products with every token, one token after the other.

The dot products (`_idot4_q8`, `_idot4_q4`) step through a row 32 values at
a time with `simd.dot32_i8` / `simd.dot32_i4`: 32 integer products summed in
pairs into 16 int32 lanes, converted to float and added, times the block's
scale, into a 16-lane float accumulator that stays in registers for the
whole row (cpu/simd.py says why this had to be written in LLVM IR). Four
rows share each load of x. The per-block offsets are plain arithmetic on
the flat layout: row n, block b, value j of qs [N, nb, bs] is element
(n nb + b) bs + j.

In pass 2 the four rows (4 K bytes) stay in the core's L1 cache while the
tokens stream past them, so each weight is read from memory once per call,
whatever the number of tokens.

Many tokens. Each token still costs a pass of integer products, while the
float GEMM of qmatmul.py dequantizes each weight once per call and then
runs 16-lane register tiles. For the GGUF formats the float GEMM wins
past `INT_MAX_TOKENS` tokens (measured on one Sapphire Rapids core, time of
the integer kernel over the float GEMM, 3072x576 and 576x1536: q8_0 0.36-0.37
at 2 tokens, 0.41-0.44 at 3, 0.8-1.2 at 4 to 6, 1.2-1.6 at 8; q4_1 0.52 at 2,
0.62-0.76 at 3, 1.06-1.25 at 4), so calls with more tokens go there. With
int16 activations the two paths agree to within float rounding
(reference.linear_int). w8a8 stays on integers at every size, as its name
says (activations quantized too), although the float GEMM is faster from
about 16 tokens on (int over float time 0.7 at 8 tokens, 0.9-1.1 at 16,
1.23 at 32): its blocks are whole rows, so its sums stay integer until the
end (`simd.idot32_i8`), and it takes tokens two at a time (`_w8a8_pair`),
so that each row's widened weights serve two tokens.

q4_0 and q4_1 share a kernel as in qmatmul.py: value = d q + o c, so a
block adds xd (d * sum qx qw + o c * sum qx); the first sum is the SIMD
part, the second one number per block.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.core import config

from .. import checks
from ..reference import ACTIVATION_BITS
from . import common, qmatmul, simd
from .bodies import qblock, qdot
from .common import FAST

f32 = np.float32


@numba.njit(inline="always", fastmath=FAST)
def _simd_idot4_q8(xq, xd, qs, d, n0, n1, n2, n3, b0, step):
    """`qdot.idot4_q8` (every block: b0 = 0, step = 1) with 16-lane accumulators."""
    nb, bs = qs.shape[1], qs.shape[2]
    a0 = simd.zeros(); a1 = simd.zeros(); a2 = simd.zeros(); a3 = simd.zeros()
    if bs == 32:                                     # q8_0: each 32 values have their own scale
        for b in range(nb):
            xdb = xd[b]
            x_at = 32 * b
            a0 = simd.dot32_i8(a0, xq, x_at, qs, (n0 * nb + b) * 32, d[n0, b] * xdb)
            a1 = simd.dot32_i8(a1, xq, x_at, qs, (n1 * nb + b) * 32, d[n1, b] * xdb)
            a2 = simd.dot32_i8(a2, xq, x_at, qs, (n2 * nb + b) * 32, d[n2, b] * xdb)
            a3 = simd.dot32_i8(a3, xq, x_at, qs, (n3 * nb + b) * 32, d[n3, b] * xdb)
    else:                                            # w8a8: one block, summed as integers first
        for b in range(nb):
            i0 = simd.zeros_i32(); i1 = simd.zeros_i32(); i2 = simd.zeros_i32(); i3 = simd.zeros_i32()
            for c in range(0, bs, 32):
                x_at = b * bs + c
                i0 = simd.idot32_i8(i0, xq, x_at, qs, (n0 * nb + b) * bs + c)
                i1 = simd.idot32_i8(i1, xq, x_at, qs, (n1 * nb + b) * bs + c)
                i2 = simd.idot32_i8(i2, xq, x_at, qs, (n2 * nb + b) * bs + c)
                i3 = simd.idot32_i8(i3, xq, x_at, qs, (n3 * nb + b) * bs + c)
            xdb = xd[b]
            a0 = simd.add_scaled(a0, i0, d[n0, b] * xdb)
            a1 = simd.add_scaled(a1, i1, d[n1, b] * xdb)
            a2 = simd.add_scaled(a2, i2, d[n2, b] * xdb)
            a3 = simd.add_scaled(a3, i3, d[n3, b] * xdb)
    return simd.hsum(a0), simd.hsum(a1), simd.hsum(a2), simd.hsum(a3)


@numba.njit(inline="always", fastmath=FAST)
def _w8a8_pair(xq, xd, t, qs, d, n0, n1, n2, n3, out):
    """out[t : t+2, n] for the rows n0..n3 of a w8a8 matrix: two tokens share
    each load of the weights (the two `idot32_i8` of a row read the same 32
    bytes, which LLVM loads and widens once). Every number is computed as
    `_simd_idot4_q8` computes it for one token, so the bits are the same."""
    bs = qs.shape[2]                                 # w8a8: one block, the whole row
    N = qs.shape[0]
    i0 = simd.zeros_i32(); i1 = simd.zeros_i32(); i2 = simd.zeros_i32(); i3 = simd.zeros_i32()
    j0 = simd.zeros_i32(); j1 = simd.zeros_i32(); j2 = simd.zeros_i32(); j3 = simd.zeros_i32()
    for c in range(0, bs, 32):
        x_at, y_at = t * bs + c, (t + 1) * bs + c     # xq [T, 1, bs], flat
        i0 = simd.idot32_i8(i0, xq, x_at, qs, n0 * bs + c); j0 = simd.idot32_i8(j0, xq, y_at, qs, n0 * bs + c)
        i1 = simd.idot32_i8(i1, xq, x_at, qs, n1 * bs + c); j1 = simd.idot32_i8(j1, xq, y_at, qs, n1 * bs + c)
        i2 = simd.idot32_i8(i2, xq, x_at, qs, n2 * bs + c); j2 = simd.idot32_i8(j2, xq, y_at, qs, n2 * bs + c)
        i3 = simd.idot32_i8(i3, xq, x_at, qs, n3 * bs + c); j3 = simd.idot32_i8(j3, xq, y_at, qs, n3 * bs + c)
    for u, a, b, e, g in ((0, i0, i1, i2, i3), (1, j0, j1, j2, j3)):
        xdb = xd[t + u, 0]
        qblock.store4(out, t + u, N, n0, n1, n2, n3,
                      simd.hsum(simd.add_scaled(simd.zeros(), a, d[n0, 0] * xdb)),
                      simd.hsum(simd.add_scaled(simd.zeros(), b, d[n1, 0] * xdb)),
                      simd.hsum(simd.add_scaled(simd.zeros(), e, d[n2, 0] * xdb)),
                      simd.hsum(simd.add_scaled(simd.zeros(), g, d[n3, 0] * xdb)))


@numba.njit(inline="always", fastmath=FAST)
def _simd_idot4_q4(xq, xd, xsum, qs, d, o, c, n0, n1, n2, n3, b0, step):
    """`qdot.idot4_q4` (every block) with 16-lane accumulators for the integer part."""
    nb = qs.shape[1]
    a0 = simd.zeros(); a1 = simd.zeros(); a2 = simd.zeros(); a3 = simd.zeros()
    m0 = f32(0.0); m1 = f32(0.0); m2 = f32(0.0); m3 = f32(0.0)
    for b in range(nb):
        xdb = xd[b]
        x_at = 32 * b
        a0 = simd.dot32_i4(a0, xq, x_at, qs, (n0 * nb + b) * 16, d[n0, b] * xdb)
        a1 = simd.dot32_i4(a1, xq, x_at, qs, (n1 * nb + b) * 16, d[n1, b] * xdb)
        a2 = simd.dot32_i4(a2, xq, x_at, qs, (n2 * nb + b) * 16, d[n2, b] * xdb)
        a3 = simd.dot32_i4(a3, xq, x_at, qs, (n3 * nb + b) * 16, d[n3, b] * xdb)
        xs = xdb * f32(xsum[b]) * f32(c)
        m0 += o[n0, b] * xs; m1 += o[n1, b] * xs; m2 += o[n2, b] * xs; m3 += o[n3, b] * xs
    return simd.hsum(a0) + m0, simd.hsum(a1) + m1, simd.hsum(a2) + m2, simd.hsum(a3) + m3


# Without numba the SIMD operations do not exist: step through the plain bodies instead.
_idot4_q8 = qdot.idot4_q8 if config.DISABLE_JIT else _simd_idot4_q8
_idot4_q4 = qdot.idot4_q4 if config.DISABLE_JIT else _simd_idot4_q4
_PAIRS = not config.DISABLE_JIT


@numba.njit(parallel=True, cache=True)
def _quantize(x, qmax, xq, xd, xsum):
    """Every token of x [T, K] as integer blocks (`qdot.quantize_row`; xq [T, nb, bs] int8 or int16).

    Without fast-math, so that every float operation is the specification's.
    It runs from `_quantized_as` and `run_i8` / `run_i4`, which have no
    fast-math flags either: numba compiles a function with its caller's flags
    unless it sets its own, and from inside the fast-math kernels LLVM turned
    max|x| / qmax into max|x| * (1 / qmax), one unit in the last place off
    the specification's scale (tests/test_ops_intmatmul.py checks every bit).
    """
    for t in prange(x.shape[0]):
        qdot.quantize_row(x[t], qmax, xq[t], xd[t], xsum[t], 0, 1)


QUANTIZE_PARALLEL_ROWS = 8      # fewer tokens are quantized on the calling thread


@numba.njit(cache=True)
def _quantized_as(x, nb, qmax, like):
    """x [T, K] as (xq [T, nb, K/nb] of like's integer dtype, xd float32 [T, nb], xsum int32 [T, nb])."""
    T = x.shape[0]
    xq = np.empty((T, nb, x.shape[1] // max(nb, 1)), like.dtype)
    xd = np.empty((T, nb), np.float32)
    xsum = np.empty((T, nb), np.int32)
    if T < QUANTIZE_PARALLEL_ROWS:        # a decode step: not worth waking the threads
        for t in range(T):
            qdot.quantize_row(x[t], qmax, xq[t], xd[t], xsum[t], 0, 1)
    else:
        _quantize(x, qmax, xq, xd, xsum)
    return xq, xd, xsum


_LIKE = {8: np.zeros(0, np.int8), 16: np.zeros(0, np.int16)}    # the dtype of xq, for numba's typing
_QMAX = {8: np.float32(127), 16: np.float32(32767)}


def _quantized(x: np.ndarray, nb: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x [T, K] as `reference.quantize_activations(x, K / nb, bits)` gives it, plus the blocks' sums:
    (xq int8 or int16 [T, nb, K/nb], xd float32 [T, nb], xsum int32 [T, nb])."""
    return _quantized_as(x, nb, _QMAX[bits], _LIKE[bits])


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _linear_i8(xq, xd, qs, d, out):
    """out[t, n] = x[t] . w[n] for a q8_0 or w8a8 matrix (qs int8 [N, nb, bs]), x quantized."""
    N, T = qs.shape[0], xq.shape[0]
    Q = (N + 3) // 4
    pairs = T // 2 if _PAIRS and qs.shape[2] != 32 else 0     # w8a8, compiled: tokens two by two
    for g in prange(Q):
        n0, n1, n2, n3 = qblock.group4(g, Q, N)
        for p in range(pairs):
            _w8a8_pair(xq, xd, 2 * p, qs, d, n0, n1, n2, n3, out)
        for t in range(2 * pairs, T):
            a0, a1, a2, a3 = _idot4_q8(xq[t], xd[t], qs, d, n0, n1, n2, n3, 0, 1)
            qblock.store4(out, t, N, n0, n1, n2, n3, a0, a1, a2, a3)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _linear_i4(xq, xd, xsum, qs, d, o, c, out):
    """out[t, n] = x[t] . w[n] for a q4_0 (o = d, c = -8) or q4_1 (o = m, c = 1) matrix, x quantized."""
    N = qs.shape[0]
    Q = (N + 3) // 4
    for g in prange(Q):
        n0, n1, n2, n3 = qblock.group4(g, Q, N)
        for t in range(xq.shape[0]):
            a0, a1, a2, a3 = _idot4_q4(xq[t], xd[t], xsum[t], qs, d, o, c, n0, n1, n2, n3, 0, 1)
            qblock.store4(out, t, N, n0, n1, n2, n3, a0, a1, a2, a3)


# Tokens per call up to which the GGUF formats use the integer kernels (see the module docstring).
INT_MAX_TOKENS = {"q8_0": 3, "q4_0": 3, "q4_1": 3}
NO_LIMIT = 1 << 62        # w8a8: integers at every size


@numba.njit(cache=True)
def run_i8(x, qs, d, qmax, like, max_tokens, workers):
    """`reference.linear_int` for a q8_0 or w8a8 matrix (qs, d), x quantized to like's integer type
    with qmax; past max_tokens tokens the exact float GEMM (`qmatmul.run_q8`).  -> new [T, N]

    One call from Python for the whole operator: quantizing on the calling thread
    (a few tokens), then one start of the threads. No fast-math here (see `_quantize`)."""
    T, N = x.shape[0], qs.shape[0]
    if T > max_tokens:
        return qmatmul.run_q8(x, qs, d, workers)
    out = common.new_rows(T, N)
    if x.shape[1] == 0:
        out[:] = 0.0
    elif T > 0 and N > 0:
        xq, xd, _ = _quantized_as(x, qs.shape[1], qmax, like)
        _linear_i8(xq, xd, qs, d, out)
    return out


@numba.njit(cache=True)
def run_i4(x, qs, d, o, c, max_tokens, workers):
    """`run_i8` for a q4_0 or q4_1 matrix (qs, d, o, c); x as int16 per 32 values."""
    T, N = x.shape[0], qs.shape[0]
    if T > max_tokens:
        return qmatmul.run_q4(x, qs, d, o, c, workers)
    out = common.new_rows(T, N)
    if x.shape[1] == 0:
        out[:] = 0.0
    elif T > 0 and N > 0:
        xq, xd, xsum = _quantized_as(x, qs.shape[1], np.float32(32767), np.zeros(0, np.int16))
        _linear_i4(xq, xd, xsum, qs, d, o, c, out)
    return out


def int_args(w) -> tuple:
    """The arguments after x of `run_i8` / `run_i4` for a QuantWeight (workers last, added by the caller)."""
    if w.format in ("q8_0", "w8a8"):
        qs, d = checks.weight_arrays(w)
        bits = ACTIVATION_BITS[w.format]
        return qs, d, _QMAX[bits], _LIKE[bits], INT_MAX_TOKENS.get(w.format, NO_LIMIT)
    return (*checks.weight_arrays(w), INT_MAX_TOKENS[w.format])


def linear_i8(x: np.ndarray, w) -> np.ndarray:
    """`reference.linear_int` for a q8_0 or w8a8 QuantWeight.  x [T, K] -> new [T, N]."""
    return run_i8(x, *int_args(w), numba.get_num_threads())


def linear_i4(x: np.ndarray, w) -> np.ndarray:
    """`reference.linear_int` for a q4_0 or q4_1 QuantWeight.  x [T, K] -> new [T, N]."""
    return run_i4(x, *int_args(w), numba.get_num_threads())


LINEAR = {"q8_0": linear_i8, "w8a8": linear_i8, "q4_0": linear_i4, "q4_1": linear_i4}   # format -> kernel
