"""The device registry: every device provides the same operators with the same signatures."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from tests.ops_helpers import CUDA_DEVICE, DEVICES
from xllm.errors import XllmError
from xllm.ops import DEVICES as KNOWN, MEMORY, OPS, DeviceNotAvailable, Ops, available_devices, get_ops, resolve_device
from xllm.weights import QuantWeight

pytestmark = pytest.mark.gpu       # `pytest -m gpu` runs these on a GPU (README)

USABLE = DEVICES + ["reference"]


def signature(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


@pytest.mark.parametrize("device", USABLE)
def test_every_device_provides_every_operator_and_memory_function_with_the_interface_signature(device):
    ops = get_ops(device)
    assert isinstance(ops, Ops) and ops.name == device
    for name in OPS + MEMORY + ("take_rows",):
        fn = getattr(ops, name)
        assert callable(fn), name
        assert signature(fn) == signature(getattr(Ops, name))[1:], (device, name)   # [1:]: without self
        assert getattr(type(ops), name) is not getattr(Ops, name) or name in ("embedding", "linear", "logits",
                                                                              "rope_tables", "synchronize",
                                                                              "prepare_layers"), \
            f"{device} does not implement {name}"


@pytest.mark.parametrize("device", USABLE)
def test_every_device_has_a_kernel_for_every_weight_format(device):
    ops = get_ops(device)
    for fmt in ("f32", "f16", "q8_0", "q4_0", "q4_1"):
        assert fmt in ops.linear_kernels and fmt in ops.embedding_kernels, (device, fmt)


def test_a_weight_format_without_a_kernel_names_the_device_and_the_format():
    class NoF16(type(get_ops("reference"))):
        name = "no-f16"
        linear_kernels = {"f32": get_ops("reference").linear_kernels["f32"]}

    with pytest.raises(ValueError, match="device 'no-f16' has no kernel for f16 weights"):
        NoF16().linear(np.ones((1, 4), np.float32), np.ones((2, 4), np.float16))


def test_available_devices_and_the_test_devices():
    found = available_devices()
    assert found[-2:] != [] and "cpu" in found and "reference" in found
    assert set(found) <= set(KNOWN)
    if CUDA_DEVICE:
        assert CUDA_DEVICE in found


def test_the_other_cuda_mode_is_refused_with_a_one_line_reason():
    if CUDA_DEVICE is None:
        pytest.skip("numba-cuda is not installed: neither CUDA device can run")   # CI installs it
    get_ops(CUDA_DEVICE)                                  # loads numba.cuda in this mode
    other = "cuda" if CUDA_DEVICE == "cuda-sim" else "cuda-sim"
    assert other not in available_devices()
    with pytest.raises(DeviceNotAvailable) as err:
        get_ops(other)
    assert isinstance(err.value, XllmError) and isinstance(err.value, ValueError)
    assert f"device {other}:" in str(err.value) and "\n" not in str(err.value)


def test_unknown_device_names_it_and_the_known_ones():
    with pytest.raises(ValueError) as err:
        get_ops("tpu")
    assert "'tpu'" in str(err.value)
    for device in KNOWN:
        assert device in str(err.value)
    with pytest.raises(DeviceNotAvailable, match="'tpu'"):
        resolve_device("tpu")


def test_auto_is_the_gpu_where_one_works_else_the_cpu():
    assert resolve_device("auto") == ("cuda" if "cuda" in available_devices() else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.parametrize("device", USABLE)
def test_upload_download_zeros_and_weights(device):
    ops = get_ops(device)
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(ops.download(ops.upload(a)), a)
    z = ops.download(ops.zeros((2, 5), np.float16))
    assert z.dtype == np.float16 and z.shape == (2, 5) and not z.any()
    assert ops.download(ops.empty((2, 3), np.int8)).shape == (2, 3)
    norm = ops.download(ops.upload_weight(np.ones(4, np.float32)))
    assert norm.dtype == np.float32                      # vectors stay float32 everywhere
    w = ops.upload_weight(a)
    stored = ops.download(w)
    assert stored.dtype == (np.float16 if device.startswith("cuda") else np.float32)
    np.testing.assert_array_equal(stored.astype(np.float32), a)   # small integers: exact in float16
    assert ops.download(ops.upload_weight(a, f32=True)).dtype == np.float32
    q = QuantWeight("q8_0", np.ones((2, 32), np.int8), np.full((2, 1), 0.5, np.float32))
    qd = ops.upload_weight(q)
    assert qd.format == "q8_0" and qd.shape == (2, 32)
    np.testing.assert_array_equal(ops.download(qd.d), q.d)


def test_the_cpu_disk_cache_is_stamped_with_the_kernel_bodies(tmp_path, monkeypatch):
    """An edited body must recompile the CPU drivers that inline it (numba's cache alone
    knows only the driver's own file): the drivers' cache stamp covers xllm/ops/kernels/."""
    import shutil

    from xllm.ops.cpu import bodies, pointwise

    locator = pointwise._rmsnorm_serial._cache._impl.locator
    assert isinstance(locator, bodies._BodiesAwareLocator)
    stamp = locator.get_source_stamp()
    copy = tmp_path / "kernels"
    shutil.copytree(bodies._KERNELS_DIR, copy)
    monkeypatch.setattr(bodies, "_KERNELS_DIR", copy)
    bodies._bodies_stamp.cache_clear()
    try:
        assert locator.get_source_stamp() == stamp                        # same sources, same stamp
        (copy / "rows.py").write_text((copy / "rows.py").read_text() + "\n# edited\n")
        bodies._bodies_stamp.cache_clear()
        assert locator.get_source_stamp() != stamp
    finally:
        bodies._bodies_stamp.cache_clear()


@pytest.mark.skipif(CUDA_DEVICE != "cuda-sim", reason="the simulator is what CI runs (numba-cuda installed, no GPU)")
def test_the_threads_of_a_simulated_block_share_each_shared_array_even_when_they_race(monkeypatch):
    """numba-cuda's simulator looks up a block's shared array, and makes it if missing,
    without a lock: threads that reach the line together each make their own, and their
    reductions then read uninitialised memory. (One full test run here failed on such
    garbage, an attention error code of 2**30.) An allocation that lets the other
    threads run makes the race certain."""
    import threading
    import time

    get_ops("cuda-sim")                                   # installs xllm/ops/cuda/simulator.py
    from numba.cuda.simulator import kernelapi

    from xllm.ops.cuda import simulator

    class SlowEmpty:
        def __getattr__(self, name):
            return getattr(np, name)

        @staticmethod
        def empty(*args, **kwargs):
            time.sleep(0.01)                              # another thread runs here
            return np.empty(*args, **kwargs)

    monkeypatch.setattr(kernelapi, "np", SlowEmpty())
    monkeypatch.setattr(simulator, "np", SlowEmpty())

    def arrays_made(array_fn) -> int:
        shared, start, got = kernelapi.FakeCUDAShared(0), threading.Barrier(4), []

        def thread():
            start.wait()
            got.append(array_fn(shared, 32, np.float32))   # the same line in every thread

        threads = [threading.Thread(target=thread) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return len({id(a) for a in got})

    assert arrays_made(simulator._original[0]) > 1        # numba-cuda's own: the threads race
    assert arrays_made(kernelapi.FakeCUDAShared.array) == 1
