"""RoPE frequencies, with the context-extending scalings of Llama checkpoints.

Plain RoPE rotates pair i of every head by the angle p * inv_freq[i] at
position p, where inv_freq[i] = theta ** (-2i / head_dim): high frequencies
(small i) turn fast, low ones slowly.  A model trained on a short context is
stretched to a longer one by lowering some of these frequencies, so that far
positions turn the slow pairs no further than the training did.  A loader
describes how in `ModelConfig.rope_scaling`, a plain dict (it is stored as
JSON in the prepared-weights cache) of one of these shapes:

    {"type": "linear", "factor": 4.0}
        every frequency divided by factor (Hugging Face "linear").
    {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_context": 8192}
        Llama 3.1: pairs whose wavelength 2*pi/inv_freq is shorter than
        original_context / high_freq_factor keep their frequency, those longer
        than original_context / low_freq_factor are divided by factor, and
        those in between are blended smoothly (Hugging Face "llama3").
    {"type": "dynamic", "factor": 2.0, "original_context": 2048}
        NTK-aware "dynamic" scaling: up to original_context plain RoPE; past
        it, theta grows with the sequence length (see `dynamic_theta`).
    {"type": "freq_factors", "factors": [1.0, 1.0, ..., 8.0]}
        one divisor per frequency, head_dim // 2 of them: llama.cpp's
        `rope_freqs.weight` tensor (how GGUF files carry llama3 scaling).

`rope_angles` turns theta, head_dim and the scaling into the angle of every
(position, pair); `ops.reference.rope_tables` takes their cos and sin once,
when a model is built.  Nothing here runs per token.

The arithmetic follows transformers' modeling_rope_utils.py
(`_compute_linear_scaling_rope_parameters`, `_compute_llama3_parameters`,
`_compute_dynamic_ntk_parameters`), in float64 where transformers uses
float32 (the angles of far positions keep their precision).

"dynamic" and transformers.  Transformers recomputes the frequencies in
every forward call from the largest position in that call: a prompt of
L > original_context tokens run in one call has *every* position (the first
ones too) rotated with dynamic_theta(L); a decode step at position p uses
dynamic_theta(p + 1) for its own query and key, while the keys cached by
earlier calls keep the rotation they were given then.  A paged engine caches
keys for reuse (chunked prefill, prefix sharing), so a key must not depend on
which call computed it.  xllm therefore gives each position p its own
theta, dynamic_theta(max(p + 1, original_context)): exactly what transformers
computes when a prompt of at most original_context tokens is followed by
tokens fed one at a time (generation with a KV cache), and the same as
transformers everywhere while no position passes original_context.  A single
call over a prompt longer than original_context differs from transformers in
all of its positions.
NOT handled: "yarn", "longrope" and the other scalings (their attention
factor and per-length switching), partial rotary embeddings.
"""

from __future__ import annotations

import math

import numpy as np

from .config import LIMITS

TYPES = ("linear", "llama3", "dynamic", "freq_factors")
MAX_FACTOR = 65536.0            # real checkpoints use 2 to 64
MAX_CONTEXT = LIMITS["context_length"]


def base_inverse_frequencies(theta: float, head_dim: int) -> np.ndarray:
    """inv_freq[i] = 1 / theta ** (2i / head_dim), float64 [head_dim // 2]."""
    return 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)


def llama3_inverse_frequencies(inv_freq: np.ndarray, factor: float, low_freq_factor: float,
                               high_freq_factor: float, original_context: int) -> np.ndarray:
    """Llama 3.1's frequency scaling (transformers' _compute_llama3_parameters).

    Wavelength w = 2*pi / inv_freq.  w < original / high_freq_factor: unchanged;
    w > original / low_freq_factor: divided by factor; in between, with
    s = (original / w - low_freq_factor) / (high_freq_factor - low_freq_factor),
    inv_freq * ((1 - s) / factor + s): s runs from 0 (fully scaled) to 1 (unchanged).
    """
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, out)


def dynamic_theta(theta: float, head_dim: int, factor: float, original_context: int, seq_len):
    """The NTK-scaled base for a sequence of seq_len tokens (transformers' _compute_dynamic_ntk_parameters):

        theta * (factor * L / original - (factor - 1)) ** (head_dim / (head_dim - 2)),  L = max(seq_len, original)

    e.g. theta 10000, head_dim 16, factor 2, original 512: seq_len 700 -> 10000 * 1.734 ** (8/7) = 18763.
    `seq_len` may be an array (one base per entry); L <= original gives theta itself.
    """
    length = np.maximum(seq_len, original_context)
    return theta * (factor * length / original_context - (factor - 1)) ** (head_dim / (head_dim - 2))


def rope_angles(theta: float, head_dim: int, max_pos: int, scaling: dict | None = None) -> np.ndarray:
    """The rotation angle of every (position, pair): float64 [max_pos, head_dim // 2].

    angles[p, i] = p * inv_freq[i], with inv_freq scaled as `scaling` says
    (see the module docstring); for "dynamic", inv_freq depends on p too.
    """
    positions = np.arange(max_pos, dtype=np.float64)
    kind = scaling["type"] if scaling else None
    if kind == "dynamic":
        # One base per position, dynamic_theta(p + 1): theta itself up to the original context.
        thetas = dynamic_theta(theta, head_dim, scaling["factor"], scaling["original_context"], positions + 1)
        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        return positions[:, None] / thetas[:, None] ** exponents[None, :]
    inv_freq = base_inverse_frequencies(theta, head_dim)
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        inv_freq = llama3_inverse_frequencies(inv_freq, scaling["factor"], scaling["low_freq_factor"],
                                              scaling["high_freq_factor"], scaling["original_context"])
    elif kind == "freq_factors":
        inv_freq = inv_freq / np.asarray(scaling["factors"], dtype=np.float64)
    elif kind is not None:
        raise ValueError(f"unknown RoPE scaling type {kind!r}")
    return positions[:, None] * inv_freq[None, :]


# ---------------------------------------------------------------- checking a file's values

def _finite(value) -> bool:
    """A real number (not a bool) with a finite float value; an int of 400 digits is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:
        return False


def scaling_problem(scaling, head_dim: int) -> tuple[str, str, object] | None:
    """(key, what was expected, what was found) for the first unusable entry of a
    `rope_scaling` dict, or None when `rope_angles` can use it.  The loaders call
    this before anything is computed from the values, and name the file's own key."""
    if not isinstance(scaling, dict):
        return "rope_scaling", "an object", scaling
    kind = scaling.get("type")
    if kind not in TYPES:
        return "type", f"one of {list(TYPES)}", kind
    if kind == "freq_factors":
        factors = scaling.get("factors")
        if not isinstance(factors, list) or len(factors) != head_dim // 2:
            return "factors", f"a list of head_dim/2={head_dim // 2} numbers", factors
        for f in factors:
            if not _finite(f) or f <= 0:
                return "factors", "finite positive numbers", f
        return None
    factor = scaling.get("factor")
    if not _finite(factor) or not 1 <= factor <= MAX_FACTOR:
        return "factor", f"a number from 1 to {MAX_FACTOR:g}", factor
    if kind == "linear":
        return None
    original = scaling.get("original_context")
    if isinstance(original, bool) or not isinstance(original, int) or not 1 <= original <= MAX_CONTEXT:
        return "original_context", f"an integer from 1 to {MAX_CONTEXT}", original
    if kind == "dynamic":
        if head_dim <= 2:
            return "head_dim", "more than 2 (dynamic scaling raises theta to head_dim / (head_dim - 2))", head_dim
        return None
    low, high = scaling.get("low_freq_factor"), scaling.get("high_freq_factor")
    if not _finite(low) or low <= 0:
        return "low_freq_factor", "a finite positive number", low
    if not _finite(high) or high <= low:
        return "high_freq_factor", f"a finite number above low_freq_factor={low}", high
    return None
