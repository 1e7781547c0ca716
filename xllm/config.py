"""The model configuration every loader produces.

The config always comes from the checkpoint's own metadata (GGUF keys,
config.json, the llama2.c header), never from a file name.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.dim // self.n_heads

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
