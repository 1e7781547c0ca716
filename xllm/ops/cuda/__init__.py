"""The GPU device: numba.cuda grid kernels around the shared kernel bodies.

    ops = xllm.ops.get_ops("cuda")       # a GPU; or "cuda-sim", the simulator

Every operator has the signature and meaning of its twin in
`xllm.ops.reference`. The wrappers check shapes on the host
(`xllm/ops/checks.py`), allocate the output on the device and launch a grid
kernel, which runs the bodies of `xllm/ops/kernels/` (compiled in
`bodies.py`), one thread block per row (or per row and head), its threads
sharing the row's elements:

  pointwise.py   rmsnorm, rope, silu_mul, add
  embedding.py   embedding and take_rows (float tables and quantized ones)
  matmul.py      linear for float32, float16 and the GGUF block formats
  kv_store.py    store_kv (float32, float16 or int8 caches)
  attention.py   attention (causal, paged, ragged batch, GQA)
  memory.py      zeros, split_qkv
  reduce.py      sums and maxima across a block (warp shuffles on a GPU,
                 shared memory under the simulator)
  errors.py      how a kernel reports a bad index
  simulator.py   two changes to numba's CUDA simulator (speed, and a race)
  assemble.py    compiles every kernel to PTX and machine code for sm_80 and
                 sm_90 without a GPU (python -m xllm.ops.cuda.assemble)

Every launch goes through `CudaOps.launch`, so a subclass can compile the
kernels instead of running them (assemble.py does).

Weights: `upload_weight` keeps GGUF blocks as they are and stores float
matrices as float16 (half the bytes a decode step reads) unless `f32=True`;
activations are float32.
"""

from __future__ import annotations

from functools import partial

import numpy as np
from numba import cuda
from numba.core import config

from ...weights import QuantWeight
from .. import checks
from ..interface import Ops
from . import attention, embedding, kv_store, matmul, memory, pointwise, simulator
from .reduce import WARP_LANES


class CudaOps(Ops):
    """Operators on a GPU ("cuda") or on numba's CUDA simulator ("cuda-sim")."""

    def __init__(self, exact: bool = False):
        super().__init__(exact)
        self.simulator = bool(config.ENABLE_CUDASIM)
        self.name = "cuda-sim" if self.simulator else "cuda"
        # Threads per block for row kernels: a multiple of the warp on a GPU. The
        # simulator runs each thread as a Python thread and each block in turn,
        # so it gets few of both (the kernels loop until their work is done).
        self.threads = 4 if self.simulator else 128
        self.max_blocks = 2 if self.simulator else 65535
        if self.simulator:
            simulator.adapt()                       # quicker, and without a race (simulator.py)
        self.err = self.zeros(4, np.int64)          # see errors.py
        self.linear_kernels = {fmt: partial(fn, self) for fmt, fn in matmul.LINEAR.items()}
        self.embedding_kernels = {fmt: partial(fn, self) for fmt, fn in embedding.EMBEDDING.items()}

    # ------------------------------------------------------------------ launching

    def launch(self, kernel, grid, block, *args) -> None:
        """kernel[grid, block](*args); a grid with no blocks launches nothing.

        None is refused here on every device: a GPU kernel cannot take it (numba-cuda
        raises NotImplementedError at the launch), but the simulator would run it, so
        only a real GPU would find out. An optional argument needs a kernel without it.
        """
        if any(a is None for a in args):
            raise TypeError(f"{kernel.py_func.__name__}: a GPU kernel cannot take None (argument "
                            f"{[a is None for a in args].index(True)})")
        if np.prod(grid) == 0:
            return
        kernel[grid, block](*args)

    def blocks(self, n: int) -> int:
        """Blocks for n work items (rows, heads): one each, up to `max_blocks`;
        the kernels walk their items in a loop (block b takes b, b + gridDim, ...)."""
        return min(n, self.max_blocks)

    def warp_blocks(self, n: int) -> int:
        """Blocks for n work items of one warp each (reduce.WARP_LANES threads; the matrix products)."""
        return self.blocks(-(-n // (self.threads // WARP_LANES)))

    def check_errors(self) -> None:
        """Raise the index error a kernel reported (errors.py), and clear it."""
        err = self.err.copy_to_host()
        if err[0]:
            self.err.copy_to_device(np.zeros(4, np.int64))
            raise checks.index_error(*err)

    # ------------------------------------------------------------------ memory

    def upload(self, a):
        return cuda.to_device(np.ascontiguousarray(a))

    def download(self, a):
        host = a.copy_to_host()
        self.check_errors()
        return host

    def synchronize(self) -> None:
        cuda.synchronize()
        self.check_errors()

    def empty(self, shape, dtype):
        return cuda.device_array(shape, dtype)

    def zeros(self, shape, dtype):
        a = self.empty(shape, dtype)
        flat = a.reshape(a.size)
        self.launch(memory.zero, min(1024, -(-a.size // 256)), 256, flat)
        return a

    def upload_weight(self, w, f32: bool = False):
        if isinstance(w, QuantWeight):
            return w.map_arrays(self.upload)
        w = np.asarray(w)
        if w.ndim == 2 and not f32:
            return self.upload(w.astype(np.float16))     # float16 stays, float32 narrows
        return self.upload(w.astype(np.float32))

    # ------------------------------------------------------------------ operators

    def split_qkv(self, qkv, n_heads, n_kv_heads, head_dim):
        return memory.split_qkv(self, qkv, n_heads, n_kv_heads, head_dim)

    def take_rows(self, x, rows):
        return embedding.take_rows(self, x, rows)

    def rmsnorm(self, x, w, eps):
        return pointwise.rmsnorm(self, x, w, eps)

    def rope(self, x, positions, cos, sin):
        return pointwise.rope(self, x, positions, cos, sin)

    def silu_mul(self, gate_up):
        return pointwise.silu_mul(self, gate_up)

    def add(self, x, y):
        return pointwise.add(self, x, y)

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        kv_store.store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attention(self, q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale,
                  k_scale=None, v_scale=None):
        return attention.attention(self, q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale,
                                   k_scale, v_scale)
