"""How far fp16 and int8 KV caches move the default model's logits from an fp32 cache.

    python -m bench.kv_accuracy [--lengths 100 400 900] [--greedy 64]

For each prompt length n, the first n tokens of ../shared/data/shareGPT_sample.txt
(from a different starting point for each prompt) are prefilled in chunks of
256 rows, with a KV cache of each dtype, and the logits of every position are
compared with the fp32 cache's:

    rel L2   = ||logits - logits_fp32|| / ||logits_fp32||   over all positions
    max abs  = max |logits - logits_fp32|
    top-1    = fraction of positions whose argmax agrees
    ppl      = the prompt's perplexity (bench.perplexity's formula, one window)

Then, from the same prompt, 64 tokens are generated greedily with each cache;
"greedy" is how many of them agree with fp32's before the first difference.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.perplexity import window_nll
from xllm.testing import greedy as greedy_ids

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shareGPT_sample.txt"
CHUNK = 256


def run(model, kv_dtype: str, prompt: list[int], greedy: int) -> tuple[np.ndarray, list[int]]:
    """(logits of every prompt position [n, vocab], `greedy` greedily generated ids)."""
    logits = model.logits_for(prompt, kv_dtype, chunk=CHUNK)
    return logits, greedy_ids(model, prompt, greedy, kv_dtype)


def main():
    from xllm.download import default_model_path
    from xllm.load import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 400, 900])
    parser.add_argument("--greedy", type=int, default=64)
    args = parser.parse_args()
    model, tokenizer, _ = load_model(default_model_path())
    ids = tokenizer.encode(DATA.read_text())
    print(f"{Path(default_model_path()).name}, {len(ids)} tokens of {DATA.name}")
    print(f"{'prompt':>7} {'kv':<5} {'rel L2':>9} {'max abs':>9} {'|logit| max':>11} {'top-1':>7} "
          f"{'ppl':>7} {'greedy':>8} {'time':>7}")
    for n, start in zip(args.lengths, range(0, 10**6, 997)):
        prompt = (ids[start:] + ids)[:n]
        t0 = time.perf_counter()
        base, base_ids = run(model, "fp32", prompt, args.greedy)
        ppl = np.exp(window_nll(base, prompt) / (n - 1))
        print(f"{n:>7} {'fp32':<5} {'':>9} {'':>9} {np.abs(base).max():11.2f} {'':>7} {ppl:7.3f} {'':>8} "
              f"{time.perf_counter() - t0:6.1f}s", flush=True)
        for kv_dtype in ("fp16", "int8"):
            t0 = time.perf_counter()
            logits, out = run(model, kv_dtype, prompt, args.greedy)
            diff = logits.astype(np.float64) - base
            rel = np.linalg.norm(diff) / np.linalg.norm(base.astype(np.float64))
            top1 = np.mean(logits.argmax(axis=1) == base.argmax(axis=1))
            same = next((i for i, (a, b) in enumerate(zip(out, base_ids)) if a != b), len(out))
            ppl = np.exp(window_nll(logits, prompt) / (n - 1))
            print(f"{n:>7} {kv_dtype:<5} {rel:9.2e} {np.abs(diff).max():9.4f} {'':>11} {top1:7.1%} {ppl:7.3f} "
                  f"{same:>4}/{len(out):<3} {time.perf_counter() - t0:6.1f}s", flush=True)


if __name__ == "__main__":
    main()
