"""linear with the GGUF block formats (`QuantWeight`: q8_0, q4_0, q4_1).

Read xllm/weights.py first for the formats. In short, block b of row n
holds 32 small integers q and a scale d (plus an offset m in q4_1), and the
weight they stand for is d * q (q8_0), d * q + m (q4_1) or d * (q - 8) (q4_0).
All arithmetic here is float32, on exactly those values.

The math of a block (dequantizing it, its dot product with x) is in the
bodies of xllm/ops/kernels/qblock.py, which the GPU runs too; this module
hands out the work on the CPU.

* One token (decode): `_gemv_q8`, `_gemv_q4`. The scale is the same for the
  32 values of a block, so it comes out of the block's sum:

      y[n] = sum_b  d[n,b] * (sum_j q[n,b,j] * x[32b+j])  +  m[n,b] * xsum[b]

  where xsum[b] is the sum of x over block b, computed once per call. The
  inner sum converts integers to floats and multiplies them by x: it is the
  only loop over all the weights, and it must run as SIMD code. Decode
  speed is bytes read, and a q4_1 weight is 0.75 bytes against float32's 4,
  so the kernel can afford more arithmetic per weight than the float32 GEMV.

  Writing that loop so LLVM vectorizes it took three rules, each found by
  reading the generated assembly (`kernel.inspect_asm()`):

  1. The inner loop runs over a block (`for j in range(qs.shape[2])`), and
     its length must not be a constant. With `range(16)` LLVM unrolls it
     completely and then vectorizes the loop over *blocks* instead, loading
     every value separately. The wrappers therefore pass qs as a 3-D view
     [N, K/32, bytes per block] (`QuantWeight.blocks`), whose last dimension
     LLVM cannot see.
  2. Array indices must be visibly non-negative. `x[b, 16 + j]` is; an index
     like `x[b, half + j]` (half read from an array shape) makes Numba add
     its negative-index fix-up to every load, which stops vectorization.
     The x-side arrays are therefore laid out to be indexed by plain j.
  3. Numba does integer arithmetic in 64 bits, and AVX2 cannot convert
     64-bit integers to floats. `byte & 0x0F` is fine (LLVM sees the result
     fits in 8 bits), but `byte >> 4` stayed 64-bit. So the high nibble is
     used in place: `byte & 0xF0` is 16 * q_hi, and the x values it
     multiplies are divided by 16 beforehand (exact: a power of two).

  Rules 1 and 2 hold inside the bodies too: their block loops take a range
  (b0, step) for the GPU's threads, and the drivers here pass (0, 1).

  Each pass computes four rows at once (`qblock.dot4_q8`, `dot4_q4`),
  sharing the loads of x between them and the loop overhead per block; four
  was the fastest in a micro-benchmark (1, 2, 4, 8 tried). The four rows are
  a quarter of the matrix apart (`qblock.group4`): then each of the four is
  a sequential stream through memory, which the hardware prefetcher follows.
  Reading four adjacent rows block by block made the cold (from DRAM) GEMV
  twice as slow in a benchmark, though it was as fast in cache. Threads
  split the groups.

  Even so the kernel is limited by arithmetic, not memory: about 9.5 G
  weights/s per core (Zen 3, AVX2), while one pass over the integers alone
  runs at twice that; the rest goes to the per-block work (reducing each
  block's SIMD sum to a float, applying d and m). That is still 1.5 to 2
  times faster than the float32 GEMV for q4_1 and 2.3 to 3 times for q8_0
  (bench/ops_cpu.py), which streams 4 bytes per weight at memory speed.

* Many tokens (prefill): `_gemm_q8`, `_gemm_q4`. Each weight is now used by every token,
  so arithmetic is the limit and unpacking integers T times would be waste.
  A worker dequantizes a block of weight rows into a float32 scratch matrix
  once (it fits in L2), then runs the float32 register-tiled GEMM of
  matmul.py (`_gemm_block`) on it for all tokens. The extra cost over the
  float32 GEMM is one dequantization of the weight per call. Each worker
  takes one contiguous run of row blocks (`matmul.scratch_jobs` says why).

Embedding dequantizes the selected rows with the same bodies (embedding.py).

q4_0 runs through the q4_1 code: d * (q - 8) = d * q + d * (-8), so it is
q4_1 with offset o = d and a constant factor c = -8 (q4_1 itself has o = m,
c = 1; `checks.weight_arrays` hands over (qs, d, o, c)). The kernels compute
o * c * xsum.

NaN in x gives NaN out: the kernels use FAST (no nnan/ninf), like matmul.py.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import checks
from . import common
from .bodies import qblock
from .common import FAST, aligned_rows
from .matmul import _gemm_block, scratch_jobs


# ---------------------------------------------------------------- GEMV: one token

@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemv_q8(x, qs, d, out):
    """out[0, n] = x[0] . w[n] for a q8_0 matrix; threads split the groups of four rows."""
    N, nb, bs = qs.shape
    xb = x[0].reshape(nb, bs)
    Q = (N + 3) // 4
    for g in prange(Q):
        n0, n1, n2, n3 = qblock.group4(g, Q, N)
        a0, a1, a2, a3 = qblock.dot4_q8(xb, qs, d, n0, n1, n2, n3, 0, 1)
        qblock.store4(out, 0, N, n0, n1, n2, n3, a0, a1, a2, a3)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemv_q4(x, qs, d, o, c, out):
    """out[0, n] = x[0] . w[n] for a q4_0 (o = d, c = -8) or q4_1 (o = m, c = 1) matrix."""
    N, nb, half = qs.shape
    xlo = np.empty((nb, 16), np.float32)
    xhi16 = np.empty((nb, 16), np.float32)
    xsum_c = np.empty(nb, np.float32)
    qblock.split_x(x[0], c, xlo, xhi16, xsum_c, 0, 1)
    Q = (N + 3) // 4
    for g in prange(Q):
        n0, n1, n2, n3 = qblock.group4(g, Q, N)
        a0, a1, a2, a3 = qblock.dot4_q4(xlo, xhi16, xsum_c, qs, d, o, n0, n1, n2, n3, 0, 1)
        qblock.store4(out, 0, N, n0, n1, n2, n3, a0, a1, a2, a3)


# ---------------------------------------------------------------- GEMM: many tokens

@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemm_q8(x, qs, d, rows_per_job, n_workers, out):
    """out = x @ w.T for a q8_0 matrix: dequantize a block of rows, then the float32 tiles."""
    T, K = x.shape
    N, nb, bs = qs.shape
    n_jobs = (N + rows_per_job - 1) // rows_per_job
    for worker in prange(n_workers):
        w = aligned_rows(rows_per_job, K)        # this worker's scratch, reused per job
        w_blocks = w.reshape(rows_per_job, nb, bs)          # the same memory, block by block
        for job in range(worker * n_jobs // n_workers, (worker + 1) * n_jobs // n_workers):
            n0 = job * rows_per_job
            rows = min(rows_per_job, N - n0)
            for r in range(rows):
                qblock.dequant_q8(qs, d, n0 + r, w_blocks, r, 0, 1)
            _gemm_block(x, w, out[:, n0:n0 + rows], 0, rows, 0, T)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemm_q4(x, qs, d, o, c, rows_per_job, n_workers, out):
    """out = x @ w.T for a q4_0/q4_1 matrix: dequantize a block of rows, then the float32 tiles."""
    T, K = x.shape
    N, nb, half = qs.shape
    n_jobs = (N + rows_per_job - 1) // rows_per_job
    for worker in prange(n_workers):
        w = aligned_rows(rows_per_job, K)
        w_blocks = w.reshape(rows_per_job, nb, 2 * half)
        for job in range(worker * n_jobs // n_workers, (worker + 1) * n_jobs // n_workers):
            n0 = job * rows_per_job
            rows = min(rows_per_job, N - n0)
            for r in range(rows):
                qblock.dequant_q4(qs, d, o, c, n0 + r, w_blocks, r, 0, 1)
            _gemm_block(x, w, out[:, n0:n0 + rows], 0, rows, 0, T)


# ---------------------------------------------------------------- one call from Python each

@numba.njit(cache=True)
def run_q8(x, qs, d, workers):
    """y = x @ w.dequantize().T for a q8_0 (or w8a8) matrix given as qs, d, without making the
    float32 matrix.  -> new [T, N]"""
    T, N = x.shape[0], qs.shape[0]
    out = common.new_rows(T, N)
    if T == 1:
        _gemv_q8(x, qs, d, out)
    elif T > 1 and N > 0:
        rows, n_workers = scratch_jobs(N, x.shape[1], workers)
        _gemm_q8(x, qs, d, rows, n_workers, out)
    return out


@numba.njit(cache=True)
def run_q4(x, qs, d, o, c, workers):
    """`run_q8` for a q4_0 or q4_1 matrix given as qs, d, o, c (`checks.weight_arrays`)."""
    T, N = x.shape[0], qs.shape[0]
    out = common.new_rows(T, N)
    if T == 1:
        _gemv_q4(x, qs, d, o, c, out)
    elif T > 1 and N > 0:
        rows, n_workers = scratch_jobs(N, x.shape[1], workers)
        _gemm_q4(x, qs, d, o, c, rows, n_workers, out)
    return out


# ---------------------------------------------------------------- wrappers (shapes checked by Ops.linear)

def linear_q8(x: np.ndarray, w) -> np.ndarray:
    """y = x @ w.dequantize().T for a q8_0 QuantWeight, without making the float32 matrix.  -> new [T, N]."""
    qs, d = checks.weight_arrays(w)
    return run_q8(x, qs, d, numba.get_num_threads())


def linear_q4(x: np.ndarray, w) -> np.ndarray:
    """y = x @ w.dequantize().T for a q4_0 or q4_1 QuantWeight, without making the float32 matrix."""
    qs, d, o, c = checks.weight_arrays(w)
    return run_q4(x, qs, d, o, c, numba.get_num_threads())


LINEAR = {"q8_0": linear_q8, "q4_0": linear_q4, "q4_1": linear_q4, "w8a8": linear_q8}   # format -> kernel
