"""Soak test of the engine: many mixed requests from two threads, then count what leaked.

    python -m bench.soak                      # 1,000 requests on the default model
    python -m bench.soak --tiny -n 200        # the tiny random model (seconds)

Two threads submit requests through `LLM.stream` at the same time, so they
share one running batch. The requests mix random prompt lengths (some share a
system prompt, for the prefix cache), random sampling (greedy or seeded,
top-k/top-p, repetition penalty, stop strings), random lengths, and a few bad
requests (which must come back as errors alone). Now and then a thread stops
reading a stream early, which aborts its unfinished requests. The KV pool is
small (blocks of 16 tokens), so sequences are preempted and cached blocks
evicted.

At the end a sample of the completed requests runs again, one at a time: the
tokens must be the same as in the mixed run (greedy, or seeded sampling).

Printed: requests/s, requests by how they ended, requests lost
(submitted but neither finished nor aborted), KV blocks still in use after
the last request (leaked), the block pool's own consistency check,
preemptions, the prefix-cache hit rate, and the resident memory after the
warm-up beside at the end. Exit status 1 when anything leaked or was lost or
memory grew by more than 5%, or a request failed that should not have, or a
rerun gave other tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter

WARMUP = 100    # requests before the first memory reading


def rss_mib() -> float:
    """Resident memory of this process now (not the peak)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_request(rng: random.Random, vocab: int, system: list[int]):
    """(prompt, SamplingParams fields, whether the request is bad on purpose)."""
    n = rng.choice([1, 3, 8, 20, 40, 90])
    prompt = [rng.randrange(3, vocab) for _ in range(n)]
    if rng.random() < 0.3:
        prompt = system + prompt
    kind = rng.random()
    if kind < 0.04:       # bad requests: each must come back alone as an error
        return rng.choice([b"bytes", [], [vocab + 5], prompt]), rng.choice(
            [None, dict(temperature=float("nan")), dict(seed=-1)]) or dict(max_tokens=0), True
    params = dict(max_tokens=rng.choice([1, 2, 5, 12, 30]), ignore_eos=rng.random() < 0.5)
    if rng.random() < 0.5:
        params.update(temperature=rng.choice([0.5, 0.8, 1.2]), seed=rng.randrange(1 << 30),
                      top_k=rng.choice([0, 5, 40]), top_p=rng.choice([1.0, 0.9]))
    if rng.random() < 0.2:
        params["repetition_penalty"] = rng.choice([1.1, 1.5])
    if rng.random() < 0.1:
        params["stop"] = ("e",)
    return prompt, params, False


def make_params(fields: dict):
    """SamplingParams, or one whose fields were set bad after it was made
    (its own check would refuse them; the engine must refuse them too)."""
    from xllm.sampling import SamplingParams

    params = SamplingParams()
    for k, v in fields.items():
        setattr(params, k, v)
    return params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default=None, help="default: the default model")
    ap.add_argument("--tiny", action="store_true", help="the tiny random model of xllm.testing")
    ap.add_argument("-n", "--requests", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=16, help="KV blocks of 16 tokens (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rerun", type=int, default=20, help="completed requests run again alone, to compare tokens")
    ap.add_argument("-t", "--threads", type=int, default=None, help="CPU threads for the kernels")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numba

    from xllm import planner
    from xllm.engine import LLM

    if args.threads:
        numba.set_num_threads(args.threads)
    if args.tiny:                  # no tokenizer: token ids in and out, no stop strings
        from xllm.testing import tiny_llama

        model, tok = tiny_llama("cpu", context_length=512), None
    else:
        from xllm.download import default_model_path
        from xllm.load import load_model

        model, tok, _ = load_model(args.model or default_model_path())
    budget = planner.kv_pool_bytes(model.config, "fp32", 16, args.blocks)
    llm = LLM(model, tok, block_size=16, kv_cache_bytes=budget, max_num_seqs=16, max_num_batched_tokens=128)
    assert llm.cache.num_blocks == args.blocks
    vocab = model.config.vocab_size
    system = [random.Random(99).randrange(3, vocab) for _ in range(40)]

    lock = threading.Lock()
    counts: Counter = Counter()
    bad_ok = Counter()
    good_failed: list[str] = []
    completed: list[tuple] = []       # (prompt, params, token ids) of good requests that ran to the end
    submitted = [0]
    memory: dict[str, float] = {}
    done_count = [0]

    def worker(seed: int, n: int) -> None:
        rng = random.Random(seed)
        left = n
        while left:
            group = [random_request(rng, vocab, system) for _ in range(min(left, rng.randint(1, 6)))]
            left -= len(group)
            prompts = [g[0] for g in group]
            params = [make_params(g[1]) for g in group]
            stop_after = rng.randint(1, len(group)) if rng.random() < 0.15 else None
            with lock:
                submitted[0] += len(group)
            seen, finished = 0, set()
            stream = llm.stream(prompts, params)
            for i, _, out in stream:
                seen += 1
                if out is not None:
                    finished.add(i)
                    with lock:
                        counts[out.finish_reason] += 1
                        if group[i][2]:
                            bad_ok[out.finish_reason == "error"] += 1
                        elif out.finish_reason == "error":
                            good_failed.append(out.error)
                        else:
                            completed.append((prompts[i], params[i], out.token_ids))
                        done_count[0] += 1
                        if done_count[0] >= WARMUP and "after_warmup" not in memory:
                            memory["after_warmup"] = rss_mib()
                if stop_after is not None and seen >= stop_after:
                    stream.close()            # the caller went away: its other requests are aborted
                    break
            with lock:
                counts["aborted by the caller"] += len(group) - len(finished)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(args.seed + k, args.requests // 2 + k * (args.requests % 2)))
               for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.perf_counter() - t0
    memory["end"] = rss_mib()

    # The same tokens alone: a sample of the completed requests, run again one by one.
    rerun = random.Random(args.seed).sample(completed, min(args.rerun, len(completed)))
    differ = sum(llm.generate([p], sp)[0].token_ids != ids for p, sp, ids in rerun)

    blocks = llm.cache.blocks
    try:
        blocks.check()
        consistent = "ok"
    except AssertionError as e:
        consistent = f"FAILED: {e}"
    sched = llm.scheduler_stats
    accounted = sum(counts.values())
    result = {
        "model": "tiny" if args.tiny else str(args.model or "default"), "requests": submitted[0],
        "wall_s": round(wall, 1), "requests_per_s": round(submitted[0] / wall, 2),
        "ended": dict(counts), "lost": submitted[0] - accounted,
        "bad_requests_answered_as_errors": bad_ok[True], "bad_requests_not_errors": bad_ok[False],
        "good_requests_failed": len(good_failed), "first_failures": good_failed[:3],
        "rerun_alone": len(rerun), "rerun_alone_differ": differ,
        "blocks_in_use_after": blocks.used_blocks, "blocks_total": blocks.num_blocks, "pool_check": consistent,
        "unfinished_in_engine": llm.engine.has_unfinished(),
        "preemptions": sched.preemptions, "prefix_cache_hit_rate": round(sched.prefix_hit_rate, 4),
        "rss_mib_after_warmup": round(memory.get("after_warmup", float("nan")), 1),
        "rss_mib_end": round(memory["end"], 1),
    }
    growth = result["rss_mib_end"] / result["rss_mib_after_warmup"] - 1
    result["rss_growth"] = round(growth, 4)
    ok = (result["lost"] == 0 and result["blocks_in_use_after"] == 0 and consistent == "ok"
          and not result["unfinished_in_engine"] and result["bad_requests_not_errors"] == 0 and not good_failed and not differ
          and growth <= 0.05)
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:32s} {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main(main))
