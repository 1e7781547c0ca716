"""Attention past 2,000 tokens: the tiled prefill and the split decode against the
reference, and batch invariance of whole requests with long prompts.

The tiny random model of `xllm.testing` with a 4,096-token context keeps the
model runs to seconds; attention itself is checked at SmolLM2's head shapes
(9 query heads, 3 kv heads, head_dim 64, blocks of 128).
"""

from __future__ import annotations

import numpy as np
import pytest

from xllm.engine import LLM
from xllm.ops import get_ops
from xllm.ops.cpu import paged_attention
from xllm.ops.reference import attention as ref_attention
from xllm.ops.reference import quantize_kv_int8
from xllm.sampling import SamplingParams
from xllm.testing import tiny_llama

cpu = get_ops("cpu")
H, HKV, HD, BS = 9, 3, 64, 128


def long_batch(lengths, n_rows, kv_dtype="fp32", seed=0):
    """Sequences of `lengths` tokens in a shuffled paged cache; the last n_rows[b] of
    sequence b are query rows. Returns the attention arguments."""
    rng = np.random.default_rng(seed)
    need = [-(-L // BS) for L in lengths]
    order = rng.permutation(sum(need))
    table = np.full((len(lengths), max(need)), -1, np.int32)
    at = 0
    for b, k in enumerate(need):
        table[b, :k] = order[at: at + k]
        at += k
    S = sum(need) * BS
    k = rng.standard_normal((S, HKV, HD)).astype(np.float32)
    v = rng.standard_normal((S, HKV, HD)).astype(np.float32)
    scales = (None, None)
    if kv_dtype == "fp16":
        k, v = k.astype(np.float16), v.astype(np.float16)
    elif kv_dtype == "int8":
        (k, ks), (v, vs) = quantize_kv_int8(k), quantize_kv_int8(v)
        scales = (ks, vs)
    cu_q = np.concatenate([[0], np.cumsum(n_rows)]).astype(np.int32)
    positions = np.concatenate([np.arange(L - n, L) for L, n in zip(lengths, n_rows)]).astype(np.int32)
    q = rng.standard_normal((int(cu_q[-1]), H, HD)).astype(np.float32)
    return (q, k, v, table, BS, cu_q, positions, HD ** -0.5, *scales)


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8"])
def test_long_prefill_chunk_and_decodes_match_the_reference(kv_dtype):
    # A 300-row chunk at the end of 2,300 tokens, a decode at 2,100, a 40-row chunk.
    args = long_batch([2300, 2100, 700], [300, 1, 40], kv_dtype)
    got = cpu.attention(*args)
    np.testing.assert_allclose(got, ref_attention(*args), rtol=2e-5, atol=2e-5)


def test_one_decoding_sequence_splits_its_blocks_and_gets_the_bits_of_a_prefill_row():
    """Flash-decoding (key blocks on several threads, partials folded in block order)
    gives a row exactly what the tiled prefill gives the same row."""
    q, k, v, table, bs, cu_q, positions, scale, _, _ = long_batch([2500], [64])
    prefill = cpu.attention(q, k, v, table, bs, cu_q, positions, scale)
    for r in (0, 63):                                     # alone: a decode of that row
        one = cpu.attention(q[r: r + 1], k, v, table, bs, np.array([0, 1], np.int32), positions[r: r + 1], scale)
        np.testing.assert_array_equal(one[0], prefill[r])


def test_a_long_sequence_gets_the_same_bits_alone_and_in_a_ragged_batch():
    q, k, v, table, bs, cu_q, positions, scale, _, _ = long_batch([2200, 900, 2600], [500, 1, 77])
    together = cpu.attention(q, k, v, table, bs, cu_q, positions, scale)
    for b in range(3):
        lo, hi = cu_q[b], cu_q[b + 1]
        alone = cpu.attention(q[lo:hi], k, v, table[b: b + 1], bs, np.array([0, hi - lo], np.int32),
                              positions[lo:hi], scale)
        np.testing.assert_array_equal(alone, together[lo:hi])
        half = (hi - lo) // 2                             # a chunk boundary elsewhere
        if half:
            first = cpu.attention(q[lo:lo + half], k, v, table[b: b + 1], bs, np.array([0, half], np.int32),
                                  positions[lo:lo + half], scale)
            np.testing.assert_array_equal(first, together[lo:lo + half])


def test_both_cpu_drivers_agree_bit_for_bit(monkeypatch):
    args = long_batch([2100, 300], [3, 2], "fp16")
    tiles = cpu.attention(*args)                          # few rows: split by key blocks
    monkeypatch.setattr(paged_attention, "SPLIT_BELOW", 0)
    np.testing.assert_array_equal(cpu.attention(*args), tiles)


def test_engine_batch_invariance_with_prompts_over_2000_tokens():
    model = tiny_llama("cpu", context_length=4096)
    rng = np.random.default_rng(3)
    prompts = [[int(t) for t in rng.integers(3, 96, n)] for n in (2300, 40, 2050, 7)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    llm = LLM(model, max_num_seqs=8, max_num_batched_tokens=512, prefix_caching=False)
    together = llm.generate(prompts, params)
    for prompt, out in zip(prompts, together):
        alone = llm.generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids, f"prompt of {len(prompt)} tokens differs in a batch"


def test_rope_tables_grow_on_demand_and_give_the_same_tokens(monkeypatch):
    import xllm.model

    prompt = [int(t) for t in np.random.default_rng(5).integers(3, 96, 300)]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    full = LLM(tiny_llama("cpu", context_length=1024), prefix_caching=False).generate([prompt], params)[0]
    monkeypatch.setattr(xllm.model, "ROPE_TABLE_START", 100)
    model = tiny_llama("cpu", context_length=1024)
    assert model.cos.shape[0] == 100
    grown = LLM(model, prefix_caching=False).generate([prompt], params)[0]
    assert 300 < model.cos.shape[0] <= 1024
    assert grown.token_ids == full.token_ids
