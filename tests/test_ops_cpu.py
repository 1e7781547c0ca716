"""The CPU kernels against the numpy reference, and the reference against direct formulas.

Shapes and values come from hypothesis. Small arrays take their values from
hypothesis itself (so it can try zeros, subnormals, repeated values); larger
ones from a numpy generator seeded by hypothesis. Row-wise operators run both
their serial and their parallel driver (`serial_or_parallel`).

`assert_close` is the only float comparison used: it requires the expected
values to be finite and uses np.testing.assert_allclose, which fails on any NaN
the expected array does not have, so a kernel that returns NaN cannot pass.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.ops_helpers import serial_or_parallel  # noqa: F401 (used by the tests below)
from xllm.ops import get_ops
from xllm.ops.cpu.bodies import expf
from xllm.ops.cpu.common import FAST

cpu = get_ops("cpu")
ref = get_ops("reference")

EXAMPLES = settings(max_examples=30, deadline=None)


# ---------------------------------------------------------------- helpers

def assert_close(actual, expected, rtol=1e-5, scale=None):
    """actual == expected within rtol * scale (default: the largest |expected|).

    Fails on a dtype or shape difference, on non-finite expected values (this
    helper is for value tests), and on any NaN in actual.
    """
    actual = np.asarray(actual)
    expected = np.asarray(expected)
    assert actual.dtype == np.float32, actual.dtype
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert np.isfinite(expected).all(), "expected values must be finite in a value test"
    if scale is None:
        scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30)


@st.composite
def f32_arrays(draw, shape, bound=4.0):
    """A float32 array of `shape` with values in [-bound, bound], never NaN or inf."""
    shape = tuple(int(s) for s in shape)
    if math.prod(shape) <= 256 and draw(st.booleans()):
        elements = st.floats(-bound, bound, width=32, allow_nan=False, allow_infinity=False)
        return draw(hnp.arrays(np.float32, shape, elements=elements))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def dot_scale(x, w):
    """The largest sum_k |x[t, k] * w[n, k]|: the size a dot product's rounding error scales with."""
    if x.size == 0 or w.size == 0:
        return 0.0
    return float((np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64)).T).max())


# ---------------------------------------------------------------- embedding

@EXAMPLES
@given(data=st.data(), V=st.integers(1, 50), D=st.integers(1, 70), T=st.integers(0, 40),
       parallel=st.booleans())
def test_embedding(data, V, D, T, parallel):
    table = data.draw(f32_arrays((V, D)))
    ids = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=T, max_size=T)), np.int32)
    with serial_or_parallel(parallel):
        out = cpu.embedding(table, ids)
    np.testing.assert_array_equal(out, ref.embedding(table, ids))
    assert out.dtype == np.float32 and out.shape == (T, D)


@pytest.mark.parametrize("bad_id", [-1, 5])
@pytest.mark.parametrize("parallel", [False, True])
def test_embedding_rejects_ids_outside_the_table(bad_id, parallel):
    table = np.ones((5, 3), np.float32)
    with serial_or_parallel(parallel), pytest.raises(ValueError, match=r"ids\[1\]"):
        cpu.embedding(table, np.array([0, bad_id], np.int32))


# ---------------------------------------------------------------- rmsnorm

@EXAMPLES
@given(data=st.data(), T=st.integers(0, 30), D=st.integers(1, 300),
       eps=st.sampled_from([1e-6, 1e-5, 1e-2]), parallel=st.booleans())
def test_rmsnorm(data, T, D, eps, parallel):
    x = data.draw(f32_arrays((T, D)))
    w = data.draw(f32_arrays((D,)))
    with serial_or_parallel(parallel):
        out = cpu.rmsnorm(x, w, eps)
    # Each output element is a few roundings away from the exact value.
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, eps), rtol=2e-6, atol=1e-30)
    assert out.dtype == np.float32


# ---------------------------------------------------------------- linear and logits

@EXAMPLES
@given(data=st.data(), T=st.integers(1, 70), N=st.integers(1, 110), K=st.integers(1, 200))
def test_linear(data, T, N, K):
    x = data.draw(f32_arrays((T, K)))
    w = data.draw(f32_arrays((N, K)))
    out = cpu.linear(x, w)
    assert_close(out, ref.linear(x, w), scale=dot_scale(x, w))


def test_linear_at_every_tile_and_block_boundary():
    # Tokens go in tiles of 4 and blocks of 64, weight rows in tiles of 3 and blocks of 48.
    rng = np.random.default_rng(0)
    for T in (0, 1, 2, 3, 4, 5, 63, 64, 65, 131):
        for N in (1, 2, 3, 4, 47, 48, 49, 97):
            for K in (0, 1, 8, 67):
                x = rng.standard_normal((T, K), dtype=np.float32)
                w = rng.standard_normal((N, K), dtype=np.float32)
                assert_close(cpu.linear(x, w), ref.linear(x, w), scale=dot_scale(x, w))


def test_linear_rejects_mismatched_inner_dimension():
    with pytest.raises(ValueError, match="linear"):
        cpu.linear(np.ones((2, 3), np.float32), np.ones((4, 5), np.float32))


@EXAMPLES
@given(data=st.data(), T=st.integers(1, 20), V=st.integers(1, 120), D=st.integers(1, 100))
def test_logits_of_selected_rows(data, T, V, D):
    x = data.draw(f32_arrays((T, D)))
    w = data.draw(f32_arrays((V, D)))
    rows = np.array(data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=T)), np.int32)
    out = cpu.logits(x, rows, w)
    assert out.shape == (len(rows), V)
    assert_close(out, ref.logits(x, rows, w), scale=dot_scale(x, w))
    # and the reference really is the projection of those rows only
    np.testing.assert_allclose(ref.logits(x, rows, w), ref.linear(x, w)[rows], rtol=1e-6)


# ---------------------------------------------------------------- rope

@EXAMPLES
@given(data=st.data(), T=st.integers(0, 12), H=st.integers(1, 5), half=st.integers(1, 64),
       theta=st.sampled_from([10000.0, 100000.0, 500000.0]), P=st.integers(1, 4096),
       parallel=st.booleans())
def test_rope(data, T, H, half, theta, P, parallel):
    hd = 2 * half
    x = data.draw(f32_arrays((T, H, hd)))
    positions = np.array(data.draw(st.lists(st.integers(0, P - 1), min_size=T, max_size=T)), np.int32)
    cos, sin = ref.rope_tables(theta, hd, P)
    with serial_or_parallel(parallel):
        out = cpu.rope(x, positions, cos, sin)
    # |out| <= sqrt(2) * max|x|: two products and a sum, a few roundings each.
    assert_close(out, ref.rope(x, positions, cos, sin), rtol=1e-6, scale=4 * float(np.abs(x).max(initial=0)))


def test_rope_reference_matches_hf_rotate_half():
    """The reference against HF's formula: x * cos + rotate_half(x) * sin, full-width tables."""
    rng = np.random.default_rng(1)
    T, H, hd, theta = 7, 3, 16, 10000.0
    x = rng.standard_normal((T, H, hd)).astype(np.float32)
    positions = np.array([0, 1, 2, 100, 1000, 4095, 17], np.int32)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([np.outer(positions, inv_freq)] * 2, axis=-1)[:, None, :]   # [T, 1, hd]
    rotate_half = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    expected = x * np.cos(emb) + rotate_half * np.sin(emb)
    cos, sin = ref.rope_tables(theta, hd, 4096)
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == (4096, hd // 2)
    np.testing.assert_allclose(ref.rope(x, positions, cos, sin), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ref.rope(x, np.zeros(T, np.int32), cos, sin), x)   # position 0: identity


@pytest.mark.parametrize("parallel", [False, True])
def test_rope_rejects_positions_past_the_tables(parallel):
    cos, sin = ref.rope_tables(10000.0, 4, 8)
    x = np.ones((2, 1, 4), np.float32)
    with serial_or_parallel(parallel), pytest.raises(ValueError, match=r"positions\[1\] = 8"):
        cpu.rope(x, np.array([0, 8], np.int32), cos, sin)


# ---------------------------------------------------------------- store_kv

@EXAMPLES
@given(data=st.data(), S=st.integers(1, 40), Hkv=st.integers(1, 3), hd=st.integers(1, 16),
       parallel=st.booleans())
def test_store_kv(data, S, Hkv, hd, parallel):
    slots = np.array(data.draw(st.permutations(range(S)))[: data.draw(st.integers(0, S))], np.int32)
    T = len(slots)
    k = data.draw(f32_arrays((T, Hkv, hd)))
    v = data.draw(f32_arrays((T, Hkv, hd)))
    k_cache = np.full((S, Hkv, hd), 7.0, np.float32)
    v_cache = np.full((S, Hkv, hd), -7.0, np.float32)
    k_expected, v_expected = k_cache.copy(), v_cache.copy()
    ref.store_kv(k, v, k_expected, v_expected, slots)
    with serial_or_parallel(parallel):
        assert cpu.store_kv(k, v, k_cache, v_cache, slots) is None
    np.testing.assert_array_equal(k_cache, k_expected)
    np.testing.assert_array_equal(v_cache, v_expected)


@pytest.mark.parametrize("parallel", [False, True])
def test_store_kv_rejects_a_slot_outside_the_cache_and_writes_nothing(parallel):
    k = np.ones((2, 1, 4), np.float32)
    k_cache = np.zeros((3, 1, 4), np.float32)
    v_cache = np.zeros((3, 1, 4), np.float32)
    with serial_or_parallel(parallel), pytest.raises(ValueError, match=r"slot_mapping\[1\] = 3"):
        cpu.store_kv(k, k, k_cache, v_cache, np.array([0, 3], np.int32))
    assert not k_cache.any() and not v_cache.any()


# ---------------------------------------------------------------- attention

@st.composite
def paged_batches(draw, max_seqs=4, max_len=40):
    """A ragged batch in a paged cache whose blocks are shuffled among the sequences.

    Sequence b has L_b tokens in the cache and its last q_b of them are query
    rows (q_b = 1: decode, q_b = L_b: prefill, in between: a chunk of a longer
    prompt; q_b = 0: a sequence with no rows in this step). Cache slots that
    no sequence owns hold NaN, so reading one would show.
    """
    B = draw(st.integers(1, max_seqs))
    Hkv = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3]))          # 1: multi-head, > 1: grouped-query
    H = Hkv * group
    hd = draw(st.sampled_from([1, 2, 8, 16, 64]))
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


@EXAMPLES
@given(batch=paged_batches())
def test_attention(batch):
    v_cache = batch[2]
    inputs = [a.copy() if isinstance(a, np.ndarray) else a for a in batch]
    expected = ref.attention(*batch)
    # A convex combination of values: errors scale with max |v| (and with the
    # score errors, which are ~1e-6 here).
    assert_close(cpu.attention(*batch), expected, rtol=2e-5, scale=float(np.nanmax(np.abs(v_cache))))
    for before, after in zip(inputs, batch):                  # nothing was written to
        np.testing.assert_array_equal(before, after)


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


def test_attention_decode_sees_the_whole_context_and_prefill_is_causal():
    """Hand-checkable cases: one key gives back its value; row 0 of a prefill sees only key 0."""
    k_cache = np.array([[[1.0, 0.0]], [[0.0, 1.0]]], np.float32)       # 2 slots, 1 kv head, hd 2
    v_cache = np.array([[[10.0, 20.0]], [[30.0, 40.0]]], np.float32)
    table = np.array([[0, 1]], np.int32)
    q = np.zeros((2, 1, 2), np.float32)                                 # equal scores
    for ops in (cpu, ref):
        out = ops.attention(q, k_cache, v_cache, table, 1, np.array([0, 2], np.int32),
                            np.array([0, 1], np.int32), 1.0)
        np.testing.assert_allclose(out[0, 0], [10.0, 20.0])             # only key 0
        np.testing.assert_allclose(out[1, 0], [20.0, 30.0])             # mean of both


def test_attention_rejects_bad_batch_descriptions():
    q = np.zeros((2, 1, 2), np.float32)
    cache = np.zeros((4, 1, 2), np.float32)
    table = np.array([[0, 1]], np.int32)
    cu_q = np.array([0, 2], np.int32)
    ok_pos = np.array([0, 1], np.int32)
    cpu.attention(q, cache, cache, table, 2, cu_q, ok_pos, 1.0)
    with pytest.raises(ValueError, match="cu_q"):
        cpu.attention(q, cache, cache, table, 2, np.array([0, 1], np.int32), ok_pos, 1.0)
    with pytest.raises(ValueError, match="negative"):
        cpu.attention(q, cache, cache, table, 2, cu_q, np.array([0, -1], np.int32), 1.0)
    with pytest.raises(ValueError, match="beyond the end"):
        cpu.attention(q, cache, cache, table, 2, cu_q, np.array([0, 4], np.int32), 1.0)
    with pytest.raises(ValueError, match="not a block"):
        cpu.attention(q, cache, cache, np.array([[0, 2]], np.int32), 2, cu_q, np.array([0, 3], np.int32), 1.0)
    with pytest.raises(ValueError, match="multiple"):
        cpu.attention(np.zeros((2, 3, 2), np.float32), np.zeros((4, 2, 2), np.float32),
                      np.zeros((4, 2, 2), np.float32), table, 2, cu_q, ok_pos, 1.0)


# ---------------------------------------------------------------- exp for softmax and SiLU

@numba.njit(fastmath=FAST)
def _exp_loop(x, out):
    """exp_nonpositive over an array, compiled as the kernels use it (fast-math, SIMD)."""
    for i in range(x.shape[0]):
        out[i] = expf.exp_nonpositive(x[i])


def test_exp_nonpositive_is_within_its_stated_error():
    x = np.concatenate([np.linspace(-87.0, 0.0, 400_001, dtype=np.float32),
                        -np.abs(np.random.default_rng(0).standard_normal(100_000).astype(np.float32)),
                        np.array([0.0, -0.0, -1e-30, -1e-45], np.float32)])
    out = np.empty_like(x)
    _exp_loop(x, out)
    exact = np.exp(x.astype(np.float64))
    rel = np.abs(out - exact) / exact
    assert rel.max() < 3.2e-7                        # the bound expf.py states near -87
    assert rel[x > -10].max() < 1.3e-7               # and about 1 ulp for x > -10
    assert (out[x == 0] == 1.0).all()


def test_exp_nonpositive_underflows_to_zero_and_keeps_nan():
    x = np.array([-87.01, -100.0, -1e30, -np.inf, np.nan], np.float32)
    out = np.empty_like(x)
    _exp_loop(x, out)
    assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert np.isnan(out[4])


# ---------------------------------------------------------------- silu_mul and add

@EXAMPLES
@given(data=st.data(), T=st.integers(0, 20), F=st.integers(1, 200), parallel=st.booleans())
def test_silu_mul(data, T, F, parallel):
    gate_up = data.draw(f32_arrays((T, 2 * F), bound=20.0))
    with serial_or_parallel(parallel):
        out = cpu.silu_mul(gate_up)
    assert_close(out, ref.silu_mul(gate_up), rtol=1e-6, scale=0.0)


@pytest.mark.parametrize("parallel", [False, True])
def test_silu_mul_is_finite_for_extreme_gates(parallel):
    g = np.array([-3e38, -1e30, -1e4, -104.0, -88.8, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.8, 104.0,
                  1e4, 1e30, 3e38], np.float32)
    gate_up = np.concatenate([g, np.ones_like(g)])[None, :]
    with serial_or_parallel(parallel):
        out = cpu.silu_mul(gate_up)
    assert np.isfinite(out).all()
    assert_close(out, ref.silu_mul(gate_up), rtol=1e-6, scale=0.0)


@EXAMPLES
@given(data=st.data(), shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=12),
       parallel=st.booleans())
def test_add(data, shape, parallel):
    x = data.draw(f32_arrays(shape))
    y = data.draw(f32_arrays(shape))
    with serial_or_parallel(parallel):
        out = cpu.add(x, y)
    np.testing.assert_array_equal(out, ref.add(x, y))
    assert out.dtype == np.float32 and not np.shares_memory(out, x) and not np.shares_memory(out, y)


def test_add_rejects_different_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        cpu.add(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))


# ---------------------------------------------------------------- NaN propagates

@pytest.mark.parametrize("T", [1, 2, 7, 70])          # GEMV, leftover tokens, 4x3 tiles, two token blocks
def test_nan_in_linear_reaches_exactly_the_affected_outputs(T):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, 33)).astype(np.float32)
    w = rng.standard_normal((50, 33)).astype(np.float32)
    bad_row, bad_n = T // 2, 49
    x[bad_row, 5] = np.nan
    w[bad_n, 0] = np.nan
    out = cpu.linear(x, w)
    assert np.isnan(out[bad_row]).all()
    assert np.isnan(out[:, bad_n]).all()
    ok_rows = np.arange(T) != bad_row
    assert_close(out[ok_rows][:, :bad_n], ref.linear(x[ok_rows], w[:bad_n]), scale=dot_scale(x[ok_rows], w[:bad_n]))


@pytest.mark.parametrize("parallel", [False, True])
def test_nan_in_rmsnorm_and_silu_mul(parallel):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    x[2, 3] = np.nan
    with serial_or_parallel(parallel):
        y = cpu.rmsnorm(x, np.ones(10, np.float32), 1e-5)
        s = cpu.silu_mul(x)                      # g = x[:, :5], u = x[:, 5:]
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    assert np.isnan(s[2, 3]) and np.isfinite(np.delete(s.ravel(), 2 * 5 + 3)).all()
    x[2, 3] = 1.0
    x[1, 7] = np.nan                             # in u this time
    with serial_or_parallel(parallel):
        s = cpu.silu_mul(x)
    assert np.isnan(s[1, 2]) and np.isfinite(np.delete(s.ravel(), 1 * 5 + 2)).all()


def test_nan_in_attention_reaches_exactly_the_affected_rows():
    # Two sequences of 6 tokens, block size 2, prefill; 2 kv heads, 4 query heads.
    rng = np.random.default_rng(4)
    B, L, bs, Hkv, H, hd = 2, 6, 2, 2, 4, 8
    table = np.array([[5, 0, 3], [1, 4, 2]], np.int32)
    k_cache = rng.standard_normal((12, Hkv, hd)).astype(np.float32)
    v_cache = rng.standard_normal((12, Hkv, hd)).astype(np.float32)
    q = rng.standard_normal((B * L, H, hd)).astype(np.float32)
    cu_q = np.array([0, L, 2 * L], np.int32)
    positions = np.tile(np.arange(L), B).astype(np.int32)
    # NaN in the key of sequence 0, position 3, kv head 1 (query heads 2 and 3) ...
    k_cache[table[0, 1] * bs + 1, 1, 0] = np.nan
    # ... and in query row 7 (sequence 1, position 1), head 0.
    q[7, 0, 4] = np.nan
    out = cpu.attention(q, k_cache, v_cache, table, bs, cu_q, positions, hd ** -0.5)
    nan = np.isnan(out).any(axis=-1)                                   # [T, H]
    expected = np.zeros_like(nan)
    expected[3:6, 2:4] = True                                          # rows that see position 3
    expected[7, 0] = True
    np.testing.assert_array_equal(nan, expected)
    assert np.isnan(out[expected]).all()


def test_read_only_weights_are_accepted():
    """Weights may come straight from a read-only memory map."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    w = rng.standard_normal((7, 16)).astype(np.float32)
    norm = rng.standard_normal(16).astype(np.float32)
    for a in (w, norm):
        a.setflags(write=False)
    assert_close(cpu.linear(x, w), ref.linear(x, w), scale=dot_scale(x, w))
    assert_close(cpu.linear(x[:1], w), ref.linear(x[:1], w), scale=dot_scale(x[:1], w))
    assert_close(cpu.logits(x, np.array([4], np.int32), w), ref.logits(x, np.array([4], np.int32), w),
                 scale=dot_scale(x, w))
    np.testing.assert_array_equal(cpu.embedding(w, np.array([6, 0], np.int32)), w[[6, 0]])
    np.testing.assert_allclose(cpu.rmsnorm(x, norm, 1e-5), ref.rmsnorm(x, norm, 1e-5), rtol=2e-6)
