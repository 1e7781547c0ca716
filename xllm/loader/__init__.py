"""Loading model checkpoints: GGUF files, Hugging Face directories, llama2.c .bin files.

    from xllm.loader import load_checkpoint
    ck = load_checkpoint("SmolLM2-135M-Instruct.Q4_1.gguf")
    ck.config     # ModelConfig, from the file's own metadata
    ck.weights    # dict of float32 arrays with canonical names (see layout.py)
    ck.kind       # "gguf" | "hf" | "llama2c"
    ck.metadata   # GGUF key/values, or config.json (+ generation_config), or {}
    ck.path

The format is recognised from the contents, not the file name: a directory
(or a config.json / .safetensors file inside one) is a Hugging Face
checkpoint, a file starting with "GGUF" is GGUF, and anything else is tried as
a llama2.c checkpoint, whose header must then match the file size exactly.
Every problem with the input is raised as one `ModelFormatError`.

    ck = load_checkpoint(path, keep_quant=True)

keeps the GGUF matrices stored as Q8_0, Q4_0 or Q4_1 in their blocks, and
the int8 matrices of a compressed-tensors W8A8 directory: those weights are
`xllm.weights.QuantWeight`s (3.5 to 6.4 times smaller than float32, and the
CPU operators compute with them directly). Matrices stored as float16 (GGUF
F16, safetensors F16, and BF16 when float16 holds every value exactly) stay
float16 arrays. Every other tensor, and every llama2.c tensor, is float32.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelFormatError
from .layout import Checkpoint, expected_shapes, rope_rows_to_halves, rope_rows_to_pairs

__all__ = ["Checkpoint", "load_checkpoint", "expected_shapes", "rope_rows_to_halves", "rope_rows_to_pairs"]


def load_checkpoint(path, *, load_weights: bool = True, keep_quant: bool = False) -> Checkpoint:
    """Load a checkpoint; with `load_weights=False` only config and metadata (weights == {}).

    `keep_quant=True`: matrices stored as Q8_0/Q4_0/Q4_1 (GGUF) or int8 (W8A8)
    come back as QuantWeights, float16 ones as float16 arrays, instead of float32.
    """
    p = Path(path)
    if not p.exists():
        raise ModelFormatError(p, "no such file or directory")
    if p.is_dir():
        from .hf import load_hf
        return load_hf(p, load_weights, keep_quant)
    if p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")):
        from .hf import load_hf
        return load_hf(p.parent, load_weights, keep_quant)
    try:
        with open(p, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFormatError(p, f"cannot read: {e.strerror or e}") from None
    if not magic:
        raise ModelFormatError(p, "file is empty")
    if magic == b"GGUF":
        from .gguf_file import load_gguf
        return load_gguf(p, load_weights, keep_quant)
    from .llama2c import load_llama2c
    return load_llama2c(p, load_weights)
