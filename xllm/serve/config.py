"""What a server runs: `ServeConfig` (validated), and the model it loads.

`ServeConfig` is what `python -m xllm.serve` builds from its flags, and what
a Ray Serve replica receives (it is a plain dataclass, so Ray can pickle it
to another machine; the model is loaded where the replica runs).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ..chat import ChatFormat, detect_format
from ..engine import Engine
from ..errors import XllmError

DEVICES = ("auto", "cpu", "cuda", "cuda-sim")
KV_DTYPES = ("fp32", "fp16", "int8")


@dataclass
class ServeConfig:
    """One server (or one replica): which model, where, and how many requests at once.

    `max_num_seqs` requests run together in the batch; up to `max_queue`
    more wait for a place (accepted, in arrival order); a request past both
    gets HTTP 503 at once instead of waiting without bound.
    `served_name`: the name clients give as "model" (default: the file or
    directory name, without .gguf). `threads`: CPU threads for the model
    (None: every core). `replica`: this engine's label in /metrics.
    """

    model: str | None = None             # a checkpoint path; None: the default model (downloaded on first use)
    tokenizer: str | None = None
    served_name: str | None = None
    device: str = "auto"
    kv_dtype: str = "fp32"
    exact: bool = False               # quantized weights multiplied in float32 (see xllm.ops.get_ops)
    threads: int | None = None
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    kv_cache_bytes: int = 1 << 30
    max_queue: int = 256
    replica: str = "0"

    def __post_init__(self):
        if self.device not in DEVICES:
            raise XllmError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.kv_dtype not in KV_DTYPES:
            raise XllmError(f"kv_dtype must be one of {', '.join(KV_DTYPES)}, got {self.kv_dtype!r}")
        for name, low in (("max_num_seqs", 1), ("max_num_batched_tokens", 1), ("kv_cache_bytes", 1),
                          ("max_queue", 0)):
            if getattr(self, name) < low:
                raise XllmError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise XllmError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                            f"max_num_seqs ({self.max_num_seqs}): every running request decodes in each step")
        if self.threads is not None and self.threads < 1:
            raise XllmError(f"threads must be >= 1, got {self.threads}")


@dataclass
class ServedModel:
    """A loaded model with what the HTTP side needs to know about it."""

    engine: Engine
    tokenizer: object
    name: str                       # what clients pass as "model"
    chat_format: ChatFormat
    default_system: str | None      # the system prompt the model's chat template adds when none is given
    context_length: int


def load_served_model(config: ServeConfig) -> ServedModel:
    """Load the model and build its engine, as `python -m xllm.main` does."""
    import numba

    from ..download import default_model_path
    from ..load import load_model

    if config.threads is not None:
        numba.set_num_threads(min(config.threads, numba.config.NUMBA_NUM_THREADS))
    path = config.model or default_model_path(log=lambda m: print(m, file=sys.stderr))
    model, tok, metadata = load_model(path, config.tokenizer, device=config.device, exact=config.exact)
    if tok is None:
        raise XllmError(f"{path} has no tokenizer: give --tokenizer (the server takes text)")
    engine = Engine(model, tok, kv_dtype=config.kv_dtype, kv_cache_bytes=config.kv_cache_bytes,
                    max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens)
    fmt, system = detect_format(tok, metadata)
    name = config.served_name or Path(os.fspath(path)).name.removesuffix(".gguf")
    return ServedModel(engine, tok, name, fmt, system, model.config.context_length)
