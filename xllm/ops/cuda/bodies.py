"""The kernel bodies of `xllm/ops/kernels/`, compiled for the GPU.

    from .bodies import rows
    ...  rows.rmsnorm_scale(x, w, inv_rms, out, t, cuda.threadIdx.x, cuda.blockDim.x)

Each body becomes a `cuda.jit(device=True)` function: the same source the
CPU compiles (cpu/bodies.py), called by the grid kernels of this package.
Under the CUDA simulator, which runs kernels as Python, the bodies stay
plain Python functions: a simulated device function would only wrap each
call (20 us a call, several per element) without changing what it does,
since bodies never touch the `cuda` module.
"""

from __future__ import annotations

from numba import cuda
from numba.core import config

from ..kernels import compile_bodies

_bodies = compile_bodies((lambda body: body) if config.ENABLE_CUDASIM else cuda.jit(device=True))
attend, expf, f16, kv_format, qblock, rows = (
    _bodies.attend, _bodies.expf, _bodies.f16, _bodies.kv_format, _bodies.qblock, _bodies.rows)
