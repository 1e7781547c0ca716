"""The kernel bodies of `xllm/ops/kernels/`, compiled for the GPU.

    from .bodies import rows
    ...  rows.rmsnorm_scale(x, w, inv_rms, out, t, cuda.threadIdx.x, cuda.blockDim.x)

Each body becomes a `cuda.jit(device=True)` function: the same source the
CPU compiles (cpu/bodies.py), called by the grid kernels of this package.
Under the CUDA simulator they are the simulator's stand-ins, which run the
Python source in each simulated thread.
"""

from __future__ import annotations

from numba import cuda

from ..kernels import compile_bodies

_bodies = compile_bodies(cuda.jit(device=True))
attend, expf, f16, kv_format, qblock, rows = (
    _bodies.attend, _bodies.expf, _bodies.f16, _bodies.kv_format, _bodies.qblock, _bodies.rows)
