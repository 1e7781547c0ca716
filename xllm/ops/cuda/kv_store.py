"""store_kv on the GPU (being written)."""

from __future__ import annotations


def store_kv(ops, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    raise NotImplementedError("store_kv on the GPU is being written")
