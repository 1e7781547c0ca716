"""Causal paged attention over a ragged batch (see `xllm.ops.reference.attention`).

The batch holds query rows of several sequences back to back; sequence b owns
rows cu_q[b] .. cu_q[b+1]-1. Keys and values live in a shared pool of cache
slots cut into blocks of `block_size`; sequence b's key at position p is in
slot block_table[b, p // block_size] * block_size + p % block_size.

Work is split by query row: `_attention` deals the rows out to the threads,
and `_attend` computes one row, all heads at once, in three passes over the
keys the row may see (positions 0 .. positions[t]):
  1. score[h, p] = dot(scale * q[h], k[p]) for every head h;
  2. score[h, p] = exp(score[h, p] - max_p) / sum_p, per head;
  3. out[h] = sum_p score[h, p] * v[p].
All heads together, because decode attention is limited by reading the
cache: each key and value is read from memory once and then used by every
query head while it sits in L1 (with grouped-query attention a kv head serves
several query heads), and the kv heads of one slot lie side by side, so a
block of keys is one contiguous stream for the prefetcher. Serving one head
at a time read each key once per head, and took twice as long.
Walking the keys block by block finds each slot with an addition instead of a
division per key.

The math of each step is a body of xllm/ops/kernels/attend.py, shared with
the GPU kernel (which orders the work differently: see that module). The
cache may store float32, float16 or int8 (kernels/kv_format.py): each stored
element is widened to float32 as it is read, and int8 scales are applied once
per key. For float caches the scales are None and the compiler drops those
lines, so the float32 path is the same machine code as without storage formats.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import checks
from .bodies import attend
from .common import FAST


# ---------------------------------------------------------------- checking the batch

@numba.njit(cache=True)
def _plan(T, n_slots, block_table, block_size, cu_q, positions):
    """Check the batch description and map each query row to its sequence.

    Returns (row_seq, code, where): row_seq[t] is the sequence of row t; code is
    0 when everything is valid, else one of checks.BAD_CU_Q, NEGATIVE_POSITION,
    PAST_TABLE, BAD_BLOCK, and `where` the offending query row (or sequence,
    for a cu_q that decreases). The rows of a sequence need the blocks of its
    row with the highest position, so only that row's blocks are checked.
    """
    B = cu_q.shape[0] - 1
    row_seq = np.empty(T, np.int32)
    n_blocks = n_slots // block_size
    if not attend.cu_q_ends_ok(cu_q, T):
        return row_seq, checks.BAD_CU_Q, 0
    for b in range(B):
        if attend.cu_q_decreases(cu_q, b):
            return row_seq, checks.BAD_CU_Q, b
        last = -1                                  # the row of b with the highest position
        for t in range(cu_q[b], cu_q[b + 1]):
            row_seq[t] = b
            if positions[t] < 0:
                return row_seq, checks.NEGATIVE_POSITION, t
            if last < 0 or positions[t] > positions[last]:
                last = t
        if last < 0:
            continue                               # no query rows for b in this batch
        code = attend.check_row_blocks(block_table, b, positions[last], block_size, n_blocks, 0, 1)
        if code:
            return row_seq, code, last
    return row_seq, 0, 0


# ---------------------------------------------------------------- one query row

@numba.njit(cache=True, fastmath=FAST)
def _attend(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, b, t, n, scale, out,
            q_scaled, scores, acc):
    """out[t] = attention of query row t (every head) over the first n keys of sequence b.

    k_scale and v_scale are the int8 caches' scales [S, Hkv], or None.
    q_scaled [H, hd], scores [H, >= n] and acc [H, hd] are the worker's scratch.
    """
    H, hd = q_scaled.shape
    group = H // k_cache.shape[1]          # query heads per kv head
    for h in range(H):
        attend.scale_query(q, t, h, scale, q_scaled, h, 0, 1)
    n_blocks = (n + block_size - 1) // block_size

    # Pass 1: scores[h, p] = q_h . k_p. Each key is read from memory once and
    # used by every head while it is in L1; a slot's kv heads lie side by
    # side, so the keys of a block are one contiguous stream.
    for blk in range(n_blocks):
        first_slot = block_table[b, blk] * block_size
        p0 = blk * block_size
        for j in range(min(block_size, n - p0)):
            slot = first_slot + j
            for h in range(H):
                scores[h, p0 + j] = attend.key_score(q_scaled, h, k_cache, k_scale, slot, h // group)

    # Pass 2: per head, probabilities exp(score - max) / sum.
    for h in range(H):
        m = attend.row_max(scores, h, n)
        total = attend.exp_and_sum(scores, h, n, m)
        attend.scale_row(scores, h, n, np.float32(1.0) / total)

    # Pass 3: the probability-weighted sum of the values.
    acc[:, :] = 0.0
    for blk in range(n_blocks):
        first_slot = block_table[b, blk] * block_size
        p0 = blk * block_size
        for j in range(min(block_size, n - p0)):
            slot = first_slot + j
            for h in range(H):
                attend.add_value(acc, h, scores[h, p0 + j], v_cache, v_scale, slot, h // group)
    for h in range(H):
        for d in range(hd):
            out[t, h, d] = acc[h, d]


# ---------------------------------------------------------------- all rows

@numba.njit(parallel=True, cache=True)
def _attention(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, row_seq, positions, scale,
               n_workers, out):
    """Run `_attend` for every query row; worker w takes rows w, w + n_workers, ...

    Dealing rows out in turn (not in halves) gives every worker rows of all
    lengths, so causal prefill, whose later rows see more keys, splits evenly.
    Each worker allocates its scratch once.
    """
    T, H, hd = q.shape
    longest = 1
    for t in range(T):
        longest = max(longest, positions[t] + 1)
    scale32 = np.float32(scale)            # keeps the score arithmetic in float32
    for w in prange(n_workers):
        q_scaled = np.empty((H, hd), np.float32)
        scores = np.empty((H, longest), np.float32)
        acc = np.empty((H, hd), np.float32)
        for t in range(w, T, n_workers):
            _attend(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, row_seq[t], t,
                    positions[t] + 1, scale32, out, q_scaled, scores, acc)


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
    checks.attention(q, k_cache, v_cache, block_table, block_size, cu_q, positions)
    row_seq, code, where = _plan(q.shape[0], k_cache.shape[0], block_table, block_size, cu_q, positions)
    if code:
        raise checks.index_error(code, where)
    kc, vc = checks.kv_caches("attention", k_cache, v_cache, k_scale, v_scale)
    out = np.empty(q.shape, np.float32)
    workers = max(1, min(numba.get_num_threads(), q.shape[0]))
    _attention(q, kc, vc, k_scale, v_scale, block_table, block_size, row_seq, positions, scale, workers, out)
    return out
