"""Two changes to numba's CUDA simulator, made when the device "cuda-sim" starts.

The simulator runs each thread of a block as a Python thread, and a manager
thread that polls them for `syncthreads`.

1. Quick thread switches. The manager polls while holding the GIL, so every
   `syncthreads` waited out Python's thread switch interval (5 ms). A switch
   interval of 0.1 ms makes the kernels with reductions about 10 times faster.

2. Shared arrays made under a lock. The simulator gives the threads of a
   block one `cuda.shared.array` per source line: the first thread to reach
   the line makes it and the others look it up. Two threads that reach the
   line together can both find nothing and each make their own, and then
   they share nothing (their reductions read garbage). numba-cuda 0.30.4
   checks and stores without a lock; quick thread switches (1.) make that
   race common. `_shared_array` does the same under a lock, keyed like the
   original by the caller's file and line.
"""

from __future__ import annotations

import sys
import threading

import numpy as np

SWITCH_INTERVAL_S = 1e-4


def adapt() -> None:
    """Make both changes (idempotent)."""
    from numba.cuda.simulator import kernelapi

    sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
    if kernelapi.FakeCUDAShared.array is not _shared_array:
        _original[0] = kernelapi.FakeCUDAShared.array
        kernelapi.FakeCUDAShared.array = _shared_array


_original = [None]
_lock = threading.Lock()


def _shared_array(self, shape, dtype, alignment=None):
    """FakeCUDAShared.array, with its lookup-or-create of a block's array made atomic."""
    if shape == 0 or alignment is not None:      # dynamic shared memory, or the simulator's error
        return _original[0](self, shape, dtype, alignment)
    from numba.cuda import types
    from numba.cuda.np import numpy_support

    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    caller = sys._getframe(1)
    key = (caller.f_code.co_filename, caller.f_lineno)
    with _lock:
        array = self._allocations.get(key)
        if array is None:
            array = self._allocations[key] = np.empty(shape, dtype)
    return array
