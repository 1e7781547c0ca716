"""Perplexity of a model over a text file, computed as llama.cpp's llama-perplexity does.

    python -m bench.perplexity --model M --file F [--ctx 512]

The file's token stream (no BOS added) is cut into non-overlapping windows of
`ctx` tokens (a shorter tail is dropped). In every window, each token from the
second on is predicted from the tokens before it in that window:

    perplexity = exp( mean over windows w, positions j = 2..ctx of  -log p(t[w, j] | t[w, 1..j-1]) )

Every later change (quantized weights, an int8 KV cache, new kernels) shows
with this number that it kept the model's accuracy.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import numpy as np


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Sum of -log p(ids[j] | ids[:j]) for j = 1..len(ids)-1, from logits[j-1]."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    target = z[np.arange(len(ids) - 1), np.asarray(ids[1:])]
    return float((log_norm - target).sum())


def perplexity(logits_for, ids: list[int], ctx: int, progress=None) -> tuple[float, int]:
    """(perplexity, tokens scored); `logits_for(window)` gives [len(window), vocab] logits."""
    n_windows = len(ids) // ctx
    if n_windows == 0:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    total, count = 0.0, 0
    for w in range(n_windows):
        window = ids[w * ctx : (w + 1) * ctx]
        total += window_nll(logits_for(window), window)
        count += ctx - 1
        if progress:
            progress(w + 1, n_windows, math.exp(total / count))
    return math.exp(total / count), count


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.perplexity", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", required=True)
    ap.add_argument("--tokenizer", default=None)
    ap.add_argument("--file", "-f", required=True)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "cuda-sim"],
                    help="where the model runs (default auto: a GPU when one works)")
    from xllm.main import add_quantize_args, quantize_options

    add_quantize_args(ap)
    args = ap.parse_args(argv)

    import numba

    from xllm.errors import XllmError
    from xllm.load import load_model

    if args.threads:
        numba.set_num_threads(args.threads)
    try:
        model, tok, _ = load_model(args.model, args.tokenizer, device=args.device, quantize=quantize_options(args))
        with open(args.file, encoding="utf-8") as f:
            ids = tok.encode(f.read())
        t0 = time.perf_counter()
        ppl, count = perplexity(model.logits_for, ids, args.ctx,
                                progress=lambda i, n, p: print(f"[{i}/{n}] {p:.4f}", file=sys.stderr))
    except (XllmError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    dt = time.perf_counter() - t0
    print(f"{len(ids)} tokens, {len(ids) // args.ctx} windows of {args.ctx}, {count} scored, "
          f"{len(ids) // args.ctx * args.ctx / dt:.1f} tok/s")
    print(f"perplexity: {ppl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
