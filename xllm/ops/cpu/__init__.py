"""The CPU device: numba-compiled drivers around the shared kernel bodies.

Every operator has the signature and meaning of its twin in
`xllm.ops.reference` (read that module for the specification). The wrappers
check shapes and indices, allocate the output and call a compiled driver,
which runs the bodies of `xllm/ops/kernels/` (compiled in `bodies.py`)
over the rows, in threads (`prange`) when the work is large enough:

  pointwise.py        rmsnorm, rope, silu_mul, add, add_rmsnorm (fused)
  embedding.py        embedding (float tables and quantized ones)
  matmul.py           linear for float32 and float16 weights (GEMV for one
                      token, register-tiled GEMM for many)
  qmatmul.py          linear for the quantized formats (q8_0, q4_0, q4_1, w8a8),
                      exactly, in float32 (`get_ops("cpu", exact=True)`)
  intmatmul.py        the same with integer activations and dot products:
                      the default, several times faster (`reference.linear_int`)
  kv_storage.py       store_kv (float32, float16 or int8 caches), rope_store (fused)
  paged_attention.py  attention (causal, paged, ragged batch, GQA)
  layer.py            decoder_layer (fused): a whole layer, the above, in one compiled call;
                      decoder_layers: every layer, the checks made once per step
  common.py           fast-math flags, serial and parallel drivers, index checks

Kernels are compiled on first use and cached on disk (`cache=True`); the
number of threads is whatever the caller set with `numba.set_num_threads`.
To step through a kernel in a Python debugger, run with NUMBA_DISABLE_JIT=1:
every driver and body is then plain Python (and `prange` a plain `range`).
"""

from __future__ import annotations

from ..interface import HostOps
from . import embedding, intmatmul, kv_storage, layer, matmul, paged_attention, pointwise, qmatmul


class CpuOps(HostOps):
    name = "cpu"
    linear_kernels = {**matmul.LINEAR, **qmatmul.LINEAR}
    int_linear_kernels = intmatmul.LINEAR
    embedding_kernels = embedding.EMBEDDING

    rmsnorm = staticmethod(pointwise.rmsnorm)
    rope = staticmethod(pointwise.rope)
    silu_mul = staticmethod(pointwise.silu_mul)
    add = staticmethod(pointwise.add)
    add_rmsnorm = staticmethod(pointwise.add_rmsnorm)
    store_kv = staticmethod(kv_storage.store_kv)
    rope_store = staticmethod(kv_storage.rope_store)
    attention = staticmethod(paged_attention.attention)
    decoder_layer = layer.decoder_layer          # methods: they fall back on Ops.decoder_layer(s)
    decoder_layers = layer.decoder_layers
    prepare_layers = layer.prepare_layers
