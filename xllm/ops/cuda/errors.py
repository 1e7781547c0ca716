"""How a GPU kernel reports a bad index without stopping.

A kernel that finds an index out of range (a token id past the table, a
slot past the cache) must not read or write through it, and cannot raise.
It skips that element and records the problem in the device's error array
`err` (int64 [4]: code, index, value, limit; codes from `xllm/ops/checks.py`);
the first report wins. `CudaOps.download` and `CudaOps.synchronize` read the
array and raise the same exception the CPU raises at the call.
"""

from __future__ import annotations

from numba import cuda


@cuda.jit(device=True)
def report(err, code, index, value, limit):
    """Record (code, index, value, limit) in err unless an earlier problem is there."""
    if cuda.atomic.cas(err, 0, 0, code) == 0:
        err[1] = index
        err[2] = value
        err[3] = limit
