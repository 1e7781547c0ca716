"""The operator layer: one `Ops` object per device, with the same operators on each.

    from xllm.ops import get_ops, available_devices
    ops = get_ops("cpu")                 # or "reference", "cuda", "cuda-sim"
    y = ops.download(ops.linear(ops.upload(x), ops.upload_weight(w)))

The devices:

    "reference"  plain numpy: the specification (`reference.py`)
    "cpu"        numba `@njit(parallel=True)` kernels (`cpu/`)
    "cuda"       numba.cuda kernels on an NVIDIA GPU (`cuda/`); needs numba-cuda
                 (`pip install xllm[cuda]`) and a GPU with its driver
    "cuda-sim"   the same CUDA kernels run by numba's CUDA simulator, in plain
                 Python threads, on any machine: slow, for tests and for
                 stepping through a GPU thread in a debugger

Each operator's math is written once (`kernels/`) and compiled for the CPU
and for the GPU; only the loops that hand out the work differ per device.
`interface.py` lists what every device provides.

numba.cuda is either the real thing or the simulator for the life of a
process (it reads NUMBA_ENABLE_CUDASIM when first imported), so one process
can use "cuda" or "cuda-sim", not both.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys

from ..errors import XllmError
from .interface import FUSED, MEMORY, OPS, HostOps, LayerWeights, Ops

__all__ = ["DEVICES", "FUSED", "MEMORY", "OPS", "DeviceNotAvailable", "HostOps", "LayerWeights", "Ops",
           "available_devices", "get_ops", "ops_for", "resolve_device"]

DEVICES = ("cpu", "reference", "cuda", "cuda-sim")


class DeviceNotAvailable(XllmError, ValueError):
    """A known device that this machine (or this process) cannot run."""


_instances: dict[tuple[str, bool], Ops] = {}


def get_ops(device: str = "cpu", exact: bool = False) -> Ops:
    """The operators of `device` (one shared instance per device, `exact` and process).

    `exact=True` multiplies every weight format in float32, exactly as
    `w.dequantize()` stands for. The default lets a device quantize the
    activations to integers where it has integer kernels for a format
    (`Ops.int_linear_kernels`: the CPU does, for q8_0, q4_0, q4_1 and w8a8),
    as llama.cpp does; the GPU has none yet, so for it both are the same.
    """
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; known devices: {', '.join(DEVICES)}")
    key = (device, bool(exact) and device in ("cpu", "reference"))
    if key not in _instances:
        if device == "cpu":
            from .cpu import CpuOps as make
        elif device == "reference":
            from .reference import ReferenceOps as make
        else:
            _import_numba_cuda(simulator=device == "cuda-sim")
            from .cuda import CudaOps as make
        _instances[key] = make(exact=key[1])
    return _instances[key]


def available_devices() -> list[str]:
    """The devices this process can run, in order of preference for speed."""
    found = ["cpu", "reference"]
    if _gpu_problem() is None:
        found.insert(0, "cuda")
    if _sim_problem() is None:
        found.append("cuda-sim")
    return found


def resolve_device(device: str) -> str:
    """`device`, with "auto" replaced by "cuda" when a GPU works here, else "cpu"."""
    if device == "auto":
        return "cuda" if _gpu_problem() is None else "cpu"
    if device not in DEVICES:
        raise DeviceNotAvailable(f"unknown device {device!r}; choose auto, {', '.join(DEVICES)}")
    return device


def ops_for(device, exact: bool = False) -> Ops:
    """The operators of `device`: a name ("auto" included; see `get_ops` for `exact`)
    or an `Ops` object, used as it is."""
    return device if isinstance(device, Ops) else get_ops(resolve_device(device), exact)


# ---------------------------------------------------------------- finding numba.cuda and a GPU

def _numba_cuda_mode() -> str | None:
    """"sim" or "gpu" once numba.cuda is imported in this process, else None."""
    if "numba.cuda" not in sys.modules:
        return None
    from numba.core import config

    return "sim" if config.ENABLE_CUDASIM else "gpu"


def _has_numba_cuda() -> bool:
    return importlib.util.find_spec("numba_cuda") is not None


def _gpu_count() -> int:
    """GPUs the CUDA driver sees, asked without importing numba.cuda (0 without a driver)."""
    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def _gpu_problem() -> str | None:
    """Why "cuda" cannot run in this process, or None when it can."""
    if not _has_numba_cuda():
        return "numba-cuda is not installed (pip install xllm[cuda])"
    if _numba_cuda_mode() == "sim":
        return "this process loaded numba.cuda as the simulator (NUMBA_ENABLE_CUDASIM=1)"
    if _gpu_count() == 0:
        return "no CUDA GPU and driver found on this machine"
    return None


def _sim_problem() -> str | None:
    """Why "cuda-sim" cannot run in this process, or None when it can."""
    if not _has_numba_cuda():
        return "numba-cuda is not installed (pip install xllm[cuda])"
    if _numba_cuda_mode() == "gpu":
        return "this process already loaded numba.cuda for a real GPU; start Python with NUMBA_ENABLE_CUDASIM=1"
    return None


def _import_numba_cuda(simulator: bool) -> None:
    problem = _sim_problem() if simulator else _gpu_problem()
    if problem:
        raise DeviceNotAvailable(f"device {'cuda-sim' if simulator else 'cuda'}: {problem}")
    if _numba_cuda_mode() is None:
        from numba.core import config

        # numba.cuda reads this once, when it is first imported.
        config.ENABLE_CUDASIM = int(simulator)
        os.environ["NUMBA_ENABLE_CUDASIM"] = str(int(simulator))
        import numba.cuda  # noqa: F401
