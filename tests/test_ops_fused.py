"""The CPU's fused operators against the compositions they replace.

`Ops.add_rmsnorm`, `Ops.rope_store` and `Ops.decoder_layer` are written once in
xllm/ops/interface.py as compositions of the other operators (every device
but the CPU runs those); the CPU replaces each with one kernel. The kernel
must give what the composition gives on the same device, and refuse bad
input the same way, writing nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ops_helpers import assert_close
from xllm.ops import get_ops
from xllm.ops.interface import Ops
from xllm.ops.reference import quantize_kv_int8

cpu = get_ops("cpu")
DTYPES = ["fp32", "fp16", "int8"]


@settings(max_examples=25, deadline=None)
@given(T=st.sampled_from([0, 1, 3, 70]), D=st.integers(1, 600), seed=st.integers(0, 2**32 - 1))
def test_add_rmsnorm_is_add_then_rmsnorm(T, D, seed):
    """T = 70 at D >= 469 takes the threaded kernel (common.PARALLEL_MIN_ELEMENTS)."""
    rng = np.random.default_rng(seed)
    x, y = (rng.standard_normal((T, D)) * 3).astype(np.float32), rng.standard_normal((T, D)).astype(np.float32)
    w = rng.standard_normal(D).astype(np.float32)
    s, h = cpu.add_rmsnorm(x, y, w, 1e-5)
    s_ref, h_ref = Ops.add_rmsnorm(get_ops("reference"), x, y, w, 1e-5)
    np.testing.assert_array_equal(s, s_ref)                  # one float32 addition each
    assert_close(h, h_ref, rtol=1e-6, scale=float(np.abs(h_ref).max(initial=1.0)))


def test_add_rmsnorm_rejects_mismatched_shapes():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="add: shapes differ"):
        cpu.add_rmsnorm(x, np.zeros((2, 7), np.float32), np.ones(8, np.float32), 1e-5)
    with pytest.raises(ValueError, match="rmsnorm: need"):
        cpu.add_rmsnorm(x, x, np.ones(7, np.float32), 1e-5)


def caches(kv_dtype: str, S: int, Hkv: int, hd: int):
    """(k_cache, v_cache, k_scale, v_scale) filled with sentinels, as the KV cache stores kv_dtype."""
    dtype = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}[kv_dtype]
    k, v = np.full((S, Hkv, hd), 7, dtype), np.full((S, Hkv, hd), -7, dtype)
    if kv_dtype != "int8":
        return [k, v, None, None]
    return [k, v, np.full((S, Hkv), 3.0, np.float32), np.full((S, Hkv), 5.0, np.float32)]


def copies(arrays):
    return [None if a is None else a.copy() for a in arrays]


def assert_same(got, want):
    """Pairwise bit-equal arrays (None where a float cache has no scales)."""
    for a, b in zip(got, want, strict=True):
        if a is not None:
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("T, H, Hkv, hd", [(1, 9, 3, 64), (5, 4, 2, 16), (300, 4, 4, 32)])
def test_rope_store_is_split_rope_and_store(kv_dtype, T, H, Hkv, hd):
    """Bit for bit the composition on the CPU: the rotated q, and every cache array
    (T = 300 takes the threaded kernel)."""
    rng = np.random.default_rng(T + H + hd)
    S, P = T + 7, T + 40
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * hd)).astype(np.float32)
    positions = rng.integers(0, P, T).astype(np.int32)
    slots = rng.permutation(S)[:T].astype(np.int32)
    cos, sin = cpu.rope_tables(10000.0, hd, P)
    fused, composed = caches(kv_dtype, S, Hkv, hd), caches(kv_dtype, S, Hkv, hd)
    q = cpu.rope_store(qkv, H, Hkv, hd, positions, cos, sin, fused[0], fused[1], slots, *fused[2:])
    q_ref = Ops.rope_store(cpu, qkv, H, Hkv, hd, positions, cos, sin, composed[0], composed[1], slots, *composed[2:])
    np.testing.assert_array_equal(q, q_ref)
    assert_same(fused, composed)


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_rope_store_refuses_a_bad_position_or_slot_and_writes_nothing(kv_dtype):
    rng = np.random.default_rng(3)
    T, H, Hkv, hd, S, P = 4, 4, 2, 8, 6, 10
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * hd)).astype(np.float32)
    cos, sin = cpu.rope_tables(10000.0, hd, P)
    good_positions, good_slots = np.arange(T, dtype=np.int32), np.arange(T, dtype=np.int32)
    for positions, slots, message in [(np.array([0, 1, P, 2], np.int32), good_slots, "position"),
                                      (good_positions, np.array([0, 1, 2, S], np.int32), "slot")]:
        c = caches(kv_dtype, S, Hkv, hd)
        before = copies(c)
        with pytest.raises(ValueError, match=message):
            cpu.rope_store(qkv, H, Hkv, hd, positions, cos, sin, c[0], c[1], slots, *c[2:])
        assert_same(c, before)
    with pytest.raises(ValueError, match="split_qkv"):
        cpu.rope_store(qkv[:, 1:], H, Hkv, hd, good_positions, cos, sin, *caches(kv_dtype, S, Hkv, hd)[:2], good_slots)


def test_rope_store_int8_cache_holds_what_the_reference_quantizer_gives():
    """The int8 cache after rope_store: each key head quantized with its own scale, as the reference does."""
    rng = np.random.default_rng(4)
    T, H, Hkv, hd = 3, 2, 1, 16
    qkv = rng.standard_normal((T, (H + 2 * Hkv) * hd)).astype(np.float32)
    positions, slots = np.array([0, 5, 9], np.int32), np.array([2, 0, 1], np.int32)
    cos, sin = cpu.rope_tables(10000.0, hd, 16)
    c = caches("int8", 3, Hkv, hd)
    cpu.rope_store(qkv, H, Hkv, hd, positions, cos, sin, c[0], c[1], slots, *c[2:])
    ref = get_ops("reference")
    k = ref.rope(qkv[:, H * hd:(H + Hkv) * hd].reshape(T, Hkv, hd), positions, cos, sin)
    kq, ks = quantize_kv_int8(k)
    np.testing.assert_array_equal(c[0][slots], kq)
    np.testing.assert_array_equal(c[2][slots], ks)


# ---------------------------------------------------------------- decoder_layer: a whole layer in one call

FORMATS = ["f32", "f16", "q8_0", "q4_0", "q4_1", "w8a8"]


CACHES = ("k_cache", "v_cache", "k_scale", "v_scale")


def model_with_cache(fmt: str, kv_dtype: str, n_layers: int = 2):
    """A tiny model with head_dim 64 (the SIMD attention block) and its cache, which already
    holds two sequences: (model, cache)."""
    from xllm.kv_cache import KVCache
    from xllm.model import Batch
    from xllm.testing import tiny_llama

    m = tiny_llama(weight_format=fmt, dim=128, n_heads=2, n_kv_heads=1, hidden_dim=96, context_length=256,
                   n_layers=n_layers)
    cache = KVCache(m.config, 12, 16, kv_dtype, device=m.ops)
    m.forward(Batch.build(cache, [(0, list(range(3, 40))), (1, list(range(5, 14)))]), cache, np.array([0], np.int32))
    return m, cache


def layer_call(fmt: str, kv_dtype: str):
    """(args, model) for layer 0 of `model_with_cache`: args(seqs) reserves the rows of `seqs`
    and gives Ops.decoder_layer's keyword arguments but x and h."""
    from xllm.model import Batch

    m, cache = model_with_cache(fmt, kv_dtype)

    def args(batch_seqs):
        b = Batch.build(cache, batch_seqs)
        kv = cache.layer(0)
        w, c = m.w, m.config
        return dict(wqkv=w["layers.0.wqkv"], wo=w["layers.0.wo"], w_gate_up=w["layers.0.w_gate_up"],
                    w_down=w["layers.0.w_down"], ffn_norm=w["layers.0.ffn_norm"], next_norm=w["layers.1.attn_norm"],
                    eps=c.rms_eps, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,
                    positions=b.positions, cos=m.cos, sin=m.sin, k_cache=kv.k, v_cache=kv.v,
                    slot_mapping=b.slot_mapping, block_table=b.block_table, block_size=cache.block_size, cu_q=b.cu_q,
                    scale=m.scale, k_scale=kv.k_scale, v_scale=kv.v_scale)
    return args, m


# Bad indices for a decode step of sequence 0 in `model_with_cache`'s cache of 12 blocks of 16 slots.
BAD_INDICES = [("positions", np.array([10_000], np.int32), "position"),      # past the rope tables
               ("slot_mapping", np.array([12 * 16], np.int32), "slot"),     # past the cache
               ("block_table", np.array([[0, 1, 99]], np.int32), "block_table")]


def caches_of_call(a: dict) -> list:
    return [a[name] for name in CACHES]


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_decoder_layer_is_its_nine_operators(fmt, kv_dtype):
    """Bit for bit, for decode (1 and 2 rows: the integer linear), a mixed batch of 6 rows and a
    prefill chunk of 30 (the float GEMM), on the integer and on the exact path, cache included."""
    args, m = layer_call(fmt, kv_dtype)
    rng = np.random.default_rng(9)
    for seqs in ([(0, [7])], [(0, [8]), (1, [9])], [(0, [3]), (1, [4, 5, 6, 7, 8])], [(2, list(range(1, 31)))]):
        a = args(seqs)
        T = len(a["positions"])
        x = rng.standard_normal((T, 128)).astype(np.float32)
        h = cpu.rmsnorm(x, m.w["layers.0.attn_norm"], 1e-5)
        for exact in (False, True):
            ops = get_ops("cpu", exact=exact)
            fused = {**a, **dict(zip(CACHES, copies(caches_of_call(a))))}
            composed = {**a, **dict(zip(CACHES, copies(caches_of_call(a))))}
            assert_same(ops.decoder_layer(x, h, **fused), Ops.decoder_layer(ops, x, h, **composed))
            assert_same(caches_of_call(fused), caches_of_call(composed))


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_decoder_layer_refuses_bad_indices_and_writes_nothing(kv_dtype):
    args, m = layer_call("q8_0", kv_dtype)
    good = args([(0, [7])])
    x = np.ones((1, 128), np.float32)
    for name, bad, message in BAD_INDICES:
        before = copies(caches_of_call(good))
        with pytest.raises(ValueError, match=message):
            cpu.decoder_layer(x, x, **{**good, name: bad})
        assert_same(caches_of_call(good), before)
    with pytest.raises(ValueError, match="linear"):
        cpu.decoder_layer(x[:, :100], x[:, :100], **good)


def stack_call(fmt: str, kv_dtype: str, n_layers: int = 3):
    """`layer_call` for every layer: (args, model), args(seqs) giving Ops.decoder_layers'
    keyword arguments but x and h, with copies of every layer's caches."""
    from xllm.model import Batch

    m, cache = model_with_cache(fmt, kv_dtype, n_layers)

    def args(batch_seqs):
        b, c = Batch.build(cache, batch_seqs), m.config
        lists = [None if a is None else [layer.copy() for layer in a]
                 for a in (cache.k, cache.v, cache.k_scale, cache.v_scale)]
        return dict(layers=m.layers, eps=c.rms_eps, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                    head_dim=c.head_dim, positions=b.positions, cos=m.cos, sin=m.sin, k_caches=lists[0],
                    v_caches=lists[1], slot_mapping=b.slot_mapping, block_table=b.block_table,
                    block_size=cache.block_size, cu_q=b.cu_q, scale=m.scale, k_scales=lists[2], v_scales=lists[3])
    return args, m


STACK_CACHES = ("k_caches", "v_caches", "k_scales", "v_scales")


def stack_caches(a: dict) -> list:
    """Every layer's cache arrays of a decoder_layers call, in one list (None: no scales)."""
    return [array for name in STACK_CACHES for array in (a[name] or [None])]


def with_copied_caches(a: dict) -> dict:
    return {**a, **{name: None if a[name] is None else copies(a[name]) for name in STACK_CACHES}}


@pytest.mark.parametrize("kv_dtype", DTYPES)
@pytest.mark.parametrize("fmt", ["f32", "q8_0", "q4_1", "w8a8"])
def test_decoder_layers_is_decoder_layer_for_each_layer(fmt, kv_dtype):
    """Bit for bit, outputs and every layer's cache, for a decode step, a mixed batch and a prefill chunk."""
    args, m = stack_call(fmt, kv_dtype)
    rng = np.random.default_rng(4)
    for seqs in ([(0, [7])], [(0, [3]), (1, [4, 5, 6, 7, 8])], [(2, list(range(1, 31)))]):
        a = args(seqs)
        x = rng.standard_normal((len(a["positions"]), 128)).astype(np.float32)
        h = cpu.rmsnorm(x, m.w["layers.0.attn_norm"], 1e-5)
        for exact in (False, True):
            ops = get_ops("cpu", exact=exact)
            stacked, layered = with_copied_caches(a), with_copied_caches(a)
            assert_same(ops.decoder_layers(x, h, **stacked), Ops.decoder_layers(ops, x, h, **layered))
            assert_same(stack_caches(stacked), stack_caches(layered))
            assert not np.array_equal(stacked["v_caches"][-1], a["v_caches"][-1])       # the last layer wrote


@pytest.mark.parametrize("kv_dtype", DTYPES)
def test_decoder_layers_refuses_bad_indices_and_writes_nothing(kv_dtype):
    args, m = stack_call("q8_0", kv_dtype)
    good = args([(0, [7])])
    x = np.ones((1, 128), np.float32)
    for name, bad, message in BAD_INDICES:
        before = copies(stack_caches(good))
        with pytest.raises(ValueError, match=message):
            cpu.decoder_layers(x, x, **{**good, name: bad})
        assert_same(stack_caches(good), before)


def test_decoder_layers_refuses_shapes_it_cannot_run_with_the_operators_errors():
    args, m = stack_call("q8_0", "fp32")
    good = args([(0, [7])])
    x = np.ones((1, 128), np.float32)
    with pytest.raises(ValueError, match="linear"):                  # x too narrow for the weights
        cpu.decoder_layers(x[:, :100], x[:, :100], **good)
    with pytest.raises(ValueError, match="3 layers, but 2 key caches"):
        cpu.decoder_layers(x, x, **{**good, "k_caches": good["k_caches"][:2]})
    odd = copies(good["v_caches"])
    odd[2] = odd[2][:100]                                             # layer 2's cache shorter than layer 0's
    before = copies(stack_caches(good))
    with pytest.raises(ValueError, match="layer 2's caches have shapes"):
        cpu.decoder_layers(x, x, **{**good, "v_caches": odd})
    assert_same(stack_caches(good), before)                            # layers 0 and 1 did not run


def test_decoder_layers_runs_layers_of_different_shapes_one_by_one():
    """A list whose layers differ in shape (not a Llama, but the operator takes any list)
    goes through decoder_layer one layer at a time, with the same result."""
    from xllm.ops.cpu.layer import LayerStack

    args, m = stack_call("f32", "fp32", n_layers=2)
    a = args([(0, [7])])
    # Layer 1 with a wider FFN: w_gate_up [2F, D], w_down [D, F] with F = 200 instead of 96.
    rng = np.random.default_rng(1)
    wide = m.layers[1]._replace(w_gate_up=rng.standard_normal((400, 128)).astype(np.float32) * 0.05,
                                w_down=rng.standard_normal((128, 200)).astype(np.float32) * 0.05)
    layers = LayerStack([m.layers[0], wide])
    assert not layers.same_shapes
    x = rng.standard_normal((1, 128)).astype(np.float32)
    stacked, layered = with_copied_caches({**a, "layers": layers}), with_copied_caches({**a, "layers": list(layers)})
    assert_same(cpu.decoder_layers(x, x, **stacked), Ops.decoder_layers(cpu, x, x, **layered))
    assert_same(stack_caches(stacked), stack_caches(layered))
