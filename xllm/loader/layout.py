"""The canonical weight layout every loader produces, and the helpers they share.

Whatever the file format, a loaded model is a `ModelConfig` plus a flat dict of
float32 arrays with these names (shapes use the config's fields):

    tok_embeddings          [vocab, dim]
    layers.{i}.attn_norm    [dim]
    layers.{i}.wq           [n_heads * head_dim, dim]
    layers.{i}.wk           [n_kv_heads * head_dim, dim]
    layers.{i}.wv           [n_kv_heads * head_dim, dim]
    layers.{i}.wo           [dim, n_heads * head_dim]
    layers.{i}.ffn_norm     [dim]
    layers.{i}.w_gate       [hidden, dim]
    layers.{i}.w_up         [hidden, dim]
    layers.{i}.w_down       [dim, hidden]
    norm                    [dim]
    output                  [vocab, dim]   (absent when config.tied_embeddings)

Matrices are stored like `torch.nn.Linear` weights: [out_features, in_features],
so a projection is `y = W @ x`.

RoPE convention.  Two equivalent ways to pair up the dimensions of a head
exist.  Meta's original Llama code, llama.cpp/GGUF and llama2.c rotate
*adjacent* pairs (x0, x1), (x2, x3), ...  Hugging Face rotates the two
*halves* against each other: (x0, x_{hd/2}), (x1, x_{hd/2+1}), ...  A
checkpoint converted from one convention to the other has the rows of wq and
wk shuffled so that both give the same attention scores.  xllm always uses
the Hugging Face "rotate-half" order, so the GGUF and llama2.c loaders undo
that shuffle with `rope_rows_to_halves`.

Quantized weights.  With `load_checkpoint(..., keep_quant=True)` the GGUF
loader gives the matrices stored as Q8_0/Q4_0/Q4_1 as `QuantWeight`s
(xllm/weights.py) instead of float32 arrays, and the HF loader does the same
for W8A8 int8 matrices; same names, same shapes, same row order (the RoPE
shuffle is undone by reordering their rows). Matrices stored as float16
stay float16 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..weights import is_quant

LAYER_NAMES = ("attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w_gate", "w_up", "w_down")


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns."""

    config: ModelConfig
    weights: dict[str, np.ndarray]   # float32 arrays (and QuantWeights with keep_quant=True)
    kind: str                 # "gguf" | "hf" | "llama2c"
    metadata: dict = field(default_factory=dict)
    path: str = ""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape, in a stable order (embeddings, layers, norm, output)."""
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm"] = (cfg.dim,)
        shapes[p + "wq"] = (cfg.q_dim, cfg.dim)
        shapes[p + "wk"] = (cfg.kv_dim, cfg.dim)
        shapes[p + "wv"] = (cfg.kv_dim, cfg.dim)
        shapes[p + "wo"] = (cfg.dim, cfg.q_dim)
        shapes[p + "ffn_norm"] = (cfg.dim,)
        shapes[p + "w_gate"] = (cfg.hidden_dim, cfg.dim)
        shapes[p + "w_up"] = (cfg.hidden_dim, cfg.dim)
        shapes[p + "w_down"] = (cfg.dim, cfg.hidden_dim)
    shapes["norm"] = (cfg.dim,)
    if not cfg.tied_embeddings:
        shapes["output"] = (cfg.vocab_size, cfg.dim)
    return shapes


def rope_rows_to_halves(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """Reorder wq/wk rows from adjacent-pair RoPE order to rotate-half order.

    Inside each head, row 2*i + j (pair i, member j) moves to row j*hd/2 + i.
    This undoes llama.cpp's converter, which did
    `w.reshape(n_heads, 2, hd // 2, dim).swapaxes(1, 2)` on the HF weight.
    A QuantWeight gets the same reordering of its rows.
    """
    if is_quant(w):
        order = rope_rows_to_halves(np.arange(w.shape[0]).reshape(-1, 1), n_heads, head_dim)
        return w.rows(order.ravel())
    cols = w.shape[-1]
    w = w.reshape(n_heads, head_dim // 2, 2, cols).swapaxes(1, 2)
    return np.ascontiguousarray(w.reshape(n_heads * head_dim, cols))


def rope_rows_to_pairs(w: np.ndarray, n_heads: int, head_dim: int) -> np.ndarray:
    """The inverse of `rope_rows_to_halves` (what llama.cpp's converter does)."""
    cols = w.shape[-1]
    w = w.reshape(n_heads, 2, head_dim // 2, cols).swapaxes(1, 2)
    return np.ascontiguousarray(w.reshape(n_heads * head_dim, cols))


def check_config(path, cfg: ModelConfig, source: str | None, keys: dict[str, str] | None = None) -> None:
    """Reject configs the engine cannot run, before anything is sized from them.

    `source` says where in the file the fields came from ("GGUF metadata"),
    None when `path` says it all (config.json); `keys` maps ModelConfig field
    names to the names the file uses, so the message quotes what the user will
    find in the file.
    """
    bad = cfg.invalid_field()
    if bad is not None:
        name, expected, found = bad
        key = (keys or {}).get(name, name)
        where = f"{source}: " if source else ""
        raise ModelFormatError(path, f"{where}field {key}: expected {expected}, found {found!r}")


def check_shapes(path, cfg: ModelConfig, shapes: dict[str, tuple], names: dict[str, str] | None = None,
                 file_name=None) -> None:
    """Check that `shapes` (canonical name -> shape) is exactly the canonical set.

    `names` maps canonical names to the names the file uses and `file_name`
    (a function) names the tensors the file lacks, so errors quote what the
    user will find in the file.
    """
    names = names or {}

    def quoted(name):
        return names.get(name) or (file_name(name) if file_name else name)

    # A corrupt layer count could ask for millions of names: compare counts first
    # (a missing tensor or two is left to the clearer "missing tensor" below).
    if 9 * cfg.n_layers > len(shapes):
        raise ModelFormatError(
            path, f"the config says {cfg.n_layers} layers (9 tensors each) but there are only {len(shapes)} tensors")
    expected = expected_shapes(cfg)
    for name, shape in expected.items():
        if name not in shapes:
            raise ModelFormatError(path, f"missing tensor '{quoted(name)}'")
        found = tuple(shapes[name])
        if found != shape:
            raise ModelFormatError(
                path, f"tensor '{quoted(name)}' has shape {list(found)}, expected {list(shape)}")
    extra = [n for n in shapes if n not in expected]
    if extra:
        raise ModelFormatError(path, f"unexpected tensor '{quoted(extra[0])}'")


def check_weights(path, cfg: ModelConfig, weights: dict[str, np.ndarray], names: dict[str, str] | None = None) -> dict:
    """`check_shapes` on arrays; returns them in canonical order as float32 C-contiguous arrays
    (QuantWeights and float16 matrices are passed through as they are)."""
    check_shapes(path, cfg, {n: w.shape for n, w in weights.items()}, names)
    return {name: weights[name] if _kept(weights[name]) else np.ascontiguousarray(weights[name], dtype=np.float32)
            for name in expected_shapes(cfg)}


def _kept(w) -> bool:
    """A weight the loaders hand on in its own storage: a QuantWeight or a float16 matrix."""
    return is_quant(w) or (w.dtype == np.float16 and w.ndim == 2 and w.flags["C_CONTIGUOUS"])
