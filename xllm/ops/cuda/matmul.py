"""linear (y = x @ w.T) on the GPU, for every weight format.

The math is the CPU's, in the bodies of xllm/ops/kernels/qblock.py. Each
output goes to one warp: its WARP_LANES lanes share the dot product and add
their parts with `warp_sum` (shuffles, no barrier); a block holds several
warps, and the warps walk the items grid-stride:

    f32, f16     item (token t, row n); the lanes split K (`qblock.dot`;
                 float16 weights arrive as their bits and are widened per element)
    q8_0         item (token t, group of four rows); the lanes split the
                 row's blocks (`qblock.dot4_q8`), as the CPU's GEMV does for one token
    q4_0, q4_1   the same with `qblock.dot4_q4`, after `_split_x` has laid out
                 every token's x as the body wants it (scratch [T, K/32, 16])

This is the plain version: one pass over the weight per token, no tensor
cores, no shared-memory tiles, no vector loads.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from .. import checks
from .bodies import qblock
from .reduce import WARP_LANES, warp_sum


@cuda.jit(device=True)
def _warp_items():
    """(first item, step, lane) of this thread's warp: warp w of block b takes
    items b * warps + w, then every (gridDim * warps)-th one."""
    warps = cuda.blockDim.x // WARP_LANES
    warp = cuda.threadIdx.x // WARP_LANES
    return cuda.blockIdx.x * warps + warp, cuda.gridDim.x * warps, cuda.threadIdx.x % WARP_LANES


# ---------------------------------------------------------------- float weights (f32, f16)

@cuda.jit
def _linear_float(x, w, out):
    """out[t, n] = x[t] . w[n]; w float32 or float16 bits [N, K]."""
    first, step, lane = _warp_items()
    N = w.shape[0]
    for item in range(first, x.shape[0] * N, step):
        t, n = item // N, item % N
        total = warp_sum(qblock.dot(x, t, w, n, lane, WARP_LANES))
        if lane == 0:
            out[t, n] = total


def linear_float(ops, x, w):
    """x [T, K] float32, w [N, K] float32 or float16 -> new [T, N] float32."""
    (wk,) = checks.weight_arrays(w)
    T, N = x.shape[0], wk.shape[0]
    out = ops.empty((T, N), np.float32)
    ops.launch(_linear_float, ops.warp_blocks(T * N), ops.threads, x, wk, out)
    return out


# ---------------------------------------------------------------- block formats

@cuda.jit(device=True)
def _store_group(out, t, N, n0, n1, n2, n3, a0, a1, a2, a3, lane):
    """Add up the warp's parts of the four rows' dot products; lane 0 stores them."""
    a0, a1, a2, a3 = warp_sum(a0), warp_sum(a1), warp_sum(a2), warp_sum(a3)
    if lane == 0:
        qblock.store4(out, t, N, n0, n1, n2, n3, a0, a1, a2, a3)


@cuda.jit
def _linear_q8(xb, qs, d, out):
    """out[t, n] = x[t] . w[n] for a q8_0 matrix; xb is x as [T, K/32, 32]."""
    first, step, lane = _warp_items()
    N = qs.shape[0]
    Q = (N + 3) // 4
    for item in range(first, xb.shape[0] * Q, step):
        t, g = item // Q, item % Q
        n0, n1, n2, n3 = qblock.group4(g, Q, N)
        a0, a1, a2, a3 = qblock.dot4_q8(xb[t], qs, d, n0, n1, n2, n3, lane, WARP_LANES)
        _store_group(out, t, N, n0, n1, n2, n3, a0, a1, a2, a3, lane)


@cuda.jit
def _split_x(x, c, xlo, xhi16, xsum_c):
    """Every token's x [T, K] laid out for dot4_q4: xlo, xhi16 [T, K/32, 16], xsum_c [T, K/32]."""
    for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):
        qblock.split_x(x[t], c, xlo[t], xhi16[t], xsum_c[t], cuda.threadIdx.x, cuda.blockDim.x)


@cuda.jit
def _linear_q4(xlo, xhi16, xsum_c, qs, d, o, out):
    """out[t, n] = x[t] . w[n] for a q4_0/q4_1 matrix, from the layout of `_split_x`."""
    first, step, lane = _warp_items()
    N = qs.shape[0]
    Q = (N + 3) // 4
    for item in range(first, xlo.shape[0] * Q, step):
        t, g = item // Q, item % Q
        n0, n1, n2, n3 = qblock.group4(g, Q, N)
        a0, a1, a2, a3 = qblock.dot4_q4(xlo[t], xhi16[t], xsum_c[t], qs, d, o, n0, n1, n2, n3, lane, WARP_LANES)
        _store_group(out, t, N, n0, n1, n2, n3, a0, a1, a2, a3, lane)


def linear_q8(ops, x, w):
    """x [T, K] float32, w a q8_0 or w8a8 QuantWeight [N, K] -> new [T, N] float32.

    A w8a8 matrix is one block per row, so a warp's lanes have only one block
    to share: correct, not fast (the GPU's int8 kernels are still to come).
    """
    qs, d = checks.weight_arrays(w)
    T, N, nb, bs = x.shape[0], qs.shape[0], qs.shape[1], qs.shape[2]
    out = ops.empty((T, N), np.float32)
    ops.launch(_linear_q8, ops.warp_blocks(T * -(-N // 4)), ops.threads, x.reshape(T, nb, bs), qs, d, out)
    return out


def linear_q4(ops, x, w):
    """x [T, K] float32, w a q4_0 or q4_1 QuantWeight [N, K] -> new [T, N] float32."""
    qs, d, o, c = checks.weight_arrays(w)
    T, N, nb = x.shape[0], qs.shape[0], qs.shape[1]
    out = ops.empty((T, N), np.float32)
    xlo, xhi16 = ops.empty((T, nb, 16), np.float32), ops.empty((T, nb, 16), np.float32)
    xsum_c = ops.empty((T, nb), np.float32)
    ops.launch(_split_x, ops.blocks(T), ops.threads, x, c, xlo, xhi16, xsum_c)
    ops.launch(_linear_q4, ops.warp_blocks(T * -(-N // 4)), ops.threads, xlo, xhi16, xsum_c, qs, d, o, out)
    return out


LINEAR = {"f32": linear_float, "f16": linear_float,           # weight format -> fn(ops, x, w)
          "q8_0": linear_q8, "q4_0": linear_q4, "q4_1": linear_q4, "w8a8": linear_q8}
