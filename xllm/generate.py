"""Generating tokens for one sequence, keeping its KV cache between calls.

A `Session` remembers which token ids already have their keys and values in
the cache. A new prompt that starts with those ids (the next turn of a chat
is the whole history plus the new message) only computes the part after the
shared prefix; a prompt that differs earlier drops the cache from there on.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from .kv_cache import KVCache
from .model import Batch, Llama
from .sampling import SamplingParams, sample


class Session:
    SEQ = 0   # a session is one sequence of the cache

    def __init__(self, model: Llama, block_size: int = 128, prefill_chunk: int = 256, kv_dtype: str = "fp32"):
        self.model = model
        ctx = model.config.context_length
        self.cache = KVCache(model.config, -(-ctx // block_size), block_size, kv_dtype, device=model.ops)
        self.prefill_chunk = prefill_chunk
        self.ids: list[int] = []          # tokens whose keys/values are in the cache
        self.tokens_computed = 0          # rows run through the model, all calls together
        self.last_prefill_computed = 0    # prompt rows the last prefill had to compute

    def reset(self) -> None:
        self.cache.free(self.SEQ)
        self.ids = []

    def _feed(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Run `ids` after what the cache holds; the logits of the last row
        (or of every row with `all_logits`)."""
        outs = []
        for start in range(0, len(ids), self.prefill_chunk):
            chunk = ids[start : start + self.prefill_chunk]
            try:
                batch = Batch.build(self.cache, [(self.SEQ, chunk)])
                rows = np.arange(len(chunk)) if all_logits else np.array([len(chunk) - 1])
                outs.append(self.model.forward(batch, self.cache, rows))
            except BaseException:
                # Ctrl-C or an error mid-step: the cache keeps only what self.ids says.
                self.cache.truncate(self.SEQ, len(self.ids))
                raise
            self.ids.extend(chunk)
            self.tokens_computed += len(chunk)
        return np.concatenate(outs) if all_logits else outs[-1][0]

    def logits_for(self, ids: list[int]) -> np.ndarray:
        """Logits after every prefix of `ids`, from an empty cache: [len(ids), vocab]."""
        self.reset()
        return self._feed(list(ids), all_logits=True)

    def prefill(self, prompt: list[int]) -> np.ndarray:
        """Make the cache hold exactly `prompt`; return the logits after its last token."""
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if len(prompt) > self.model.config.context_length:
            raise ValueError(f"the prompt has {len(prompt)} tokens, the model's context is {self.model.config.context_length}")
        keep = 0
        while keep < min(len(self.ids), len(prompt) - 1) and self.ids[keep] == prompt[keep]:
            keep += 1
        self.cache.truncate(self.SEQ, keep)
        del self.ids[keep:]
        self.last_prefill_computed = len(prompt) - keep
        return self._feed(list(prompt[keep:]))

    def generate(self, prompt: list[int], max_tokens: int, params: SamplingParams,
                 stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
        """Yield up to `max_tokens` new token ids, the last one a stop id if one came."""
        logits = self.prefill(prompt)
        rng = np.random.default_rng(params.seed)
        for n in range(max_tokens):
            token = sample(logits, params, rng)
            yield token
            if token in stop_ids or n == max_tokens - 1 or len(self.ids) >= self.model.config.context_length:
                return
            logits = self._feed([token])
