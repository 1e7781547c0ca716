"""Causal paged attention on the GPU (see `xllm.ops.reference.attention`).

One thread block per (query row, query head), flash attention's way with the
CPU's bodies (xllm/ops/kernels/attend.py): the block walks the row's keys a
tile at a time (at most KEY_TILE keys, never across a cache block), and for
each tile
  * the threads split the keys: each widens a key (`widen_head`), scores it
    (`dot`) into shared memory and keeps its largest score; `block_max`
    gives the tile's max m_blk;
  * they split the keys again for exp(score - m_blk) (`exp_and_sum`);
    `block_sum` gives the tile's sum l_blk;
  * they split the elements of the head for the weighted values
    (`add_value`), each thread in its own registers, and fold the tile's
    partial into the running state (`fold`).
Every thread ends with the same m and l, and the output is acc / l
(`finish`). The sums over a tile run in a fixed order, so a run gives the
same result every time; the CPU folds per cache block, so results agree with
the CPU to rounding.

The batch description comes from data, so the kernel checks it as it goes,
with the codes of the CPU's `_plan` (xllm/ops/checks.py): the threads first
check cu_q (one entry each), then each block checks its row's sequence,
position and block table entries and skips a bad row. The first problem
found is raised at the next download or synchronize; when a batch has
several, the GPU may name another one than the CPU (which names the first
in order, and for the blocks of a sequence its row with the highest position).
"""

from __future__ import annotations

import numpy as np
from numba import cuda, float32, int32

from .. import checks
from . import errors
from .bodies import attend
from .reduce import WARP, block_max, block_sum

MAX_HEAD_DIM = 256      # a thread's accumulators are local arrays of this size
KEY_TILE = 128          # the scores of a tile sit in shared memory


@cuda.jit(device=True)
def _attention(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, cu_q, positions, scale, err, out):
    """out[t, h] = attention of query row t, head h; a block per (t, h) (see the module docstring)."""
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    qs = cuda.shared.array((1, MAX_HEAD_DIM), float32)        # the block's scaled query
    scores = cuda.shared.array((1, KEY_TILE), float32)
    fscratch = cuda.shared.array(WARP, float32)
    iscratch = cuda.shared.array(WARP, int32)
    row = cuda.local.array((1, MAX_HEAD_DIM), float32)        # a widened key or value (this thread's part)
    acc = cuda.local.array((1, MAX_HEAD_DIM), float32)        # running accumulator, this thread's elements
    acc_blk = cuda.local.array((1, MAX_HEAD_DIM), float32)    # the tile's weighted values, likewise
    T, H, hd = q.shape
    group = H // k_cache.shape[1]
    n_blocks = k_cache.shape[0] // block_size

    # cu_q, one entry per thread of the grid (a bad cu_q leaves rows without a sequence).
    B = cu_q.shape[0] - 1
    if cuda.grid(1) == 0 and not attend.cu_q_ends_ok(cu_q, T):
        errors.report(err, checks.BAD_CU_Q, 0, 0, 0)
    for b in range(cuda.grid(1), B, cuda.gridsize(1)):
        if attend.cu_q_decreases(cu_q, b):
            errors.report(err, checks.BAD_CU_Q, b, 0, 0)

    for item in range(cuda.blockIdx.x, T * H, cuda.gridDim.x):
        t = item // H
        h = item - t * H
        # Every test below reads the same values in all threads, or reduces
        # across the block: the whole block skips a bad row together.
        b = attend.row_sequence(cu_q, T, t)
        if b < 0:
            continue                                           # reported by the cu_q check above
        position = positions[t]
        if position < 0:
            if lane == 0 and h == 0:
                errors.report(err, checks.NEGATIVE_POSITION, t, position, 0)
            continue
        code = block_max(int32(attend.check_row_blocks(block_table, b, position, block_size, n_blocks,
                                                       lane, lanes)), iscratch)
        if code != 0:
            if lane == 0 and h == 0:
                errors.report(err, code, t, position, 0)
            continue

        attend.scale_query(q, t, h, scale, qs, 0, lane, lanes)
        cuda.syncthreads()
        kvh = h // group
        m = float32(-np.inf)
        l = float32(0.0)
        for d in range(lane, hd, lanes):
            acc[0, d] = 0.0
        p0 = 0
        while p0 <= position:
            # The tile: keys p0 .. p0 + n - 1, inside one cache block.
            n = min(KEY_TILE, block_size - p0 % block_size, position + 1 - p0)
            first_slot = attend.key_slot(block_table, b, p0, block_size)
            top = float32(-np.inf)
            for j in range(lane, n, lanes):
                k_scale_j = attend.widen_head(k_cache, k_scale, first_slot + j, kvh, row, 0, 0, 1)
                s = attend.dot(qs, 0, row, 0, hd) * k_scale_j
                scores[0, j] = s
                if s > top:
                    top = s
            m_blk = block_max(top, fscratch)                   # (the reductions synchronize the block)
            l_blk = block_sum(attend.exp_and_sum(scores, 0, n, m_blk, lane, lanes), fscratch)
            for d in range(lane, hd, lanes):
                acc_blk[0, d] = 0.0
            for j in range(n):
                v_scale_j = attend.widen_head(v_cache, v_scale, first_slot + j, kvh, row, 0, lane, lanes)
                attend.add_value(acc_blk, 0, scores[0, j] * v_scale_j, row, 0, hd, lane, lanes)
            m, l = attend.fold(m, l, acc, 0, m_blk, l_blk, acc_blk, 0, hd, lane, lanes)
            p0 += n
            cuda.syncthreads()                                 # before the next tile writes scores
        attend.finish(acc, 0, l, out, t, h, lane, lanes)
        cuda.syncthreads()                                     # before the next item writes qs


@cuda.jit
def _attention_float(q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale, err, out):
    """`_attention` over a float32 or float16 cache (a GPU kernel cannot take None for the scales)."""
    _attention(q, k_cache, v_cache, None, None, block_table, block_size, cu_q, positions, scale, err, out)


@cuda.jit
def _attention_int8(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, cu_q, positions, scale, err,
                    out):
    """`_attention` over an int8 cache with its scales."""
    _attention(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, cu_q, positions, scale, err, out)


def attention(ops, q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale, k_scale=None, v_scale=None):
    """Causal paged attention: q [T, H, hd], caches [S, Hkv, hd] -> new [T, H, hd] (see the CPU's
    paged_attention.attention); head_dim at most MAX_HEAD_DIM. A bad batch description
    raises ValueError at the next download or synchronize."""
    checks.attention(q, k_cache, v_cache, block_table, block_size, cu_q, positions)
    kc, vc = checks.kv_caches("attention", k_cache, v_cache, k_scale, v_scale)
    T, H, hd = q.shape
    if hd > MAX_HEAD_DIM:
        raise ValueError(f"attention: head_dim {hd} is more than the {MAX_HEAD_DIM} the GPU kernel supports")
    out = ops.empty(q.shape, np.float32)
    # At least one block, so that cu_q is checked even with no query rows (as on the CPU).
    grid, rest = ops.blocks(max(T * H, 1)), (block_table, int(block_size), cu_q, positions, np.float32(scale),
                                             ops.err, out)
    if k_scale is None:
        ops.launch(_attention_float, grid, ops.threads, q, kc, vc, *rest)
    else:
        ops.launch(_attention_int8, grid, ops.threads, q, kc, vc, k_scale, v_scale, *rest)
    return out
