"""Matrix products: `linear` (y = x @ w.T) and `logits` (linear on chosen rows).

The weight w is [N, K] with rows contiguous, and so is every token row of x,
so each output y[t, n] is a dot product of two contiguous vectors. Both
kernels below are built from that one idea; what differs is how many dot
products share a pass over K.

* One token (decode): `_gemv`. Every weight element is used exactly once, so
  the time is the time to stream w from memory. Threads split the output
  rows; the inner loop is a plain dot product that LLVM vectorizes (AVX2 FMA)
  because FAST allows it to reassociate the sum.

* Many tokens (prefill): `_gemm`. Now every weight row is reused by every
  token, so the limit is arithmetic, and the trick is to keep numbers in
  registers. A 4 x 3 tile (4 tokens x 3 weight rows) loads 7 values per k and
  does 12 multiply-adds with them, into 12 accumulators that LLVM turns into
  12 SIMD registers (AVX2 has 16). Tiles are grouped into blocks of 48 weight
  rows x 64 tokens: a block's weight rows (48 x K floats) stay in L2 while the
  4 token rows of a tile stay in L1. Threads take blocks.

Quantized weights (`QuantWeight`) have their own kernels in qmatmul.py;
`linear` hands them over.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ...weights import QuantWeight
from .common import FAST

ROWS_PER_BLOCK = 48     # weight rows per work item of _gemm (a multiple of 3)
TOKENS_PER_BLOCK = 64   # token rows per work item of _gemm (a multiple of 4)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemv(x, w, out):
    """out[0, n] = dot(x[0], w[n]) for every n; threads split the rows of w."""
    N, K = w.shape
    for n in prange(N):
        acc = np.float32(0.0)
        for k in range(K):
            acc += x[0, k] * w[n, k]
        out[0, n] = acc


@numba.njit(cache=True, fastmath=FAST)
def _tile_4x3(x, w, out, t, n, K):
    """out[t:t+4, n:n+3] = x[t:t+4] @ w[n:n+3].T with twelve register accumulators."""
    a00 = np.float32(0.0); a01 = np.float32(0.0); a02 = np.float32(0.0)
    a10 = np.float32(0.0); a11 = np.float32(0.0); a12 = np.float32(0.0)
    a20 = np.float32(0.0); a21 = np.float32(0.0); a22 = np.float32(0.0)
    a30 = np.float32(0.0); a31 = np.float32(0.0); a32 = np.float32(0.0)
    for k in range(K):
        w0 = w[n, k]; w1 = w[n + 1, k]; w2 = w[n + 2, k]
        x0 = x[t, k]
        a00 += x0 * w0; a01 += x0 * w1; a02 += x0 * w2
        x1 = x[t + 1, k]
        a10 += x1 * w0; a11 += x1 * w1; a12 += x1 * w2
        x2 = x[t + 2, k]
        a20 += x2 * w0; a21 += x2 * w1; a22 += x2 * w2
        x3 = x[t + 3, k]
        a30 += x3 * w0; a31 += x3 * w1; a32 += x3 * w2
    out[t, n] = a00; out[t, n + 1] = a01; out[t, n + 2] = a02
    out[t + 1, n] = a10; out[t + 1, n + 1] = a11; out[t + 1, n + 2] = a12
    out[t + 2, n] = a20; out[t + 2, n + 1] = a21; out[t + 2, n + 2] = a22
    out[t + 3, n] = a30; out[t + 3, n + 1] = a31; out[t + 3, n + 2] = a32


@numba.njit(cache=True, fastmath=FAST)
def _tile_1x3(x, w, out, t, n, K):
    """out[t, n:n+3] = w[n:n+3] @ x[t]: the tile for leftover tokens."""
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0)
    for k in range(K):
        xk = x[t, k]
        a0 += xk * w[n, k]; a1 += xk * w[n + 1, k]; a2 += xk * w[n + 2, k]
    out[t, n] = a0; out[t, n + 1] = a1; out[t, n + 2] = a2


@numba.njit(cache=True, fastmath=FAST)
def _tile_1x1(x, w, out, t, n, K):
    """out[t, n] = dot(x[t], w[n]): the tile for leftover weight rows."""
    acc = np.float32(0.0)
    for k in range(K):
        acc += x[t, k] * w[n, k]
    out[t, n] = acc


@numba.njit(cache=True, fastmath=FAST)
def _gemm_block(x, w, out, n0, n1, t0, t1):
    """out[t0:t1, n0:n1] = x[t0:t1] @ w[n0:n1].T, in 4 x 3 tiles (and leftover tiles).

    Also the inner part of the quantized GEMM (qmatmul.py), which calls it on
    a block of weight rows it has just dequantized.
    """
    K = x.shape[1]
    n3 = n1 - (n1 - n0) % 3          # rows n0..n3 go in threes
    t4 = t1 - (t1 - t0) % 4          # tokens t0..t4 go in fours
    for t in range(t0, t4, 4):
        for n in range(n0, n3, 3):
            _tile_4x3(x, w, out, t, n, K)
    for t in range(t4, t1):
        for n in range(n0, n3, 3):
            _tile_1x3(x, w, out, t, n, K)
    for n in range(n3, n1):
        for t in range(t0, t1):
            _tile_1x1(x, w, out, t, n, K)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemm(x, w, out):
    """out = x @ w.T, tiled: blocks of (48 weight rows x 64 tokens) run in parallel."""
    T = x.shape[0]
    N = w.shape[0]
    n_blocks = (N + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    t_blocks = (T + TOKENS_PER_BLOCK - 1) // TOKENS_PER_BLOCK
    for job in prange(n_blocks * t_blocks):
        n0 = (job // t_blocks) * ROWS_PER_BLOCK
        t0 = (job % t_blocks) * TOKENS_PER_BLOCK
        _gemm_block(x, w, out, n0, min(n0 + ROWS_PER_BLOCK, N), t0, min(t0 + TOKENS_PER_BLOCK, T))


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T.  x [T, K] float32, w [N, K] float32 -> new [T, N] float32.

    w may also be a QuantWeight (xllm/weights.py): then qmatmul.py computes it.
    """
    if isinstance(w, QuantWeight):
        return qmatmul.qlinear(x, w)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: need x [T, K] and w [N, K], got {x.shape} and {w.shape}")
    out = np.empty((x.shape[0], w.shape[0]), np.float32)
    if x.shape[0] == 1:
        _gemv(x, w, out)
    else:
        _gemm(x, w, out)
    return out


def logits(x: np.ndarray, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
    """linear(x[rows], w): the output projection of the rows that need logits.  -> [R, V].

    `rows` indexes x like numpy does (x[rows] copies the chosen rows, and an
    index past the end raises IndexError).
    """
    return linear(x[rows], w)


# At the end: qmatmul imports _gemm_block and ROWS_PER_BLOCK from this module.
from . import qmatmul  # noqa: E402

LINEAR = {"f32": linear}      # weight format -> kernel (CpuOps.linear_kernels)
