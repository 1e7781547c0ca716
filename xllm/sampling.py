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
(unless `ignore_eos`, for benchmarks) or one of its `stop_token_ids` (a chat
format's end of turn), or when its text contains one of the `stop` strings
(the text is cut before it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class SamplingParams:
    """How one request picks its tokens and when it stops (see the module docstring).

    `stop_token_ids`: token ids that end the request like end-of-sequence
    (a chat format's end-of-turn token). `truncate_prompt_tokens`: keep only
    the last k tokens of the prompt (None: a prompt too long for the
    context is refused instead). Every field is checked when the object is
    made and again when a request is added (`check`), so a bad value is one
    clear error naming the field, not a failure deep inside a step.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()
    truncate_prompt_tokens: int | None = None

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        if isinstance(self.stop, list):
            self.stop = tuple(self.stop)
        if isinstance(self.stop_token_ids, list):
            self.stop_token_ids = tuple(self.stop_token_ids)
        self.check()

    def check(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        _real(self, "temperature", lambda v: v >= 0, ">= 0")
        _integer(self, "top_k", 0)
        _real(self, "top_p", lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        if self.seed is not None:
            _integer(self, "seed", 0)
        _integer(self, "max_tokens", 1)
        _real(self, "repetition_penalty", lambda v: v > 0, "> 0")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a string or a tuple of non-empty strings, got {self.stop!r}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(_is_int(i) and i >= 0 for i in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be a tuple of token ids >= 0, got {self.stop_token_ids!r}")
        if self.truncate_prompt_tokens is not None:
            _integer(self, "truncate_prompt_tokens", 1)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _integer(params, name: str, low: int) -> None:
    v = getattr(params, name)
    if not _is_int(v) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")


def _real(params, name: str, ok, expected: str) -> None:
    v = getattr(params, name)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(v) or not ok(v):
        raise ValueError(f"{name} must be a finite number {expected}, got {v!r}")


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
