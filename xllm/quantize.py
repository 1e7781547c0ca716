"""Quantizing float weights: W8A8 (per-channel int8), GGUF Q8_0 blocks, float16, and SmoothQuant.

    from xllm.quantize import quantize_weights, smooth_weights, activation_maxima
    maxima = activation_maxima(config, weights, calib_ids)          # optional
    weights = smooth_weights(config, weights, maxima, alpha=0.5)    # optional
    weights = quantize_weights(config, weights, "w8a8")

`weights` are a loader's canonical float weights (xllm/loader/layout.py).
W8A8 quantizes every linear layer: the matrices of each layer and the
output projection (lm_head). Decode reads the output projection whole for
every token (the largest matrix of a small model: 113 of SmolLM2-135M's
220 MB a token in float32), while the embedding table is read one row per
token, so the table stays float32; a model whose output projection is its
embedding table (tied) gets an int8 copy of the table as its own output
projection. Q8_0 and fp16 store every matrix so, embeddings included, as
llama.cpp's files of those types do. The norms stay float32.

W8A8 (per output channel, symmetric). Row n of W gets one scale:

    d[n] = max_k |W[n, k]| / 127,    q[n, k] = round(W[n, k] / d[n])  in [-127, 127]

rounding half away from zero (as GGUF does; np.rint would round half to
even), so |W - d q| <= d / 2 everywhere. A row of zeros gets d = 0, q = 0.
At run time the activations are quantized per token (xllm/ops/reference.py,
`linear_int`), the dot products are int32, and each output is rescaled once.

Q8_0 (GGUF). The same per 32 consecutive values of a row, with d stored as
float16. `quantize_q8_0` repeats the arithmetic of ggml's reference
quantizer step by step in float32 (d = amax / 127, inv = 1 / d, q =
round(x * inv), then d to float16), so `q8_0_blocks` equals
`gguf.quants.quantize(w, Q8_0)` byte for byte (tests/test_quantize.py).

SmoothQuant. Int8 activations lose precision in the few input channels whose
activations are far larger than the rest (outliers), because one scale per
token must cover them. Dividing such a channel k of the activations by s_k
and multiplying column k of the weights by s_k leaves X W^T unchanged and
moves the difficulty into the weights, which are quantized per row and
absorb it better:

    s_k = max|X_k|^alpha / max|W_k|^(1 - alpha)

The division costs nothing at run time: the activations entering wq|wk|wv
and w_gate|w_up are outputs of an RMSNorm, so 1/s is folded into the norm's
weight. wo and w_down have no such norm before them and stay unsmoothed.
max|X_k| comes from running the float model on a short calibration text
(`activation_maxima`). Not handled: per-group weight scales, static
activation scales, asymmetric (zero-point) quantization.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import XllmError
from .weights import BLOCK, QuantWeight

SCHEMES = ("w8a8", "q8_0", "fp16")
LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")

F32 = np.float32
# The calibration text when none is given: the shared sample of chat turns beside the repository.
DEFAULT_CALIB = Path(__file__).resolve().parents[2] / "shared" / "data" / "shareGPT_sample.txt"


@dataclass(frozen=True)
class QuantizeOptions:
    """How to quantize float weights at load time or in convert/quantize.py."""

    scheme: str                    # "w8a8", "q8_0" or "fp16"
    smooth: float | None = None    # SmoothQuant's alpha (0.5 is usual); None: no smoothing
    calib: str | None = None       # the calibration text file (default DEFAULT_CALIB)
    calib_tokens: int = 512        # how many of its first tokens are run

    def __post_init__(self):
        if self.scheme not in SCHEMES:
            raise ValueError(f"quantization scheme: expected one of {', '.join(SCHEMES)}, found {self.scheme!r}")
        if self.smooth is not None and not 0.0 <= self.smooth <= 1.0:
            raise ValueError(f"smoothing alpha: expected a number in [0, 1], found {self.smooth}")
        if self.smooth is not None and self.scheme != "w8a8":
            raise ValueError(f"smoothing is for w8a8 (int8 activations), not {self.scheme}")
        if self.calib_tokens < 1:
            raise ValueError(f"calib_tokens: expected a positive number, found {self.calib_tokens}")

    @property
    def calib_path(self) -> Path:
        return Path(self.calib) if self.calib else DEFAULT_CALIB

    def key(self) -> str:
        """A short name for cache entries: "w8a8", or "w8a8-s0.5-512-<digest of the calibration text>"."""
        if self.smooth is None:
            return self.scheme
        if not self.calib_path.is_file():
            raise XllmError(f"{self.calib_path}: calibration text not found (give one with --calib)")
        digest = hashlib.blake2b(self.calib_path.read_bytes(), digest_size=4).hexdigest()
        return f"{self.scheme}-s{self.smooth:g}-{self.calib_tokens}-{digest}"


def quantize_checkpoint(config: ModelConfig, weights: dict, options: QuantizeOptions, tokenizer=None,
                        report=None) -> dict:
    """Canonical weights (any formats) -> `options.scheme`, smoothed first when `options.smooth`
    (which needs the model's `tokenizer` for the calibration text)."""
    weights = {k: _float(v) for k, v in weights.items()}
    if options.smooth is not None:
        if tokenizer is None:
            raise ValueError("smoothing needs the model's tokenizer to read the calibration text")
        if not options.calib_path.is_file():
            raise XllmError(f"{options.calib_path}: calibration text not found (give one with --calib)")
        ids = calibration_ids(tokenizer, options.calib_path, options.calib_tokens)
        weights = smooth_weights(config, weights, activation_maxima(config, weights, ids), options.smooth)
    return quantize_weights(config, weights, options.scheme, report)


# ---------------------------------------------------------------- rounding and the two int8 formats

def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to the nearest integer, ties away from zero (C's roundf): 2.5 -> 3, -2.5 -> -3.

    Exact in float32: x - trunc(x) has no rounding error, unlike x + 0.5
    (0.49999997 + 0.5 rounds up to 1.0 in float32).
    """
    whole = np.trunc(x)
    return whole + np.where(np.abs(x - whole) >= 0.5, np.sign(x), 0).astype(x.dtype)


def _check_finite(w: np.ndarray, what: str) -> np.ndarray:
    w = np.ascontiguousarray(w, dtype=F32)
    if w.ndim != 2 or w.shape[1] % BLOCK:
        raise ValueError(f"{what}: need a matrix [N, K] with K a multiple of {BLOCK}, got {w.shape}")
    if not np.isfinite(w).all():
        raise ValueError(f"{what}: the matrix holds NaN or infinite values")
    return w


def quantize_w8a8(w: np.ndarray) -> QuantWeight:
    """float [N, K] -> QuantWeight("w8a8", int8 [N, K], float32 d [N, 1]); see the module docstring."""
    w = _check_finite(w, "quantize_w8a8")
    d = (np.abs(w).max(axis=1, keepdims=True) / F32(127)).astype(F32)
    inv = np.where(d == 0, F32(0), F32(1) / np.where(d == 0, F32(1), d)).astype(F32)
    q = np.clip(round_half_away(w * inv), -127, 127).astype(np.int8)
    return QuantWeight("w8a8", q, d)


def quantize_q8_0(w: np.ndarray) -> QuantWeight:
    """float [N, K] -> QuantWeight("q8_0"): per 32 values, d = amax / 127 (kept as its float16
    value), q = round(x / d) computed with the float32 d, as ggml does."""
    w = _check_finite(w, "quantize_q8_0")
    N, K = w.shape
    blocks = w.reshape(N, K // BLOCK, BLOCK)
    d = (np.abs(blocks).max(axis=-1, keepdims=True) / F32(127)).astype(F32)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, F32(0), F32(1) / d).astype(F32)
    q = round_half_away(blocks * inv).astype(np.int8)
    if d.max(initial=0) > np.finfo(np.float16).max:
        raise ValueError(f"quantize_q8_0: a block's scale {d.max():.3g} (max |w| / 127) is past float16's range")
    d16 = d[..., 0].astype(np.float16)
    return QuantWeight("q8_0", q.reshape(N, K), d16.astype(F32))


def q8_0_blocks(w: QuantWeight) -> np.ndarray:
    """The GGUF bytes of a q8_0 QuantWeight: uint8 [N, K/32 * 34], each block d (float16) then 32 int8.

    The layout `gguf.quants.quantize` returns and `GGUFWriter.add_tensor(..., raw_dtype=Q8_0)` takes.
    """
    N, K = w.shape
    d = w.d.astype(np.float16).view(np.uint8).reshape(N, K // BLOCK, 2)
    qs = w.qs.view(np.uint8).reshape(N, K // BLOCK, BLOCK)
    return np.concatenate([d, qs], axis=-1).reshape(N, -1)


def max_channel_error(w: np.ndarray, q) -> float:
    """The largest |w - q| over the matrix, relative to that row's max |w|: the worst output channel."""
    err = np.abs(w.astype(F32) - (q.dequantize() if isinstance(q, QuantWeight) else q.astype(F32)))
    scale = np.abs(w).max(axis=1)
    rel = np.where(scale > 0, err.max(axis=1) / np.where(scale > 0, scale, 1), 0)
    return float(rel.max()) if rel.size else 0.0


def quantize_matrix(w: np.ndarray, scheme: str):
    """One float matrix in `scheme` ("w8a8", "q8_0" or "fp16")."""
    if scheme == "w8a8":
        return quantize_w8a8(w)
    if scheme == "q8_0":
        return quantize_q8_0(w)
    if scheme == "fp16":
        return np.ascontiguousarray(w, dtype=np.float16)
    raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def quantize_weights(config: ModelConfig, weights: dict, scheme: str, report=None) -> dict:
    """The canonical float `weights` with their matrices in `scheme` (which ones: the module docstring).

    `report(name, error)` is called per matrix with `max_channel_error`,
    e.g. to drive a progress bar.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; known: {', '.join(SCHEMES)}")
    out = {}

    def quantize(name, w):
        out[name] = quantize_matrix(w, scheme)
        if report:
            report(name, max_channel_error(w, out[name]))

    for name, w in weights.items():
        kind = name.rsplit(".", 1)[-1]
        w = _float(w)
        if name == "output" and config.tied_embeddings:
            continue                           # the table's, below
        if kind in LAYER_MATRICES or (w.ndim == 2 and (scheme != "w8a8" or name == "output")):
            quantize(name, w)
        else:
            out[name] = np.ascontiguousarray(w, dtype=F32)
    if config.tied_embeddings and scheme == "w8a8":
        quantize("output", out["tok_embeddings"])     # an int8 copy of the float32 table
    elif config.tied_embeddings and "output" in weights:
        out["output"] = out["tok_embeddings"]
    return out


# ---------------------------------------------------------------- SmoothQuant

def smoothing_factors(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """s_k = x_max_k^alpha / w_max_k^(1 - alpha), float32 [K]; 1 where either maximum is 0
    (a channel that never carries a value needs no moving)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    x, w = x_max.astype(np.float64), w_max.astype(np.float64)
    ok = (x > 0) & (w > 0)
    s = np.ones_like(x)
    s[ok] = x[ok] ** alpha / w[ok] ** (1.0 - alpha)
    return s.astype(F32)


def smooth_weights(config: ModelConfig, weights: dict, maxima: dict[str, np.ndarray], alpha: float = 0.5) -> dict:
    """Canonical float weights with SmoothQuant's factors folded in (the float function is unchanged).

    `maxima` (from `activation_maxima`): "layers.{i}.attn" and "layers.{i}.ffn",
    max |activation| per input channel [dim] entering wq|wk|wv and w_gate|w_up.
    One s per block: W' = W * s (columns) for each matrix it feeds, norm' = norm / s.
    """
    out = dict(weights)
    groups = (("attn", "attn_norm", ("wq", "wk", "wv")), ("ffn", "ffn_norm", ("w_gate", "w_up")))
    for i in range(config.n_layers):
        p = f"layers.{i}."
        for key, norm, mats in groups:
            ws = [_float(weights[p + m]) for m in mats]
            w_max = np.max([np.abs(w).max(axis=0) for w in ws], axis=0)
            s = smoothing_factors(maxima[p + key], w_max, alpha)
            for m, w in zip(mats, ws):
                out[p + m] = (w * s[None, :]).astype(F32)
            out[p + norm] = (_float(weights[p + norm]) / s).astype(F32)
    return out


def _float(w) -> np.ndarray:
    return w.dequantize() if isinstance(w, QuantWeight) else np.asarray(w, dtype=F32)


def activation_maxima(config: ModelConfig, weights: dict, ids: list[int], chunk: int = 256) -> dict[str, np.ndarray]:
    """max |x| per input channel of the stacked qkv and gate|up projections, over the tokens `ids`.

    Runs the float model (canonical `weights`) on the CPU with `_RecordingOps`,
    whose `linear` notes the maxima of its input for the weights it is asked
    about; the forward pass itself is not touched.
    -> {"layers.{i}.attn": float32 [dim], "layers.{i}.ffn": float32 [dim]}.
    """
    from .model import Llama, prepare_weights

    prepared = prepare_weights(config, {k: _float(v) for k, v in weights.items()})
    ops = _recording_ops()
    model = Llama(config, prepared, ops, f32=True)
    ops.watch = {}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        ops.watch[id(model.w[p + "wqkv"])] = p + "attn"
        ops.watch[id(model.w[p + "w_gate_up"])] = p + "ffn"
    ops.maxima = {}
    model.logits_for(list(ids)[: config.context_length], chunk=chunk)
    missing = set(ops.watch.values()) - set(ops.maxima)
    if missing:
        raise RuntimeError(f"activation_maxima: no activations seen for {sorted(missing)[0]}")
    return dict(ops.maxima)


def _recording_ops():
    """A new CPU `Ops` (exact float32) whose `linear` records max |x| per column for watched weights."""
    from .ops import Ops, get_ops

    base = type(get_ops("cpu", exact=True))

    class _RecordingOps(base):
        name = "cpu"
        watch: dict[int, str] = {}
        maxima: dict[str, np.ndarray] = {}
        decoder_layer = Ops.decoder_layer      # operator by operator, so that `linear` sees every x
        decoder_layers = Ops.decoder_layers

        def linear(self, x, w):
            key = self.watch.get(id(w))
            if key is not None:
                seen = np.abs(np.asarray(x)).max(axis=0).astype(F32)
                self.maxima[key] = np.maximum(self.maxima[key], seen) if key in self.maxima else seen
            return super().linear(x, w)

    return _RecordingOps(exact=True)


def calibration_ids(tokenizer, path, n_tokens: int = 512) -> list[int]:
    """The first `n_tokens` token ids of the text file at `path` (the calibration text)."""
    with open(path, encoding="utf-8") as f:
        text = f.read(n_tokens * 16)             # ample: a token is rarely more than 16 characters
    ids = tokenizer.encode(text)[:n_tokens]
    if not ids:
        raise ValueError(f"calibration file {path} holds no text")
    return ids
