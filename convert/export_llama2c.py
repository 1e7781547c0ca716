"""Export any checkpoint xllm can load to llama2.c's .bin format.

    python -m convert.export_llama2c SRC OUT.bin [--version 0|1]

SRC is a GGUF file, a Hugging Face directory or another llama2.c file.
Version 0 (the default) is llama2.c's legacy format that `run.c` reads;
version 1 is its "ak42" format with a 256-byte header.  Quantized GGUF
weights are written dequantized, as float32.

The format cannot say everything a modern checkpoint can.  It has no field for
the RoPE theta (llama2.c always uses 10000), the RMSNorm epsilon (always 1e-5)
or a head size other than dim / n_heads.  A model that differs in any of these
would load without complaint and then compute something else, so the export
refuses it with an error instead of writing a file.  Token ids are not stored
either (llama2.c assumes BOS = 1, EOS = 2); a model with other ids is exported
with a warning, since the weights are still right and only the tokenizer
conventions differ.
"""

from __future__ import annotations

import argparse
import struct
import sys

import numpy as np

from xllm.errors import ModelFormatError, XllmError
from xllm.loader import load_checkpoint
from xllm.loader.layout import Checkpoint, rope_rows_to_pairs
from xllm.loader.llama2c import MAGIC, RMS_EPS, ROPE_THETA, V1_HEADER


def check_exportable(ck: Checkpoint, out_path) -> list[str]:
    """Raise if the legacy format cannot express `ck`; return warnings for what it drops."""
    cfg = ck.config
    problems = []
    if cfg.rope_theta != ROPE_THETA:
        problems.append(f"rope theta is {cfg.rope_theta:g} but llama2.c always uses {ROPE_THETA:g}")
    if cfg.rope_scaling is not None:
        problems.append(f"RoPE scaling {cfg.rope_scaling['type']!r} cannot be stored: llama2.c has plain RoPE only")
    if cfg.head_dim * cfg.n_heads != cfg.dim:
        problems.append(f"head_dim {cfg.head_dim} x {cfg.n_heads} heads != dim {cfg.dim}, "
                        f"but llama2.c derives head_dim as dim / n_heads")
    if abs(cfg.rms_eps - RMS_EPS) > 1e-12:
        problems.append(f"RMSNorm epsilon is {cfg.rms_eps:g} but llama2.c always uses {RMS_EPS:g}")
    if problems:
        raise ModelFormatError(ck.path, "cannot export to llama2.c format: " + "; ".join(problems))
    warnings = []
    if cfg.bos_id not in (None, 1) or (cfg.eos_ids and 2 not in cfg.eos_ids):
        warnings.append(f"token ids are not stored: llama2.c assumes BOS=1, EOS=2, this model has "
                        f"BOS={cfg.bos_id}, EOS={list(cfg.eos_ids)}")
    return warnings


def freq_cis(seq_len: int, head_dim: int, theta: float = ROPE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """RoPE cos/sin tables [seq_len, head_dim/2] as llama2.c stores them."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    angles = np.outer(np.arange(seq_len, dtype=np.float64), inv_freq)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def export_llama2c(ck: Checkpoint, out_path, version: int = 0) -> list[str]:
    """Write `ck` to `out_path`; returns the warnings from `check_exportable`."""
    warnings = check_exportable(ck, out_path)
    cfg, w = ck.config, ck.weights
    L = cfg.n_layers
    vocab = cfg.vocab_size if cfg.tied_embeddings else -cfg.vocab_size
    fields = (cfg.dim, cfg.hidden_dim, L, cfg.n_heads, cfg.n_kv_heads, cfg.context_length)

    def layer(kind):
        return [w[f"layers.{i}.{kind}"] for i in range(L)]

    # llama2.c rotates adjacent pairs: put wq/wk rows back in that order.
    wq = [rope_rows_to_pairs(m, cfg.n_heads, cfg.head_dim) for m in layer("wq")]
    wk = [rope_rows_to_pairs(m, cfg.n_kv_heads, cfg.head_dim) for m in layer("wk")]
    attn = wq + wk + layer("wv") + layer("wo")
    ffn = layer("w_gate") + layer("w_down") + layer("w_up")

    if version == 0:
        header = struct.pack("<7i", *fields[:5], vocab, fields[5])
        real, imag = freq_cis(cfg.context_length, cfg.head_dim)
        arrays = ([w["tok_embeddings"]] + layer("attn_norm") + attn + layer("ffn_norm") + ffn
                  + [w["norm"], real, imag])
    elif version == 1:
        header = struct.pack("<Ii7iB", MAGIC, 1, *fields[:5], cfg.vocab_size, fields[5], int(cfg.tied_embeddings))
        header += b"\0" * (V1_HEADER - len(header))
        arrays = (layer("attn_norm") + layer("ffn_norm") + [w["norm"], w["tok_embeddings"]] + attn + ffn)
    else:
        raise ValueError(f"unknown llama2.c version {version} (0 or 1)")
    if not cfg.tied_embeddings:
        arrays.append(w["output"])

    with open(out_path, "wb") as f:
        f.write(header)
        for a in arrays:
            f.write(np.ascontiguousarray(a, dtype="<f4").tobytes())
    return warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m convert.export_llama2c", description=__doc__.split("\n")[0])
    parser.add_argument("src", help="a GGUF file, Hugging Face directory or llama2.c .bin")
    parser.add_argument("out", help="the llama2.c .bin file to write")
    parser.add_argument("--version", type=int, choices=(0, 1), default=0,
                        help="0: legacy format run.c reads (default); 1: 'ak42' header format")
    args = parser.parse_args(argv)
    try:
        ck = load_checkpoint(args.src)
        for warning in export_llama2c(ck, args.out, args.version):
            print(f"warning: {warning}", file=sys.stderr)
    except XllmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = ck.config
    print(f"wrote {args.out}: {cfg.n_layers} layers, dim {cfg.dim}, vocab {cfg.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
