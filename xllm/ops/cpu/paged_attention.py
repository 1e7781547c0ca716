"""Causal paged attention over a ragged batch (see `xllm.ops.reference.attention`).

The batch holds query rows of several sequences back to back; sequence b owns
rows cu_q[b] .. cu_q[b+1]-1. Keys and values live in a shared pool of cache
slots cut into blocks of `block_size`; sequence b's key at position p is in
slot block_table[b, p // block_size] * block_size + p % block_size.

Work is split into independent (query head, query row) pairs, one `prange`
iteration each (`_attention`). For one pair, `_attend` makes three passes over
the keys the row may see (positions 0 .. positions[t]):
  1. score[p] = dot(scale * q, k[p]), and the maximum score;
  2. score[p] = exp(score[p] - max), and their sum (in float64);
  3. out = sum_p score[p] * v[p] / sum.
Walking the keys block by block finds each slot with an addition instead of a
division per key.

The cache may store float32, float16 or int8 (see kv_storage.py). Each stored
element goes through `widen` (float16 bits -> float32, int8 -> float32) as it
is read, and int8 caches bring one scale per token per kv head, applied once
per key rather than once per element:
  dot(q, s_k * k_int8) = s_k * dot(q, k_int8)     and     w * (s_v * v_int8) = (w * s_v) * v_int8.
For float caches the scales are None and the compiler drops those lines, so
the float32 path is the same machine code as without storage formats.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from .common import FAST
from .kv_storage import kernel_arrays, widen

# Problems `_plan` can find, by the code it returns.
_PLAN_ERRORS = {
    1: "cu_q must start at 0, never decrease, and end at the number of query rows",
    2: "a position is negative",
    3: "a position needs a block beyond the end of its block_table row",
    4: "a block_table entry in use is not a block of the cache",
}


@numba.njit(cache=True)
def _plan(T, n_slots, block_table, block_size, cu_q, positions):
    """Check the batch description and map each query row to its sequence.

    Returns (row_seq, code, where): row_seq[t] is the sequence of row t; code is
    0 when everything is valid, else a key of _PLAN_ERRORS, and `where` the
    offending query row (or sequence, for code 1).
    """
    B = cu_q.shape[0] - 1
    row_seq = np.empty(T, np.int32)
    n_blocks = n_slots // block_size
    if B < 0 or cu_q[0] != 0 or cu_q[B] != T:
        return row_seq, 1, 0
    for b in range(B):
        if cu_q[b + 1] < cu_q[b]:
            return row_seq, 1, b
        last = -1                                  # the row of b with the highest position
        for t in range(cu_q[b], cu_q[b + 1]):
            row_seq[t] = b
            if positions[t] < 0:
                return row_seq, 2, t
            if last < 0 or positions[t] > positions[last]:
                last = t
        if last < 0:
            continue                               # no query rows for b in this batch
        last_block = positions[last] // block_size
        if last_block >= block_table.shape[1]:
            return row_seq, 3, last
        for blk in range(last_block + 1):
            if block_table[b, blk] < 0 or block_table[b, blk] >= n_blocks:
                return row_seq, 4, last
    return row_seq, 0, 0


@numba.njit(cache=True, fastmath=FAST)
def _attend(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, b, t, h, kvh, n, scale, out):
    """out[t, h] = attention of query row t, head h over the first n keys of sequence b.

    k_scale and v_scale are the int8 caches' scales [S, Hkv], or None.
    """
    hd = q.shape[2]
    q_scaled = np.empty(hd, np.float32)
    for d in range(hd):
        q_scaled[d] = q[t, h, d] * scale
    n_blocks = (n + block_size - 1) // block_size
    scores = np.empty(n, np.float32)

    # Pass 1: scores and their maximum. (`s > m` is False for NaN, so a NaN
    # score is never the maximum, but it turns the sum of pass 2 into NaN and
    # so still reaches the output.)
    m = np.float32(-np.inf)
    for blk in range(n_blocks):
        first_slot = block_table[b, blk] * block_size
        p0 = blk * block_size
        for j in range(min(block_size, n - p0)):
            s = np.float32(0.0)
            for d in range(hd):
                s += q_scaled[d] * widen(k_cache[first_slot + j, kvh, d])
            if k_scale is not None:
                s *= k_scale[first_slot + j, kvh]        # NaN for a key stored from NaN/inf
            scores[p0 + j] = s
            if s > m:
                m = s

    # Pass 2: unnormalised probabilities exp(s - max) and their sum.
    total = 0.0
    for p in range(n):
        e = math.exp(scores[p] - m)
        scores[p] = e
        total += e

    # Pass 3: probability-weighted sum of the values, normalised at the end.
    acc = np.zeros(hd, np.float32)
    for blk in range(n_blocks):
        first_slot = block_table[b, blk] * block_size
        p0 = blk * block_size
        for j in range(min(block_size, n - p0)):
            weight = scores[p0 + j]
            if v_scale is not None:
                weight *= v_scale[first_slot + j, kvh]
            for d in range(hd):
                acc[d] += weight * widen(v_cache[first_slot + j, kvh, d])
    inv_total = np.float32(1.0 / total)
    for d in range(hd):
        out[t, h, d] = acc[d] * inv_total


@numba.njit(parallel=True, cache=True)
def _attention(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, row_seq, positions, scale, out):
    """Run `_attend` for every (query row, query head) pair, in parallel."""
    T, H = q.shape[0], q.shape[1]
    group = H // k_cache.shape[1]          # query heads per kv head
    scale32 = np.float32(scale)            # keeps the score arithmetic in float32
    # Head-major order: consecutive jobs (and so each thread's share) use the
    # same kv head, whose keys then stay in cache, and every thread gets rows
    # of all lengths, so causal prefill splits evenly between threads.
    for job in prange(H * T):
        h = job // T
        t = job % T
        _attend(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, row_seq[t], t, h, h // group,
                positions[t] + 1, scale32, out)


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_table: np.ndarray,
              block_size: int, cu_q: np.ndarray, positions: np.ndarray, scale: float,
              k_scale: np.ndarray | None = None, v_scale: np.ndarray | None = None) -> np.ndarray:
    """Causal paged attention: q [T, H, hd], caches [S, Hkv, hd] -> new [T, H, hd].

    block_table [B, MAXB] int32, cu_q [B+1] int32, positions [T] int32; query
    head h reads kv head h // (H // Hkv). The caller has already written the
    new tokens' keys and values with `store_kv`. The caches are float32,
    float16, or int8 with k_scale and v_scale [S, Hkv] float32 (`scale` is
    the softmax scale, usually head_dim ** -0.5).
    """
    if (q.ndim != 3 or k_cache.ndim != 3 or v_cache.shape != k_cache.shape
            or q.shape[2] != k_cache.shape[2] or k_cache.shape[1] == 0
            or q.shape[1] % k_cache.shape[1] != 0):
        raise ValueError(f"attention: need q [T, H, hd] and caches [S, Hkv, hd] with H a multiple of Hkv, "
                         f"got q {q.shape}, k_cache {k_cache.shape}, v_cache {v_cache.shape}")
    if block_table.ndim != 2 or block_table.shape[0] != cu_q.shape[0] - 1 or positions.shape != q.shape[:1]:
        raise ValueError(f"attention: need block_table [B, MAXB], cu_q [B+1], positions [T], got "
                         f"{block_table.shape}, {cu_q.shape}, {positions.shape} for q {q.shape}")
    if block_size < 1:
        raise ValueError(f"attention: block_size must be >= 1, got {block_size}")
    row_seq, code, where = _plan(q.shape[0], k_cache.shape[0], block_table, block_size, cu_q, positions)
    if code:
        raise ValueError(f"attention: {_PLAN_ERRORS[code]} (at index {where})")
    kc, vc = kernel_arrays("attention", k_cache, v_cache, k_scale, v_scale)
    out = np.empty(q.shape, np.float32)
    _attention(q, kc, vc, k_scale, v_scale, block_table, block_size, row_seq, positions, scale, out)
    return out
