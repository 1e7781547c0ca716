"""A tiny random Llama, for tests, for stepping through kernels, and for the CUDA compile check.

    from xllm.testing import tiny_llama, greedy
    model = tiny_llama(device="cuda-sim", weight_format="q8_0")
    greedy(model, [1, 5, 9], 8)           # 8 token ids, temperature 0

    python -m xllm.testing --device cpu   # the same from the command line

Two layers of width 64 (4 query heads, 2 kv heads, head_dim 16), a
vocabulary of 96: small enough for numba's CUDA simulator, which runs every
GPU thread as Python, and for NUMBA_DISABLE_JIT=1, which runs every CPU
kernel as Python. The weights are random but exactly representable in
float16, so a GPU that stores them as float16 computes with the same
numbers as the CPU. `weight_format` stores the matrices as float32, float16
or GGUF blocks (quantized with the `gguf` package, as llama.cpp would).
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from .config import ModelConfig
from .weights import WEIGHT_FORMATS

TINY = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=96, rope_theta=10000.0,
            rms_eps=1e-5, context_length=128, tied_embeddings=False, bos_id=1, eos_ids=(2,), name="tiny llama")


def tiny_config(**overrides) -> ModelConfig:
    """The tiny model's config; any field can be overridden (e.g. n_kv_heads=4 for MHA)."""
    return ModelConfig(**{**TINY, **overrides})


def tiny_weights(config: ModelConfig, seed: int = 0, weight_format: str = "f32") -> dict:
    """Random weights in the canonical layout of the loaders, matrices stored as `weight_format`."""
    from .loader import expected_shapes

    if weight_format not in WEIGHT_FORMATS:
        raise ValueError(f"weight_format must be one of {', '.join(WEIGHT_FORMATS)}, got {weight_format!r}")
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(config).items():
        w = rng.standard_normal(shape).astype(np.float32) * np.float32(0.5 / np.sqrt(shape[-1]))
        if name.endswith("norm"):
            w += np.float32(1.0)
        w = w.astype(np.float16).astype(np.float32)          # exact in float16
        weights[name] = _store(w, weight_format) if w.ndim == 2 else w
    if "output" not in weights:                              # tied embeddings
        weights["output"] = weights["tok_embeddings"]
    return weights


def _store(w: np.ndarray, weight_format: str):
    if weight_format == "f32":
        return w
    if weight_format == "f16":
        return w.astype(np.float16)
    if weight_format == "w8a8":
        from .quantize import quantize_w8a8

        return quantize_w8a8(w)
    import gguf

    from .loader.dequant import keep_blocks

    qtype = getattr(gguf.GGMLQuantizationType, weight_format.upper())
    raw = np.ascontiguousarray(gguf.quants.quantize(w, qtype)).view(np.uint8).ravel()
    return keep_blocks(raw, qtype, w.shape)


def tiny_llama(device="cpu", seed: int = 0, weight_format: str = "f32", f32: bool | None = None, **overrides):
    """The tiny model on `device`, ready to run (`xllm.model.Llama`).

    The matrices keep `weight_format` on every device unless `f32` says
    otherwise: f32=False lets a GPU store float32 matrices as float16 (as the
    engine does; with these weights that changes no number), f32=True widens
    float16 ones.
    """
    if f32 is None:
        f32 = weight_format == "f32"
    from .model import Llama, prepare_weights

    config = tiny_config(**overrides)
    weights = prepare_weights(config, tiny_weights(config, seed, weight_format))
    return Llama(config, weights, device, f32=f32)


def greedy(model, prompt: list[int], n: int, kv_dtype: str = "fp32") -> list[int]:
    """n token ids that follow `prompt` at temperature 0, past any end-of-sequence
    (a fresh engine, so a fresh cache, each call)."""
    from .engine import Engine
    from .kv_cache import blocks_for
    from .sampling import SamplingParams

    engine = Engine(model, kv_dtype=kv_dtype, block_size=16, num_blocks=blocks_for(len(prompt) + n, 16))
    return engine.run(list(prompt), SamplingParams(max_tokens=n, ignore_eos=True)).token_ids


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xllm.testing", description="Greedy tokens of the tiny random model.")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda-sim or reference (default cpu)")
    ap.add_argument("--weights", default="f32", choices=WEIGHT_FORMATS, help="how the matrices are stored")
    ap.add_argument("--kv-dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("-n", type=int, default=8, help="tokens to generate (default 8)")
    args = ap.parse_args(argv)
    model = tiny_llama(args.device, weight_format=args.weights)
    prompt = [1, 5, 9, 42]
    print(f"tiny llama on {model.ops.name}, {args.weights} weights, {args.kv_dtype} KV: "
          f"prompt {prompt} -> {greedy(model, prompt, args.n, args.kv_dtype)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
