"""Bodies of paged attention: checking a batch, one key's score, one value's share, softmax.

Causal paged attention over a ragged batch (`xllm.ops.reference.attention`):
sequence b owns the query rows cu_q[b] .. cu_q[b+1]-1, and row t attends to
the keys of positions 0 .. positions[t] of its sequence; key position p
lives in cache slot block_table[b, p // block_size] * block_size + p % block_size.
Query head h reads kv head h // (H // Hkv).

The devices share the arithmetic and differ in how they order it:
  * the CPU computes one query row, all heads, in three passes over its keys:
    every score (`key_score`), the softmax of each head (`row_max`,
    `exp_and_sum`, `scale_row`), then the weighted values (`add_value`);
  * a GPU block computes one (row, head): its threads split the keys, each
    keeps a running softmax (`online_step`: max m, sum l, accumulator acc),
    and the block merges the threads' states (`merge_weight`).
Both read a stored element through `f16.widen`; for int8 caches the scales
(k_scale, v_scale [S, Hkv]) are applied once per key, not per element:
  dot(q, s_k * k_int8) = s_k * dot(q, k_int8)   and   w * (s_v * v_int8) = (w * s_v) * v_int8.
For float caches the scales are None and the compilers drop those lines.

Query and accumulator rows are rows i of 2-D arrays (`qs[i, d]`, `acc[i, d]`):
the CPU keeps a row per head, a GPU thread has a single row (i = 0).
NaN: a NaN score is never a maximum (`s > m` is False) but turns the sum,
and so the output of its head, into NaN; a NaN value element turns that
element of the output NaN. Infinite scores give NaN as well.
"""

from __future__ import annotations

import numpy as np

from ..checks import BAD_BLOCK, PAST_TABLE
from .expf import exp_nonpositive
from .f16 import widen

f32 = np.float32


# ---------------------------------------------------------------- the batch description

def cu_q_ends_ok(cu_q, T):
    """cu_q [B+1] starts at 0 and ends at T, the number of query rows."""
    B = cu_q.shape[0] - 1
    return B >= 0 and cu_q[0] == 0 and cu_q[B] == T


def cu_q_decreases(cu_q, b):
    """cu_q[b+1] < cu_q[b]: sequence b would have a negative number of rows."""
    return cu_q[b + 1] < cu_q[b]


def row_sequence(cu_q, T, t):
    """The sequence b that owns query row t (cu_q[b] <= t < cu_q[b+1]), by
    bisection; -1 when cu_q gives row t no sequence (cu_q is then invalid)."""
    B = cu_q.shape[0] - 1
    if B < 1 or not cu_q_ends_ok(cu_q, T):
        return -1
    lo, hi = 0, B - 1                      # the last b with cu_q[b] <= t, if cu_q never decreases
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if cu_q[mid] <= t:
            lo = mid
        else:
            hi = mid - 1
    return lo if cu_q[lo] <= t < cu_q[lo + 1] else -1


def check_row_blocks(block_table, b, position, block_size, n_blocks, lane, lanes):
    """0 when a row of sequence b at `position` (>= 0) may read its keys, else
    PAST_TABLE (it needs a block beyond the end of the table row) or
    BAD_BLOCK (a table entry it needs, among this lane's, is not one of the
    cache's n_blocks blocks)."""
    last_block = position // block_size
    if last_block >= block_table.shape[1]:
        return PAST_TABLE
    for blk in range(lane, last_block + 1, lanes):
        if block_table[b, blk] < 0 or block_table[b, blk] >= n_blocks:
            return BAD_BLOCK
    return 0


def key_slot(block_table, b, p, block_size):
    """The cache slot of key position p of sequence b."""
    return block_table[b, p // block_size] * block_size + p % block_size


# ---------------------------------------------------------------- one query, one key

def scale_query(q, t, h, scale, qs, i, lane, lanes):
    """qs[i, d] = q[t, h, d] * scale for this lane's d (float32 scale: float32 products)."""
    for d in range(lane, q.shape[2], lanes):
        qs[i, d] = q[t, h, d] * scale


def key_score(qs, i, k_cache, k_scale, slot, kvh):
    """The score of key `slot`, kv head kvh, for the scaled query qs[i]: the dot
    product with the widened key, times the key's scale for int8 (NaN for a
    key stored from NaN or inf)."""
    s = f32(0.0)
    for d in range(k_cache.shape[2]):
        s += qs[i, d] * widen(k_cache[slot, kvh, d])
    if k_scale is not None:
        s *= k_scale[slot, kvh]
    return s


def add_value(acc, i, weight, v_cache, v_scale, slot, kvh):
    """acc[i, d] += weight * value[d] for the value at `slot`, kv head kvh (widened;
    for int8 the value's scale is folded into the weight)."""
    if v_scale is not None:
        weight *= v_scale[slot, kvh]
    for d in range(v_cache.shape[2]):
        acc[i, d] += weight * widen(v_cache[slot, kvh, d])


# ---------------------------------------------------------------- softmax over a row of scores (CPU)

def row_max(scores, h, n):
    """The largest of scores[h, :n] (NaN passed over; -inf if there is none)."""
    m = f32(-np.inf)
    for p in range(n):
        if scores[h, p] > m:
            m = scores[h, p]
    return m


def exp_and_sum(scores, h, n, m):
    """scores[h, p] = exp(scores[h, p] - m) for p < n, in place; returns their sum.
    The loop runs as SIMD code: exp_nonpositive is plain arithmetic (expf.py)."""
    total = f32(0.0)
    for p in range(n):
        e = exp_nonpositive(scores[h, p] - m)
        scores[h, p] = e
        total += e
    return total


def scale_row(scores, h, n, factor):
    """scores[h, :n] *= factor."""
    for p in range(n):
        scores[h, p] *= factor


# ---------------------------------------------------------------- running softmax (GPU)

def online_step(m, l, s, acc, i, hd):
    """Fold score s into a running softmax (max m, sum l, accumulator acc[i, :hd]);
    returns the new (m, l) and the weight the key's value gets.

    When s is a new maximum the sum and accumulator so far are rescaled by
    exp(m - s), so that every weight stays exp(score - current max) <= 1.
    Start from m = -inf, l = 0, acc = 0.
    """
    if s > m:
        c = exp_nonpositive(m - s)
        l *= c
        for d in range(hd):
            acc[i, d] *= c
        m = s
    e = exp_nonpositive(s - m)
    return m, l + e, e


def merge_weight(m, top):
    """The factor a running softmax with max m takes when merged into one with max top >= m."""
    return exp_nonpositive(m - top)
