"""Sums and maxima across threads: the one place that differs between a real
GPU and the simulator.

    total = block_sum(value, scratch)      # every thread gets the block's total
    top = block_max(value, scratch)
    total = warp_sum(value)                # every lane gets its warp's total

`scratch` is a shared array of WARP elements of the value's type, made by the
calling kernel (`cuda.shared.array(WARP, float32)`). Every thread of the block
must call, with blockDim.x at most WARP * WARP.

On a GPU the 32 threads of a warp exchange registers with `shfl_down_sync`
(no memory, no barrier), and one value per warp goes through shared memory.
The simulator has no warp shuffles; there a block has at most WARP threads
(`CudaOps.threads`) and the values are added pairwise in shared memory.
Both add in a tree, so neither is the CPU's left-to-right order: results
agree with the CPU to rounding, not bit for bit.

`warp_sum` serves kernels that give each output to one warp (the matrix
products): the WARP_LANES lanes of a warp split the work and add up with
shuffles alone, no barrier. Under the simulator, which has no shuffles, a
warp is a single thread (WARP_LANES = 1) that does the whole of its output,
so `warp_sum` has nothing to add; those kernels are written for any
WARP_LANES, and the simulator checks them with the one it has.
"""

from __future__ import annotations

from numba import cuda
from numba.core import config

WARP = 32
FULL_MASK = 0xFFFFFFFF
WARP_LANES = 1 if config.ENABLE_CUDASIM else WARP      # lanes that share one output (see the docstring)


@cuda.jit(device=True)
def _combine(a, b, take_max):
    if take_max:
        return a if a > b or b != b else b      # a NaN is passed over, as by the CPU's `if s > m` loops
    return a + b


@cuda.jit(device=True)
def _reduce_shuffle(value, scratch, take_max):
    lane = cuda.threadIdx.x % WARP
    warp = cuda.threadIdx.x // WARP
    offset = WARP // 2
    while offset > 0:                                        # within each warp
        value = _combine(value, cuda.shfl_down_sync(FULL_MASK, value, offset), take_max)
        offset //= 2
    if lane == 0:
        scratch[warp] = value
    cuda.syncthreads()
    n_warps = (cuda.blockDim.x + WARP - 1) // WARP
    if warp == 0:                                            # across the warps
        value = scratch[lane] if lane < n_warps else scratch[0]
        offset = WARP // 2
        while offset > 0:
            other = cuda.shfl_down_sync(FULL_MASK, value, offset)
            if lane + offset < n_warps:
                value = _combine(value, other, take_max)
            offset //= 2
        if lane == 0:
            scratch[0] = value
    cuda.syncthreads()
    total = scratch[0]
    cuda.syncthreads()                                       # scratch may be reused next
    return total


@cuda.jit(device=True)
def _reduce_shared(value, scratch, take_max):
    lane = cuda.threadIdx.x
    scratch[lane] = value
    cuda.syncthreads()
    width = 1
    while width < cuda.blockDim.x:                           # pairs, then pairs of pairs, ...
        if lane % (2 * width) == 0 and lane + width < cuda.blockDim.x:
            scratch[lane] = _combine(scratch[lane], scratch[lane + width], take_max)
        width *= 2
        cuda.syncthreads()
    total = scratch[0]
    cuda.syncthreads()
    return total


_reduce = _reduce_shared if config.ENABLE_CUDASIM else _reduce_shuffle


@cuda.jit(device=True)
def block_sum(value, scratch):
    """The sum of `value` over the threads of the block, returned to every thread."""
    return _reduce(value, scratch, False)


@cuda.jit(device=True)
def block_max(value, scratch):
    """The largest `value` over the threads of the block (NaN values passed over), returned to every thread."""
    return _reduce(value, scratch, True)


@cuda.jit(device=True)
def _warp_sum_shuffle(value):
    offset = WARP // 2
    while offset > 0:                    # butterfly: every lane ends with the total
        value += cuda.shfl_xor_sync(FULL_MASK, value, offset)
        offset //= 2
    return value


@cuda.jit(device=True)
def _warp_sum_one_lane(value):
    return value


_warp_sum = _warp_sum_one_lane if config.ENABLE_CUDASIM else _warp_sum_shuffle


@cuda.jit(device=True)
def warp_sum(value):
    """The sum of `value` over the WARP_LANES lanes of this thread's warp, returned to each.

    Every lane of the warp must call it (the loops that lead here must be the
    same for the whole warp).
    """
    return _warp_sum(value)
