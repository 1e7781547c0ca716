"""Causal paged attention on the GPU (see `xllm.ops.reference.attention`).

One thread block per (query row, query head). The block's threads split the
row's keys (thread `lane` takes positions lane, lane + lanes, ...); each
keeps a running softmax over its keys: the largest score m, the sum l of
exp(score - m) and the accumulator acc[hd] of exp(score - m) * value, all in
registers or local memory (`attend.online_step`). Then the block merges the
threads' states: the block's largest m, each thread's state rescaled by
exp(m - largest) (`attend.merge_weight`) and summed over the threads in a
fixed order through shared memory (`part`, a row per thread of a warp), so a
run gives the same result every time. The scores, weights and values are
those of the CPU (the bodies of xllm/ops/kernels/attend.py); only the order
of the sums differs, so results agree with the CPU to rounding.

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

MAX_HEAD_DIM = 256      # the accumulator of each thread is a local array of this size


@cuda.jit
def _attention(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, cu_q, positions, scale, err, out):
    """out[t, h] = attention of query row t, head h; a block per (t, h) (see the module docstring)."""
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    qs = cuda.shared.array((1, MAX_HEAD_DIM), float32)        # the block's scaled query
    fscratch = cuda.shared.array(WARP, float32)
    iscratch = cuda.shared.array(WARP, int32)
    part = cuda.shared.array((WARP, MAX_HEAD_DIM), float32)   # the threads' accumulators, merged
    acc = cuda.local.array((1, MAX_HEAD_DIM), float32)        # this thread's accumulator
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
        for d in range(hd):
            acc[0, d] = 0.0
        for p in range(lane, position + 1, lanes):
            slot = attend.key_slot(block_table, b, p, block_size)
            s = attend.key_score(qs, 0, k_cache, k_scale, slot, kvh)
            m, l, weight = attend.online_step(m, l, s, acc, 0, hd)
            attend.add_value(acc, 0, weight, v_cache, v_scale, slot, kvh)

        # Merge the threads' states: rescale each by exp(m - the block's m),
        # then sum over the threads in a fixed order (the same result every
        # run): the warps in turn add theirs into rows lane % WARP of `part`,
        # then each thread adds up those rows for its elements.
        c = attend.merge_weight(m, block_max(m, fscratch))
        total = block_sum(l * c, fscratch)
        for r in range((lanes + WARP - 1) // WARP):
            if lane // WARP == r:
                for d in range(hd):
                    part[lane % WARP, d] = acc[0, d] * c + (part[lane % WARP, d] if r > 0 else float32(0.0))
            cuda.syncthreads()
        for d in range(lane, hd, lanes):
            value = float32(0.0)
            for r in range(min(lanes, WARP)):
                value += part[r, d]
            out[t, h, d] = value / total
        cuda.syncthreads()                                     # before the next item writes qs and part


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
    ops.launch(_attention, ops.blocks(max(T * H, 1)), ops.threads, q, kc, vc, k_scale, v_scale, block_table,
               int(block_size), cu_q, positions, np.float32(scale), ops.err, out)
    return out
