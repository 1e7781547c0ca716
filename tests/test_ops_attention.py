"""store_kv and attention on every device, in every KV cache format.

Each operator test runs on every device of DEVICES against the numpy
reference (`xllm/ops/reference.py`) and, on a CUDA device, against the CPU's
output for the same inputs. Batches are ragged GQA batches in a paged cache
whose blocks are shuffled among the sequences (`paged_batches`); the cache
stores float32, float16 or int8 with a scale per token per kv head. The CPU
runs both its serial and its parallel store_kv driver.

The simulator runs every GPU thread as a Python thread, so it draws smaller
batches and fewer examples (`batches_on`, `examples_on`).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ops_helpers import (DEVICES, assert_close, device_params, f32_arrays, parallel_flags, ref, serial_or_parallel,
                               size)
from xllm.ops import get_ops
from xllm.ops.reference import quantize_kv_int8

pytestmark = pytest.mark.gpu

cpu = get_ops("cpu")
DTYPES = ["fp32", "fp16", "int8"]


def examples_on(device: str, n: int):
    """Hypothesis settings for a test on `device`: n examples, half as many under the simulator."""
    return settings(max_examples=n if device != "cuda-sim" else max(3, n // 2), deadline=None)


# ---------------------------------------------------------------- running on a device

def run(device: str, op: str, *args):
    """ops.<op>(*args) on `device`, numpy arrays uploaded first. Returns (the output,
    the arguments as the device holds them afterwards), all numpy; on the CPU the
    arguments are the caller's arrays themselves (store_kv writes into them)."""
    ops = get_ops(device)
    up = [ops.upload(a) if isinstance(a, np.ndarray) else a for a in args]
    out = getattr(ops, op)(*up)
    out = ops.synchronize() if out is None else ops.download(out)
    return out, [ops.download(u) if isinstance(a, np.ndarray) else a for a, u in zip(args, up)]


def caches_of(kv_dtype: str, S: int, Hkv: int, hd: int):
    """A fresh (k_cache, v_cache, k_scale, v_scale) of a storage dtype, filled with a sentinel."""
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[kv_dtype]
    k, v = np.full((S, Hkv, hd), 7, dtype), np.full((S, Hkv, hd), -7, dtype)
    if kv_dtype != "int8":
        return k, v, None, None
    return k, v, np.full((S, Hkv), 3.0, np.float32), np.full((S, Hkv), 5.0, np.float32)


def store_on(device: str, k, v, caches, slots):
    """store_kv(k, v, ..., slots) on `device` into `caches` (as caches_of gives); returns them as written."""
    out, after = run(device, "store_kv", k, v, caches[0], caches[1], slots, caches[2], caches[3])
    assert out is None
    return after[2], after[3], after[5], after[6]


def attention_on(device: str, q, caches, *batch):
    """attention(q, k_cache, v_cache, *batch, k_scale, v_scale) on `device`; on a CUDA
    device also checked against the CPU's output. `batch`: table, block_size, cu_q, positions, scale."""
    out = run(device, "attention", q, *caches[:2], *batch, *caches[2:])[0]
    if device != "cpu":
        assert_close(out, cpu.attention(q, *caches[:2], *batch, *caches[2:]), rtol=2e-5,
                     scale=float(np.nanmax(np.abs(dequantized(*caches)[1]))))
    return out


# ---------------------------------------------------------------- store_kv

@device_params
def test_store_kv_matches_the_reference_exactly(device):
    @examples_on(device, 30)
    @given(data=st.data(), kv_dtype=st.sampled_from(DTYPES), Hkv=st.integers(1, 3))
    def check(data, kv_dtype, Hkv):
        S, hd = data.draw(st.integers(1, size(device, 40))), data.draw(st.integers(1, size(device, 70)))
        slots = np.array(data.draw(st.permutations(range(S)))[: data.draw(st.integers(0, S))], np.int32)
        k = data.draw(f32_arrays((len(slots), Hkv, hd), bound=data.draw(st.sampled_from([1.0, 100.0, 1e5]))))
        v = data.draw(f32_arrays((len(slots), Hkv, hd)))
        if len(slots) and data.draw(st.booleans()):                # a zero head and a non-finite one
            k[0, 0] = 0.0
            v[-1, -1, 0] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        expected = caches_of(kv_dtype, S, Hkv, hd)
        with np.errstate(over="ignore"):
            ref.store_kv(k, v, *expected[:2], slots, *expected[2:])
        with serial_or_parallel(data.draw(parallel_flags(device))), np.errstate(over="ignore"):
            got = store_on(device, k, v, caches_of(kv_dtype, S, Hkv, hd), slots)
        for a, b in zip(got, expected):
            if b is not None:
                assert a.dtype == b.dtype
                np.testing.assert_array_equal(a, b)                # NaN == NaN here
        if kv_dtype == "fp16":                                     # fp16 is numpy's astype, bit for bit
            with np.errstate(over="ignore"):
                np.testing.assert_array_equal(got[0][slots].view(np.uint16), k.astype(np.float16).view(np.uint16))

    check()


@device_params
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_store_kv_rejects_a_slot_outside_the_cache_and_writes_nothing(device, kv_dtype):
    ops = get_ops(device)
    k = np.ones((2, 1, 4), np.float32)
    for parallel in ([False, True] if device == "cpu" else [False]):
        caches = [None if a is None else ops.upload(a) for a in caches_of(kv_dtype, 3, 1, 4)]
        with serial_or_parallel(parallel), pytest.raises(ValueError, match=r"slot_mapping\[1\] = 3"):
            ops.store_kv(ops.upload(k), ops.upload(k), *caches[:2], ops.upload(np.array([0, 3], np.int32)),
                         *caches[2:])
            ops.synchronize()
        for a, b in zip(caches, caches_of(kv_dtype, 3, 1, 4)):
            if b is not None:
                np.testing.assert_array_equal(ops.download(a), b)


@device_params
def test_cache_formats_are_checked(device):
    k = np.ones((1, 1, 4), np.float32)
    slots = np.zeros(1, np.int32)
    f32 = np.zeros((2, 1, 4), np.float32)
    i8 = np.zeros((2, 1, 4), np.int8)
    scale = np.zeros((2, 1), np.float32)
    cases = [((f32, i8, None, None), "different dtypes"),
             ((i8, i8, None, None), "needs k_scale"),
             ((f32, f32, scale, scale), "for int8 caches"),
             ((i8, i8, scale, np.zeros((2, 2), np.float32)), "v_scale must be"),
             ((i8, i8, scale.astype(np.float64), scale), "k_scale must be"),
             ((f32.astype(np.float64), f32.astype(np.float64), None, None), "not one of")]
    q = np.ones((1, 1, 4), np.float32)
    table, cu_q, pos = np.zeros((1, 1), np.int32), np.array([0, 1], np.int32), np.zeros(1, np.int32)
    for (kc, vc, ks, vs), message in cases:
        with pytest.raises(ValueError, match=message):
            run(device, "store_kv", k, k, kc, vc, slots, ks, vs)
        with pytest.raises(ValueError, match=message):
            run(device, "attention", q, kc, vc, table, 2, cu_q, pos, 1.0, ks, vs)


@device_params
def test_fp16_keeps_nan_and_turns_overflow_into_inf(device):
    k = np.array([[[np.nan, 70000.0, -1e9, 1.0]]], np.float32)
    with np.errstate(over="ignore"):
        got = store_on(device, k, k, caches_of("fp16", 1, 1, 4), np.zeros(1, np.int32))
    assert np.isnan(got[0][0, 0, 0])
    np.testing.assert_array_equal(got[0][0, 0, 1:], [np.inf, -np.inf, 1.0])


# ---------------------------------------------------------------- attention

@st.composite
def paged_batches(draw, max_seqs=4, max_len=40, max_kv_heads=3, head_dims=(1, 2, 8, 16, 64)):
    """A ragged batch in a paged cache whose blocks are shuffled among the sequences.

    Sequence b has L_b tokens in the cache and its last q_b of them are query
    rows (q_b = 1: decode, q_b = L_b: prefill, in between: a chunk of a longer
    prompt; q_b = 0: a sequence with no rows in this step). Cache slots that
    no sequence owns hold NaN, so reading one would show.
    """
    B = draw(st.integers(1, max_seqs))
    Hkv = draw(st.integers(1, max_kv_heads))
    group = draw(st.sampled_from([1, 2, 3]))          # 1: multi-head, > 1: grouped-query
    H = Hkv * group
    hd = draw(st.sampled_from(head_dims))
    block_size = draw(st.sampled_from([1, 2, 3, 4, 16]))
    lengths = [draw(st.integers(1, max_len)) for _ in range(B)]
    n_rows = [draw(st.integers(0, L)) for L in lengths]
    need = [-(-L // block_size) for L in lengths]
    n_blocks = sum(need) + draw(st.integers(0, 3))
    order = draw(st.permutations(range(n_blocks)))
    block_table = np.full((B, max(need) + draw(st.integers(0, 2))), -1, np.int32)   # unused: -1
    at = 0
    for b in range(B):
        block_table[b, : need[b]] = order[at: at + need[b]]
        at += need[b]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    S = n_blocks * block_size
    k_cache = np.full((S, Hkv, hd), np.nan, np.float32)
    v_cache = np.full((S, Hkv, hd), np.nan, np.float32)
    for b in range(B):
        p = np.arange(lengths[b])
        slots = block_table[b, p // block_size] * block_size + p % block_size
        k_cache[slots] = rng.uniform(-2, 2, (len(p), Hkv, hd))
        v_cache[slots] = rng.uniform(-2, 2, (len(p), Hkv, hd))
    cu_q = np.concatenate([[0], np.cumsum(n_rows)]).astype(np.int32)
    positions = np.concatenate([np.arange(L - n, L) for L, n in zip(lengths, n_rows)]).astype(np.int32)
    q = rng.uniform(-2, 2, (int(cu_q[-1]), H, hd)).astype(np.float32)
    scale = float(hd) ** -0.5
    return q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale


def batches_on(device: str):
    """paged_batches of a size for `device` (the simulator: two short sequences, small heads)."""
    if device == "cuda-sim":
        return paged_batches(max_seqs=2, max_len=size(device, 40), max_kv_heads=2, head_dims=(1, 2, 8))
    return paged_batches(max_seqs=size(device, 4), max_len=size(device, 40))


def stored_as(kv_dtype: str, k_cache: np.ndarray, v_cache: np.ndarray):
    """(k, v, k_scale, v_scale) of float32 caches stored as kv_dtype, with the
    reference's rules. Unowned slots of paged_batches hold NaN: they stay NaN
    (fp16) or get a NaN scale (int8), so reading one would still show."""
    if kv_dtype == "fp32":
        return k_cache, v_cache, None, None
    if kv_dtype == "fp16":
        return k_cache.astype(np.float16), v_cache.astype(np.float16), None, None
    (kq, ks), (vq, vs) = quantize_kv_int8(k_cache), quantize_kv_int8(v_cache)
    return kq, vq, ks, vs


def dequantized(k, v, ks, vs):
    if ks is None:
        return k.astype(np.float32), v.astype(np.float32)
    return (k * ks[..., None]).astype(np.float32), (v * vs[..., None]).astype(np.float32)


@device_params
def test_attention_matches_the_reference(device):
    @examples_on(device, 30)
    @given(batch=batches_on(device), kv_dtype=st.sampled_from(DTYPES))
    def check(batch, kv_dtype):
        q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale = batch
        stored = stored_as(kv_dtype, k_cache, v_cache)
        args = (q, *stored[:2], block_table, block_size, cu_q, positions, scale, *stored[2:])
        inputs = [a.copy() if isinstance(a, np.ndarray) else a for a in args]
        expected = ref.attention(*args)
        got, after = run(device, "attention", *args)
        # A convex combination of values: errors scale with max |v| (and with the
        # score errors, which are ~1e-6 here).
        v_scale = float(np.nanmax(np.abs(dequantized(*stored)[1])))
        assert_close(got, expected, rtol=2e-5, scale=v_scale)
        if device != "cpu":
            assert_close(got, cpu.attention(*args), rtol=2e-5, scale=v_scale)
        for before, now in zip(inputs, after):                    # nothing was written to
            np.testing.assert_array_equal(before, now)

    check()


@device_params
def test_attention_reads_what_a_float32_cache_of_the_dequantized_values_gives(device):
    """Storage formats change the values read, never how they are attended:
    a narrow cache gives what a float32 cache holding its widened values gives."""
    @examples_on(device, 30)
    @given(batch=batches_on(device), kv_dtype=st.sampled_from(DTYPES))
    def check(batch, kv_dtype):
        q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale = batch
        stored = stored_as(kv_dtype, k_cache, v_cache)
        k_read, v_read = dequantized(*stored)
        got = attention_on(device, q, stored, block_table, block_size, cu_q, positions, scale)
        expected = run(device, "attention", q, k_read, v_read, block_table, block_size, cu_q, positions, scale)[0]
        assert_close(got, expected, rtol=2e-5, scale=float(np.nanmax(np.abs(v_read))))

    check()


def test_both_cpu_drivers_match_the_reference_and_each_other_bit_for_bit():
    """The CPU's tiled driver (tiles of TILE_ROWS rows, blocks folded in turn) and its
    split driver (blocks on several threads, partials folded afterwards) on batches
    with many query rows and key blocks: close to the reference, equal to each
    other, and each sequence gets the same bits alone as in the batch."""
    from xllm.ops.cpu import paged_attention

    def both(*args):
        outs = []
        for split_below in (0, 10**9):
            old, paged_attention.SPLIT_BELOW = paged_attention.SPLIT_BELOW, split_below
            try:
                outs.append(cpu.attention(*args))
            finally:
                paged_attention.SPLIT_BELOW = old
        np.testing.assert_array_equal(outs[0], outs[1])
        return outs[0]

    @settings(max_examples=25, deadline=None)
    @given(batch=paged_batches(max_seqs=3, max_len=120), kv_dtype=st.sampled_from(DTYPES))
    def check(batch, kv_dtype):
        q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale = batch
        stored = stored_as(kv_dtype, k_cache, v_cache)
        got = both(q, *stored[:2], block_table, block_size, cu_q, positions, scale, *stored[2:])
        expected = ref.attention(q, *stored[:2], block_table, block_size, cu_q, positions, scale, *stored[2:])
        assert_close(got, expected, rtol=2e-5, scale=float(np.nanmax(np.abs(dequantized(*stored)[1]))))
        for b in range(len(cu_q) - 1):
            lo, hi = cu_q[b], cu_q[b + 1]
            alone = cpu.attention(q[lo:hi], *stored[:2], block_table[b: b + 1], block_size,
                                  np.array([0, hi - lo], np.int32), positions[lo:hi], scale, *stored[2:])
            np.testing.assert_array_equal(alone, got[lo:hi])

    check()


def direct_attention(q, keys, values, positions, scale):
    """Attention of one sequence written out with loops: keys/values [L, Hkv, hd] in position order."""
    T, H, hd = q.shape
    group = H // keys.shape[1]
    out = np.zeros((T, H, hd))
    for t in range(T):
        for h in range(H):
            scores = [scale * float(np.dot(q[t, h].astype(np.float64), keys[p, h // group]))
                      for p in range(positions[t] + 1)]
            top = max(scores)
            weights = [math.exp(s - top) for s in scores]
            for p, wt in enumerate(weights):
                out[t, h] += wt / sum(weights) * values[p, h // group]
    return out


@settings(max_examples=20, deadline=None)
@given(batch=paged_batches(max_seqs=3, max_len=12))
def test_attention_reference_against_direct_loops(batch):
    """The reference's paging, masking and head grouping against the plain definition."""
    q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale = batch
    got = ref.attention(*batch)
    for b in range(len(cu_q) - 1):
        lo, hi = cu_q[b], cu_q[b + 1]
        if hi == lo:
            continue
        p = np.arange(positions[hi - 1] + 1)          # a sequence's last row sees every key
        slots = block_table[b, p // block_size] * block_size + p % block_size
        expected = direct_attention(q[lo:hi], k_cache[slots].astype(np.float64),
                                    v_cache[slots].astype(np.float64), positions[lo:hi], scale)
        np.testing.assert_allclose(got[lo:hi], expected, rtol=1e-5, atol=1e-6)


@device_params
def test_attention_decode_sees_the_whole_context_and_prefill_is_causal(device):
    """Hand-checkable cases: one key gives back its value; row 0 of a prefill sees only key 0."""
    k_cache = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32)       # 2 slots, 1 kv head, hd 2
    v_cache = np.array([[[10.0, 20.0]], [[30.0, 40.0]]], np.float32)
    table = np.array([[0, 1]], np.int32)
    q = np.zeros((2, 1, 2), np.float32)                                 # equal scores
    for on in (device, "reference"):
        out = run(on, "attention", q, k_cache, v_cache, table, 1, np.array([0, 2], np.int32),
                  np.array([0, 1], np.int32), 1.0)[0]
        np.testing.assert_allclose(out[0, 0], [10.0, 20.0])             # only key 0
        np.testing.assert_allclose(out[1, 0], [20.0, 30.0])             # mean of both


@device_params
def test_attention_rejects_bad_batch_descriptions(device):
    q = np.zeros((2, 1, 2), np.float32)
    cache = np.zeros((4, 1, 2), np.float32)
    table = np.array([[0, 1]], np.int32)
    cu_q = np.array([0, 2], np.int32)
    ok_pos = np.array([0, 1], np.int32)
    run(device, "attention", q, cache, cache, table, 2, cu_q, ok_pos, 1.0)
    cases = [((table, np.array([0, 1], np.int32), ok_pos), r"cu_q .* \(at index 0\)"),
             ((np.tile(np.array([0, 1], np.int32), (3, 1)), np.array([0, 2, 1, 2], np.int32), ok_pos),
              r"cu_q .* \(at index 1\)"),
             ((table, cu_q, np.array([0, -1], np.int32)), r"negative \(at index 1\)"),
             ((table, cu_q, np.array([0, 4], np.int32)), r"beyond the end .* \(at index 1\)"),
             ((np.array([[0, 2]], np.int32), cu_q, np.array([0, 3], np.int32)), r"not a block .* \(at index 1\)")]
    for (tbl, offsets, pos), message in cases:
        with pytest.raises(ValueError, match=message):
            run(device, "attention", q, cache, cache, tbl, 2, offsets, pos, 1.0)
    with pytest.raises(ValueError, match="multiple"):
        run(device, "attention", np.zeros((2, 3, 2), np.float32), np.zeros((4, 2, 2), np.float32),
            np.zeros((4, 2, 2), np.float32), table, 2, cu_q, ok_pos, 1.0)
    run(device, "attention", q, cache, cache, table, 2, cu_q, ok_pos, 1.0)   # the device still works
    if device != "cpu":                                   # the GPU kernel holds a head in a local array
        big = np.zeros((1, 1, 257), np.float32)
        with pytest.raises(ValueError, match="head_dim 257"):
            run(device, "attention", big, big, big, table, 2, np.array([0, 1], np.int32), ok_pos[:1], 1.0)


# ---------------------------------------------------------------- through store_kv, and NaN

@device_params
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_store_then_attend_stays_close_to_float32(device, kv_dtype):
    """The whole path on one prefill: fp32 is the old operator exactly; fp16
    and int8 differ from it by about their rounding (int8: a step is max|x| / 127)."""
    rng = np.random.default_rng(0)
    L, Hkv, H = size(device, 50), 2, 6
    hd, bs = (64, 16) if device != "cuda-sim" else (16, 2)
    k = rng.standard_normal((L, Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, hd)).astype(np.float32)
    q = rng.standard_normal((L, H, hd)).astype(np.float32)
    n_blocks = max(4, -(-L // bs))                        # the GPU's larger shapes need more than four
    table = np.roll(np.arange(n_blocks, dtype=np.int32), 1)[None]       # blocks out of order: n-1, 0, 1, 2, ...
    p = np.arange(L)
    slots = (table[0, p // bs] * bs + p % bs).astype(np.int32)
    batch = (table, bs, np.array([0, L], np.int32), p.astype(np.int32), hd ** -0.5)
    outs = {}
    for name in ("fp32", kv_dtype):
        caches = store_on(device, k, v, caches_of(name, n_blocks * bs, Hkv, hd), slots)
        outs[name] = attention_on(device, q, caches, *batch)
    f32_cache = np.zeros((n_blocks * bs, Hkv, hd), np.float32), np.zeros((n_blocks * bs, Hkv, hd), np.float32)
    f32_cache[0][slots], f32_cache[1][slots] = k, v
    np.testing.assert_array_equal(outs["fp32"], run(device, "attention", q, *f32_cache, *batch)[0])
    err = np.abs(outs[kv_dtype] - outs["fp32"]).max()
    assert err <= {"fp32": 0.0, "fp16": 2e-3, "int8": 5e-2}[kv_dtype], err


# Two sequences of 6 tokens, prefill; 2 kv heads, 4 query heads. The second
# shape takes the CPU's SIMD block (head_dim 64, block_size a multiple of 4).
NAN_BATCHES = [dict(B=2, L=6, bs=2, Hkv=2, H=4, hd=8, table=np.array([[5, 0, 3], [1, 4, 2]], np.int32)),
               dict(B=2, L=6, bs=4, Hkv=2, H=4, hd=64, table=np.array([[2, 0], [1, 3]], np.int32))]
nan_batches = pytest.mark.parametrize("nan_batch", NAN_BATCHES, ids=["hd8", "hd64"])


@device_params
@nan_batches
def test_nan_in_attention_reaches_exactly_the_affected_rows(device, nan_batch):
    B, L, bs, Hkv, H, hd, table = nan_batch.values()
    S = (table.max() + 1) * bs
    rng = np.random.default_rng(4)
    k_cache = rng.standard_normal((S, Hkv, hd)).astype(np.float32)
    v_cache = rng.standard_normal((S, Hkv, hd)).astype(np.float32)
    q = rng.standard_normal((B * L, H, hd)).astype(np.float32)
    cu_q = np.array([0, L, 2 * L], np.int32)
    positions = np.tile(np.arange(L), B).astype(np.int32)
    # NaN in the key of sequence 0, position 3, kv head 1 (query heads 2 and 3) ...
    k_cache[table[0, 3 // bs] * bs + 3 % bs, 1, 0] = np.nan
    # ... and in query row 7 (sequence 1, position 1), head 0.
    q[7, 0, 4] = np.nan
    out = run(device, "attention", q, k_cache, v_cache, table, bs, cu_q, positions, hd ** -0.5)[0]
    nan = np.isnan(out).any(axis=-1)                                   # [T, H]
    expected = np.zeros_like(nan)
    expected[3:6, 2:4] = True                                          # rows that see position 3
    expected[7, 0] = True
    np.testing.assert_array_equal(nan, expected)
    assert np.isnan(out[expected]).all()


@device_params
@nan_batches
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_a_non_finite_key_or_value_reaches_exactly_the_rows_that_see_it(device, kv_dtype, nan_batch):
    """As above, through store_kv: a NaN key (fp32, fp16) or a NaN/inf anywhere
    in a head (int8: its scale is NaN) makes the output NaN for the query rows
    and heads that attend to it, and nowhere else."""
    B, L, bs, Hkv, H, hd, table = nan_batch.values()
    S = (table.max() + 1) * bs
    rng = np.random.default_rng(4)
    k = rng.standard_normal((B * L, Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((B * L, Hkv, hd)).astype(np.float32)
    q = rng.standard_normal((B * L, H, hd)).astype(np.float32)
    positions = np.tile(np.arange(L), B).astype(np.int32)
    slots = np.concatenate([table[b, positions[:L] // bs] * bs + positions[:L] % bs for b in range(B)]).astype(np.int32)
    cu_q = np.array([0, L, 2 * L], np.int32)
    k[3, 1, 0] = np.nan                      # sequence 0, position 3, kv head 1 (query heads 2, 3)
    v[L + 4, 0, 5] = np.nan if kv_dtype != "int8" else np.inf   # sequence 1, position 4, kv head 0
    caches = store_on(device, k, v, caches_of(kv_dtype, S, Hkv, hd), slots)
    # (The kernels only: the reference multiplies future values by a zero
    # probability, and 0 * NaN is NaN.)
    out = run(device, "attention", q, *caches[:2], table, bs, cu_q, positions, hd ** -0.5, *caches[2:])[0]
    nan = np.isnan(out)
    expected = np.zeros_like(nan)
    expected[3:6, 2:4, :] = True
    if kv_dtype == "int8":
        expected[L + 4:, 0:2, :] = True      # the whole head row: its scale is NaN
    else:
        expected[L + 4:, 0:2, 5] = True      # one NaN element of a value: that element
    np.testing.assert_array_equal(nan, expected)


# ---------------------------------------------------------------- any block shape (GPU)

# (threads, blocks) per launch: the simulator's reductions take at most a warp of threads.
BLOCK_SHAPES = {"cuda-sim": [(1, 1), (3, 2), (8, 3)], "cuda": [(32, 1), (96, 2), (1024, 5)]}


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("shape", [0, 1, 2])
@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_the_gpu_kernels_give_the_same_results_for_any_block_shape(device, shape, kv_dtype, monkeypatch):
    """Threads split a head's elements and a row's keys: fewer threads than keys,
    more threads than keys (some see none), and a few blocks for many items."""
    ops = get_ops(device)
    threads, blocks = BLOCK_SHAPES[device][shape]
    monkeypatch.setattr(ops, "threads", threads)
    monkeypatch.setattr(ops, "max_blocks", blocks)
    rng = np.random.default_rng(shape)
    Hkv, H, hd, bs = 2, 4, 5, 2
    table = np.array([[4, 0, 6], [1, 5, 2]], np.int32)
    lengths = [5, 6]                                           # a prefill of 5 rows and a decode row
    slots = np.concatenate([table[b, np.arange(n) // bs] * bs + np.arange(n) % bs
                            for b, n in enumerate(lengths)]).astype(np.int32)
    k = rng.standard_normal((len(slots), Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((len(slots), Hkv, hd)).astype(np.float32)
    expected_caches = caches_of(kv_dtype, 14, Hkv, hd)
    ref.store_kv(k, v, *expected_caches[:2], slots, *expected_caches[2:])
    caches = store_on(device, k, v, caches_of(kv_dtype, 14, Hkv, hd), slots)
    for a, b in zip(caches, expected_caches):
        if b is not None:
            np.testing.assert_array_equal(a, b)
    q = rng.standard_normal((6, H, hd)).astype(np.float32)
    batch = (table, bs, np.array([0, 5, 6], np.int32), np.array([0, 1, 2, 3, 4, 5], np.int32), hd ** -0.5)
    got = attention_on(device, q, caches, *batch)
    assert_close(got, ref.attention(q, *caches[:2], *batch, *caches[2:]), rtol=2e-5,
                 scale=float(np.abs(dequantized(*caches)[1]).max()))


# ---------------------------------------------------------------- the CPU's SIMD pieces

def test_hsum4_gives_the_bits_of_four_hsums():
    """`simd.hsum4` (the SIMD block's four scores at once) adds the lanes of each
    vector in the order `simd.hsum` does, NaN and infinities included."""
    import numba

    from xllm.ops.cpu import simd

    @numba.njit
    def both(a):
        a0, a1, a2, a3 = simd.load(a, 0), simd.load(a, 16), simd.load(a, 32), simd.load(a, 48)
        return simd.hsum4(a0, a1, a2, a3), (simd.hsum(a0), simd.hsum(a1), simd.hsum(a2), simd.hsum(a3))

    @settings(max_examples=50, deadline=None)
    @given(st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), min_size=64, max_size=64),
           st.integers(-20, 20))
    def check(values, exponent):
        a = np.asarray(values, np.float32) * np.float32(2.0 ** exponent)
        four, one_by_one = both(a)
        np.testing.assert_array_equal(np.array(four, np.float32), np.array(one_by_one, np.float32))

    check()


def test_host_arrays_and_scratch_rows_start_on_a_cache_line():
    """The KV cache (`ops.zeros`) and the attention's scratch rows start on a
    64-byte line: a 64-byte load from anywhere else reads two lines. (Arrays
    under ALIGN_FROM bytes are made as numpy makes them.)"""
    from xllm.ops.cpu.common import aligned_rows
    from xllm.ops.interface import ALIGN_FROM

    for shape, dtype in [((7,), np.float32), ((300, 3, 64), np.float32), ((1000, 2, 64), np.uint16), ((5, 3), np.int8)]:
        for a in (cpu.zeros(shape, dtype), cpu.empty(shape, dtype)):
            assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
            assert a.ctypes.data % 64 == 0 or a.nbytes < ALIGN_FROM
        assert not cpu.zeros(shape, dtype).any()
    for rows, cols in [(1, 1), (24, 64), (3, 128)]:
        r = aligned_rows(rows, cols)
        assert r.ctypes.data % 64 == 0 and r.shape == (rows, cols)
