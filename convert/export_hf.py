"""Export any checkpoint xllm can load as a Hugging Face Llama directory.

    python -m convert.export_hf SRC OUT_DIR [--dtype f32|f16|bf16]

Writes OUT_DIR/config.json (LlamaForCausalLM), generation_config.json and
model.safetensors, so that `transformers` (or xllm itself) can load a GGUF or
llama2.c model.  Quantized GGUF weights are written dequantized.  The
tokenizer is not exported.  HF checkpoints keep wq/wk rows in rotate-half
order, which is xllm's own, so the weights are written as loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from xllm.errors import ModelFormatError, XllmError
from xllm.loader import load_checkpoint
from xllm.loader.hf import hf_name
from xllm.loader.layout import Checkpoint
from xllm.loader.safetensors_file import write_safetensors

_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def hf_rope_scaling(ck: Checkpoint) -> tuple[dict | None, int]:
    """config.json's `rope_scaling` and `max_position_embeddings` for the
    checkpoint's RoPE scaling (the inverse of what `xllm.loader.hf` reads)."""
    cfg, s = ck.config, ck.config.rope_scaling
    if s is None:
        return None, cfg.context_length
    if s["type"] == "linear":
        return {"rope_type": "linear", "factor": s["factor"]}, cfg.context_length
    if s["type"] == "llama3":
        return ({"rope_type": "llama3", "factor": s["factor"], "low_freq_factor": s["low_freq_factor"],
                 "high_freq_factor": s["high_freq_factor"],
                 "original_max_position_embeddings": s["original_context"]}, cfg.context_length)
    if s["type"] == "dynamic":    # Hugging Face counts from max_position_embeddings, the original context
        return {"rope_type": "dynamic", "factor": s["factor"]}, s["original_context"]
    raise ModelFormatError(ck.path, f"cannot export to a Hugging Face config: its RoPE scaling {s['type']!r} "
                                    "(per-frequency divisors from a GGUF rope_freqs tensor) has no config.json form")


def hf_config(ck: Checkpoint, dtype: str = "F32") -> dict:
    cfg = ck.config
    eos = list(cfg.eos_ids)
    rope_scaling, max_positions = hf_rope_scaling(ck)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": max_positions,
        "rms_norm_eps": cfg.rms_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tied_embeddings,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        "torch_dtype": _TORCH_DTYPES[dtype],
    }


def export_hf(ck: Checkpoint, out_dir, dtype: str = "F32") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(ck, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_safetensors(out / "model.safetensors", {hf_name(n): w for n, w in ck.weights.items()}, dtype)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.export_hf", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a GGUF file, Hugging Face directory or llama2.c .bin")
    parser.add_argument("out", help="the directory to write")
    parser.add_argument("--dtype", choices=("f32", "f16", "bf16"), default="f32")
    args = parser.parse_args(argv)
    try:
        ck = load_checkpoint(args.src)
        export_hf(ck, args.out, args.dtype.upper())
    except XllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {ck.config.n_layers} layers, dim {ck.config.dim}, vocab {ck.config.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
