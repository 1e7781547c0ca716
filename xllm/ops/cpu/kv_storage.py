"""store_kv on the CPU: the new tokens' keys and values into their cache slots.

The storage formats (float32, float16, int8 with a scale per token per kv
head) and their rules are the bodies of xllm/ops/kernels/kv_format.py; the
driver below hands out the token rows, one `store_head` per kv head of k and
of v. It is compiled twice by `serial_and_parallel`: a decode step stores
one token (a few hundred numbers), too little to start the threads for.

Slots come from data, so the driver checks all of them before it writes
anything: a bad slot raises a ValueError and leaves the caches untouched.

`rope_store` is the fused step the forward pass takes from the stacked
projection qkv to the cache (`Ops.rope_store`): split, rope of q and k, and
the same `store_head` per kv head, in one call instead of four.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import checks
from . import common
from .bodies import kv_format, rows
from .common import first_out_of_range, serial_and_parallel


def _store_kv(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping):
    """k_cache[slot_mapping[t]] = k[t] (and v), each head in the cache's format;
    returns the first bad index of slot_mapping (nothing written), or -1.

    The scales are None for float caches (see kv_format.store_head).
    """
    bad = first_out_of_range(slot_mapping, k_cache.shape[0])
    if bad < 0:
        for t in prange(k.shape[0]):
            slot = slot_mapping[t]
            for h in range(k.shape[1]):
                kv_format.store_head(k, t, h, k_cache, k_scale, slot)
                kv_format.store_head(v, t, h, v_cache, v_scale, slot)
    return bad


_store_kv_serial, _store_kv_parallel = serial_and_parallel(_store_kv)


def store_kv(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
             slot_mapping: np.ndarray, k_scale: np.ndarray | None = None,
             v_scale: np.ndarray | None = None) -> None:
    """k_cache[slot_mapping[t]] = k[t] and likewise for v, in place.

    k, v [T, Hkv, hd] float32; caches [S, Hkv, hd] float32, float16 or int8;
    slot_mapping [T] int32, each < S. int8 caches also take k_scale and
    v_scale [S, Hkv] float32, written with one scale per token per kv head
    (see kernels/kv_format.py). Nothing is written when a slot is out of range.
    """
    checks.store_kv(k, v, k_cache, v_cache, slot_mapping)
    kc, vc = checks.kv_caches("store_kv", k_cache, v_cache, k_scale, v_scale)
    run = _store_kv_parallel if k.size >= common.PARALLEL_MIN_ELEMENTS else _store_kv_serial
    bad = run(k, v, kc, vc, k_scale, v_scale, slot_mapping)
    if bad >= 0:
        raise checks.index_error(checks.BAD_SLOT, bad, slot_mapping[bad], k_cache.shape[0])


# ---------------------------------------------------------------- rope_store: the step from qkv to the cache

def _rope_store(q, k, v, positions, cos, sin, k_cache, v_cache, k_scale, v_scale, slot_mapping, q_out, k_out):
    """q_out = rope(q), k_out = rope(k), then the cache slots of each row get k_out
    and v; returns (bad position row, bad slot row), -1 when fine (nothing done otherwise)."""
    bad_position = first_out_of_range(positions, cos.shape[0])
    bad_slot = first_out_of_range(slot_mapping, k_cache.shape[0])
    if bad_position < 0 and bad_slot < 0:
        for t in prange(q.shape[0]):
            pos = positions[t]
            for h in range(q.shape[1]):
                rows.rope_head(q, cos, sin, pos, q_out, t, h, 0, 1)
            slot = slot_mapping[t]
            for h in range(k.shape[1]):
                rows.rope_head(k, cos, sin, pos, k_out, t, h, 0, 1)
                kv_format.store_head(k_out, t, h, k_cache, k_scale, slot)
                kv_format.store_head(v, t, h, v_cache, v_scale, slot)
    return bad_position, bad_slot


# Without fast-math, as rope and store_kv.
_rope_store_serial, _rope_store_parallel = serial_and_parallel(_rope_store)


@numba.njit(cache=True)
def run_rope_store(heads, n_heads, n_kv_heads, positions, cos, sin, k_cache, v_cache, k_scale, v_scale,
                   slot_mapping):
    """`_rope_store` from heads = qkv as [T, H + 2 Hkv, hd]: (q_out, bad position row, bad slot row)."""
    T, hd = heads.shape[0], heads.shape[2]
    q = heads[:, :n_heads]
    k = heads[:, n_heads:n_heads + n_kv_heads]
    v = heads[:, n_heads + n_kv_heads:]
    q_out = common.new_rows(T * n_heads, hd).reshape((T, n_heads, hd))
    k_out = np.empty((T, n_kv_heads, hd), np.float32)
    if heads.size >= common.PARALLEL_MIN_ELEMENTS:
        bad_position, bad_slot = _rope_store_parallel(q, k, v, positions, cos, sin, k_cache, v_cache, k_scale,
                                                      v_scale, slot_mapping, q_out, k_out)
    else:
        bad_position, bad_slot = _rope_store_serial(q, k, v, positions, cos, sin, k_cache, v_cache, k_scale,
                                                    v_scale, slot_mapping, q_out, k_out)
    return q_out, bad_position, bad_slot


def rope_store(qkv: np.ndarray, n_heads: int, n_kv_heads: int, head_dim: int, positions: np.ndarray,
               cos: np.ndarray, sin: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
               slot_mapping: np.ndarray, k_scale: np.ndarray | None = None,
               v_scale: np.ndarray | None = None) -> np.ndarray:
    """`Ops.rope_store` in one pass over the rows: split_qkv, rope of q and k, store_kv.  -> new q [T, H, hd]."""
    checks.split_qkv(qkv, n_heads, n_kv_heads, head_dim)
    heads = qkv.reshape(qkv.shape[0], n_heads + 2 * n_kv_heads, head_dim)
    checks.rope(heads, positions, cos, sin)
    kv_end = n_heads + n_kv_heads
    checks.store_kv(heads[:, n_heads:kv_end], heads[:, kv_end:], k_cache, v_cache, slot_mapping)
    kc, vc = checks.kv_caches("rope_store", k_cache, v_cache, k_scale, v_scale)
    q, bad_position, bad_slot = run_rope_store(heads, n_heads, n_kv_heads, positions, cos, sin, kc, vc, k_scale,
                                               v_scale, slot_mapping)
    if bad_position >= 0:
        raise checks.index_error(checks.BAD_POSITION, bad_position, positions[bad_position], cos.shape[0])
    if bad_slot >= 0:
        raise checks.index_error(checks.BAD_SLOT, bad_slot, slot_mapping[bad_slot], k_cache.shape[0])
    return q
