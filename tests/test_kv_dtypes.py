"""KV cache storage formats: fp32, fp16 and int8 with one scale per token per kv head.

  * the float16 bit conversions of the kernel bodies (kernels/f16.py) against
    numpy, exactly, compiled for the CPU and, on a sample, for the GPU;
  * int8 quantization (the reference's `quantize_kv_int8`): round-trip bound,
    zeros, NaN and inf;
  * KVCache: dtypes, `layer`, `pool_bytes`, budgets (against the planner).

store_kv and attention in every format, on every device: tests/test_ops_attention.py.
"""

from __future__ import annotations


import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ops_helpers import CUDA_DEVICE, f32_arrays, gpu_elementwise
from tests.test_ops_attention import DTYPES
from xllm import planner
from xllm.config import ModelConfig
from xllm.kv_cache import KVCache
from xllm.ops.cpu.bodies import f16
from xllm.ops.reference import quantize_kv_int8
from xllm.planner import kv_bytes_per_token

EXAMPLES = settings(max_examples=30, deadline=None)


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


@pytest.mark.gpu
@pytest.mark.parametrize("device", [d for d in [CUDA_DEVICE] if d])
def test_the_bodies_compiled_for_the_gpu_convert_like_numpy_on_a_sample(device):
    """A few hundred values on the CUDA device: ties, random bits (NaN payloads
    included), the overflow edge and subnormals both ways."""
    rng = np.random.default_rng(0)
    below = rng.integers(0, 0x7BFF, 100).astype(np.uint16)        # a float16 and the next one up
    ties = (below.view(np.float16).astype(np.float64) + (below + 1).view(np.float16).astype(np.float64)) / 2
    x = np.concatenate([ties, rng.integers(0, 2**32, 150, dtype=np.uint64).astype(np.uint32).view(np.float32),
                        [np.inf, np.nan, 65504.0, 65520.0, 65519.996, 1e-45, 2.0 ** -25, 2.0 ** -24, 6.1e-5]])
    x = np.concatenate([x, -x]).astype(np.float32)
    bits = gpu_elementwise(device, "f16", "f32_to_f16_bits", x, np.uint16)
    np.testing.assert_array_equal(bits, numpy_f16_bits(x))
    h = np.concatenate([rng.integers(0, 1 << 16, 250), [0, 1, 0x3FF, 0x400, 0x7BFF, 0x7C00, 0x7C01, 0x7FFF,
                                                       0x8000, 0x83FF, 0xFC00, 0xFE00]]).astype(np.uint16)
    values = gpu_elementwise(device, "f16", "f16_bits_to_f32", h, np.float32)
    np.testing.assert_array_equal(values.view(np.uint32),
                                  h.view(np.float16).astype(np.float32).view(np.uint32))


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
