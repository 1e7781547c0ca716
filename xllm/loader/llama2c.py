"""Loading llama2.c checkpoints (Andrej Karpathy's `run.c` format).

Legacy format ("version 0"): a header of 7 int32

    dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len

(a negative vocab_size means the output classifier is stored separately
rather than shared with the embeddings), then float32 arrays, each layer's
tensors grouped by kind:

    token_embedding [vocab, dim]
    rms_att [L, dim], wq [L, dim, dim], wk [L, kv_dim, dim], wv [L, kv_dim, dim], wo [L, dim, dim]
    rms_ffn [L, dim], w1 [L, hidden, dim], w2 [L, dim, hidden], w3 [L, hidden, dim]
    rms_final [dim], freq_cis_real [seq_len, head_dim/2], freq_cis_imag [seq_len, head_dim/2]
    wcls [vocab, dim]   (only when vocab_size was negative)

w1 is the gate, w3 the up projection, w2 the down projection.  The freq_cis
tables are RoPE's cos/sin for theta = 10000 and are ignored: the engine
computes its own.

Version 1 ("ak42" magic, version 1) has a 256-byte header (magic, version,
the same 7 ints, a shared-classifier byte, zero padding) and stores the norms
first and no freq_cis tables; it is read too.  Version 2 (int8) is not.

The format has no fields for RoPE theta or the RMSNorm epsilon: llama2.c
always uses 10000 and 1e-5, and so do we.  Nor does it name token ids:
llama2.c's tokenizer is Llama 2's, with BOS = 1 and EOS = 2, and its `run.c`
also stops when the model starts a new sequence with BOS, so eos_ids is
(2, 1).  Like GGUF, llama2.c keeps wq/wk rows in adjacent-pair RoPE order;
we convert them to rotate-half order.
"""

from __future__ import annotations

import math
import os
import struct

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from .layout import Checkpoint, check_config, check_weights, rope_rows_to_halves

MAGIC = 0x616B3432            # "ak42" read as a little-endian uint32
LEGACY_HEADER = 28
V1_HEADER = 256
ROPE_THETA = 10000.0
RMS_EPS = 1e-5
BOS_ID = 1
EOS_IDS = (2, 1)


def _layout(cfg: ModelConfig, version: int, shared: bool) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 array in file order; per-layer names use '{}' for the index."""
    L, dim, hidden, kv = cfg.n_layers, cfg.dim, cfg.hidden_dim, cfg.kv_dim
    per_layer = lambda name, shape: [(f"layers.{i}.{name}", shape) for i in range(L)]  # noqa: E731
    attn = (per_layer("wq", (dim, dim)) + per_layer("wk", (kv, dim)) + per_layer("wv", (kv, dim))
            + per_layer("wo", (dim, dim)))
    ffn = (per_layer("w_gate", (hidden, dim)) + per_layer("w_down", (dim, hidden))
           + per_layer("w_up", (hidden, dim)))
    if version == 0:
        arrays = ([("tok_embeddings", (cfg.vocab_size, dim))] + per_layer("attn_norm", (dim,)) + attn
                  + per_layer("ffn_norm", (dim,)) + ffn + [("norm", (dim,))]
                  + [("freq_cis_real", (cfg.context_length, cfg.head_dim // 2)),
                     ("freq_cis_imag", (cfg.context_length, cfg.head_dim // 2))])
    else:
        arrays = (per_layer("attn_norm", (dim,)) + per_layer("ffn_norm", (dim,)) + [("norm", (dim,))]
                  + [("tok_embeddings", (cfg.vocab_size, dim))] + attn + ffn)
    if not shared:
        arrays.append(("output", (cfg.vocab_size, dim)))
    return arrays


def _not_a_model(path, why: str) -> ModelFormatError:
    return ModelFormatError(
        path, f"not a recognised model file: not GGUF (no 'GGUF' magic), not a Hugging Face directory, "
              f"and not a llama2.c checkpoint ({why})")


def load_llama2c(path, load_weights: bool = True) -> Checkpoint:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(V1_HEADER)
    if len(head) < LEGACY_HEADER:
        raise _not_a_model(path, f"{size} bytes is too small for the 28-byte header")

    (magic,) = struct.unpack_from("<I", head, 0)
    if magic == MAGIC:
        (version,) = struct.unpack_from("<i", head, 4)
        if version != 1:
            raise ModelFormatError(
                path, f"llama2.c checkpoint version {version} is not supported (supported: legacy, 1)")
        if len(head) < V1_HEADER:
            raise ModelFormatError(path, f"truncated llama2.c file: header needs {V1_HEADER} bytes, found {size}")
        fields = struct.unpack_from("<7i", head, 8)
        shared = bool(head[36])
        header_bytes = V1_HEADER
    else:
        version = 0
        fields = struct.unpack_from("<7i", head, 0)
        shared = fields[5] > 0
        header_bytes = LEGACY_HEADER
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = fields
    vocab = abs(vocab)
    names = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
    header_text = ", ".join(f"{n}={v}" for n, v in zip(names, fields))
    if (min(dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len) <= 0
            or dim % n_heads or n_heads % n_kv_heads or (dim // n_heads) % 2):
        if version == 0:
            raise _not_a_model(path, f"its header would say {header_text}")
        raise ModelFormatError(path, f"invalid llama2.c header: {header_text}")

    cfg = ModelConfig(
        n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden,
        vocab_size=vocab, rope_theta=ROPE_THETA, rms_eps=RMS_EPS, context_length=seq_len,
        tied_embeddings=shared, bos_id=BOS_ID, eos_ids=EOS_IDS, arch="llama", name="",
        extra={"llama2c_version": version},
    )
    check_config(path, cfg, "llama2.c header", {"hidden_dim": "hidden_dim", "context_length": "seq_len"})

    # The header must account for every byte of the file.
    kv = cfg.kv_dim
    per_layer = 2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim   # 2 norms, wq+wo, wk+wv, w1..w3
    n_floats = vocab * dim * (1 if shared else 2) + n_layers * per_layer + dim
    if version == 0:
        n_floats += seq_len * cfg.head_dim                                   # freq_cis real + imag
    expected = header_bytes + 4 * n_floats
    if size != expected:
        problem = "truncated llama2.c file" if size < expected else "llama2.c file size does not match its header"
        raise ModelFormatError(
            path, f"{problem}: header ({header_text}) expects {expected} bytes, found {size}")

    weights = {}
    if load_weights:
        arrays = _layout(cfg, version, shared)
        assert header_bytes + 4 * sum(math.prod(shape) for _, shape in arrays) == expected
        data = np.memmap(path, dtype="<f4", mode="r", offset=header_bytes)
        pos = 0
        for name, shape in arrays:
            n = math.prod(shape)
            if not name.startswith("freq_cis"):
                w = np.array(data[pos:pos + n], dtype=np.float32).reshape(shape)
                if name.endswith(".wq"):
                    w = rope_rows_to_halves(w, n_heads, cfg.head_dim)
                elif name.endswith(".wk"):
                    w = rope_rows_to_halves(w, n_kv_heads, cfg.head_dim)
                weights[name] = w
            pos += n
        del data
        weights = check_weights(path, cfg, weights)
    return Checkpoint(config=cfg, weights=weights, kind="llama2c", metadata={}, path=str(path))
