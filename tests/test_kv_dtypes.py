"""KV cache storage formats: fp32, fp16 and int8 with one scale per token per kv head.

  * the float16 bit conversions of the CPU kernels against numpy, exactly;
  * int8 quantization (the reference's `quantize_kv_int8`): round-trip bound,
    zeros, NaN and inf;
  * store_kv and attention, CPU against reference, for every format, on
    ragged GQA batches with shuffled blocks (`paged_batches` of test_ops_cpu);
  * KVCache: dtypes, `layer`, `pool_bytes`, budgets (against the planner).
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ops_helpers import serial_or_parallel
from tests.test_ops_cpu import assert_close, f32_arrays, paged_batches
from xllm import planner
from xllm.config import ModelConfig
from xllm.kv_cache import KVCache
from xllm.planner import kv_bytes_per_token
from xllm.ops import get_ops
from xllm.ops.cpu.bodies import f16
from xllm.ops.reference import quantize_kv_int8

cpu = get_ops("cpu")
ref = get_ops("reference")

EXAMPLES = settings(max_examples=30, deadline=None)
DTYPES = ["fp32", "fp16", "int8"]


# ---------------------------------------------------------------- float16 bits

@numba.njit
def _encode_all(x, out):
    for i in range(x.shape[0]):
        out[i] = f16.f32_to_f16_bits(x[i])


@numba.njit
def _decode_all(h, out):
    for i in range(h.shape[0]):
        out[i] = f16.f16_bits_to_f32(h[i])


def encode(x: np.ndarray) -> np.ndarray:
    out = np.empty(x.shape, np.uint16)
    _encode_all(x.astype(np.float32), out)
    return out


def numpy_f16_bits(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return x.astype(np.float32).astype(np.float16).view(np.uint16)


def test_f16_to_f32_is_numpy_for_every_float16():
    bits = np.arange(1 << 16, dtype=np.uint16)
    out = np.empty(bits.shape, np.float32)
    _decode_all(bits, out)
    np.testing.assert_array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


def test_f32_to_f16_rounds_like_numpy_at_every_tie():
    """Every float16 value, the midpoints between neighbours (the ties) and one
    float32 step either side of each, both signs, inf and the overflow edge."""
    halves = np.arange(0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)   # 0 .. 65504
    mids = (halves[:-1] + halves[1:]) / 2                       # exact in float32 (12 significant bits)
    mids = np.append(mids, 65520.0).astype(np.float32)          # the tie between 65504 and "65536" (inf)
    x = np.concatenate([halves.astype(np.float32), mids, np.nextafter(mids, np.float32(np.inf)),
                        np.nextafter(mids, np.float32(0)), [np.inf, 1e30, 3.4e38, 1e-45, 2.0 ** -25]]).astype(np.float32)
    x = np.concatenate([x, -x])
    np.testing.assert_array_equal(encode(x), numpy_f16_bits(x))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=64))
def test_f32_to_f16_is_numpy_for_any_bits_nan_payloads_included(words):
    x = np.array(words, np.uint32).view(np.float32)
    np.testing.assert_array_equal(encode(x), numpy_f16_bits(x))


# ---------------------------------------------------------------- int8 quantization (the spec)

@EXAMPLES
@given(data=st.data(), rows=st.integers(1, 6), hd=st.integers(1, 64),
       bound=st.sampled_from([2.0 ** -10, 1.0, 30.0, 2.0 ** 20]))
def test_int8_round_trip_is_within_half_a_step(data, rows, hd, bound):
    x = data.draw(f32_arrays((rows, hd), bound=bound))
    q, s = quantize_kv_int8(x)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (rows,)
    assert np.abs(q.astype(np.int32)).max() <= 127
    deq = q.astype(np.float64) * s[:, None]                    # exact in float64
    # s / 2 from rounding to an integer, plus x / s rounded to float32 (|x / s| <= 127).
    err = np.abs(x - deq)
    normal = s >= np.finfo(np.float32).tiny                   # a subnormal scale has fewer digits
    assert (err[normal] <= (s[normal, None] * (0.5 + 127 * 2.0 ** -24))).all()
    amax = np.abs(x).max(axis=1)
    np.testing.assert_array_equal(s, (amax / np.float32(127)).astype(np.float32))
    assert (np.abs(q[normal]).max(axis=1) == 127).all()       # the largest |x| uses the full range


def test_int8_zeros_tiny_nan_and_inf():
    x = np.array([[0.0, -0.0, 0.0],                            # zeros: scale 0
                  [1e-45, 0.0, -1e-45],                        # max / 127 rounds to 0: zeros too
                  [1.0, np.nan, 2.0],                          # NaN: scale NaN, q 0
                  [np.inf, 1.0, 0.0],
                  [-127.0, 63.5, 0.5]], np.float32)            # ties round to even
    q, s = quantize_kv_int8(x)
    np.testing.assert_array_equal(s[:2], [0.0, 0.0])
    assert np.isnan(s[2]) and np.isnan(s[3])
    np.testing.assert_array_equal(q[:4], 0)
    np.testing.assert_array_equal(s[4], 1.0)
    np.testing.assert_array_equal(q[4], [-127, 64, 0])


# ---------------------------------------------------------------- store_kv

def caches_of(kv_dtype: str, S: int, Hkv: int, hd: int):
    """A fresh (k_cache, v_cache, k_scale, v_scale) of a storage dtype, filled with a sentinel."""
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[kv_dtype]
    k, v = np.full((S, Hkv, hd), 7, dtype), np.full((S, Hkv, hd), -7, dtype)
    if kv_dtype != "int8":
        return k, v, None, None
    return k, v, np.full((S, Hkv), 3.0, np.float32), np.full((S, Hkv), 5.0, np.float32)


@EXAMPLES
@given(data=st.data(), kv_dtype=st.sampled_from(DTYPES), S=st.integers(1, 40), Hkv=st.integers(1, 3),
       hd=st.integers(1, 70), parallel=st.booleans())
def test_store_kv_matches_the_reference_exactly(data, kv_dtype, S, Hkv, hd, parallel):
    slots = np.array(data.draw(st.permutations(range(S)))[: data.draw(st.integers(0, S))], np.int32)
    k = data.draw(f32_arrays((len(slots), Hkv, hd), bound=data.draw(st.sampled_from([1.0, 100.0, 1e5]))))
    v = data.draw(f32_arrays((len(slots), Hkv, hd)))
    if len(slots) and data.draw(st.booleans()):                # a zero head and a non-finite one
        k[0, 0] = 0.0
        v[-1, -1, 0] = data.draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    got, expected = caches_of(kv_dtype, S, Hkv, hd), caches_of(kv_dtype, S, Hkv, hd)
    ref.store_kv(k, v, *expected[:2], slots, *expected[2:])
    with serial_or_parallel(parallel), np.errstate(over="ignore"):
        assert cpu.store_kv(k, v, *got[:2], slots, *got[2:]) is None
    for a, b in zip(got, expected):
        if a is not None:
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)                # NaN == NaN here
    if kv_dtype == "fp16":                                     # fp16 is numpy's astype, bit for bit
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(got[0][slots].view(np.uint16), k.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_store_kv_rejects_a_slot_outside_the_cache_and_writes_nothing(kv_dtype):
    k = np.ones((2, 1, 4), np.float32)
    caches = caches_of(kv_dtype, 3, 1, 4)
    before = [None if a is None else a.copy() for a in caches]
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 3"):
        cpu.store_kv(k, k, *caches[:2], np.array([0, 3], np.int32), *caches[2:])
    for a, b in zip(caches, before):
        if a is not None:
            np.testing.assert_array_equal(a, b)


def test_cache_formats_are_checked():
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
            cpu.store_kv(k, k, kc, vc, slots, ks, vs)
        with pytest.raises(ValueError, match=message):
            cpu.attention(q, kc, vc, table, 2, cu_q, pos, 1.0, ks, vs)


# ---------------------------------------------------------------- attention

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


@EXAMPLES
@given(batch=paged_batches(), kv_dtype=st.sampled_from(DTYPES))
def test_attention_matches_the_reference(batch, kv_dtype):
    q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale = batch
    stored = stored_as(kv_dtype, k_cache, v_cache)
    inputs = [a.copy() for a in stored if a is not None]
    expected = ref.attention(q, *stored[:2], block_table, block_size, cu_q, positions, scale, *stored[2:])
    got = cpu.attention(q, *stored[:2], block_table, block_size, cu_q, positions, scale, *stored[2:])
    v_read = dequantized(*stored)[1]
    assert_close(got, expected, rtol=2e-5, scale=float(np.nanmax(np.abs(v_read))))
    for before, after in zip(inputs, [a for a in stored if a is not None]):    # nothing was written to
        np.testing.assert_array_equal(before, after)


@EXAMPLES
@given(batch=paged_batches(), kv_dtype=st.sampled_from(DTYPES))
def test_attention_reads_what_a_float32_cache_of_the_dequantized_values_gives(batch, kv_dtype):
    """Storage formats change the values read, never how they are attended:
    a narrow cache gives what a float32 cache holding its widened values gives."""
    q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale = batch
    stored = stored_as(kv_dtype, k_cache, v_cache)
    k_read, v_read = dequantized(*stored)
    got = cpu.attention(q, *stored[:2], block_table, block_size, cu_q, positions, scale, *stored[2:])
    expected = cpu.attention(q, k_read, v_read, block_table, block_size, cu_q, positions, scale)
    assert_close(got, expected, rtol=2e-5, scale=float(np.nanmax(np.abs(v_read))))


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_store_then_attend_stays_close_to_float32(kv_dtype):
    """The whole path on one prefill: fp32 is the old operator exactly; fp16
    and int8 differ from it by about their rounding (int8: a step is max|x| / 127)."""
    rng = np.random.default_rng(0)
    L, Hkv, H, hd, bs = 50, 2, 6, 64, 16
    k = rng.standard_normal((L, Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((L, Hkv, hd)).astype(np.float32)
    q = rng.standard_normal((L, H, hd)).astype(np.float32)
    table = np.array([[3, 0, 2, 1]], np.int32)
    p = np.arange(L)
    slots = (table[0, p // bs] * bs + p % bs).astype(np.int32)
    cu_q, positions = np.array([0, L], np.int32), p.astype(np.int32)
    outs = {}
    for name in ("fp32", kv_dtype):
        caches = caches_of(name, 4 * bs, Hkv, hd)
        cpu.store_kv(k, v, *caches[:2], slots, *caches[2:])
        outs[name] = cpu.attention(q, *caches[:2], table, bs, cu_q, positions, hd ** -0.5, *caches[2:])
    f32_cache = np.zeros((4 * bs, Hkv, hd), np.float32), np.zeros((4 * bs, Hkv, hd), np.float32)
    f32_cache[0][slots], f32_cache[1][slots] = k, v
    old = cpu.attention(q, *f32_cache, table, bs, cu_q, positions, hd ** -0.5)
    np.testing.assert_array_equal(outs["fp32"], old)
    err = np.abs(outs[kv_dtype] - outs["fp32"]).max()
    assert err <= {"fp32": 0.0, "fp16": 2e-3, "int8": 5e-2}[kv_dtype], err


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_a_non_finite_key_or_value_reaches_exactly_the_rows_that_see_it(kv_dtype):
    """Like test_ops_cpu's NaN test, through store_kv: a NaN key (fp32, fp16) or
    a NaN/inf anywhere in a head (int8: its scale is NaN) makes the output NaN
    for the query rows and heads that attend to it, and nowhere else."""
    rng = np.random.default_rng(4)
    B, L, bs, Hkv, H, hd = 2, 6, 2, 2, 4, 8
    table = np.array([[5, 0, 3], [1, 4, 2]], np.int32)
    k = rng.standard_normal((B * L, Hkv, hd)).astype(np.float32)
    v = rng.standard_normal((B * L, Hkv, hd)).astype(np.float32)
    q = rng.standard_normal((B * L, H, hd)).astype(np.float32)
    positions = np.tile(np.arange(L), B).astype(np.int32)
    slots = np.concatenate([table[b, positions[:L] // bs] * bs + positions[:L] % bs for b in range(B)]).astype(np.int32)
    cu_q = np.array([0, L, 2 * L], np.int32)
    k[3, 1, 0] = np.nan                      # sequence 0, position 3, kv head 1 (query heads 2, 3)
    v[L + 4, 0, 5] = np.nan if kv_dtype != "int8" else np.inf   # sequence 1, position 4, kv head 0
    caches = caches_of(kv_dtype, 12, Hkv, hd)
    cpu.store_kv(k, v, *caches[:2], slots, *caches[2:])
    # (The CPU kernel only: the reference multiplies future values by a zero
    # probability, and 0 * NaN is NaN.)
    out = cpu.attention(q, *caches[:2], table, bs, cu_q, positions, hd ** -0.5, *caches[2:])
    nan = np.isnan(out)
    expected = np.zeros_like(nan)
    expected[3:6, 2:4, :] = True
    if kv_dtype == "int8":
        expected[L + 4:, 0:2, :] = True      # the whole head row: its scale is NaN
    else:
        expected[L + 4:, 0:2, 5] = True      # one NaN element of a value: that element
    np.testing.assert_array_equal(nan, expected)


def test_fp16_keeps_nan_and_turns_overflow_into_inf():
    k = np.array([[[np.nan, 70000.0, -1e9, 1.0]]], np.float32)
    caches = caches_of("fp16", 1, 1, 4)
    with np.errstate(over="ignore"):
        cpu.store_kv(k, k, *caches[:2], np.zeros(1, np.int32))
    assert np.isnan(caches[0][0, 0, 0])
    np.testing.assert_array_equal(caches[0][0, 0, 1:], [np.inf, -np.inf, 1.0])


# ---------------------------------------------------------------- KVCache

CONFIG = ModelConfig(n_layers=3, dim=48, n_heads=6, n_kv_heads=2, hidden_dim=64, vocab_size=100, head_dim=8)


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_kv_cache_arrays_layer_and_pool_bytes(kv_dtype):
    cache = KVCache(CONFIG, num_blocks=5, block_size=4, kv_dtype=kv_dtype)
    assert cache.kv_dtype == kv_dtype
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[kv_dtype]
    for i in range(CONFIG.n_layers):
        kv = cache.layer(i)
        assert kv.k is cache.k[i] and kv.v is cache.v[i]
        assert kv.k.dtype == kv.v.dtype == dtype and kv.k.shape == (20, 2, 8)
        if kv_dtype == "int8":
            assert kv.k_scale is cache.k_scale[i] and kv.v_scale is cache.v_scale[i]
            assert kv.k_scale.dtype == np.float32 and kv.k_scale.shape == (20, 2)
        else:
            assert kv.k_scale is None and kv.v_scale is None and cache.k_scale is None
    assert cache.pool_bytes == 20 * kv_bytes_per_token(CONFIG, kv_dtype)
    assert cache.pool_bytes == planner.kv_pool_bytes(CONFIG, kv_dtype, 4, 5)


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_budget_counts_the_storage_dtype(kv_dtype):
    per_block = 16 * kv_bytes_per_token(CONFIG, kv_dtype)
    assert per_block == {"fp32": 16 * 2 * 3 * 2 * 8 * 4, "fp16": 16 * 2 * 3 * 2 * 8 * 2,
                         "int8": 16 * 2 * 3 * 2 * (8 + 4)}[kv_dtype]
    assert planner.kv_pool_blocks(CONFIG, kv_dtype, 16, 10 * per_block + 1) == 10
    cache = KVCache.for_budget(CONFIG, 10 * per_block + per_block - 1, 16, kv_dtype=kv_dtype)
    assert cache.num_blocks == 10 and cache.kv_dtype == kv_dtype and cache.pool_bytes == 10 * per_block


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_touch_writes_the_whole_pool_but_never_blocks_in_use(kv_dtype):
    cache = KVCache(CONFIG, num_blocks=5, block_size=4, kv_dtype=kv_dtype)
    everything = cache.k + cache.v + (cache.k_scale or []) + (cache.v_scale or [])
    for a in everything:
        a[...] = 1
    cache.reserve(7, 3)                                  # sequence 7 holds a block
    with pytest.raises(RuntimeError, match="1 blocks in use"):
        cache.touch()
    assert all((a == 1).all() for a in everything)       # nothing was erased
    cache.free(7)
    cache.touch()
    assert all((a == 0).all() for a in everything)


def test_unknown_kv_dtype():
    with pytest.raises(ValueError, match="bf16"):
        KVCache(CONFIG, 2, 4, kv_dtype="bf16")
