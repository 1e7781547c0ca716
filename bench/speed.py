"""Batch-1 speed of the whole model: prompt tokens/s and decode tokens/s.

    python -m bench.speed [--model M] [--threads 2] [--prompt-tokens 128] [--decode-tokens 128]

Decode is memory bound: every new token reads every weight once (the output
projection included, the embedding table only one row), so besides tokens/s
it prints the achieved weight bandwidth = weight bytes per token x tokens/s.
Each figure is the median of --runs runs after one warm-up run. Both go
through the engine every caller uses (`xllm.engine.Engine`, prefix cache
off), so its per-step work is counted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import numpy as np


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads."""
    w = model.w
    total = sum(a.nbytes for name, a in w.items() if name != "tok_embeddings")
    if w["output"] is not w["tok_embeddings"]:
        total += w["tok_embeddings"].nbytes // w["tok_embeddings"].shape[0]   # one row
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default=None, help="default: the default model")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--f32", action="store_true", help="every weight float32 (a GPU stores float matrices as float16 otherwise)")
    ap.add_argument("--exact", action="store_true", help="quantized weights multiplied in float32, not with integer activations")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "cuda-sim"],
                    help="where the model runs (default auto: a GPU when one works)")
    ap.add_argument("--json", action="store_true")
    from xllm.main import add_quantize_args, quantize_options

    add_quantize_args(ap)
    args = ap.parse_args(argv)

    import numba

    from xllm.download import default_model_path
    from xllm.engine import Engine
    from xllm.kv_cache import blocks_for
    from xllm.load import load_model
    from xllm.sampling import SamplingParams

    numba.set_num_threads(args.threads)
    path = args.model or default_model_path()
    model, tok, _ = load_model(path, device=args.device, keep_quant=not args.f32, quantize=quantize_options(args),
                                exact=args.exact)
    rng = np.random.default_rng(0)
    prompt = [int(i) for i in rng.integers(3, model.config.vocab_size, args.prompt_tokens)]
    # The engine every caller uses, with the prefix cache off so that every
    # run computes its whole prompt; the prompt runs in one step.
    engine = Engine(model, tok, num_blocks=blocks_for(args.prompt_tokens + args.decode_tokens + 1, 128),
                    max_num_batched_tokens=max(512, args.prompt_tokens), prefix_caching=False)
    params = SamplingParams(max_tokens=args.decode_tokens + 1, ignore_eos=True)

    def one_run():
        t0 = time.perf_counter()
        out = engine.run(prompt, params)
        t1, t2 = out.first_token_time, out.finish_time
        return args.prompt_tokens / (t1 - t0), args.decode_tokens / (t2 - t1)

    one_run()  # warm-up: page in the weights
    runs = [one_run() for _ in range(args.runs)]
    pp = statistics.median(r[0] for r in runs)
    tg = statistics.median(r[1] for r in runs)
    bpt = weight_bytes_per_token(model)
    result = {
        "model": str(path), "device": model.device, "weights": args.quantize or ("f32" if args.f32 else "native"),
        "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "prompt_tokens": args.prompt_tokens, "prompt_tok_s": round(pp, 1),
        "decode_tokens": args.decode_tokens, "decode_tok_s": round(tg, 1),
        "weight_MB_per_token": round(bpt / 1e6, 1), "decode_weight_GB_s": round(bpt * tg / 1e9, 1),
        "runs": [[round(a, 1), round(b, 1)] for a, b in runs],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"model {path} on {model.device}, {result['weights']} weights, {args.threads} threads")
        print(f"prompt ({args.prompt_tokens} tokens): {pp:8.1f} tok/s")
        print(f"decode ({args.decode_tokens} tokens): {tg:8.1f} tok/s  "
              f"= {bpt / 1e6:.0f} MB of weights/token x tok/s = {bpt * tg / 1e9:.1f} GB/s")
    return 0


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main(main))
