"""Small kernels behind the memory functions of `CudaOps`: filling, splitting, gathering."""

from __future__ import annotations

from numba import cuda


@cuda.jit
def zero(flat):
    """flat[i] = 0 for every i (any dtype)."""
    for i in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
        flat[i] = 0


def split_qkv(ops, qkv, n_heads, n_kv_heads, head_dim):
    raise NotImplementedError("split_qkv on the GPU is being written")
