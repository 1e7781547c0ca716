"""The operator layer: one namespace of operators per device.

    from xllm.ops import get_ops
    ops = get_ops("cpu")            # Numba kernels
    y = ops.linear(x, w)

Every device provides the operators in OPS with the same signatures:
"reference" is plain numpy (the specification, `xllm/ops/reference.py`),
"cpu" is the compiled version the engine runs (`xllm/ops/cpu/`). All float
arrays are float32 and C-contiguous, index arrays int32, except the KV caches,
which may also be float16, or int8 with float32 scales (`store_kv`); each
operator returns a new array except `store_kv`, which writes into the caches.
"""

from __future__ import annotations

import importlib
from types import ModuleType

OPS = ("embedding", "rmsnorm", "linear", "rope", "rope_tables", "store_kv", "attention",
       "silu_mul", "add", "logits")

DEVICES = ("cpu", "reference", "cuda")

_MODULES = {"cpu": "xllm.ops.cpu", "reference": "xllm.ops.reference"}


class DeviceNotAvailable(NotImplementedError, ValueError):
    """A known device whose operators cannot be used (yet). Catchable as either base."""


def get_ops(device: str = "cpu") -> ModuleType:
    """The module holding the operators of `device` ("cpu", "reference" or "cuda")."""
    if device == "cuda":
        raise DeviceNotAvailable(
            "device 'cuda': the CUDA kernels are not implemented yet (numba.cuda versions of the CPU "
            "kernels are planned); use device 'cpu'")
    if device not in _MODULES:
        raise ValueError(f"unknown device {device!r}; known devices: {', '.join(DEVICES)}")
    return importlib.import_module(_MODULES[device])
