"""Compile every CUDA kernel to PTX and assemble it to machine code, without a GPU.

    python -m xllm.ops.cuda.assemble [--arch sm_80 sm_90]

The simulator runs the kernels as Python, so it cannot tell whether the CUDA
compiler accepts them (it types code the simulator never types) or whether
inline PTX is valid (NVVM passes it through unread). This tool checks both on
any machine with numba-cuda's toolkit wheels (`pip install xllm[cuda]`):

1. It runs the tiny model's forward pass (`xllm.testing.tiny_llama`) in every
   weight format and KV cache format, prefill and decode, on `AssembleOps`:
   the CUDA device with numpy arrays for memory and a `launch` that compiles
   the kernel for the argument types it was given instead of running it. So
   each kernel is compiled with exactly the types the engine launches it with.
2. Each (kernel, types) pair is compiled to PTX for every --arch with
   `numba.cuda.compile_ptx`, and the PTX is assembled into a cubin by
   nvJitLink, which rejects what the GPU could not run.
3. Every kernel defined in xllm.ops.cuda must have been compiled at least once.

It prints one line per compilation and exits with 1 on any failure. The test
suite runs it (tests/test_ops_cuda_assemble.py). It must run in a process
that has not loaded the CUDA simulator.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time

import numpy as np


def _require_real_numba_cuda() -> None:
    from numba.core import config

    if "numba.cuda" in sys.modules and config.ENABLE_CUDASIM:
        raise SystemExit("assemble: this process loaded the CUDA simulator; run it without NUMBA_ENABLE_CUDASIM=1")
    config.ENABLE_CUDASIM = 0
    os.environ["NUMBA_ENABLE_CUDASIM"] = "0"


class _Device:
    """What numba asks of the current GPU while typing a call to a device function."""

    def __init__(self, cc):
        self.compute_capability = cc


def kernels_of_the_package() -> dict[str, object]:
    """Every grid kernel (a `cuda.jit` function that is not a device function) in xllm.ops.cuda."""
    from numba.cuda.dispatcher import CUDADispatcher

    from xllm.ops import cuda as package

    found = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for name, value in vars(module).items():
            if (isinstance(value, CUDADispatcher) and not value.targetoptions.get("device")
                    and value.py_func.__module__ == module.__name__):
                found[f"{info.name}.{name}"] = value
    return found


def _argument_type(a):
    """The numba type a launch with argument `a` compiles for (device arrays are never read-only)."""
    from numba import typeof, types

    t = typeof(a)
    if isinstance(t, types.Array):
        return types.Array(t.dtype, t.ndim, t.layout)
    return t


def assemble_ptx(ptx: str, arch: str) -> int:
    """Assemble PTX into a cubin for `arch` ("sm_90") with nvJitLink; return its size in bytes."""
    from cuda.bindings import nvjitlink

    handle = nvjitlink.create(1, [f"-arch={arch}"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(handle, nvjitlink.InputType.PTX, data, len(data), "kernel.ptx")
        try:
            nvjitlink.complete(handle)
        except nvjitlink.nvJitLinkError as e:
            size = nvjitlink.get_error_log_size(handle)
            log = bytearray(size)
            nvjitlink.get_error_log(handle, log)
            raise RuntimeError(f"nvJitLink rejected the PTX for {arch}: {log.decode(errors='replace').strip()}") from e
        return nvjitlink.get_linked_cubin_size(handle)
    finally:
        nvjitlink.destroy(handle)


def make_assemble_ops(archs: list[str], log=print):
    """A CudaOps whose launches compile and assemble instead of running (see the module docstring)."""
    _require_real_numba_cuda()
    import numba.cuda.dispatcher as dispatcher
    from numba import cuda

    from xllm.ops.cuda import CudaOps

    class AssembleOps(CudaOps):
        def __init__(self):
            self.compiled: dict[tuple, dict[str, int]] = {}   # (kernel, types) -> {arch: cubin bytes}
            self.failures: list[str] = []
            super().__init__()
            self.name = "cuda-assemble"

        def launch(self, kernel, grid, block, *args):
            key = (f"{kernel.py_func.__module__.rsplit('.', 1)[-1]}.{kernel.py_func.__name__}",
                   tuple(_argument_type(a) for a in args))
            if key in self.compiled:
                return
            self.compiled[key] = {}
            for arch in archs:
                cc = (int(arch[3:-1]), int(arch[-1]))
                dispatcher.get_current_device = lambda cc=cc: _Device(cc)
                t0 = time.perf_counter()
                try:
                    ptx, _ = cuda.compile_ptx(kernel.py_func, key[1], cc=cc,
                                              fastmath=kernel.targetoptions.get("fastmath", False))
                    cubin = assemble_ptx(ptx, arch)
                except Exception as e:  # noqa: BLE001 - every failure is reported, then the run fails
                    self.failures.append(f"{key[0]} {arch}: {type(e).__name__}: {e}")
                    log(f"FAIL {key[0]:32s} {arch}  {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                    continue
                self.compiled[key][arch] = cubin
                log(f"ok   {key[0]:32s} {arch}  ptx {len(ptx):7d} B  cubin {cubin:7d} B  "
                    f"{time.perf_counter() - t0:5.1f} s  ({', '.join(str(t) for t in key[1])})")

        # Memory is host memory: nothing runs, so only the types matter.
        def upload(self, a):
            return np.ascontiguousarray(a)

        def download(self, a):
            return np.asarray(a)

        def synchronize(self):
            pass

        def check_errors(self):
            pass

        def empty(self, shape, dtype):
            return np.zeros(shape, dtype)

    return AssembleOps()


def exercise(ops) -> None:
    """Run the tiny model the way the engine does, in every weight and KV cache format.

    Each model runs one step with two sequences prefilling (several rows:
    the GEMM paths) and one decoding step (one row: the GEMV paths).
    """
    from xllm.kv_cache import KVCache
    from xllm.model import Batch
    from xllm.testing import tiny_llama
    from xllm.weights import WEIGHT_FORMATS

    for weight_format in WEIGHT_FORMATS:
        model = tiny_llama(ops, weight_format=weight_format)
        for kv_dtype in ("fp32", "fp16", "int8"):
            cache = KVCache(model.config, num_blocks=4, block_size=4, kv_dtype=kv_dtype, device=ops)
            model.forward(Batch.build(cache, [(0, [1, 2, 3, 4, 5]), (1, [6, 7])]), cache, np.array([4, 6]))
            model.forward(Batch.build(cache, [(0, [9])]), cache, np.array([0]))
    tiny_llama(ops, f32=False)                   # float32 matrices stored as float16


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xllm.ops.cuda.assemble", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="GPU architectures (default sm_80 sm_90)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    ops = make_assemble_ops(args.arch)
    exercise(ops)
    done = {name for name, _ in ops.compiled}
    missing = sorted(set(kernels_of_the_package()) - done)
    for name in missing:
        print(f"MISSING {name}: no launch of this kernel was compiled")
    n = sum(len(v) for v in ops.compiled.values())
    print(f"{n} cubins from {len(ops.compiled)} (kernel, types) pairs of {len(done)} kernels for "
          f"{' '.join(args.arch)} in {time.perf_counter() - t0:.0f} s; {len(ops.failures)} failures, "
          f"{len(missing)} kernels never launched")
    return 1 if ops.failures or missing else 0


if __name__ == "__main__":
    sys.exit(main())
