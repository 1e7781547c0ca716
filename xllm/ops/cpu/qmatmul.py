"""Matrix products and embedding lookups with quantized weights (`QuantWeight`).

Read xllm/weights.py first for the formats. In short, block b of row n
holds 32 small integers q and a scale d (plus an offset m in q4_1), and the
weight they stand for is d * q (q8_0), d * q + m (q4_1) or d * (q - 8) (q4_0).
All arithmetic here is float32, on exactly those values.

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

  Each pass computes four rows at once (`_dot4_*`), sharing the loads of
  x between them and the loop overhead per block; four was the fastest in a
  micro-benchmark (1, 2, 4, 8 tried). The four rows are a quarter of the
  matrix apart (`_group`), and threads split the groups.

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
  float32 GEMM is one dequantization of the weight per call.
  Each worker takes one contiguous run of row blocks. Dealing the blocks out
  in turn made neighbouring output columns belong to different threads, and
  where two of them share a cache line (numpy aligns arrays to 16 bytes, not
  64) the line bounced between the cores on every store: contiguous runs
  were 8-19% faster at 32 tokens (3072 x 576, this 2-core CPU).

* Embedding: the selected rows are dequantized (`_dequant_row_*`, the same
  helpers the GEMM uses); the result is bit-identical to `dequantize()`.

q4_0 runs through the q4_1 code: d * (q - 8) = d * q + d * (-8), so it is
q4_1 with offset o = d and a constant factor c = -8 (q4_1 itself has o = m,
c = 1). The kernels take (o, c) and compute o * c * xsum.

NaN in x gives NaN out: the kernels use FAST (no nnan/ninf), like matmul.py.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ...weights import BLOCK, QuantWeight
from .common import FAST
from .matmul import ROWS_PER_BLOCK, _gemm_block
from .common import first_out_of_range as _first_out_of_range

f32 = np.float32

SCRATCH_BYTES = 384 << 10     # per worker of _gemm_q8/_gemm_q4: the dequantized rows should stay in L2 (512 KiB)


# ---------------------------------------------------------------- GEMV: one token

@numba.njit(cache=True, fastmath=FAST)
def _dot4_q8(xb, qs, d, n0, n1, n2, n3):
    """x . row n for the four rows n0..n3 of a q8_0 matrix.

    xb is x as [K/32, 32] (block b is xb[b]); qs is [N, K/32, 32] int8.
    """
    nb, bs = qs.shape[1], qs.shape[2]
    a0 = f32(0.0); a1 = f32(0.0); a2 = f32(0.0); a3 = f32(0.0)
    for b in range(nb):
        s0 = f32(0.0); s1 = f32(0.0); s2 = f32(0.0); s3 = f32(0.0)
        for j in range(bs):                  # the SIMD loop: int8 -> float32, multiply-add
            xv = xb[b, j]
            s0 += f32(qs[n0, b, j]) * xv
            s1 += f32(qs[n1, b, j]) * xv
            s2 += f32(qs[n2, b, j]) * xv
            s3 += f32(qs[n3, b, j]) * xv
        a0 += d[n0, b] * s0
        a1 += d[n1, b] * s1
        a2 += d[n2, b] * s2
        a3 += d[n3, b] * s3
    return a0, a1, a2, a3


@numba.njit(cache=True, fastmath=FAST)
def _dot4_q4(xlo, xhi16, xsum_c, qs, d, o, n0, n1, n2, n3):
    """x . row n for the four rows n0..n3 of a q4_0/q4_1 matrix.

    qs is [N, K/32, 16] uint8: byte j of block b packs values j (low nibble)
    and j + 16 (high nibble). The x side comes prepared by `_split_x`:
    xlo[b, j] = x[32b + j], xhi16[b, j] = x[32b + 16 + j] / 16, and
    xsum_c[b] = c * (sum of block b of x).
    """
    nb, half = qs.shape[1], qs.shape[2]
    a0 = f32(0.0); a1 = f32(0.0); a2 = f32(0.0); a3 = f32(0.0)
    for b in range(nb):
        s0 = f32(0.0); s1 = f32(0.0); s2 = f32(0.0); s3 = f32(0.0)
        for j in range(half):                # the SIMD loop: unpack two nibbles, two multiply-adds
            xl = xlo[b, j]
            xh = xhi16[b, j]
            q0 = qs[n0, b, j]; q1 = qs[n1, b, j]; q2 = qs[n2, b, j]; q3 = qs[n3, b, j]
            s0 += f32(q0 & 0x0F) * xl + f32(q0 & 0xF0) * xh
            s1 += f32(q1 & 0x0F) * xl + f32(q1 & 0xF0) * xh
            s2 += f32(q2 & 0x0F) * xl + f32(q2 & 0xF0) * xh
            s3 += f32(q3 & 0x0F) * xl + f32(q3 & 0xF0) * xh
        xs = xsum_c[b]
        a0 += d[n0, b] * s0 + o[n0, b] * xs
        a1 += d[n1, b] * s1 + o[n1, b] * xs
        a2 += d[n2, b] * s2 + o[n2, b] * xs
        a3 += d[n3, b] * s3 + o[n3, b] * xs
    return a0, a1, a2, a3


@numba.njit(cache=True, fastmath=FAST)
def _split_x(x, c, xlo, xhi16, xsum_c):
    """Lay out the token x [K] for `_dot4_q4` (see there): a few hundred floats, once per call."""
    nb = xlo.shape[0]
    for b in range(nb):
        s = f32(0.0)
        for j in range(16):
            lo = x[32 * b + j]
            hi = x[32 * b + 16 + j]
            xlo[b, j] = lo
            xhi16[b, j] = hi * f32(0.0625)
            s += lo + hi
        xsum_c[b] = c * s


@numba.njit(cache=True)
def _store4(out, N, n0, n1, n2, n3, a0, a1, a2, a3):
    """out[0, row] = result for the rows of a group that exist (see `_group`)."""
    out[0, n0] = a0
    if n1 < N:
        out[0, n1] = a1
    if n2 < N:
        out[0, n2] = a2
    if n3 < N:
        out[0, n3] = a3


@numba.njit(cache=True)
def _group(g, Q, N):
    """The rows of group g: g, g + Q, g + 2Q, g + 3Q (Q = ceil(N / 4)), clamped to N - 1.

    Rows a quarter of the matrix apart, not four neighbours: then each of the
    four is a sequential stream through memory, which the hardware prefetcher
    follows. Reading four adjacent rows block by block made the cold (from
    DRAM) GEMV twice as slow in a benchmark, though it was as fast in cache.
    Rows past the end repeat the last row; `_store4` skips their results.
    """
    last = N - 1
    return g, min(g + Q, last), min(g + 2 * Q, last), min(g + 3 * Q, last)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemv_q8(x, qs, d, out):
    """out[0, n] = x[0] . w[n] for a q8_0 matrix; threads split the groups of four rows."""
    N, nb, bs = qs.shape
    xb = x[0].reshape(nb, bs)
    Q = (N + 3) // 4
    for g in prange(Q):
        n0, n1, n2, n3 = _group(g, Q, N)
        a0, a1, a2, a3 = _dot4_q8(xb, qs, d, n0, n1, n2, n3)
        _store4(out, N, n0, n1, n2, n3, a0, a1, a2, a3)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemv_q4(x, qs, d, o, c, out):
    """out[0, n] = x[0] . w[n] for a q4_0 (o = d, c = -8) or q4_1 (o = m, c = 1) matrix."""
    N, nb, half = qs.shape
    xlo = np.empty((nb, 16), np.float32)
    xhi16 = np.empty((nb, 16), np.float32)
    xsum_c = np.empty(nb, np.float32)
    _split_x(x[0], f32(c), xlo, xhi16, xsum_c)
    Q = (N + 3) // 4
    for g in prange(Q):
        n0, n1, n2, n3 = _group(g, Q, N)
        a0, a1, a2, a3 = _dot4_q4(xlo, xhi16, xsum_c, qs, d, o, n0, n1, n2, n3)
        _store4(out, N, n0, n1, n2, n3, a0, a1, a2, a3)


# ---------------------------------------------------------------- dequantizing rows

# No fastmath here: these produce exactly the numbers of QuantWeight.dequantize().
# (d * q is exact, see quant.py, so the only rounding is the final "+ offset".)

@numba.njit(cache=True)
def _dequant_row_q8(qs, d, n, dst, r):
    """dst[r] = row n of a q8_0 matrix; qs [N, K/32, 32], dst float32 [R, K/32, 32]."""
    for b in range(qs.shape[1]):
        db = d[n, b]
        for j in range(qs.shape[2]):
            dst[r, b, j] = db * f32(qs[n, b, j])


@numba.njit(cache=True)
def _dequant_row_q4(qs, d, o, c, n, dst, r):
    """dst[r] = row n of a q4_0/q4_1 matrix; qs [N, K/32, 16], dst float32 [R, K/32, 32].

    The high nibble is used in place as in `_dot4_q4`: (d / 16) * (byte & 0xF0)
    is d * q_hi exactly (d / 16 is exact, and so are both products).
    """
    for b in range(qs.shape[1]):
        db = d[n, b]
        db16 = db * f32(0.0625)
        ob = o[n, b] * f32(c)
        for j in range(qs.shape[2]):
            byte = qs[n, b, j]
            dst[r, b, j] = db * f32(byte & 0x0F) + ob
            dst[r, b, 16 + j] = db16 * f32(byte & 0xF0) + ob


# ---------------------------------------------------------------- GEMM: many tokens

@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemm_q8(x, qs, d, rows_per_job, n_workers, out):
    """out = x @ w.T for a q8_0 matrix: dequantize a block of rows, then the float32 tiles."""
    T, K = x.shape
    N, nb, bs = qs.shape
    n_jobs = (N + rows_per_job - 1) // rows_per_job
    for worker in prange(n_workers):
        w = np.empty((rows_per_job, K), np.float32)        # this worker's scratch, reused per job
        w_blocks = w.reshape(rows_per_job, nb, bs)          # the same memory, block by block
        for job in range(worker * n_jobs // n_workers, (worker + 1) * n_jobs // n_workers):
            n0 = job * rows_per_job
            rows = min(rows_per_job, N - n0)
            for r in range(rows):
                _dequant_row_q8(qs, d, n0 + r, w_blocks, r)
            _gemm_block(x, w, out[:, n0:n0 + rows], 0, rows, 0, T)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _gemm_q4(x, qs, d, o, c, rows_per_job, n_workers, out):
    """out = x @ w.T for a q4_0/q4_1 matrix: dequantize a block of rows, then the float32 tiles."""
    T, K = x.shape
    N, nb, half = qs.shape
    n_jobs = (N + rows_per_job - 1) // rows_per_job
    for worker in prange(n_workers):
        w = np.empty((rows_per_job, K), np.float32)
        w_blocks = w.reshape(rows_per_job, nb, 2 * half)
        for job in range(worker * n_jobs // n_workers, (worker + 1) * n_jobs // n_workers):
            n0 = job * rows_per_job
            rows = min(rows_per_job, N - n0)
            for r in range(rows):
                _dequant_row_q4(qs, d, o, c, n0 + r, w_blocks, r)
            _gemm_block(x, w, out[:, n0:n0 + rows], 0, rows, 0, T)


# ---------------------------------------------------------------- embedding

@numba.njit(cache=True)
def _embedding_q8_serial(qs, d, ids, out):
    bad = _first_out_of_range(ids, qs.shape[0])
    if bad < 0:
        out_blocks = out.reshape(ids.shape[0], qs.shape[1], qs.shape[2])
        for t in range(ids.shape[0]):
            _dequant_row_q8(qs, d, ids[t], out_blocks, t)
    return bad


@numba.njit(parallel=True, cache=True)
def _embedding_q8_parallel(qs, d, ids, out):
    bad = _first_out_of_range(ids, qs.shape[0])
    if bad < 0:
        out_blocks = out.reshape(ids.shape[0], qs.shape[1], qs.shape[2])
        for t in prange(ids.shape[0]):
            _dequant_row_q8(qs, d, ids[t], out_blocks, t)
    return bad


@numba.njit(cache=True)
def _embedding_q4_serial(qs, d, o, c, ids, out):
    bad = _first_out_of_range(ids, qs.shape[0])
    if bad < 0:
        out_blocks = out.reshape(ids.shape[0], qs.shape[1], 2 * qs.shape[2])
        for t in range(ids.shape[0]):
            _dequant_row_q4(qs, d, o, c, ids[t], out_blocks, t)
    return bad


@numba.njit(parallel=True, cache=True)
def _embedding_q4_parallel(qs, d, o, c, ids, out):
    bad = _first_out_of_range(ids, qs.shape[0])
    if bad < 0:
        out_blocks = out.reshape(ids.shape[0], qs.shape[1], 2 * qs.shape[2])
        for t in prange(ids.shape[0]):
            _dequant_row_q4(qs, d, o, c, ids[t], out_blocks, t)
    return bad


# ---------------------------------------------------------------- wrappers

def _offsets(w: QuantWeight):
    """(o, c) of the 4-bit formats: value = d * q + o * c (see the module docstring)."""
    if w.format == "q4_1":
        return w.m, 1.0
    return w.d, -8.0                                   # q4_0: d * (q - 8) = d * q + d * (-8)


def qlinear(x: np.ndarray, w: QuantWeight) -> np.ndarray:
    """y = x @ w.dequantize().T without making the float32 matrix.  x [T, K] -> new [T, N]."""
    qs = w.blocks                                      # [N, K/32, bytes per block]
    N, K = qs.shape[0], BLOCK * qs.shape[1]
    if x.ndim != 2 or x.shape[1] != K:
        raise ValueError(f"linear: need x [T, K] and w [N, K], got {x.shape} and {w.shape} ({w.format})")
    T = x.shape[0]
    out = np.empty((T, N), np.float32)
    if T == 0 or N == 0:
        return out
    if T == 1:
        if w.format == "q8_0":
            _gemv_q8(x, qs, w.d, out)
        else:
            _gemv_q4(x, qs, w.d, *_offsets(w), out)
        return out
    rows = max(3, min(ROWS_PER_BLOCK, SCRATCH_BYTES // (4 * K) // 3 * 3))
    workers = min(numba.get_num_threads(), -(-N // rows))
    if w.format == "q8_0":
        _gemm_q8(x, qs, w.d, rows, workers, out)
    else:
        _gemm_q4(x, qs, w.d, *_offsets(w), rows, workers, out)
    return out


def qembedding(table: QuantWeight, ids: np.ndarray, parallel: bool = False) -> np.ndarray:
    """out[t] = table.dequantize()[ids[t]], dequantizing only those rows.  -> new [T, D].

    `parallel` picks the threaded driver (pointwise.embedding decides, as for float32 tables).
    """
    if ids.ndim != 1:
        raise ValueError(f"embedding: need table [V, D] and ids [T], got {table.shape} and {ids.shape}")
    V, D = table.shape
    out = np.empty((ids.shape[0], D), np.float32)
    qs = table.blocks
    if table.format == "q8_0":
        bad = (_embedding_q8_parallel if parallel else _embedding_q8_serial)(qs, table.d, ids, out)
    else:
        run = _embedding_q4_parallel if parallel else _embedding_q4_serial
        bad = run(qs, table.d, *_offsets(table), ids, out)
    if bad >= 0:
        raise ValueError(f"embedding: ids[{bad}] = {ids[bad]} is not a row of the {V}-row table")
    return out

LINEAR = {"q8_0": qlinear, "q4_0": qlinear, "q4_1": qlinear}     # weight format -> kernel
