"""Bodies of paged attention: checking a batch, one key block's partial softmax, folding partials.

Causal paged attention over a ragged batch (`xllm.ops.reference.attention`):
sequence b owns the query rows cu_q[b] .. cu_q[b+1]-1, and row t attends to
the keys of positions 0 .. positions[t] of its sequence; key position p
lives in cache slot block_table[b, p // block_size] * block_size + p % block_size.
Query head h reads kv head h // (H // Hkv).

Flash attention's way, on every device: the keys of a row are taken one
cache block at a time, and a block never needs the scores of another.
For one (query row, head) and one key block of n keys, with s_j the scores
(`dot` of the scaled query with each key, widened by `widen_head`):

    m_blk = max_j s_j          l_blk = sum_j exp(s_j - m_blk)   (`exp_and_sum`)
    acc_blk = sum_j exp(s_j - m_blk) * v_j                       (`add_value`)

is the block's *partial softmax*. Partials are folded into a running state
(m, l, acc), block 0 first (`fold`): with M = max(m, m_blk),

    l   <- l   * exp(m - M) + l_blk   * exp(m_blk - M)
    acc <- acc * exp(m - M) + acc_blk * exp(m_blk - M)

and the output is acc / l once every block is folded. Every exponent is
<= 0, so nothing overflows however far apart the blocks' scores are.

Because a partial depends on nothing but its own block, a query row's
result does not depend on which other rows (of its sequence or of others)
are computed with it, nor on which thread computes which block: the CPU
computes a block for a tile of rows at once, or the blocks of one decoding
row on several threads, and folds in block order either way, bit for bit
the same (tests/test_ops_attention.py checks both). A GPU block computes one
(row, head); its threads share the keys of a block and the elements of a head.

Bodies that split work take `lane, lanes` (kernels/__init__.py): the keys of
a block in `exp_and_sum`, the elements of a head in `widen_head`, `add_value`
and `fold`; max and sum across lanes are the device's job. Both devices read
stored elements through `widen_head`; for int8 caches the scales
(k_scale, v_scale [S, Hkv]) are applied once per key, not per element:
  dot(q, s_k * k_int8) = s_k * dot(q, k_int8)   and   w * (s_v * v_int8) = (w * s_v) * v_int8.
For float caches the scales are None and the compilers drop those lines.

Query and accumulator rows are rows i of 2-D arrays (`qs[i, d]`, `acc[i, d]`),
one per (query row, head) of a tile. NaN: a NaN score is never a maximum
(`s > m` is False) but turns the sum, and so the output of its head, into
NaN; a NaN value element turns that element of the output NaN. Infinite
scores give NaN as well.
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


def keys_in_block(position, blk, block_size):
    """How many keys of block blk a row at `position` sees: 0 .. block_size."""
    return min(max(position + 1 - blk * block_size, 0), block_size)


# ---------------------------------------------------------------- one query row, one key block

def scale_query(q, t, h, scale, qs, i, lane, lanes):
    """qs[i, d] = q[t, h, d] * scale for this lane's d (float32 scale: float32 products)."""
    for d in range(lane, q.shape[2], lanes):
        qs[i, d] = q[t, h, d] * scale


def widen_head(cache, scales, slot, kvh, row, j, lane, lanes):
    """row[j, d] = the stored element cache[slot, kvh, d] as float32, for this lane's d < head_dim;
    returns the head's scale (int8 caches; 1 for float caches, whose scales are None).

    Widening a key or value once into a float32 row lets every query that
    reads it use plain float32 SIMD arithmetic: for float16 the bit
    arithmetic of f16.py is then paid once per key, not once per query.
    """
    for d in range(lane, cache.shape[2], lanes):
        row[j, d] = widen(cache[slot, kvh, d])
    if scales is None:
        return f32(1.0)
    return scales[slot, kvh]


def dot(qs, i, row, j, hd):
    """sum_{d < hd} qs[i, d] * row[j, d]: a scaled query's score with a widened key
    (before the key's int8 scale)."""
    s = f32(0.0)
    for d in range(hd):
        s += qs[i, d] * row[j, d]
    return s


def exp_and_sum(scores, r, n, m, lane, lanes):
    """scores[r, j] = exp(scores[r, j] - m) for this lane's j < n, in place; returns
    their sum. On the CPU (one lane) the loop runs as SIMD code: exp_nonpositive
    is plain arithmetic (expf.py)."""
    total = f32(0.0)
    for j in range(lane, n, lanes):
        e = exp_nonpositive(scores[r, j] - m)
        scores[r, j] = e
        total += e
    return total


def add_value(acc, i, weight, row, j, hd, lane, lanes):
    """acc[i, d] += weight * row[j, d] for this lane's d < hd: one widened value's share
    (for int8 the caller folds the value's scale into the weight)."""
    for d in range(lane, hd, lanes):
        acc[i, d] += weight * row[j, d]


# ---------------------------------------------------------------- folding partials in block order

def fold(m, l, acc, i, m_blk, l_blk, acc_blk, k, hd, lane, lanes):
    """Fold a block's partial (m_blk, l_blk, acc_blk[k]) into the running state
    (m, l, acc[i]) for this lane's elements d < hd; returns the new (m, l).

    Start from m = -inf, l = 0, acc = 0 (the first fold then gives the first
    partial exactly: 0 * 0 + x * 1 = x).
    """
    top = m_blk if m_blk > m else m
    a = exp_nonpositive(m - top)
    c = exp_nonpositive(m_blk - top)
    for d in range(lane, hd, lanes):
        acc[i, d] = acc[i, d] * a + acc_blk[k, d] * c
    return top, l * a + l_blk * c


def finish(acc, i, l, out, t, h, lane, lanes):
    """out[t, h, d] = acc[i, d] / l for this lane's d: the softmax-weighted mean of the values."""
    for d in range(lane, out.shape[2], lanes):
        out[t, h, d] = acc[i, d] / l
