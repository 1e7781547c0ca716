"""linear (y = x @ w.T) for float weights: float32 ("f32") and float16 ("f16").

The weight w is [N, K] with rows contiguous, and so is every token row of x,
so each output y[t, n] is a dot product of two contiguous vectors
(`qblock.dot`, the body the GPU uses too). The kernels differ in how many
dot products share a pass over K.

* One token (decode): `_gemv`. Every weight element is used exactly once, so
  the time is the time to stream w from memory, if the arithmetic keeps up.
  Four rows a quarter of the matrix apart (`qblock.group4`, as in
  qmatmul.py) share each load of x, and each row's products go into a
  16-lane accumulator that stays in registers (`simd.load`, `simd.fma`),
  summed across lanes once at the end. Threads split the groups of rows.
  (A plain dot product per row, which LLVM vectorizes too, streamed half as
  fast: 8.9 against 17.8 GB/s on one Sapphire Rapids core, 212 MB of rows.)

* Many tokens (prefill): `_gemm`. Now every weight row is reused by every
  token, so the limit is arithmetic, and the trick is to keep numbers in
  registers. A 4 x 3 tile (4 tokens x 3 weight rows) loads 7 values per k and
  does 12 multiply-adds with them, into 12 accumulators that LLVM turns into
  12 SIMD registers (AVX2 has 16). Tiles are grouped into blocks of 48 weight
  rows x 64 tokens: a block's weight rows (48 x K floats) stay in L2 while the
  4 token rows of a tile stay in L1. Threads take blocks. The tiling is the
  CPU's own; the GPU has other ways to reuse a weight.

* float16 weights arrive as their bits (uint16, see `checks.weight_arrays`).
  They stay 2 bytes a weight in memory, half of float32's, and decode reads
  every weight once per token, so the f16 GEMV should take half the time of
  the f32 one. It is the same `_gemv`: `simd.load` widens 16 float16 in
  registers with one `vcvtph2ps`. `f16.widen`, which converts one element
  by integer arithmetic, does not vectorize: it is left to the last K % 16
  columns and to runs without numba (NUMBA_DISABLE_JIT=1, where simd.py
  cannot run). The GEMM widens a block of rows into a float32 scratch
  matrix once (`_gemm_f16`, with the same `simd.load`) and runs the tiles on
  it, as qmatmul.py does for the GGUF block formats with `_gemm_block` and
  `scratch_jobs` from here.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.core import config

from .. import checks
from . import common, simd
from .bodies import f16, qblock
from .common import FAST, aligned_rows

ROWS_PER_BLOCK = 48     # weight rows per work item of _gemm (a multiple of 3)
TOKENS_PER_BLOCK = 64   # token rows per work item of _gemm (a multiple of 4)
SCRATCH_BYTES = 384 << 10     # per worker of a converting GEMM: the float32 rows should stay in L2 (512 KiB)


# ---------------------------------------------------------------- GEMV: one token

@numba.njit(inline="always", fastmath=FAST)
def _simd_dot4(x, w, n0, n1, n2, n3):
    """x[0] . w[n] for the rows n0..n3 of w [N, K] (float32, or float16 bits), 16 columns at a time."""
    K = w.shape[1]
    K16 = K - K % 16
    a0 = simd.zeros(); a1 = simd.zeros(); a2 = simd.zeros(); a3 = simd.zeros()
    for k in range(0, K16, 16):
        xk = simd.load(x, k)
        a0 = simd.fma(a0, xk, simd.load(w, n0 * K + k))
        a1 = simd.fma(a1, xk, simd.load(w, n1 * K + k))
        a2 = simd.fma(a2, xk, simd.load(w, n2 * K + k))
        a3 = simd.fma(a3, xk, simd.load(w, n3 * K + k))
    s0 = simd.hsum(a0); s1 = simd.hsum(a1); s2 = simd.hsum(a2); s3 = simd.hsum(a3)
    for k in range(K16, K):                       # the last K % 16 columns
        xk = x[0, k]
        s0 += xk * f16.widen(w[n0, k]); s1 += xk * f16.widen(w[n1, k])
        s2 += xk * f16.widen(w[n2, k]); s3 += xk * f16.widen(w[n3, k])
    return s0, s1, s2, s3


def _plain_dot4(x, w, n0, n1, n2, n3):
    """`_simd_dot4` one element at a time (for NUMBA_DISABLE_JIT=1)."""
    return (qblock.dot(x, 0, w, n0, 0, 1), qblock.dot(x, 0, w, n1, 0, 1),
            qblock.dot(x, 0, w, n2, 0, 1), qblock.dot(x, 0, w, n3, 0, 1))


_dot4 = _plain_dot4 if config.DISABLE_JIT else _simd_dot4


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemv(x, w, out):
    """out[0, n] = x[0] . w[n] for w float32 or float16 bits [N, K]; threads split the groups of four rows."""
    N = w.shape[0]
    Q = (N + 3) // 4
    for g in prange(Q):
        n0, n1, n2, n3 = qblock.group4(g, Q, N)
        a0, a1, a2, a3 = _dot4(x, w, n0, n1, n2, n3)
        qblock.store4(out, 0, N, n0, n1, n2, n3, a0, a1, a2, a3)


# ---------------------------------------------------------------- GEMM: many tokens, float32 weights

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
def _simd_tile_4x3(x, w, out, t, n, K):
    """`_tile_4x3` in 16-lane registers (K a multiple of 16; x and w C-contiguous float32).

    Twelve 16-lane accumulators, one per (token, row), summed across their
    lanes at the end (`simd.hsum4`). LLVM vectorised `_tile_4x3` 8 lanes
    wide; here each step is 16 columns. Every output element is a 16-lane
    sum over K followed by the fixed lane sum, exactly as in `_simd_tile_1x1`,
    so a token gets the same bits in a tile of four or alone.
    """
    a00 = simd.zeros(); a01 = simd.zeros(); a02 = simd.zeros()
    a10 = simd.zeros(); a11 = simd.zeros(); a12 = simd.zeros()
    a20 = simd.zeros(); a21 = simd.zeros(); a22 = simd.zeros()
    a30 = simd.zeros(); a31 = simd.zeros(); a32 = simd.zeros()
    for k in range(0, K, 16):
        w0 = simd.load(w, n * K + k); w1 = simd.load(w, (n + 1) * K + k); w2 = simd.load(w, (n + 2) * K + k)
        x0 = simd.load(x, t * K + k)
        a00 = simd.fma(a00, x0, w0); a01 = simd.fma(a01, x0, w1); a02 = simd.fma(a02, x0, w2)
        x1 = simd.load(x, (t + 1) * K + k)
        a10 = simd.fma(a10, x1, w0); a11 = simd.fma(a11, x1, w1); a12 = simd.fma(a12, x1, w2)
        x2 = simd.load(x, (t + 2) * K + k)
        a20 = simd.fma(a20, x2, w0); a21 = simd.fma(a21, x2, w1); a22 = simd.fma(a22, x2, w2)
        x3 = simd.load(x, (t + 3) * K + k)
        a30 = simd.fma(a30, x3, w0); a31 = simd.fma(a31, x3, w1); a32 = simd.fma(a32, x3, w2)
    out[t, n], out[t, n + 1], out[t, n + 2], out[t + 1, n] = simd.hsum4(a00, a01, a02, a10)
    out[t + 1, n + 1], out[t + 1, n + 2], out[t + 2, n], out[t + 2, n + 1] = simd.hsum4(a11, a12, a20, a21)
    out[t + 2, n + 2], out[t + 3, n], out[t + 3, n + 1], out[t + 3, n + 2] = simd.hsum4(a22, a30, a31, a32)


@numba.njit(cache=True, fastmath=FAST)
def _simd_tile_1x1(x, w, out, t, n, K):
    """out[t, n] = x[t] . w[n], summed as `_simd_tile_4x3` sums each of its elements."""
    a = simd.zeros()
    for k in range(0, K, 16):
        a = simd.fma(a, simd.load(x, t * K + k), simd.load(w, n * K + k))
    out[t, n] = simd.hsum(a)


@numba.njit(cache=True, fastmath=FAST)
def _tile_1x3(x, w, out, t, n, K):
    """out[t, n:n+3] = w[n:n+3] @ x[t]: the tile for leftover tokens."""
    a0 = np.float32(0.0); a1 = np.float32(0.0); a2 = np.float32(0.0)
    for k in range(K):
        xk = x[t, k]
        a0 += xk * w[n, k]; a1 += xk * w[n + 1, k]; a2 += xk * w[n + 2, k]
    out[t, n] = a0; out[t, n + 1] = a1; out[t, n + 2] = a2


@numba.njit(cache=True, fastmath=FAST)
def _tile_1x1(x, w, out, t, n):
    """out[t, n] = dot(x[t], w[n]): the tile for leftover weight rows."""
    out[t, n] = qblock.dot(x, t, w, n, 0, 1)


@numba.njit(cache=True, fastmath=FAST)
def _gemm_block(x, w, out, n0, n1, t0, t1):
    """out[t0:t1, n0:n1] = x[t0:t1] @ w[n0:n1].T, in 4 x 3 tiles (and leftover tiles).

    w is float32. Also the inner part of the converting GEMMs (`_gemm_f16`,
    qmatmul.py), which call it on a block of rows they have just converted.
    """
    K = x.shape[1]
    n3 = n1 - (n1 - n0) % 3          # rows n0..n3 go in threes
    t4 = t1 - (t1 - t0) % 4          # tokens t0..t4 go in fours
    if K % simd.LANES == 0 and not config.DISABLE_JIT:
        for t in range(t0, t4, 4):
            for n in range(n0, n3, 3):
                _simd_tile_4x3(x, w, out, t, n, K)
        for t in range(t4, t1):
            for n in range(n0, n1):
                _simd_tile_1x1(x, w, out, t, n, K)
        for n in range(n3, n1):
            for t in range(t0, t4):
                _simd_tile_1x1(x, w, out, t, n, K)
        return
    for t in range(t0, t4, 4):
        for n in range(n0, n3, 3):
            _tile_4x3(x, w, out, t, n, K)
    for t in range(t4, t1):
        for n in range(n0, n3, 3):
            _tile_1x3(x, w, out, t, n, K)
    for n in range(n3, n1):
        for t in range(t0, t1):
            _tile_1x1(x, w, out, t, n)


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


# ---------------------------------------------------------------- GEMM: many tokens, converted rows

@numba.njit(cache=True)
def scratch_jobs(N, K, workers):
    """(rows per job, workers to use of `workers`) for a GEMM that converts rows into float32 scratch first.

    A worker converts a block of rows (about SCRATCH_BYTES of float32, a
    multiple of 3 rows for the tiles) and multiplies it with every token,
    then the next block of its own: each worker takes one contiguous run of
    blocks. Dealing the blocks out in turn made neighbouring output columns
    belong to different threads, and where two of them share a cache line
    (numpy aligns arrays to 16 bytes, not 64) the line bounced between the
    cores on every store: contiguous runs were 8-19% faster at 32 tokens
    (3072 x 576, a 2-core CPU).
    """
    rows = max(3, min(ROWS_PER_BLOCK, SCRATCH_BYTES // (4 * max(K, 1)) // 3 * 3))
    return rows, min(workers, -(-N // rows))


# ---------------------------------------------------------------- float16 weights

@numba.njit(inline="always", fastmath=FAST)
def _simd_widen_row(w, n, dst, r, k0, step):
    """`qblock.widen_row` (k0 = 0, step = 1) 16 columns at a time: dst[r] = w[n] as float32."""
    K = w.shape[1]
    K16 = K - K % 16
    for k in range(0, K16, 16):
        simd.store(simd.load(w, n * K + k), dst, r * dst.shape[1] + k)
    for k in range(K16, K):
        dst[r, k] = f16.widen(w[n, k])


_widen_row = qblock.widen_row if config.DISABLE_JIT else _simd_widen_row


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemm_f16(x, w, rows_per_job, n_workers, out):
    """out = x @ w.T for float16 bits w [N, K]: widen a block of rows, then the float32 tiles."""
    T, K = x.shape
    N = w.shape[0]
    n_jobs = (N + rows_per_job - 1) // rows_per_job
    for worker in prange(n_workers):
        scratch = aligned_rows(rows_per_job, K)    # this worker's, reused per job
        for job in range(worker * n_jobs // n_workers, (worker + 1) * n_jobs // n_workers):
            n0 = job * rows_per_job
            rows = min(rows_per_job, N - n0)
            for r in range(rows):
                _widen_row(w, n0 + r, scratch, r, 0, 1)
            _gemm_block(x, scratch, out[:, n0:n0 + rows], 0, rows, 0, T)


# ---------------------------------------------------------------- one call from Python each

@numba.njit(cache=True)
def run_f32(x, w, workers):
    """y = x @ w.T.  x [T, K] float32, w [N, K] float32 -> new [T, N] float32 (`workers`: unused, as
    every kernel of `linear` takes it)."""
    out = common.new_rows(x.shape[0], w.shape[0])
    if x.shape[0] == 1 and w.shape[0] > 0:
        _gemv(x, w, out)
    else:
        _gemm(x, w, out)
    return out


@numba.njit(cache=True)
def run_f16(x, bits, workers):
    """y = x @ w.T.  x [T, K] float32, bits [N, K] the float16 bits of w -> new [T, N] float32."""
    T, N = x.shape[0], bits.shape[0]
    out = common.new_rows(T, N)
    if T == 1 and N > 0:
        _gemv(x, bits, out)
    elif T > 1 and N > 0:
        rows, n_workers = scratch_jobs(N, x.shape[1], workers)
        _gemm_f16(x, bits, rows, n_workers, out)
    return out


# ---------------------------------------------------------------- wrappers (shapes checked by Ops.linear)

def linear_f32(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T.  x [T, K] float32, w [N, K] float32 -> new [T, N] float32."""
    return run_f32(x, w, 1)


def linear_f16(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ w.T.  x [T, K] float32, w [N, K] float16 -> new [T, N] float32."""
    (bits,) = checks.weight_arrays(w)
    return run_f16(x, bits, numba.get_num_threads())


LINEAR = {"f32": linear_f32, "f16": linear_f16}      # weight format -> kernel (CpuOps.linear_kernels)
