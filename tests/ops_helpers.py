"""What the operator tests share: the devices under test, input strategies, comparisons.

Devices. Every operator test runs on each device of `DEVICES` that this
process can use: "cpu" always, and the CUDA kernels either on a GPU ("cuda",
where one works) or under numba's simulator ("cuda-sim", which CI uses). The
numpy reference is the expectation; on a CUDA device the CPU's output for
the same drawn inputs is checked as well (`check_on`).

The simulator runs every GPU thread as a Python thread, so inputs are drawn
smaller there: `size(device, n)` is the largest size to draw.

Exactness. `linear` has two paths for quantized weights (xllm/ops/interface.py):
float32 on the dequantized matrix (`exact=True`), and int8 activations with
integer dot products (the CPU's default). The operator tests here run the
exact one on every device (`get_ops(device, exact=True)`); tests/test_ops_intmatmul.py
checks the integer one against `reference.linear_int`.

`assert_close` is the only float comparison used: it requires the expected
values to be finite and uses np.testing.assert_allclose, which fails on any NaN
the expected array does not have, so a kernel that returns NaN cannot pass.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from xllm.ops import available_devices, get_ops

# numba.cuda is the simulator or a GPU for a whole process; tests use the GPU
# where one works, else the simulator.
_available = available_devices()
CUDA_DEVICE = "cuda" if "cuda" in _available else ("cuda-sim" if "cuda-sim" in _available else None)
DEVICES = ["cpu"] + ([CUDA_DEVICE] if CUDA_DEVICE else [])
GPU_SHAPES = os.environ.get("XLLM_GPU_SHAPES") == "1"     # pytest -m gpu on a real GPU: larger inputs

EXAMPLES = settings(max_examples=30, deadline=None)
FEW_EXAMPLES = settings(max_examples=12, deadline=None)

cpu = get_ops("cpu", exact=True)
ref = get_ops("reference", exact=True)


def size(device: str, n: int) -> int:
    """The largest size to draw on `device` where the CPU draws up to n."""
    if device == "cuda-sim":
        return max(1, min(n, 8 if n >= 8 else n))
    if device == "cuda" and GPU_SHAPES:
        return 8 * n
    return n


# ---------------------------------------------------------------- running on a device

def on(device: str, op: str, *args, **kwargs):
    """ops.<op>(*args) on `device`: numpy arrays go up, the result comes back as numpy.

    Arguments that are not numpy arrays (weights already uploaded, scalars,
    None) pass as they are.
    """
    ops = get_ops(device, exact=True)
    up = [ops.upload(a) if isinstance(a, np.ndarray) else a for a in args]
    out = getattr(ops, op)(*up, **kwargs)
    if out is None:
        ops.synchronize()
        return None
    return ops.download(out)


def check_on(device: str, op: str, args, expected, compare) -> np.ndarray:
    """Run `op` on `device`, `compare(actual, expected)`; on a CUDA device also
    `compare(actual, cpu's output)` for the same inputs. Returns the device's output."""
    out = on(device, op, *args)
    compare(out, expected)
    if device != "cpu":
        compare(out, on("cpu", op, *args))
    return out


def upload_weight(device: str, w):
    """A weight (array or QuantWeight) in `device`'s memory in the format it has
    (the model's `upload_weight` would store float32 matrices as float16 on a GPU)."""
    ops = get_ops(device, exact=True)
    return w.map_arrays(ops.upload) if hasattr(w, "map_arrays") else ops.upload(w)


cuda = None       # numba.cuda, imported by _elementwise_kernel once get_ops has chosen the GPU or the simulator


@functools.cache
def _elementwise_kernel(module: str, name: str):
    """A kernel out[i] = body(x[i]), an element a thread, for the body `name` of
    xllm/ops/kernels/<module>.py as the GPU kernels compile it (cuda/bodies.py).

    `cuda` must be a global of the kernel: the simulator runs it with the
    module globals bound to numba.cuda swapped for its own.
    """
    global cuda
    from numba import cuda

    from xllm.ops.cuda import bodies

    body = getattr(getattr(bodies, module), name)

    @cuda.jit
    def kernel(x, out):
        for i in range(cuda.grid(1), x.shape[0], cuda.gridsize(1)):
            out[i] = body(x[i])

    return kernel


def gpu_elementwise(device: str, module: str, name: str, x: np.ndarray, out_dtype) -> np.ndarray:
    """<module>.<name>(x[i]) for every element of the 1-D array x, by the body compiled for
    the GPU, run on the CUDA `device`."""
    ops = get_ops(device)
    out = ops.empty(x.shape, out_dtype)
    ops.launch(_elementwise_kernel(module, name), ops.blocks(64), ops.threads, ops.upload(x), out)
    return ops.download(out)


# ---------------------------------------------------------------- comparisons

def assert_close(actual, expected, rtol=1e-5, scale=None):
    """actual == expected within rtol * scale (default: the largest |expected|).

    Fails on a dtype or shape difference, on non-finite expected values (this
    helper is for value tests), and on any NaN in actual.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float32, actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(expected).all(), "expected values must be finite in a value test"
    if scale is None:
        scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30)


def dot_scale(x, w):
    """The largest sum_k |x[t, k] * w[n, k]|: the size a dot product's rounding error scales with."""
    if x.size == 0 or w.size == 0:
        return 0.0
    return float((np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T).max())


# ---------------------------------------------------------------- inputs

@st.composite
def f32_arrays(draw, shape, bound=4.0):
    """A float32 array of `shape` with values in [-bound, bound], never NaN or inf."""
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) <= 256 and draw(st.booleans()):
        elements = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
        return draw(hnp.arrays(np.float32, shape, elements=elements))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


@contextlib.contextmanager
def serial_or_parallel(parallel: bool):
    """Make the CPU wrappers pick their parallel (or serial) driver for any size."""
    from xllm.ops.cpu import common

    saved = common.PARALLEL_MIN_ELEMENTS
    common.PARALLEL_MIN_ELEMENTS = 0 if parallel else 1 << 62
    try:
        yield
    finally:
        common.PARALLEL_MIN_ELEMENTS = saved


def parallel_flags(device: str):
    """The CPU runs both its serial and its parallel drivers; other devices have one."""
    return st.booleans() if device == "cpu" else st.just(False)


device_params = pytest.mark.parametrize("device", DEVICES)
