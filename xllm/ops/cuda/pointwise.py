"""Row-wise operators on the GPU: rmsnorm, rope, silu_mul, add.

One thread block per row; its threads split the row's elements with the
`lane, lanes` arguments of the shared bodies (xllm/ops/kernels/rows.py).
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float64

from .. import checks
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


def rope(ops, x, positions, cos, sin):
    raise NotImplementedError("rope on the GPU is being written")


def silu_mul(ops, gate_up):
    raise NotImplementedError("silu_mul on the GPU is being written")


def add(ops, x, y):
    raise NotImplementedError("add on the GPU is being written")
