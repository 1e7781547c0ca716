"""The model configuration every loader produces.

The config always comes from the checkpoint's own metadata (GGUF keys,
config.json, the llama2.c header), never from a file name.

A file's fields are untrusted: a flipped bit can claim 2^31 layers or a
context of 4 billion tokens, and sizes like these go straight into numpy
allocations (RoPE tables, the KV cache, the tensor list).  `invalid_field()`
says what is wrong with a config before anything is allocated from it; the
loaders turn its answer into a `ModelFormatError` naming the file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Upper bounds far above every Llama-family model (the largest today: 126
# layers, width 16384, FFN 53248, 128 heads of 128, vocabulary 262144, context
# 1048576), low enough that no allocation sized from them is absurd.
LIMITS = {
    "n_layers": 1024,
    "dim": 1 << 17,
    "n_heads": 1024,
    "n_kv_heads": 1024,
    "hidden_dim": 1 << 19,
    "vocab_size": 1 << 24,
    "head_dim": 1024,
    "context_length": 1 << 20,
}


@dataclass
class ModelConfig:
    n_layers: int
    dim: int                  # model width (hidden_size)
    n_heads: int              # query heads
    n_kv_heads: int           # key/value heads (== n_heads for MHA, fewer for GQA)
    hidden_dim: int           # SwiGLU inner width (intermediate_size)
    vocab_size: int
    head_dim: int = 0         # 0 means dim // n_heads
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    context_length: int = 2048
    tied_embeddings: bool = False   # output projection shares tok_embeddings
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()   # generation stops on any of these
    arch: str = "llama"
    name: str = ""
    extra: dict = field(default_factory=dict)  # anything else a loader wants to keep
    # RoPE frequency scaling (Llama 3.1 "llama3", "linear", "dynamic", GGUF's per-frequency
    # divisors), a plain dict described in xllm/rope.py; None for plain RoPE.
    rope_scaling: dict | None = None

    def __post_init__(self):
        if not self.head_dim and isinstance(self.n_heads, int) and self.n_heads > 0:
            self.head_dim = self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    def invalid_field(self) -> tuple[str, str, object] | None:
        """(field, what was expected, what was found) for the first field the
        engine cannot run with, or None when the config is usable."""
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
                return name, f"an integer from 1 to {limit}", value
        if self.n_kv_heads > self.n_heads or self.n_heads % self.n_kv_heads:
            return "n_kv_heads", f"a divisor of n_heads={self.n_heads}", self.n_kv_heads
        if self.head_dim % 2:
            return "head_dim", "an even number (RoPE rotates pairs)", self.head_dim
        for name in ("rope_theta", "rms_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                return name, "a finite positive number", value
        if self.rope_scaling is not None:
            from .rope import scaling_problem

            bad = scaling_problem(self.rope_scaling, self.head_dim)
            if bad is not None:
                return f"rope_scaling.{bad[0]}", bad[1], bad[2]
        for name, ids in (("bos_id", [] if self.bos_id is None else [self.bos_id]), ("eos_ids", self.eos_ids)):
            for i in ids:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
                    return name, f"token ids from 0 to vocab_size-1={self.vocab_size - 1}", i
        return None
