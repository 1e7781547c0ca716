"""The CPU operators: Numba-compiled kernels behind thin Python wrappers.

Every operator has the signature and meaning of its twin in
`xllm.ops.reference` (read that module for the specification). The wrappers
check shapes and indices, allocate the output and call a compiled kernel:

  matmul.py           linear, logits      (GEMV for one token, tiled GEMM for many)
  paged_attention.py  attention           (causal, paged, ragged batch, GQA)
  pointwise.py        embedding, rmsnorm, rope, silu_mul, add, store_kv
  qmatmul.py          linear, logits and embedding when the weight is a
                      QuantWeight (xllm/ops/quant.py); `linear` and
                      `embedding` hand those over to it
  kv_storage.py       how store_kv and attention store and read a KV cache
                      of float32, float16 (as bits) or int8 with scales
  expf.py             exp(x) for x <= 0 in plain arithmetic, so that the
                      softmax and SiLU loops run as SIMD code

Kernels are compiled on first use and cached on disk (`cache=True`); the
number of threads is whatever the caller set with `numba.set_num_threads`.
To step through a kernel in a Python debugger, run with NUMBA_DISABLE_JIT=1:
every kernel is then plain Python (and `prange` a plain `range`).
"""

from ..reference import rope_tables
from .matmul import linear, logits
from .paged_attention import attention
from .pointwise import add, embedding, rmsnorm, rope, silu_mul, store_kv

__all__ = ["add", "attention", "embedding", "linear", "logits", "rmsnorm", "rope", "rope_tables",
           "silu_mul", "store_kv"]
