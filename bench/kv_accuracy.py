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

The caches are passed to `Llama.forward` through a thin wrapper of the
operators that adds a layer's int8 scales to store_kv/attention calls when the
caller did not pass them (`ScalesFromCache`), so this works whether or not
the forward pass passes `cache.layer(i)` itself.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from bench.perplexity import window_nll
from xllm.kv_cache import KVCache
from xllm.model import Batch

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "shareGPT_sample.txt"
CHUNK = 256


class ScalesFromCache:
    """The operators of `ops`, with store_kv and attention finding an int8
    cache's scales from the key array they are given (layer i's k is
    cache.k[i], its scales cache.k_scale[i])."""

    def __init__(self, ops, cache: KVCache):
        self._ops, self._cache = ops, cache
        self._layer = {id(k): i for i, k in enumerate(cache.k)}

    def __getattr__(self, name):
        return getattr(self._ops, name)

    def _scales(self, k_cache):
        if self._cache.k_scale is None:
            return None, None
        i = self._layer[id(k_cache)]
        return self._cache.k_scale[i], self._cache.v_scale[i]

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        if k_scale is None:
            k_scale, v_scale = self._scales(k_cache)
        return self._ops.store_kv(k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale)

    def attention(self, q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale,
                  k_scale=None, v_scale=None):
        if k_scale is None:
            k_scale, v_scale = self._scales(k_cache)
        return self._ops.attention(q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale,
                                   k_scale, v_scale)


def run(model, kv_dtype: str, prompt: list[int], greedy: int) -> tuple[np.ndarray, list[int]]:
    """(logits of every prompt position [n, vocab], `greedy` greedily generated ids)."""
    cache = KVCache(model.config, num_blocks=-(-(len(prompt) + greedy) // 128), block_size=128, kv_dtype=kv_dtype)
    plain_ops = model.ops
    model.ops = ScalesFromCache(plain_ops, cache)
    try:
        logits = []
        for start in range(0, len(prompt), CHUNK):
            chunk = prompt[start: start + CHUNK]
            batch = Batch.build(cache, [(0, chunk)])
            logits.append(model.forward(batch, cache, np.arange(len(chunk), dtype=np.int32)))
        logits = np.concatenate(logits)
        out = [int(np.argmax(logits[-1]))]
        for _ in range(greedy - 1):
            batch = Batch.build(cache, [(0, [out[-1]])])
            out.append(int(np.argmax(model.forward(batch, cache, np.zeros(1, np.int32))[0])))
    finally:
        model.ops = plain_ops
    return logits, out


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
