"""attention on the GPU (being written)."""

from __future__ import annotations


def attention(ops, q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale, k_scale=None, v_scale=None):
    raise NotImplementedError("attention on the GPU is being written")
