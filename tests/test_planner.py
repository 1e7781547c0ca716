"""The memory planner and roofline model (xllm/planner.py, bench/plan.py, bench/ops.py).

The anchor is the original xLLM README's table for Llama-2-7B (b=48, s=68,
n=512, 128-token blocks; its 'G' are GiB):

    Embedding   vh1                              FP32   0.5
    weights     (4h1h1+2h1+3h1h2)L + vh1+h1      FP16  12.3
      self-attention (4h1h1+h1)L                 FP16   4
      MLP            (3h1h2+h1)L                 FP16   8.1
      head           vh1+h1                      FP16   0.2
    KV cache    2bh1L[(s+n)%128]*128             FP32  30
    activations prefill  bs(8h1+2h2+(s+n)+v)     FP32   1.1
                decode   b(8h1+2h2+(1+n)+v)      FP32   0.02

(its "[(s+n)%128]*128" means s+n rounded up to whole 128-token blocks.) The
weights and the KV cache are reproduced exactly; the activations differ, on
purpose, because the planner counts what xllm's forward allocates (see
test_activations_differ_from_the_original_as_explained). Beyond the table, the
planner is checked against the engine's own objects: a real KVCache's arrays
and the real forward's allocations, measured with tracemalloc.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm import planner as P
from xllm.config import ModelConfig
from xllm.kv_cache import KVCache
from xllm.model import Batch, Llama, prepare_weights

LLAMA2_7B = P.MODELS["llama2-7b"]
GiB = P.GiB


def table_round(nbytes: int, digits: int = 1) -> float:
    """A byte count as the original's table prints it: GiB to one decimal."""
    return round(nbytes / GiB, digits)


# ---------------------------------------------------------------- the original's table

def test_llama2_7b_weights_reproduce_the_original():
    """fp16 weights 12.3 GiB (attention 4, MLP 8.1, head 0.2) and a separate fp32 embedding 0.5 GiB.

    The original stores the embedding table in fp32 beside fp16 weights, so it
    is passed as embedding_dtype="fp32". Llama-2-7B is untied: the head (v x h1)
    is a second table. Total parameters 6,738,415,616, the published 6.74B.
    """
    h1, h2, v, L = 4096, 11008, 32000, 32
    w = P.weight_bytes(LLAMA2_7B, "fp16", embedding_dtype="fp32")
    assert w.embedding == v * h1 * 4 == 524_288_000
    assert w.attention == (4 * h1 * h1 + h1) * L * 2
    assert w.mlp == (3 * h1 * h2 + h1) * L * 2
    assert w.head == (v * h1 + h1) * 2
    weights = w.attention + w.mlp + w.head
    assert weights == ((4 * h1 * h1 + 2 * h1 + 3 * h1 * h2) * L + v * h1 + h1) * 2 == 13_214_687_232
    assert (table_round(w.embedding), table_round(weights)) == (0.5, 12.3)
    assert (table_round(w.attention), table_round(w.mlp), table_round(w.head)) == (4.0, 8.1, 0.2)
    assert w.embedding // 4 + weights // 2 == 6_738_415_616
    # xllm's own default keeps the embedding in the weight dtype: 0.24 GiB instead of 0.49
    assert P.weight_bytes(LLAMA2_7B, "fp16").embedding == v * h1 * 2


def test_llama2_7b_kv_cache_is_30_gib():
    """b=48 sequences of s+n = 68+512 = 580 tokens: ceil(580/128) = 5 blocks = 640 slots each;
    2 (K and V) * 32 layers * 4096 * 4 bytes * 640 * 48 = 30 GiB exactly, as in the original."""
    kv = P.kv_cache_bytes(LLAMA2_7B, "fp32", 128, 48, 68 + 512)
    assert kv == 2 * 32 * 4096 * 4 * 640 * 48 == 30 * GiB
    assert P.plan_memory(LLAMA2_7B, 48, 68, 512, weight_dtype="fp16").kv_cache == 30 * GiB
    # fp16 halves it; int8 quarters it plus one fp32 scale per token per kv head (32 heads of 128)
    assert P.kv_cache_bytes(LLAMA2_7B, "fp16", 128, 48, 580) == 15 * GiB
    assert P.kv_cache_bytes(LLAMA2_7B, "int8", 128, 48, 580) == 2 * 32 * (4096 + 32 * 4) * 640 * 48


def test_activations_differ_from_the_original_as_explained():
    """Prefill 0.65 GiB where the original says 1.1, decode 0.010 GiB where it says 0.02.

    The original's formula bs(8h1+2h2+(s+n)+v) gives 1.06 GiB and
    b(8h1+2h2+(1+n)+v) 0.016 GiB, so the difference is not rounding. The
    planner replays what xllm's forward holds alive at its peak instead:
      * prefill peaks inside silu_mul of the second layer on: the forward
        pass holds the first layer's inputs x0 and h0 until decoder_layers
        returns, which holds the layer's inputs x and h until the layer
        returns; then the new x (h1), gate_up (2h2) and its silu output
        (h2): bs(5h1+3h2). q, attn and the new h were freed after their
        last use (the compiled layer frees each array then), qkv and the
        rotated k inside `rope_store`, and no k or v array outlives it. The
        original counts logits (v) for every prompt token; xllm projects
        only the last row of each sequence. And xllm's attention streams
        its scores, so no (s+n) floats per row.
      * decode peaks at the same place, b(5h1+3h2), above the logits: x and
        h (2h1 per row), the gathered rows (h1) and their logits (v), b(3h1+v).
    """
    h1, h2, v, b, s, n = 4096, 11008, 32000, 48, 68, 512
    original_prefill = b * s * (8 * h1 + 2 * h2 + (s + n) + v) * 4
    original_decode = b * (8 * h1 + 2 * h2 + (1 + n) + v) * 4
    assert (table_round(original_prefill), table_round(original_decode, 2)) == (1.1, 0.02)

    plan = P.plan_memory(LLAMA2_7B, b, s, n, weight_dtype="fp16")
    assert plan.prefill.bytes == b * s * (5 * h1 + 3 * h2) * 4
    assert plan.prefill.step == "silu_mul(gate_up)"
    assert plan.decode.bytes == b * (5 * h1 + 3 * h2) * 4 > b * (3 * h1 + v) * 4
    assert plan.decode.step == "silu_mul(gate_up)"
    assert (round(plan.prefill.bytes / GiB, 3), round(plan.decode.bytes / GiB, 3)) == (0.651, 0.010)


def test_operator_figures_reproduce_the_original():
    """The original's operator table (4090: 73 TFLOP/s half, 1008 GB/s; fp16; per layer of a decode
    step). Its numbers match b=64, s=n=512, the setting of its earlier README, not b=48, s=68:
        Get k             2bh1h1 FLOPs 2.1 G, 2h1h1 bytes 0.03 GB, 0.03 ms compute, 0.03 ms memory
        attention score   2bh1(s+n) 0.5 GFLOP, 2bh1(s+n) 0.5 GB, 0.007 ms, 0.5 ms: memory
        attention output  the same
    xllm fuses q, k and v into one linear (3 x "Get k") and score + output into one attention,
    and adds the activations' bytes (2*4bh1 for qkv: +1 MB) to the weights'.
    """
    h1, b, ctx = 4096, 64, 1024
    dev = P.Device("original 4090", {"fp32": 73e12, "fp16": 73e12}, 1008e9, 24 * GiB, "the original's figures")
    costs = {c.name: c for c in P.step_costs(LLAMA2_7B, P.decode_phase(b, 512, 512), weight_dtype="fp16",
                                             kv_dtype="fp16", act_dtype="fp16")}
    bounds = {x.cost.name: x for x in P.roofline(list(costs.values()), dev, "fp16")}

    get_k_flops, get_k_bytes = 2 * b * h1 * h1, 2 * h1 * h1
    assert (round(get_k_flops / 1e9, 1), round(get_k_bytes / 1e9, 2)) == (2.1, 0.03)
    qkv = costs["qkv linear"]
    assert qkv.flops == 3 * get_k_flops and qkv.flops_formula == "6bh1h1"
    assert qkv.bytes == 3 * get_k_bytes + 2 * b * (h1 + 3 * h1)
    assert round(bounds["qkv linear"].compute_s / 3 * 1e3, 2) == 0.03
    assert round(bounds["qkv linear"].memory_s / 3 * 1e3, 2) == 0.03

    score = 2 * b * h1 * ctx                            # FLOPs of q.k, and bytes of the fp16 keys
    assert round(score / 1e9, 1) == 0.5
    att = bounds["attention"]
    assert att.cost.flops == 2 * score                  # score + output
    assert att.cost.bytes == 2 * score + 2 * 2 * b * h1  # keys + values, plus q in and out
    assert round(att.compute_s / 2 * 1e3, 3) == 0.007 and round(att.memory_s / 2 * 1e3, 1) == 0.5
    assert att.bottleneck == "memory"


def test_plan_command_prints_the_original_tables(capsys):
    from bench import plan

    plan.main([])
    out = capsys.readouterr().out
    for line in ["vh1", "(4h1h1+2h1+3h1h2)L + vh1+h1", "(4h1h1+h1)L", "(3h1h2+h1)L", "2bh1L*ceil((s+n)/128)*128",
                 "bs(5h1+3h2)", "b(5h1+3h2)"]:
        assert line in out
    assert "0.488" in out and "12.307" in out and "30.000" in out
    assert out.count("whole step") == 2 and "attention" in out


def test_plan_command_draws_the_roofline(tmp_path):
    import matplotlib  # noqa: F401  (in the test extra: a missing matplotlib fails here, it does not skip)

    from bench import plan

    png = tmp_path / "roofline.png"
    plan.main(["--model", "smollm2-135m", "-b", "4", "-s", "32", "-n", "32", "--png", str(png)])
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


# ---------------------------------------------------------------- the planner against the engine

@settings(max_examples=25, deadline=None)
@given(layers=st.integers(1, 4), kv_heads=st.integers(1, 4), head_dim=st.sampled_from([8, 64, 128]),
       block_size=st.sampled_from([1, 16, 128]), num_blocks=st.integers(1, 6))
def test_kv_cache_arrays_are_the_planned_pool(layers, kv_heads, head_dim, block_size, num_blocks):
    """A real KVCache allocates exactly kv_pool_bytes (np.zeros maps pages lazily, so this is cheap)."""
    config = ModelConfig(layers, kv_heads * head_dim * 2, kv_heads * 2, kv_heads, 64, 100, head_dim=head_dim)
    cache = KVCache(config, num_blocks, block_size)
    assert sum(a.nbytes for a in cache.k + cache.v) == P.kv_pool_bytes(config, "fp32", block_size, num_blocks)


def test_engine_pool_from_a_budget_fills_it():
    """blocks_for_budget: weights + activation peak + the pool fit, one more block would not;
    and the KVCache built with that many blocks holds exactly the planned bytes."""
    config = P.MODELS["smollm2-135m"]
    budget, step_tokens, rows = 2 * GiB, 2048, 64
    blocks = P.blocks_for_budget(config, budget, max_step_tokens=step_tokens, max_logit_rows=rows, block_size=16)
    cache = KVCache(config, blocks, 16)
    pool = sum(a.nbytes for a in cache.k + cache.v)
    used = (P.weight_bytes(config).total + P.activation_peak(config, step_tokens, rows).bytes + pool)
    assert pool == P.kv_pool_bytes(config, "fp32", 16, blocks)
    assert used <= budget < used + P.kv_pool_bytes(config, "fp32", 16, 1)
    with pytest.raises(P.BudgetTooSmall, match="GiB"):
        P.blocks_for_budget(config, P.weight_bytes(config).total, max_step_tokens=1, max_logit_rows=1)


def random_model(config: ModelConfig, seed: int = 0) -> Llama:
    rng = np.random.default_rng(seed)
    c = config
    shapes = {"tok_embeddings": (c.vocab_size, c.dim), "norm": (c.dim,), "output": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (c.dim,), p + "ffn_norm": (c.dim,), p + "wq": (c.q_dim, c.dim),
                       p + "wk": (c.kv_dim, c.dim), p + "wv": (c.kv_dim, c.dim), p + "wo": (c.dim, c.q_dim),
                       p + "w_gate": (c.hidden_dim, c.dim), p + "w_up": (c.hidden_dim, c.dim),
                       p + "w_down": (c.dim, c.hidden_dim)})
    weights = {k: rng.standard_normal(s, dtype=np.float32) * 0.1 for k, s in shapes.items()}
    return Llama(c, prepare_weights(c, weights))


@pytest.mark.parametrize("vocab, steps, peak_at", [
    (512, [[29, 13]], "silu_mul(gate_up)"),              # prefill of two prompts
    (512, [[29, 13], [1, 1]], "silu_mul(gate_up)"),      # then one decode step
    (8192, [[5, 3], [1, 1]], "logits = linear(h[rows], output)"),  # a big vocabulary: logits dominate
])
def test_activation_peak_is_what_the_forward_allocates(vocab, steps, peak_at):
    """The real Llama.forward on the CPU operators, its numpy allocations traced with tracemalloc:
    the peak above the starting point equals the planner's replay, up to a few Python objects
    and the kernels' own scratch, which the planner does not count: numba allocates it where
    tracemalloc sees it, and in a decode step of these tiny shapes the CPU attention's
    per-thread tiles (a few KiB a thread) can outweigh the activations themselves."""
    config = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=192, vocab_size=vocab,
                         context_length=256)
    model = random_model(config)
    for warm_up in (True, False):                    # first pass compiles/loads kernels outside the trace
        cache = KVCache(config, num_blocks=8, block_size=16)
        for lengths in steps:
            seqs = [(i, [1 + (i + t) % (vocab - 1) for t in range(n)]) for i, n in enumerate(lengths)]
            batch = Batch.build(cache, seqs)
            rows = (np.cumsum(lengths) - 1).astype(np.int32)
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
            model.forward(batch, cache, rows)
            measured = tracemalloc.get_traced_memory()[1] - base
            tracemalloc.stop()
            if warm_up:
                continue
            planned = P.activation_peak(config, len(batch.tokens), len(rows))
            assert 0 <= measured - planned.bytes <= 4096 + 8192, (measured, planned)
    assert planned.step == peak_at


def test_max_batch_is_the_edge():
    for model, budget_gib, s, n in [("llama2-7b", 24, 68, 512), ("llama2-7b", 80, 512, 512),
                                    ("smollm2-135m", 1, 128, 256), ("llama3-8b", 80, 1000, 1000)]:
        config, budget = P.MODELS[model], budget_gib * GiB
        keys = dict(weight_dtype="fp16", kv_dtype="fp16")
        b = P.max_batch(config, budget, s, n, **keys)
        assert b >= 1
        assert P.plan_memory(config, b, s, n, **keys).total <= budget < P.plan_memory(config, b + 1, s, n, **keys).total
    assert P.max_batch(LLAMA2_7B, 10 * GiB, 68, 512, weight_dtype="fp16") == 0   # weights alone are 12.8 GiB


# ---------------------------------------------------------------- dtypes and the cost model

def test_int8_weights_count_row_scales_and_keep_a_float_embedding():
    """W8A8: one byte per weight, one fp32 scale per output row, fp32 norms and an fp32 embedding."""
    c = ModelConfig(n_layers=2, dim=8, n_heads=2, n_kv_heads=1, hidden_dim=16, vocab_size=10)   # hkv = 4
    w = P.weight_bytes(c, "int8")
    assert w.embedding == 10 * 8 * 4
    assert w.attention == 2 * ((8 * 8 + 2 * 8 * 4 + 8 * 8) + 4 * (8 + 2 * 4 + 8) + 4 * 8)
    assert w.mlp == 2 * (3 * 16 * 8 + 4 * (2 * 16 + 8) + 4 * 8)
    assert w.head == 10 * 8 + 4 * 10 + 4 * 8
    tied = ModelConfig(2, 8, 2, 1, 16, 10, tied_embeddings=True)
    assert P.weight_bytes(tied, "int8").embedding == 0 and P.weight_bytes(tied, "int8").head == w.head
    assert P.kv_bytes_per_token(c, "int8") == 2 * 2 * (4 + 4) and P.kv_bytes_per_token(c, "fp16") == 2 * 2 * 8


@pytest.mark.parametrize("model", ["llama2-7b", "smollm2-135m", "llama3-8b"])
def test_linear_costs_add_up_to_the_weights(model):
    """Over a decode step (T = R = b rows) the linears and logits do 2 FLOPs per matrix weight per
    row, and move every matrix weight once plus each row's input and output activations."""
    c = P.MODELS[model]
    phase = P.decode_phase(3, 10, 5)
    linears = [x for x in P.step_costs(c, phase, weight_dtype="fp16") if x.matrix and x.name != "attention"]
    times = {x.name: c.n_layers if x.per_layer else 1 for x in linears}
    w = P.weight_bytes(c, "fp16")
    matrix_params = (w.attention + w.mlp + w.head) // 2 - c.dim * (2 * c.n_layers + 1)    # less the norms
    assert sum(x.flops * times[x.name] for x in linears) == 2 * phase.T * matrix_params
    widths = (c.n_layers * ((c.dim + c.q_dim + 2 * c.kv_dim) + (c.q_dim + c.dim) + (c.dim + 2 * c.hidden_dim)
                            + (c.hidden_dim + c.dim)) + c.dim + c.vocab_size)
    assert sum(x.bytes * times[x.name] for x in linears) == 2 * matrix_params + 4 * phase.T * widths


def test_measure_cpu_gives_a_roof():
    dev = P.measure_cpu(0.2)
    assert dev.bandwidth > 1e8 and dev.peak("fp32") > 1e8 and dev.peak("int8") == dev.peak("fp32")
    assert dev.memory > 0 and "GB/s" in dev.source


def test_ops_bench_times_every_planned_operator(capsys):
    """bench.ops has a call for every operator the planner costs, and runs them at the planned shapes."""
    from bench import ops as bench_ops
    from xllm.ops import get_ops

    config = ModelConfig(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=300,
                         context_length=512)
    for phase in (P.prefill_phase(2, 40), P.decode_phase(2, 40, 100)):
        calls = bench_ops.calls(config, phase, get_ops("cpu"), np.random.default_rng(0))
        names = [c.name for c in P.step_costs(config, phase)]
        assert set(calls) == set(names)
        for name in names:
            calls[name]()
    phase = P.decode_phase(2, 40, 100)
    measured = bench_ops.measure(config, phase, get_ops("cpu"), np.random.default_rng(0), budget_s=0.0)
    bounds = bench_ops.report(config, phase, P.DEVICES["t4"], measured)
    assert len(bounds) == len(measured) and all(t > 0 for t in measured)
    out = capsys.readouterr().out
    assert all(name in out for name in names) and "x bound" in out
