"""Row-wise operators on the GPU: rmsnorm, rope, silu_mul, add.

One thread block per row; its threads split the row's elements with the
`lane, lanes` arguments of the shared bodies (xllm/ops/kernels/rows.py).
add has no rows: its threads walk the flat arrays.
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float64

from .. import checks
from . import errors
from .bodies import rows
from .reduce import WARP, block_sum


# ---------------------------------------------------------------- rmsnorm

@cuda.jit
def _rmsnorm(x, w, eps, out):
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    scratch = cuda.shared.array(WARP, float64)
    for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):        # a block per row
        sum_squares = block_sum(rows.rmsnorm_sum_squares(x, t, lane, lanes), scratch)
        rows.rmsnorm_scale(x, w, rows.rmsnorm_inv_rms(sum_squares, x.shape[1], eps), out, t, lane, lanes)


def rmsnorm(ops, x, w, eps: float):
    checks.rmsnorm(x, w)
    out = ops.empty(x.shape, np.float32)
    ops.launch(_rmsnorm, ops.blocks(x.shape[0]), ops.threads, x, w, float(eps), out)
    return out


# ---------------------------------------------------------------- rope

@cuda.jit
def _rope(x, positions, cos, sin, out, err):
    # The block's threads form groups of `width` (at most hd/2), each rotating
    # one head at a time, so 128 threads rotate four 64-wide heads at once.
    H, half = x.shape[1], x.shape[2] // 2
    width = min(cuda.blockDim.x, max(half, 1))
    groups = cuda.blockDim.x // width
    group, lane = cuda.threadIdx.x // width, cuda.threadIdx.x % width
    for t in range(cuda.blockIdx.x, x.shape[0], cuda.gridDim.x):        # a block per row
        pos = positions[t]
        if pos < 0 or pos >= cos.shape[0]:
            if cuda.threadIdx.x == 0:
                errors.report(err, checks.BAD_POSITION, t, pos, cos.shape[0])
            continue                                                    # skip the row
        if group < groups:                                              # not a thread past the last group
            for h in range(group, H, groups):
                rows.rope_head(x, cos, sin, pos, out, t, h, lane, width)


def rope(ops, x, positions, cos, sin):
    checks.rope(x, positions, cos, sin)
    out = ops.empty(x.shape, np.float32)
    ops.launch(_rope, ops.blocks(x.shape[0]), ops.threads, x, positions, cos, sin, out, ops.err)
    return out


# ---------------------------------------------------------------- silu_mul

@cuda.jit
def _silu_mul(gate_up, out):
    for t in range(cuda.blockIdx.x, gate_up.shape[0], cuda.gridDim.x):  # a block per row
        rows.silu_mul_row(gate_up, out, t, cuda.threadIdx.x, cuda.blockDim.x)


def silu_mul(ops, gate_up):
    checks.silu_mul(gate_up)
    out = ops.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    ops.launch(_silu_mul, ops.blocks(gate_up.shape[0]), ops.threads, gate_up, out)
    return out


# ---------------------------------------------------------------- add

@cuda.jit
def _add(x, y, out):
    for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):        # every thread of the grid
        rows.add(x, y, out, i)


def add(ops, x, y):
    checks.add(x, y)
    out = ops.empty(x.shape, np.float32)
    n = out.size
    ops.launch(_add, ops.blocks(-(-n // ops.threads)), ops.threads, x.reshape(n), y.reshape(n), out.reshape(n))
    return out
