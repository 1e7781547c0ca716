"""Settings and helpers shared by the CPU drivers.

FAST is the set of LLVM fast-math flags the kernels use for reductions (dot
products, sums of squares). It allows reassociation, which is what lets LLVM
turn `acc += a[k] * b[k]` into several SIMD accumulators with fused
multiply-adds. It deliberately leaves out `nnan` and `ninf`: with those LLVM
may assume NaN and inf never occur, and a NaN in the input could then vanish
instead of reaching the output.

Starting the thread pool for a `prange` loop costs a few microseconds, more than
the whole work of most operators during decode (one token, a few hundred
floats). Those operators' drivers are therefore compiled twice by
`serial_and_parallel`, once as a plain loop and once with threads, and the
wrapper picks the threaded one only when the array has at least
PARALLEL_MIN_ELEMENTS elements.

A 64-byte SIMD load that starts inside a cache line touches two lines and
costs about twice as much. Arrays from numpy start 16 bytes into a line
(large ones) and numba's np.empty 32 bytes, so a kernel that streams the
same rows from the L1 cache again and again (attention) ran at half speed.
Scratch rows in kernels come from `aligned_rows`, outputs from `empty`
(in Python) or `new_rows` (compiled); the host devices allocate the KV cache and keep
float32 weights the same way (`interface.HostOps`).
"""

import types

import numba
import numpy as np

from ..interface import ALIGN, ALIGN_FROM, aligned_array

FAST = {"reassoc", "contract", "nsz", "arcp"}

PARALLEL_MIN_ELEMENTS = 1 << 15


def serial_and_parallel(driver, fastmath=False):
    """(serial, parallel): `driver`, a loop written with `prange`, compiled
    without threads (prange is then a plain range) and with them.

    The threaded copy gets its own name, so numba's disk cache keeps the two
    apart (it names cache files after the function). Both use numpy's error
    model, which `parallel=True` implies: a float division by zero gives inf
    instead of raising, so numba puts no check before each division, and a
    loop that divides (SiLU's sigmoid) can run as SIMD code in both twins,
    which then give the same bits.
    """
    serial = numba.njit(cache=True, fastmath=fastmath, error_model="numpy")(driver)
    copy = types.FunctionType(driver.__code__, driver.__globals__, driver.__name__ + "_parallel",
                              driver.__defaults__, driver.__closure__)
    copy.__qualname__ = driver.__qualname__ + "_parallel"
    copy.__module__, copy.__doc__ = driver.__module__, driver.__doc__
    parallel = numba.njit(parallel=True, cache=True, fastmath=fastmath, error_model="numpy")(copy)
    return serial, parallel


@numba.njit(cache=True)
def first_out_of_range(idx, limit):
    """Index of the first element of idx outside [0, limit), or -1 if none.

    Compiled code has no bounds checks, so the drivers that index with data
    (token ids, positions, cache slots) call this before touching memory, and
    the wrapper turns a bad index into a ValueError (`checks.index_error`).
    """
    for i in range(idx.shape[0]):
        if idx[i] < 0 or idx[i] >= limit:
            return i
    return -1


def empty(shape, dtype=np.float32) -> np.ndarray:
    """np.empty on a cache line: the outputs of the wrappers, which the next kernel reads."""
    return aligned_array(np.empty, shape, dtype)


@numba.njit(cache=True)
def new_rows(rows, cols):
    """An uninitialised float32 [rows, cols] for a compiled driver's output, on a cache line
    from ALIGN_FROM bytes on (as `empty` makes the wrappers' outputs)."""
    if rows * cols * 4 >= ALIGN_FROM:
        return aligned_rows(rows, cols)
    return np.empty((rows, cols), np.float32)


@numba.njit(cache=True)
def aligned_rows(rows, cols):
    """An uninitialised float32 [rows, cols] array whose data starts on a cache line."""
    buf = np.empty(rows * cols + ALIGN // 4, np.float32)
    start = (-(buf.ctypes.data // 4)) % (ALIGN // 4)
    return buf[start : start + rows * cols].reshape((rows, cols))
