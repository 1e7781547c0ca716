"""Small kernels behind the memory functions of `CudaOps`: filling and splitting."""

from __future__ import annotations

import numpy as np
from numba import cuda

from .. import checks
from .bodies import rows


# ---------------------------------------------------------------- zeros

@cuda.jit
def zero(flat):
    """flat[i] = 0 for every i (any dtype)."""
    for i in range(cuda.grid(1), flat.shape[0], cuda.gridsize(1)):
        flat[i] = 0


# ---------------------------------------------------------------- split_qkv

@cuda.jit
def _split_qkv(qkv, q, k, v):
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    for t in range(cuda.blockIdx.x, qkv.shape[0], cuda.gridDim.x):      # a block per row
        rows.copy_columns(qkv, t, 0, q, lane, lanes)
        rows.copy_columns(qkv, t, q.shape[1], k, lane, lanes)
        rows.copy_columns(qkv, t, q.shape[1] + k.shape[1], v, lane, lanes)


def split_qkv(ops, qkv, n_heads, n_kv_heads, head_dim):
    """qkv [T, (H + 2 Hkv) hd] -> new q [T, H, hd], k [T, Hkv, hd], v [T, Hkv, hd] (HostOps.split_qkv)."""
    checks.split_qkv(qkv, n_heads, n_kv_heads, head_dim)
    T = qkv.shape[0]
    q = ops.empty((T, n_heads, head_dim), np.float32)
    k = ops.empty((T, n_kv_heads, head_dim), np.float32)
    v = ops.empty((T, n_kv_heads, head_dim), np.float32)
    ops.launch(_split_qkv, ops.blocks(T), ops.threads, qkv, q.reshape(T, n_heads * head_dim),
               k.reshape(T, n_kv_heads * head_dim), v.reshape(T, n_kv_heads * head_dim))
    return q, k, v
