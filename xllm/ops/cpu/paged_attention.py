"""Causal paged attention over a ragged batch (see `xllm.ops.reference.attention`).

The batch holds query rows of several sequences back to back; sequence b owns
rows cu_q[b] .. cu_q[b+1]-1. Keys and values live in a shared pool of cache
slots cut into blocks of `block_size`; sequence b's key at position p is in
slot block_table[b, p // block_size] * block_size + p % block_size.

The math is flash attention's (kernels/attend.py): for each query row and
head, each key block gives a partial softmax (its max, sum and weighted
values), and the partials are folded in block order. Two drivers hand out
the work; both compute every partial and every fold the same way, so a row
gets the same bits whichever runs it and whatever else is in the batch:

  * `_attention_tiles` (prefill, and decode batches of many sequences): the
    rows of a sequence are cut into tiles of at most TILE_ROWS rows, and a
    work item is (tile, kv head): it walks the key blocks once, computing
    each block's partial for every (row, query head) of the tile and folding
    it at once. A key block (32 KB at head_dim 64) is read from memory once
    per tile and then served from the core's cache to TILE_ROWS x group query
    heads; reading the whole context again for every query row (6 MB per row
    per layer at 4,000 tokens) left prefill waiting on memory. Tiles are dealt to the threads in turn, so causal prefill, whose
    later tiles see more keys, splits evenly.
  * `_attention_split` (flash-decoding: a few rows, too few items to keep
    every thread busy, as when one sequence decodes alone): a work item is
    (tile, kv head, key block); the partials go to a buffer, and a second
    pass folds each (row, head)'s partials in block order.

A key block's partial comes from `_block_simd` when head_dim is a multiple
of 64 (64 and 128 are usual) and the block size a multiple of 4, else from
`_block` (the plain bodies, for any shape). `_block_simd` scores four keys
at a time in 16-lane registers with one shared horizontal sum
(`simd.hsum4`), keeps each output row in registers while a block's values
stream past, and reads the cache in place (float32, float16 or int8: the
int8 scales are applied once per key). `_block` widens each key and value
into a float32 row that then serves every query of the tile. Scoring keys
without any horizontal sum would need the keys of a block stored
transposed (head_dim-major) in the cache; the cache layout stays [slot,
kv head, head_dim] for every storage format. For float caches the scales
are None and the compiler drops those lines.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange
from numba.core import config

from .. import checks
from . import common, simd
from .bodies import attend
from .common import FAST, aligned_rows

f32 = np.float32

TILE_ROWS = 8
SPLIT_BELOW = 4         # split by key blocks when there are fewer than this many items per thread


# ---------------------------------------------------------------- checking the batch

@numba.njit(cache=True)
def _plan(T, n_slots, block_table, block_size, cu_q, positions):
    """Check the batch description and cut each sequence's rows into tiles.

    Returns (tiles, code, where): tiles [n_tiles, 3] holds (b, first row, end
    row) of tiles of at most TILE_ROWS rows of one sequence; code is 0 when
    everything is valid, else one of checks.BAD_CU_Q, NEGATIVE_POSITION,
    PAST_TABLE, BAD_BLOCK, and `where` the offending query row (or sequence,
    for a cu_q that decreases). The rows of a sequence need the blocks of its
    row with the highest position, so only that row's blocks are checked.
    """
    B = cu_q.shape[0] - 1
    n_blocks = n_slots // block_size
    if not attend.cu_q_ends_ok(cu_q, T):
        return np.empty((0, 3), np.int32), checks.BAD_CU_Q, 0
    n_tiles = 0
    for b in range(B):
        if attend.cu_q_decreases(cu_q, b):
            return np.empty((0, 3), np.int32), checks.BAD_CU_Q, b
        n_tiles += (cu_q[b + 1] - cu_q[b] + TILE_ROWS - 1) // TILE_ROWS
        last = -1                                  # the row of b with the highest position
        for t in range(cu_q[b], cu_q[b + 1]):
            if positions[t] < 0:
                return np.empty((0, 3), np.int32), checks.NEGATIVE_POSITION, t
            if last < 0 or positions[t] > positions[last]:
                last = t
        if last < 0:
            continue                               # no query rows for b in this batch
        code = attend.check_row_blocks(block_table, b, positions[last], block_size, n_blocks, 0, 1)
        if code:
            return np.empty((0, 3), np.int32), code, last
    tiles = np.empty((n_tiles, 3), np.int32)
    i = 0
    for b in range(B):
        for t0 in range(cu_q[b], cu_q[b + 1], TILE_ROWS):
            tiles[i, 0], tiles[i, 1], tiles[i, 2] = b, t0, min(t0 + TILE_ROWS, cu_q[b + 1])
            i += 1
    return tiles, 0, 0


# ---------------------------------------------------------------- a tile of rows, one key block

@numba.njit(cache=True, fastmath=FAST)
def _scale_tile(q, t0, t1, kvh, group, scale, qs):
    """qs[i] = scale * q[t, h] for each (row t, query head h of kv head kvh) of rows
    t0 .. t1-1, i = (t - t0) * group + h % group; returns the number of rows i."""
    for i in range((t1 - t0) * group):
        attend.scale_query(q, t0 + i // group, kvh * group + i % group, scale, qs, i, 0, 1)
    return (t1 - t0) * group


@numba.njit(cache=True, fastmath=FAST)
def _block(qs, R, group, t0, positions, k_cache, v_cache, k_scale, v_scale, first_slot, blk, block_size, kvh,
           row, scores, n, m_blk, l_blk, acc_blk):
    """The partial softmax of block blk (slots first_slot ..) for each query qs[i], i < R,
    of a tile whose rows start at t0: n[i] keys seen, m_blk[i], l_blk[i], acc_blk[i].
    A row that sees no key of the block gets n[i] = 0 and nothing else.

    Loops run key by key: each key (then value) is widened once into `row`
    [1, hd] and serves every query of the tile from L1. scores [R, >= block_size].
    """
    hd = qs.shape[1]
    most = 0
    for i in range(R):
        n[i] = attend.keys_in_block(positions[t0 + i // group], blk, block_size)
        most = max(most, n[i])
        m_blk[i] = -np.inf
        acc_blk[i, :] = 0.0
    for j in range(most):
        k_scale_j = attend.widen_head(k_cache, k_scale, first_slot + j, kvh, row, 0, 0, 1)
        for i in range(R):
            if j < n[i]:
                s = attend.dot(qs, i, row, 0, hd) * k_scale_j
                scores[i, j] = s
                if s > m_blk[i]:                       # NaN is never the maximum
                    m_blk[i] = s
    for i in range(R):
        if n[i] > 0:
            l_blk[i] = attend.exp_and_sum(scores, i, n[i], m_blk[i], 0, 1)
    for j in range(most):
        v_scale_j = attend.widen_head(v_cache, v_scale, first_slot + j, kvh, row, 0, 0, 1)
        for i in range(R):
            if j < n[i]:
                attend.add_value(acc_blk, i, scores[i, j] * v_scale_j, row, 0, hd, 0, 1)


@numba.njit(cache=True, fastmath=FAST)
def _block_simd(qs, R, group, t0, positions, k_cache, v_cache, k_scale, v_scale, first_slot, blk, block_size,
                kvh, scores, n, m_blk, l_blk, acc_blk):
    """`_block` in 16-lane SIMD steps, for head_dim a multiple of 64, block_size a
    multiple of 4 and C-contiguous caches (`_simd_applies`): the same partial up to
    rounding (its sums run in another order).

    Scores: four keys at a time, each query's four dot products are summed
    in 16 lanes over head_dim and then across the lanes together
    (`simd.hsum4`, the same numbers as four `simd.hsum`). Keys past a row's
    last one (the diagonal block of a prefill) are scored too and ignored.
    Values: each query's output stays in four 16-lane registers (64
    elements at a time) while the block's values stream past it.
    The stored keys and values are read in place (`simd.load` widens
    float16 and int8 as it loads), so nothing is copied per key.

    With plain loops over a runtime head_dim, the loop set-up, the one
    horizontal sum per dot product and the accumulator's trip through memory
    for every value cost several times the arithmetic.
    """
    hd = qs.shape[1]
    Hkv = k_cache.shape[1]
    stride = Hkv * hd                                      # from one slot's head to the next slot's
    most = 0
    for i in range(R):
        n[i] = attend.keys_in_block(positions[t0 + i // group], blk, block_size)
        most = max(most, n[i])
        m_blk[i] = -np.inf
    base = (first_slot * Hkv + kvh) * hd                   # cache[first_slot, kvh, 0], flat
    for j in range(0, most, 4):                            # block_size % 4 == 0: keys j .. j+3 exist
        at = base + j * stride
        ks0, ks1, ks2, ks3 = _key_scales(k_scale, first_slot + j, kvh)
        for i in range(R):
            a0 = simd.zeros(); a1 = simd.zeros(); a2 = simd.zeros(); a3 = simd.zeros()
            for c in range(0, hd, 16):
                qc = simd.load(qs, i * hd + c)
                a0 = simd.fma(a0, qc, simd.load(k_cache, at + c))
                a1 = simd.fma(a1, qc, simd.load(k_cache, at + stride + c))
                a2 = simd.fma(a2, qc, simd.load(k_cache, at + 2 * stride + c))
                a3 = simd.fma(a3, qc, simd.load(k_cache, at + 3 * stride + c))
            s0, s1, s2, s3 = simd.hsum4(a0, a1, a2, a3)
            s0 *= ks0; s1 *= ks1; s2 *= ks2; s3 *= ks3
            scores[i, j], scores[i, j + 1], scores[i, j + 2], scores[i, j + 3] = s0, s1, s2, s3
            # The running maximum, here where the rows interleave (one row's
            # comparisons in a loop of their own wait on each other).
            m = m_blk[i]
            if j + 4 <= n[i]:
                m = s0 if s0 > m else m                    # NaN is never the maximum
                m = s1 if s1 > m else m
                m = s2 if s2 > m else m
                m = s3 if s3 > m else m
            else:                                          # the row's last keys: skip those it does not see
                for jj in range(j, n[i]):
                    m = scores[i, jj] if scores[i, jj] > m else m
            m_blk[i] = m
    for i in range(R):
        if n[i] > 0:
            l_blk[i] = _exp_and_sum(scores, i, n[i], m_blk[i])
        for c in range(0, hd, 64):
            a0 = simd.zeros(); a1 = simd.zeros(); a2 = simd.zeros(); a3 = simd.zeros()
            at = base + c
            for j in range(n[i]):
                w = simd.splat(scores[i, j] if v_scale is None else scores[i, j] * v_scale[first_slot + j, kvh])
                a0 = simd.fma(a0, w, simd.load(v_cache, at))
                a1 = simd.fma(a1, w, simd.load(v_cache, at + 16))
                a2 = simd.fma(a2, w, simd.load(v_cache, at + 32))
                a3 = simd.fma(a3, w, simd.load(v_cache, at + 48))
                at += stride
            simd.store(a0, acc_blk, i * hd + c)
            simd.store(a1, acc_blk, i * hd + c + 16)
            simd.store(a2, acc_blk, i * hd + c + 32)
            simd.store(a3, acc_blk, i * hd + c + 48)


@numba.njit(inline="always")
def _key_scales(k_scale, slot, kvh):
    """The int8 scales of keys slot .. slot+3 of kv head kvh; 1 (exact) for float caches."""
    if k_scale is None:
        return f32(1.0), f32(1.0), f32(1.0), f32(1.0)
    return k_scale[slot, kvh], k_scale[slot + 1, kvh], k_scale[slot + 2, kvh], k_scale[slot + 3, kvh]


@numba.njit(cache=True, fastmath=FAST)
def _exp_and_sum(scores, i, n, m):
    """`attend.exp_and_sum` of row i, in a function of its own: inlined into
    `_block_simd`, LLVM vectorised its loop 4 lanes wide instead of 8 and it cost 4x."""
    return attend.exp_and_sum(scores, i, n, m, 0, 1)


@numba.njit(inline="always")
def _any_block(use_simd, qs, R, group, t0, positions, k_cache, v_cache, k_scale, v_scale, first_slot, blk,
               block_size, kvh, row, scores, n, m_blk, l_blk, acc_blk):
    """`_block_simd` when the caller found it applies (`_simd_applies`), else `_block`."""
    if use_simd:
        _block_simd(qs, R, group, t0, positions, k_cache, v_cache, k_scale, v_scale, first_slot, blk, block_size,
                    kvh, scores, n, m_blk, l_blk, acc_blk)
    else:
        _block(qs, R, group, t0, positions, k_cache, v_cache, k_scale, v_scale, first_slot, blk, block_size,
               kvh, row, scores, n, m_blk, l_blk, acc_blk)


@numba.njit(inline="always")
def _block_scratch(R_max, hd, block_size):
    """One worker's scratch for `_any_block`: (qs, row, scores, n, m_blk, l_blk, acc_blk),
    for tiles of up to R_max (row, query head) pairs; qs and acc_blk start on a cache line."""
    return (aligned_rows(R_max, hd), np.empty((1, hd), np.float32), np.empty((R_max, block_size), np.float32),
            np.empty(R_max, np.int64), np.empty(R_max, np.float32), np.empty(R_max, np.float32),
            aligned_rows(R_max, hd))


def _simd_applies(k_cache: np.ndarray, v_cache: np.ndarray, block_size: int) -> bool:
    """`_block_simd` needs compiled code (not NUMBA_DISABLE_JIT), head_dim a multiple of 64
    (64 and 128 are usual), block_size a multiple of 4 and C-contiguous caches."""
    return (not config.DISABLE_JIT and k_cache.shape[2] % 64 == 0 and block_size % 4 == 0
            and k_cache.flags.c_contiguous and v_cache.flags.c_contiguous)


# ---------------------------------------------------------------- tiles of rows, blocks in turn

@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _attention_tiles(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, tiles, positions, scale,
                     n_workers, use_simd, out):
    """out = attention of every row; worker w takes items (tile, kv head) w, w + n_workers, ..."""
    _, H, hd = q.shape
    Hkv = k_cache.shape[1]
    group = H // Hkv
    R_max = TILE_ROWS * group
    scale32 = np.float32(scale)            # keeps the score arithmetic in float32
    n_items = tiles.shape[0] * Hkv
    for w in prange(n_workers):
        qs, row, scores, n, m_blk, l_blk, acc_blk = _block_scratch(R_max, hd, block_size)
        acc = np.empty((R_max, hd), np.float32)          # the running state of each (row, head)
        m = np.empty(R_max, np.float32)
        l = np.empty(R_max, np.float32)
        for item in range(w, n_items, n_workers):
            tile, kvh = item // Hkv, item % Hkv
            b, t0, t1 = tiles[tile, 0], tiles[tile, 1], tiles[tile, 2]
            R = _scale_tile(q, t0, t1, kvh, group, scale32, qs)
            acc[:R] = 0.0
            m[:R] = -np.inf
            l[:R] = 0.0
            longest = 0
            for t in range(t0, t1):
                longest = max(longest, positions[t] + 1)
            for blk in range((longest + block_size - 1) // block_size):
                _any_block(use_simd, qs, R, group, t0, positions, k_cache, v_cache, k_scale, v_scale,
                           block_table[b, blk] * block_size, blk, block_size, kvh, row, scores, n, m_blk, l_blk,
                           acc_blk)
                for i in range(R):
                    if n[i] > 0:
                        m[i], l[i] = attend.fold(m[i], l[i], acc, i, m_blk[i], l_blk[i], acc_blk, i, hd, 0, 1)
            for i in range(R):
                attend.finish(acc, i, l[i], out, t0 + i // group, kvh * group + i % group, 0, 1)


# ---------------------------------------------------------------- flash-decoding: blocks on several threads

@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _attention_split(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, tiles, positions, scale,
                     n_workers, use_simd, out):
    """out = attention of every row, the key blocks of each (tile, kv head) dealt
    to the workers; partials stored, then folded per (row, head) in block order."""
    T, H, hd = q.shape
    Hkv = k_cache.shape[1]
    group = H // Hkv
    R_max = TILE_ROWS * group
    scale32 = np.float32(scale)
    most_blocks = 1
    for t in range(T):
        most_blocks = max(most_blocks, (positions[t] + block_size) // block_size)
    part_acc = np.empty((T * H * most_blocks, hd), np.float32)   # partial of (row t, head h, block) in
    part_m = np.empty(T * H * most_blocks, np.float32)             # row (t * H + h) * most_blocks + block
    part_l = np.empty(T * H * most_blocks, np.float32)
    n_items = tiles.shape[0] * Hkv * most_blocks
    for w in prange(n_workers):
        qs, row, scores, n, m_blk, l_blk, acc_blk = _block_scratch(R_max, hd, block_size)
        for item in range(w, n_items, n_workers):
            tile, kvh, blk = item // (Hkv * most_blocks), item // most_blocks % Hkv, item % most_blocks
            b, t0, t1 = tiles[tile, 0], tiles[tile, 1], tiles[tile, 2]
            if blk * block_size > positions[t0:t1].max():
                continue                                   # no row of the tile reaches this block
            R = _scale_tile(q, t0, t1, kvh, group, scale32, qs)
            _any_block(use_simd, qs, R, group, t0, positions, k_cache, v_cache, k_scale, v_scale,
                       block_table[b, blk] * block_size, blk, block_size, kvh, row, scores, n, m_blk, l_blk, acc_blk)
            for i in range(R):
                if n[i] > 0:
                    k = ((t0 + i // group) * H + kvh * group + i % group) * most_blocks + blk
                    part_m[k], part_l[k] = m_blk[i], l_blk[i]
                    part_acc[k, :] = acc_blk[i, :]
    # Few rows: not worth waking the threads again. (Plain loops: numba would run
    # an array expression such as np.zeros here as a parallel region of its own.)
    acc = np.empty((1, hd), np.float32)
    for th in range(T * H):
        t, h = th // H, th % H
        for d in range(hd):
            acc[0, d] = 0.0
        m, l = np.float32(-np.inf), np.float32(0.0)
        for blk in range((positions[t] + block_size) // block_size):
            k = th * most_blocks + blk
            m, l = attend.fold(m, l, acc, 0, part_m[k], part_l[k], part_acc, k, hd, 0, 1)
        attend.finish(acc, 0, l, out, t, h, 0, 1)


@numba.njit(cache=True)
def _attend(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, cu_q, positions, scale, workers,
            use_simd):
    """Plan the batch (`_plan`), then run the driver that suits it on `workers` threads:
    (out, code, where); when code is not 0, nothing ran and out is q. One call from Python."""
    tiles, code, where = _plan(q.shape[0], k_cache.shape[0], block_table, block_size, cu_q, positions)
    if code:
        return q, code, where
    return run_planned(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, tiles, positions, scale,
                       workers, use_simd), code, where


@numba.njit(cache=True)
def run_planned(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, tiles, positions, scale,
                workers, use_simd):
    """Attention of a batch `_plan` found valid (its tiles), by the driver that suits it.  -> new [T, H, hd]"""
    T, H, hd = q.shape
    out = common.new_rows(T * H, hd).reshape((T, H, hd))
    if workers > 1 and tiles.shape[0] * k_cache.shape[1] < SPLIT_BELOW * workers:
        _attention_split(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, tiles, positions,
                         scale, workers, use_simd, out)
    else:
        _attention_tiles(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, tiles, positions,
                         scale, workers, use_simd, out)
    return out


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
    kc, vc = checks.kv_caches("attention", k_cache, v_cache, k_scale, v_scale)
    out, code, where = _attend(q, kc, vc, k_scale, v_scale, block_table, block_size, cu_q, positions, scale,
                               numba.get_num_threads(), _simd_applies(kc, vc, block_size))
    if code:
        raise checks.index_error(code, where)
    return out
