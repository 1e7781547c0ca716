"""Batch throughput, the original xLLM's benchmark_batch.

    python -m bench.benchmark_batch --synthetic -n 32 -b 32 -l 128 -t 2 --baseline
    python -m bench.benchmark_batch --file ../shared/data/prompts.txt -b 16 -l 128

Every line of --file is one prompt (sent through the model's chat format),
or --synthetic makes -n prompts of random token ids with lengths repeating
5, 13, 27, 51. All requests are submitted at once; the engine runs at most
-b of them at a time (continuous batching). Generation ignores end-of-sequence
so every request writes exactly -l tokens.

Printed: generated tokens/s over the whole run, prompt tokens/s, time to first
token and time per output token (p50/p90), the peak number of KV blocks in
use, the share of prompt tokens the prefix cache supplied, and with --baseline the batch-1 decode speed of one request measured in
the same run (before and after the batch run, averaged), with the ratio
between the two. The KV pool is written once before timing, so that the
operating system's first-touch page faults, paid once in a server's life,
are not counted (--cold-kv counts them). --profile adds the milliseconds
each operator takes per decode step of a full batch.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

import numpy as np

from xllm.ops import FUSED, OPS, Ops

SYNTHETIC_LENGTHS = (5, 13, 27, 51)


def percentile(values, q):
    values = [v for v in values if v is not None]
    return float(np.percentile(values, q)) if values else float("nan")


def build_prompts(args, llm) -> list:
    if args.file:
        from xllm.chat import Conversation, detect_format

        fmt, system = detect_format(llm.tokenizer, llm.metadata)
        lines = [ln.strip() for ln in Path(args.file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if args.num_prompts:
            lines = (lines * (args.num_prompts // len(lines) + 1))[: args.num_prompts]
        return [Conversation(llm.tokenizer, fmt, system).add_user(line) for line in lines]
    rng = np.random.default_rng(0)
    vocab = llm.model.config.vocab_size
    n = args.num_prompts or 32
    return [[int(t) for t in rng.integers(3, vocab, SYNTHETIC_LENGTHS[i % len(SYNTHETIC_LENGTHS)])] for i in range(n)]


class OpTimer:
    """Stands in for the model's operators and times every call of one.

    `llm.model.ops = OpTimer(llm.model.ops)` before a run; afterwards
    `per_step(rows)` gives the milliseconds each operator took per forward
    step that had exactly `rows` rows (so decode steps of a full batch can be
    told apart from prompt steps). `linear` is split by weight shape; a fused
    operator (`xllm.ops.FUSED`) is timed as one, except `decoder_layers` and
    `decoder_layer`, which run as their compositions so that the operators are
    timed (on the CPU, which runs a layer as one compiled call, the profiled
    step is then slower than the real one by their calls from Python). Of the
    memory functions only split_qkv, a copy of the activations, is timed; the
    others (uploading the step's few indices, downloading its logits) pass
    through.
    """

    TIMED = (set(OPS) | set(FUSED) | {"split_qkv"}) - {"decoder_layer", "decoder_layers"}

    def __init__(self, ops):
        self.ops = ops
        self.ms: dict[tuple[str, int], float] = {}
        self.steps: dict[int, int] = {}

    def __getattr__(self, name):
        if name in ("decoder_layer", "decoder_layers"):
            return functools.partial(getattr(Ops, name), self)
        fn = getattr(self.ops, name)
        if name not in self.TIMED:
            return fn

        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.ops.synchronize()                     # a GPU's launches return before the work is done
            key = f"linear {args[1].shape[0]}x{args[1].shape[1]}" if name == "linear" else name
            rows = len(args[1]) if name == "embedding" else len(args[0])
            if name == "embedding":
                self.steps[rows] = self.steps.get(rows, 0) + 1
            self.ms[key, rows] = self.ms.get((key, rows), 0.0) + (time.perf_counter() - start) * 1e3
            return out

        return timed

    def per_step(self, rows: int) -> dict[str, float]:
        n = self.steps.get(rows, 0)
        got = {k: v / n for (k, r), v in self.ms.items() if r == rows and n}
        return dict(sorted(got.items(), key=lambda kv: -kv[1]))


def run(llm, prompts, max_tokens, max_batch, show_progress=True) -> dict:
    from tqdm import tqdm

    from xllm.sampling import SamplingParams

    llm.engine.set_limits(max_batch, max(llm.engine.scheduler.max_num_batched_tokens, max_batch))
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.engine.reset_stats()
    bar = tqdm(total=len(prompts), desc=f"batch {max_batch}", unit="req", disable=not show_progress, file=sys.stderr)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, progress=lambda _: bar.update(1))
    wall = time.perf_counter() - t0
    bar.close()
    generated = sum(len(o.token_ids) for o in outs)
    sched = llm.scheduler_stats
    return {
        "requests": len(outs), "max_batch": max_batch, "max_tokens": max_tokens,
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
        "prompt_tokens_computed": llm.stats.prompt_tokens_computed,
        "prefix_cache_hit_rate": round(sched.prefix_hit_rate, 4),
        "generated_tokens": generated, "wall_s": round(wall, 3),
        "generated_tok_s": round(generated / wall, 2),
        "prompt_tok_s": round(sum(len(o.prompt_token_ids) for o in outs) / wall, 2),
        "ttft_p50_s": round(percentile([o.ttft for o in outs], 50), 4),
        "ttft_p90_s": round(percentile([o.ttft for o in outs], 90), 4),
        "tpot_p50_s": round(percentile([o.tpot for o in outs], 50), 4),
        "tpot_p90_s": round(percentile([o.tpot for o in outs], 90), 4),
        "peak_kv_blocks": sched.peak_blocks_used, "kv_blocks_total": llm.cache.num_blocks,
        "kv_block_size": llm.cache.block_size, "preemptions": sched.preemptions,
        "steps": sched.steps,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.benchmark_batch", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "--weight", "-m", dest="model", default=None)
    ap.add_argument("--tokenizer", default=None)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--file", "-f", help="one prompt per line")
    src.add_argument("--synthetic", action="store_true", help="random prompts of lengths 5, 13, 27, 51, ... (default)")
    ap.add_argument("-n", "--num-prompts", type=int, default=None, help="number of requests (default: the file's lines, or 32)")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("-l", "--max-length", type=int, default=128, help="tokens generated per request")
    ap.add_argument("-b", "--batch", type=int, default=32, help="most requests running at once")
    ap.add_argument("--kv-dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "cuda-sim"],
                    help="where the model runs (default auto: a GPU when one works)")
    ap.add_argument("--kv-cache-mib", type=int, default=1024)
    ap.add_argument("--baseline", action="store_true",
                    help="also time one request alone (batch-1 decode), before and after the batch run")
    ap.add_argument("--cold-kv", action="store_true",
                    help="do not page in the KV pool before timing (include first-touch page faults)")
    ap.add_argument("--profile", action="store_true",
                    help="time every operator call and print ms per decode step of a full batch")
    ap.add_argument("--json", action="store_true")
    from xllm.main import add_quantize_args, quantize_options

    add_quantize_args(ap)
    args = ap.parse_args(argv)

    import numba

    from xllm.engine import LLM

    if args.threads:
        numba.set_num_threads(args.threads)
    llm = LLM(args.model, args.tokenizer, kv_dtype=args.kv_dtype, kv_cache_bytes=args.kv_cache_mib << 20,
              max_num_seqs=args.batch, max_num_batched_tokens=max(512, args.batch), device=args.device,
              quantize=quantize_options(args))
    prompts = build_prompts(args, llm)
    # Warm-up and batch 1 use prompts of their own, so that the prefix cache
    # cannot hand the batch run keys and values they computed.
    rng = np.random.default_rng(1)
    own = [[int(t) for t in rng.integers(3, llm.model.config.vocab_size, len(p))] for p in prompts[:2]]
    run(llm, own, 4, 2, show_progress=False)   # warm-up: page in the weights
    result = {"model": str(args.model or "default (SmolLM2-135M-Instruct)"), "device": llm.model.device,
              "threads": numba.get_num_threads(),
              "kv_dtype": args.kv_dtype, "quantize": args.quantize, "workload": args.file or "synthetic"}
    if not args.cold_kv:
        t0 = time.perf_counter()
        llm.cache.touch()                               # steady state: no first-touch page faults while timed
        result["kv_touch_s"] = round(time.perf_counter() - t0, 2)

    def batch1() -> float:
        return round(1.0 / run(llm, own[:1], args.max_length, 1, show_progress=False)["tpot_p50_s"], 2)

    # Batch 1 is timed before and after the batch run, and the ratio uses the
    # mean of the two: this machine's clock drifts by 10-30% over a minute,
    # and timing the baseline on one side only would tilt the ratio with it.
    before = batch1() if args.baseline else None
    if args.profile:
        llm.model.ops = timer = OpTimer(llm.model.ops)
    result.update(run(llm, prompts, args.max_length, args.batch, show_progress=not args.json))
    if args.profile:
        llm.model.ops = timer.ops
        full = min(args.batch, len(prompts))
        result["decode_step_ms_by_op"] = {k: round(v, 2) for k, v in timer.per_step(full).items()}
        result["decode_steps_profiled"] = timer.steps.get(full, 0)
    if args.baseline:
        after = batch1()
        result["batch1_decode_tok_s_before"], result["batch1_decode_tok_s_after"] = before, after
        result["batch1_decode_tok_s"] = round((before + after) / 2, 2)
        result["speedup_vs_batch1"] = round(result["generated_tok_s"] / result["batch1_decode_tok_s"], 2)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"workload {result['workload']}: {result['requests']} requests, -b {args.batch}, -l {args.max_length}, "
          f"{result['threads']} threads, KV {args.kv_dtype}")
    print(f"generated: {result['generated_tok_s']:.1f} tok/s ({result['generated_tokens']} tokens in {result['wall_s']:.1f} s)")
    print(f"prompt:    {result['prompt_tok_s']:.1f} tok/s ({result['prompt_tokens']} tokens)")
    print(f"TTFT p50 {result['ttft_p50_s'] * 1e3:.0f} ms, p90 {result['ttft_p90_s'] * 1e3:.0f} ms; "
          f"TPOT p50 {result['tpot_p50_s'] * 1e3:.1f} ms, p90 {result['tpot_p90_s'] * 1e3:.1f} ms")
    print(f"peak KV blocks: {result['peak_kv_blocks']} of {result['kv_blocks_total']} "
          f"({result['kv_block_size']} tokens each), preemptions {result['preemptions']}, "
          f"prefix-cache hit rate {result['prefix_cache_hit_rate']:.1%}")
    if args.profile:
        ops_ms = result["decode_step_ms_by_op"]
        print(f"per decode step of {min(args.batch, len(prompts))} rows ({result['decode_steps_profiled']} steps), "
              f"ms by operator (total {sum(ops_ms.values()):.1f}, TPOT above includes the rest):")
        for k, v in ops_ms.items():
            print(f"  {k:<20s} {v:7.2f}")
    if "kv_touch_s" in result:
        print(f"KV pool paged in before timing ({result['kv_touch_s']:.1f} s; --cold-kv to include it)")
    if args.baseline:
        print(f"batch-1 decode: {result['batch1_decode_tok_s']:.1f} tok/s (before {before:.1f}, after {after:.1f}) -> "
              f"{result['speedup_vs_batch1']:.2f}x with batching")
    return 0


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main(main))
