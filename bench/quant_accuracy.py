"""What quantization costs in accuracy: perplexity and greedy answers, per weight format.

    python -m bench.quant_accuracy [--model M] [--file TEXT] [--ctx 512] [--prompts FILE] [-n 48]

From one float source (default: the default model, SmolLM2-135M-Instruct,
whose GGUF holds Q4_1 blocks: "fp32" is their float32 values, the others
quantize those values again, as `--quantize` does at load) it builds:

    fp32         every weight float32, float32 arithmetic
    fp16         matrices stored as float16
    q8_0         GGUF Q8_0 blocks, int8 activations per 32 values (as llama.cpp)
    w8a8         int8 per output channel, int8 activations per token
    w8a8+sq      the same after SmoothQuant smoothing (alpha --smooth, calibrated
                 on the first --calib-tokens tokens of --calib)

and reports, for each, the perplexity on --file (bench.perplexity's method:
windows of --ctx tokens) with its change from fp32, and the greedy answers
to each line of --prompts (in the model's chat format): how many are
identical to fp32's, and for the others the token index of the first
difference. The integer kernels the CPU used are named in the header.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VARIANTS = ("fp32", "fp16", "q8_0", "w8a8", "w8a8+sq")


def build(path, variant: str, smooth: float, calib, calib_tokens: int):
    """(model, tokenizer, metadata) of `variant` (see the module docstring)."""
    from xllm.load import load_model
    from xllm.quantize import QuantizeOptions

    if variant == "fp32":
        return load_model(path, device="cpu", keep_quant=False)
    if variant == "w8a8+sq":
        options = QuantizeOptions("w8a8", smooth, calib, calib_tokens)
    else:
        options = QuantizeOptions(variant)
    return load_model(path, device="cpu", quantize=options)


def greedy_answers(model, tok, metadata, prompts: list[str], max_tokens: int) -> list[list[int]]:
    """The greedy answer ids to each prompt, as one user turn in the model's chat format."""
    from xllm.chat import Conversation, detect_format
    from xllm.engine import Engine
    from xllm.sampling import SamplingParams

    fmt, system = detect_format(tok, metadata)
    convo = Conversation(tok, fmt, system)
    engine = Engine(model, tok, max_num_seqs=len(prompts), max_num_batched_tokens=2048)
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=convo.stop_ids)
    by_id = {engine.add_request(convo.render([], p), params): i for i, p in enumerate(prompts)}
    answers: list[list[int]] = [[] for _ in prompts]
    while engine.has_unfinished():
        for step in engine.step():
            if step.finished:
                answers[by_id[step.request_id]] = list(step.output.token_ids)
    return answers


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The index of the first token where a and b differ (None when identical)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.quant_accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default=None, help="a float (or GGUF) checkpoint; default: the default model")
    ap.add_argument("--file", "-f", default=str(SHARED_DATA / "shareGPT_sample.txt"), help="perplexity text")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--prompts", default=str(SHARED_DATA / "prompts.txt"), help="one prompt per line")
    ap.add_argument("-n", "--max-tokens", type=int, default=48, help="tokens per greedy answer (default 48)")
    ap.add_argument("--smooth", type=float, default=0.8, help="SmoothQuant alpha of w8a8+sq (default 0.8, the best of 0.35-0.8 on the default model: bench/RESULTS.md)")
    ap.add_argument("--calib", default=str(SHARED_DATA / "shareGPT_sample.txt"), help="calibration text")
    ap.add_argument("--calib-tokens", type=int, default=512)
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numba

    from bench.perplexity import perplexity
    from xllm.download import default_model_path
    from xllm.ops import get_ops

    if args.threads:
        numba.set_num_threads(args.threads)
    path = args.model or default_model_path()
    variants = [v for v in args.variants.split(",") if v]
    if variants[0] != "fp32" or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: fp32 first, then any of {', '.join(VARIANTS[1:])}")
    prompts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    text = Path(args.file).read_text(encoding="utf-8")
    int_kernels = sorted(get_ops("cpu").int_linear_kernels)
    print(f"model {path}; CPU integer kernels for: {', '.join(int_kernels) or 'none'}", file=sys.stderr)

    rows, reference = [], None
    for variant in variants:
        t0 = time.perf_counter()
        model, tok, metadata = build(path, variant, args.smooth, args.calib, args.calib_tokens)
        ids = tok.encode(text)
        ppl, _ = perplexity(model.logits_for, ids, args.ctx)
        answers = greedy_answers(model, tok, metadata, prompts, args.max_tokens)
        if reference is None:
            reference = (ppl, answers)
        diffs = [first_difference(a, r) for a, r in zip(answers, reference[1])]
        row = {"variant": variant, "perplexity": round(ppl, 4), "vs_fp32_pct": round(100 * (ppl / reference[0] - 1), 2),
               "identical_answers": sum(d is None for d in diffs), "prompts": len(prompts),
               "first_differences": [d for d in diffs if d is not None], "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{variant:9s} ppl {ppl:8.4f} ({row['vs_fp32_pct']:+.2f}%)  identical answers "
              f"{row['identical_answers']}/{len(prompts)}  first differences at tokens {row['first_differences']}",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"model": str(path), "ctx": args.ctx, "file": args.file, "int_kernels": int_kernels,
                          "rows": rows}))
    else:
        print(f"\n| weights | perplexity (ctx {args.ctx}) | vs fp32 | greedy answers = fp32 | first difference at token |")
        print("|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['perplexity']:.4f} | {r['vs_fp32_pct']:+.2f}% | "
                  f"{r['identical_answers']}/{r['prompts']} | {', '.join(map(str, r['first_differences'])) or '-'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
