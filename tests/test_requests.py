"""The engine loop's request API: a bad request fails alone, threads share the
batch, the context policy, the prefix cache, and the chat CLI giving the same
tokens as `LLM`."""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest

from xllm.engine import LLM, Engine, RequestError
from xllm.sampling import SamplingParams
from xllm.testing import tiny_llama

from .conftest import REPO

GOOD = [[17, 300, 5021, 88, 9], [4000, 4001, 4002, 12, 13, 14, 15, 16, 99]]
PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(smollm2_path):
    # No prefix cache here: a request "alone" then computes everything itself.
    return LLM(str(smollm2_path), device="cpu", prefix_caching=False)


@pytest.fixture(scope="module")
def alone(llm):
    return [llm.generate([p], PARAMS)[0].token_ids for p in GOOD]


def bad_params(**fields) -> SamplingParams:
    """Params whose fields were set bad after they were made (their own check refuses them)."""
    p = SamplingParams(max_tokens=8)
    for k, v in fields.items():
        setattr(p, k, v)
    return p


BAD = {   # class of bad input -> (prompt, params, words the error must name)
    "bytes prompt": (b"Hello", PARAMS, ["bytes"]),
    "empty text": ("", PARAMS, ["empty"]),
    "empty ids": ([], PARAMS, ["empty"]),
    "id past vocab": ([5, 10**6], PARAMS, ["1000000", "token"]),
    "negative id": ([5, -1], PARAMS, ["-1"]),
    "float id": ([5, 2.5], PARAMS, ["2.5"]),
    "nan temperature": (GOOD[0], bad_params(temperature=math.nan), ["temperature", "nan"]),
    "nan repetition penalty": (GOOD[0], bad_params(repetition_penalty=math.nan), ["repetition_penalty"]),
    "inf top_p": (GOOD[0], bad_params(top_p=math.inf), ["top_p"]),
    "negative seed": (GOOD[0], bad_params(seed=-3), ["seed"]),
    "bool max_tokens": (GOOD[0], bad_params(max_tokens=True), ["max_tokens"]),
    "stop id past vocab": (GOOD[0], replace(PARAMS, stop_token_ids=(10**6,)), ["stop_token_ids"]),
    "past the context": ([7] * 9000, PARAMS, ["9000", "context"]),
    "params not SamplingParams": (GOOD[0], {"temperature": 0.0}, ["SamplingParams"]),
}


def test_sampling_params_refuse_bad_fields_when_made():
    for fields, name in [(dict(temperature=math.nan), "temperature"), (dict(repetition_penalty=math.nan), "repetition_penalty"),
                         (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(top_k=2.0), "top_k"),
                         (dict(top_p=0.0), "top_p"), (dict(max_tokens=0), "max_tokens"), (dict(stop=("",)), "stop"),
                         (dict(truncate_prompt_tokens=0), "truncate_prompt_tokens")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**fields)


@pytest.mark.parametrize("case", list(BAD))
def test_one_bad_request_fails_alone(llm, alone, case):
    prompt, params, words = BAD[case]
    outs = llm.generate([GOOD[0], prompt, GOOD[1]], [PARAMS, params, PARAMS])
    assert [o.token_ids for o in (outs[0], outs[2])] == alone
    bad = outs[1]
    assert bad.finish_reason == "error" and bad.token_ids == []
    assert bad.error.startswith(f"request {bad.request_id}: ")
    for word in words:
        assert word in bad.error, f"{word!r} not in {bad.error!r}"
    assert llm.cache.used_blocks == 0 and not llm.engine.has_unfinished()


def test_add_request_raises_one_line_request_error(llm):
    with pytest.raises(RequestError, match=r"^request \d+: the prompt is bytes") as e:
        llm.engine.add_request(b"Hi", PARAMS)
    assert isinstance(e.value, ValueError) and "\n" not in str(e.value)
    assert not llm.engine.has_unfinished()


def test_error_inside_one_request_finishes_it_alone(llm, alone, monkeypatch):
    engine = llm.engine
    real = engine._sample
    calls = {}

    def flaky(row_logits, req, seq):
        if req.out.prompt_token_ids == [1, 2, 3]:
            calls[seq.seq_id] = calls.get(seq.seq_id, 0) + 1
            if calls[seq.seq_id] == 3:
                raise RuntimeError("a sampler that broke")
        return real(row_logits, req, seq)

    monkeypatch.setattr(engine, "_sample", flaky)
    outs = llm.generate([GOOD[0], [1, 2, 3], GOOD[1]], PARAMS)
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert outs[1].finish_reason == "error" and "a sampler that broke" in outs[1].error
    assert len(outs[1].token_ids) == 2                       # what it had before the error
    assert llm.cache.used_blocks == 0


def test_non_finite_logits_fail_that_request(llm, alone, monkeypatch):
    engine = llm.engine
    real = engine._sample

    def nan_for_one(row_logits, req, seq):
        if req.out.prompt_token_ids == [1, 2, 3]:
            row_logits = np.full_like(row_logits, np.nan)     # as a broken kernel or weight would give
        return real(row_logits, req, seq)

    monkeypatch.setattr(engine, "_sample", nan_for_one)
    outs = llm.generate([GOOD[0], [1, 2, 3], GOOD[1]], SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
    assert [outs[0].token_ids, outs[2].token_ids] == alone
    assert outs[1].finish_reason == "error" and "not finite" in outs[1].error


def test_two_threads_and_two_open_streams_share_the_batch(llm, alone):
    results = {}

    def run(k):
        results[k] = [o.token_ids for o in llm.generate(GOOD, PARAMS)]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[k] == alone for k in range(3))
    # A second stream opened while the first is still open, read in turns.
    first, second = llm.stream([GOOD[0]], PARAMS), llm.stream([GOOD[1]], PARAMS)
    got = {0: None, 1: None}
    streams = {0: first, 1: second}
    while streams:
        for k in list(streams):
            try:
                _, _, out = next(streams[k])
            except StopIteration:
                del streams[k]
                continue
            if out is not None:
                got[k] = out.token_ids
    assert [got[0], got[1]] == alone
    assert llm.cache.used_blocks == 0


def test_closing_a_stream_aborts_its_requests_and_frees_their_blocks(llm):
    stream = llm.stream(GOOD, SamplingParams(max_tokens=50, ignore_eos=True))
    next(stream)
    assert llm.cache.used_blocks > 0
    stream.close()
    assert llm.cache.used_blocks == 0 and not llm.engine.has_unfinished()
    llm.cache.blocks.check()


def test_engine_abort_returns_what_was_generated(llm):
    engine = llm.engine
    rid = engine.add_request(GOOD[0], SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    out = engine.abort(rid)
    assert out.finish_reason == "abort" and len(out.token_ids) == 3      # the prompt's step samples the first
    assert engine.abort(rid) is None and llm.cache.used_blocks == 0


# ---------------------------------------------------------------- the context


@pytest.fixture(scope="module")
def tiny_engine():
    return Engine(tiny_llama("cpu"), block_size=16, num_blocks=16)     # context 128


def test_a_prompt_past_the_context_is_refused_or_truncated_on_request(tiny_engine):
    with pytest.raises(RequestError, match="the prompt has 128 tokens and the model's context is 128"):
        tiny_engine.add_request([5] * 128, SamplingParams(max_tokens=1))
    out = tiny_engine.run(list(range(3, 90)) * 2, SamplingParams(max_tokens=2, truncate_prompt_tokens=100))
    assert out.prompt_token_ids == (list(range(3, 90)) * 2)[-100:] and len(out.token_ids) == 2


def test_an_answer_cut_by_the_context_says_so(tiny_engine):
    out = tiny_engine.run([5] * 120, SamplingParams(max_tokens=50, ignore_eos=True))
    assert len(out.token_ids) == 8 and out.finish_reason == "length" and out.cut_by_context
    out = tiny_engine.run([5] * 120, SamplingParams(max_tokens=8, ignore_eos=True))
    assert len(out.token_ids) == 8 and not out.cut_by_context


def test_a_chat_that_outgrows_the_context_drops_its_oldest_turns_once(smollm2_path):
    from xllm.chat import ChatSession, detect_format
    from xllm.load import load_model

    model, tok, metadata = load_model(smollm2_path, device="cpu")
    model.config = replace(model.config, context_length=200)
    fmt, system = detect_format(tok, metadata)
    notices = []
    chat = ChatSession(Engine(model, tok, block_size=16, num_blocks=13), tok, fmt, system, notice=notices.append)
    opening = chat.convo.render([], "")[:5]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    first = "Tell me about the river Danube."
    for i, text in enumerate([first, "And the Rhine?", "Which is longer?", "Name a city on it.", "Thanks!", "Bye."]):
        "".join(chat.send(text, params))
        prompt = chat.convo.render(chat.convo.turns[:-1], text)
        assert prompt[:5] == opening                               # the system prompt stays
        assert chat.last_turn["prompt_tokens"] + 24 <= 200
        assert chat.last_output.finish_reason in ("length", "eos") and not chat.last_output.cut_by_context
    assert chat.convo.dropped > 0 and len(notices) == 1 and "200" in notices[0]
    assert first not in tok.decode(chat.convo.render(chat.convo.turns, "x"))


def xllm_main(*args):
    return subprocess.run([sys.executable, "-m", "xllm.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("flags", [
    dict(temperature=0.0, repetition_penalty=1.5, stop=()),
    dict(temperature=0.8, seed=11, top_k=40, top_p=0.95, repetition_penalty=1.3, stop=("Paris",)),
])
def test_the_chat_cli_and_llm_give_the_same_tokens(llm, flags):
    from xllm.chat import Conversation, detect_format

    question = "What is the capital of France? Answer in one sentence."
    cli_flags = ["--temperature", flags["temperature"], "--repeat-penalty", flags["repetition_penalty"],
                 "--top-k", flags.get("top_k", 0), "--top-p", flags.get("top_p", 1.0), "-n", 30]
    if "seed" in flags:
        cli_flags += ["--seed", flags["seed"]]
    for s in flags["stop"]:
        cli_flags += ["--stop", s]
    run = xllm_main("-p", question, *cli_flags)
    assert run.returncode == 0, run.stderr

    fmt, system = detect_format(llm.tokenizer, llm.metadata)
    convo = Conversation(llm.tokenizer, fmt, system)
    params = SamplingParams(max_tokens=30, stop_token_ids=convo.stop_ids, **flags)
    out = llm.generate([convo.add_user(question)], params)[0]
    assert run.stdout == out.text + "\n"
    if flags["stop"]:
        assert out.finish_reason == "stop" and "Paris" not in run.stdout
    else:   # the penalty is applied, not ignored: without it the greedy answer differs
        plain = llm.generate([convo.add_user(question)], replace(params, repetition_penalty=1.0))[0]
        assert plain.token_ids != out.token_ids


def test_the_cli_refuses_a_prompt_past_the_context_in_one_line():
    run = xllm_main("-p", "word " * 9000, "-n", 4)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xllm: error: request 0: the prompt has")


def test_the_front_door():
    import xllm
    from xllm import LLM as FrontLLM, SamplingParams as FrontParams

    assert FrontLLM is LLM and FrontParams is SamplingParams and "LLM" in xllm.__all__


def test_soak_smoke_nothing_leaks_or_is_lost(capsys):
    """bench/soak.py on the tiny model: two threads, aborts, bad requests, preemption."""
    import json

    from bench.soak import main

    code = main(["--tiny", "-n", "200", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ok"]
    assert r["lost"] == 0 and r["blocks_in_use_after"] == 0 and r["pool_check"] == "ok"
    assert r["ended"]["aborted by the caller"] > 0 and r["preemptions"] > 0 and r["prefix_cache_hit_rate"] > 0
    assert r["bad_requests_answered_as_errors"] > 0 and r["bad_requests_not_errors"] == 0
    assert r["rerun_alone"] == 20 and r["rerun_alone_differ"] == 0


def test_two_requests_sharing_a_200_token_system_prompt_compute_it_once(smollm2_path):
    llm = LLM(str(smollm2_path), device="cpu")                      # blocks of 128, prefix caching on
    rng = np.random.default_rng(3)
    system = [int(t) for t in rng.integers(3, 40000, 200)]
    a = system + [int(t) for t in rng.integers(3, 40000, 9)]
    b = system + [int(t) for t in rng.integers(3, 40000, 14)]
    # A runs past token 256, so its block 1 (tokens 128..255) is full and hashed
    # with its own tokens: B's hit ends inside it and is copied, not shared.
    first = llm.generate([a], SamplingParams(max_tokens=60, ignore_eos=True))[0]
    assert first.num_cached_tokens == 0
    before = llm.stats.prompt_tokens_computed
    second = llm.generate([b], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert second.num_cached_tokens == 200
    assert llm.stats.prompt_tokens_computed - before == 14            # only B's own tokens ran
    assert llm.scheduler_stats.prefix_copied_tokens == 200 - 128
    # And the answer is the one B gets from a cache that holds nothing of A.
    fresh = LLM(llm.model, prefix_caching=False)
    assert fresh.generate([b], SamplingParams(max_tokens=4, ignore_eos=True))[0].token_ids == second.token_ids


def test_a_failed_forward_step_fails_only_its_requests_and_ctrl_c_leaves_the_engine_usable(monkeypatch):
    model = tiny_llama("cpu")
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    alone = Engine(model, block_size=16, num_blocks=8).run([5, 6], params).token_ids
    engine = Engine(model, block_size=16, num_blocks=8, max_num_seqs=1, max_num_batched_tokens=4)
    real = model.forward

    def broken(batch, cache, rows):
        first = int(batch.tokens[0]) if batch.positions[0] == 0 else None    # a prompt's first token
        if first == 77:
            raise RuntimeError("a kernel that broke")
        if first == 78:
            raise KeyboardInterrupt
        return real(batch, cache, rows)

    monkeypatch.setattr(model, "forward", broken)
    a = engine.add_request([77, 5], params)          # runs first, alone (one sequence at a time)
    b = engine.add_request([5, 6], params)
    outs = {}
    while engine.has_unfinished():
        for ev in engine.step():
            if ev.finished:
                outs[ev.request_id] = ev.output
    assert outs[a].finish_reason == "error" and "a kernel that broke" in outs[a].error
    assert outs[b].token_ids == alone
    c = engine.add_request([78, 5], params)
    with pytest.raises(KeyboardInterrupt):
        engine.step()
    assert not engine.has_unfinished() and engine.abort(c) is None and engine.cache.used_blocks == 0
    # The interrupted request's end is not lost: the next step hands it out (to whoever waits for it).
    [late] = engine.step()
    assert late.request_id == c and late.finished and late.output.error == "interrupted"
    assert engine.step() == []
    engine.cache.blocks.check()
    assert engine.run([5, 6], params).token_ids == alone


def test_a_message_too_long_even_alone_keeps_the_conversation(llm):
    from xllm.chat import Conversation, detect_format

    fmt, system = detect_format(llm.tokenizer, llm.metadata)
    convo = Conversation(llm.tokenizer, fmt, system)
    convo.add_answer("Hi!", llm.tokenizer.encode("Hello there."))
    convo.add_answer("And?", llm.tokenizer.encode("Nothing more."))
    alone = len(convo.render([], "Ok"))
    # Too long even alone: nothing is dropped, the engine will refuse the prompt.
    ids = convo.prompt_for("word " * 300, context=200, room=24)
    assert len(ids) >= 200 and len(convo.turns) == 2 and convo.dropped == 0
    # Fits with every turn: nothing is dropped.
    assert convo.prompt_for("Ok", context=1000, room=24) == convo.add_user("Ok") and convo.dropped == 0
    # Fits only alone: both turns go, and the prompt is the message after the system prompt.
    assert convo.prompt_for("Ok", context=alone + 24, room=24) == convo.render([], "Ok")
    assert convo.turns == [] and convo.dropped == 2


def test_a_stream_whose_requests_are_aborted_behind_its_back_raises_instead_of_waiting_forever():
    llm = LLM(tiny_llama("cpu"), block_size=16, kv_cache_bytes=1 << 20)
    stream = llm.stream([[5, 6, 7], [8]], [SamplingParams(max_tokens=20, ignore_eos=True),
                                           SamplingParams(max_tokens=1)])
    i, _, short = next(stream)                     # the one-token request ends after the first step
    assert i == 1 and short.finished
    assert llm.engine.abort(short.request_id - 1) is not None   # the other one, ids go in prompt order
    with pytest.raises(RuntimeError, match="left the engine without an output"):
        next(stream)
