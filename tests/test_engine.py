"""The continuous-batching engine (`xllm.engine.LLM`) on the real default model.

Batch invariance is checked with the prefix cache off, so that a request run
alone computes everything itself instead of reusing the batched run's keys
and values; tests/test_requests.py checks the cache and the request API.
And it is checked on the exact path (`exact=True`): by default the CPU
multiplies the quantized default model with integer activations for a few
tokens at a time and in float32 for many (cpu/intmatmul.py), so a sequence's
numbers change at the level of float rounding with the size of its batch,
enough to change a seeded sample now and then."""

from __future__ import annotations

import json

import numpy as np
import pytest

from xllm import planner
from xllm.chat import ChatSession, detect_format
from xllm.engine import LLM
from xllm.sampling import SamplingParams


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), max_num_seqs=16, max_num_batched_tokens=256, device="cpu", prefix_caching=False,
               exact=True)


def mixed_prompts(vocab: int) -> list[list[int]]:
    """16 prompts of 5 to 900 tokens: random ids, so no two share a prefix."""
    rng = np.random.default_rng(7)
    lengths = [5, 900, 13, 27, 51, 300, 8, 128, 129, 600, 64, 17, 255, 33, 450, 6]
    return [[int(t) for t in rng.integers(3, vocab, n)] for n in lengths]


def test_batch_invariance_greedy(llm):
    prompts = mixed_prompts(llm.model.config.vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    llm.engine.reset_stats()
    together = llm.generate(prompts, params)
    sched = llm.scheduler_stats
    assert max(sched.tokens_per_step) > 16, "prefill chunks and decodes should share steps"
    for prompt, out in zip(prompts, together):
        alone = llm.generate([prompt], params)[0]
        assert out.token_ids == alone.token_ids, f"prompt of {len(prompt)} tokens differs in a batch"
        assert len(out.token_ids) == 12 and out.finish_reason == "length"


def test_seeded_sampling_does_not_depend_on_the_batch(llm):
    prompts = mixed_prompts(llm.model.config.vocab_size)[:6]
    params = [SamplingParams(temperature=0.9, top_k=50, top_p=0.95, seed=100 + i, max_tokens=8, ignore_eos=True)
              for i in range(len(prompts))]
    together = llm.generate(prompts, params)
    for prompt, p, out in zip(prompts, params, together):
        assert out.token_ids == llm.generate([prompt], p)[0].token_ids


def test_stream_concatenates_to_text_and_stop_strings_cut(llm):
    prompt = "<|im_start|>user\nCount from one to ten in words.<|im_end|>\n<|im_start|>assistant\n"
    ids = llm.tokenizer.encode(prompt, allow_special=True)
    full = llm.generate([ids], SamplingParams(max_tokens=40))[0]
    assert full.text and full.finish_reason in ("eos", "length")
    pieces = "".join(text for _, text, _ in llm.stream([ids], SamplingParams(max_tokens=40)))
    assert pieces == full.text
    word = full.text.split()[2]
    cut = llm.generate([ids], SamplingParams(max_tokens=40, stop=(word,)))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(word)]


def test_kv_blocks_grow_with_the_longest_sequence_and_return(llm):
    prompts = [[5] * 100, [6] * 300]
    llm.engine.reset_stats()
    llm.generate(prompts, SamplingParams(max_tokens=40, ignore_eos=True))
    # 340 tokens need 3 blocks of 128 and 140 tokens 2: 5 at the peak, not 2 x context.
    assert llm.scheduler_stats.peak_blocks_used == 5
    assert llm.cache.free_blocks == llm.cache.num_blocks


def test_chat_turns_compute_only_their_new_tokens(smollm2_path):
    llm = LLM(str(smollm2_path), device="cpu")           # prefix caching on, as in the chat CLI
    fmt, system = detect_format(llm.tokenizer, llm.metadata)
    chat = ChatSession(llm.engine, llm.tokenizer, fmt, system)
    cached = 0
    for turn in ["Hi!", "What is the capital of France?", "And of Spain?", "Name a river there.", "Thanks!"]:
        before = llm.stats.prompt_tokens_computed
        answer = "".join(chat.send(turn, SamplingParams(max_tokens=12)))
        t = chat.last_turn
        assert answer
        # Only what was added since the cache was last written runs: this turn's
        # tokens and the previous answer's last token (sampled, never yet run).
        assert t["computed_tokens"] == t["prompt_tokens"] - cached
        assert llm.stats.prompt_tokens_computed - before == t["computed_tokens"]   # counted by the engine
        assert t["computed_tokens"] < 40
        cached = t["prompt_tokens"] + t["answer_tokens"] - 1


@pytest.mark.parametrize("kv_dtype", ["fp32", "fp16", "int8"])
def test_engine_kv_pool_is_the_planners_figure(smollm2_path, kv_dtype):
    budget = 300 << 20
    engine = LLM(str(smollm2_path), kv_dtype=kv_dtype, kv_cache_bytes=budget, device="cpu")
    config = engine.model.config
    blocks = planner.kv_pool_blocks(config, kv_dtype, 128, budget)
    assert engine.cache.num_blocks == blocks
    assert engine.kv_pool_bytes == planner.kv_pool_bytes(config, kv_dtype, 128, blocks) <= budget
    arrays = engine.cache.k + engine.cache.v + (engine.cache.k_scale or []) + (engine.cache.v_scale or [])
    assert sum(a.nbytes for a in arrays) == engine.kv_pool_bytes
    out = engine.generate(["Hello"], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4


def test_benchmark_batch_runs_and_reports_what_it_measured(smollm2_path, capsys):
    from bench.benchmark_batch import main

    assert main(["--model", str(smollm2_path), "--synthetic", "-n", "6", "-b", "3", "-l", "5",
                 "--kv-cache-mib", "64", "--baseline", "--profile", "--json", "--device", "cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["requests"] == 6 and r["generated_tokens"] == 6 * 5 and r["prompt_tokens"] == 5 + 13 + 27 + 51 + 5 + 13
    assert r["prompt_tokens_computed"] == r["prompt_tokens"]
    assert r["peak_kv_blocks"] == 3 and r["preemptions"] == 0    # 3 running, at most 56 tokens: 1 block each
    assert r["kv_touch_s"] >= 0
    b1 = r["batch1_decode_tok_s"]
    assert b1 == pytest.approx((r["batch1_decode_tok_s_before"] + r["batch1_decode_tok_s_after"]) / 2, abs=0.01)
    # Both figures are rounded to 2 decimals, so a small ratio needs an absolute margin.
    assert r["speedup_vs_batch1"] == pytest.approx(r["generated_tok_s"] / b1, rel=0.01, abs=0.006)
    assert r["prefix_cache_hit_rate"] == 0.0                         # random prompts share nothing
    ops = r["decode_step_ms_by_op"]                                 # --profile: decode steps of 3 rows
    assert r["decode_steps_profiled"] >= 4 and {"attention", "logits", "linear 576x576"} <= set(ops)
    assert all(ms > 0 for ms in ops.values())
