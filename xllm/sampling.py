"""Choosing the next token from a row of logits, and when a request stops.

First a repetition penalty (1.0 = off) makes every token the request has
already seen less likely: its logit is divided by the penalty when positive,
multiplied when negative (the CTRL paper's rule, as in transformers).
Then temperature 0 is greedy (argmax). Otherwise the logits are divided by
the temperature, cut to the `top_k` largest (0 = no cut), then to the smallest
set whose probabilities add up to `top_p` (1.0 = no cut), and one token is
drawn from what is left with the request's own random generator, so a seeded
request draws the same tokens whatever else runs beside it.

A request stops after `max_tokens` tokens, on an end-of-sequence token
(unless `ignore_eos`, for benchmarks), or when its text contains one of the
`stop` strings (the text is cut before it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator,
           seen: list[int] | None = None) -> int:
    """One token id from a [vocab] row of logits; `seen`: the request's tokens so far."""
    if params.repetition_penalty != 1.0 and seen:
        logits = logits.copy()
        ids = np.unique(np.asarray(seen))
        z = logits[ids]
        logits[ids] = np.where(z > 0, z / params.repetition_penalty, z * params.repetition_penalty)
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / params.temperature
    candidates = np.arange(z.size)
    if 0 < params.top_k < z.size:
        candidates = np.argpartition(-z, params.top_k - 1)[: params.top_k]
    order = candidates[np.argsort(-z[candidates], kind="stable")]
    p = np.exp(z[order] - z[order[0]])
    p /= p.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), params.top_p)) + 1
        order, p = order[:keep], p[:keep] / p[:keep].sum()
    return int(order[rng.choice(order.size, p=p)])
