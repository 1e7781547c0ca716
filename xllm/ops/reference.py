"""Plain numpy versions of every operator: the specification the kernels must match.

Each function here is written to be obviously correct rather than fast: it
computes in float64 where that is cheap and returns float32, like the
compiled kernels of every device (same names, same signatures; the device
"reference" is these functions, `ReferenceOps` at the bottom). The tests
compare every kernel against these, so when in doubt about what an operator
means, read it here.

Conventions shared by all operators:
  * float arrays are float32 and C-contiguous, index arrays are int32;
  * a weight matrix (the w of `linear`/`logits`, the table of `embedding`) may
    also be float16, or a `QuantWeight` (xllm/weights.py), which stands for
    the float32 matrix `w.dequantize()`: the operator means exactly that;
  * every operator returns a new array, except `store_kv`, which writes into
    the caches it is given;
  * `T` is the number of token rows in the (possibly ragged) batch.
"""

from __future__ import annotations

import numpy as np

from ..rope import rope_angles
from ..weights import BLOCK, FORMATS, WEIGHT_FORMATS, is_quant
from .interface import HostOps

F32 = np.float32
F64 = np.float64


def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Row lookup: out[t] = table[ids[t]].  table [V, D], ids [T] -> [T, D]."""
    ids = np.asarray(ids)
    if ids.size and (ids.min() < 0 or ids.max() >= table.shape[0]):
        raise ValueError(f"embedding: token id out of range [0, {table.shape[0]})")
    if is_quant(table):
        return table.rows(ids).dequantize()    # the same rows of table.dequantize(), made alone
    return np.array(table[ids], dtype=F32)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMS normalisation of each row: y = x / sqrt(mean(x^2) + eps) * w.  [T, D] -> [T, D]."""
    x64 = x.astype(F64)
    ms = np.mean(x64 * x64, axis=-1, keepdims=True)
    return (x64 / np.sqrt(ms + eps) * w.astype(F64)).astype(F32)


def linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Dense layer without bias: y = x @ w.T.  x [T, K], w [N, K] -> [T, N].

    The weight is stored [out_features, in_features] (PyTorch/GGUF order), so
    every output is a dot product of two contiguous rows.
    """
    if is_quant(w):
        w = w.dequantize()
    return (x.astype(F64) @ w.astype(F64).T).astype(F32)


# ---------------------------------------------------------------- the integer path of linear

ACTIVATION_BITS = {"w8a8": 8, "q8_0": 16, "q4_0": 16, "q4_1": 16}   # weight format -> bits of x's integers


def quantize_activations(x: np.ndarray, block: int, bits: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """x [T, K] float32 as integers of `bits` bits (8 or 16), one scale per `block` values of a row.

    Symmetric, as llama.cpp quantizes activations: for each block, with
    qmax = 127 (8 bits) or 32767 (16 bits),
        d = max|x| / qmax,   q = rint(x / d) (round half to even), so x ~ d * q.
    Written with float32 operations the kernels repeat exactly (they run
    this part without fast-math): inv = 1 / d, q = rint(x * inv). A block
    of zeros (or of values so small that d is not a normal float32) gets
    d = 0 and q = 0. A block holding NaN or an infinity gets d = NaN (and
    q = 0), so that every product with it is NaN.
    -> (q int8 or int16 [T, K], d float32 [T, K / block]).
    """
    qmax, dtype = (F32(127), np.int8) if bits == 8 else (F32(32767), np.int16)
    T, K = x.shape
    xb = x.reshape(T, K // block, block).astype(F32)
    finite = np.isfinite(xb).all(axis=-1)
    amax = np.where(finite, np.abs(np.where(np.isfinite(xb), xb, 0)).max(axis=-1, initial=F32(0)), F32(0))
    d = (amax / qmax).astype(F32)
    small = d < np.finfo(F32).tiny
    d[small] = 0
    inv = np.where(small, F32(0), F32(1) / np.where(small, F32(1), d)).astype(F32)
    q = np.rint(np.where(finite[..., None], xb, 0) * inv[..., None]).astype(dtype)
    d[~finite] = np.nan
    return q.reshape(T, K), d


def linear_int(x: np.ndarray, w) -> np.ndarray:
    """linear with integer activations: the integer path of the quantized formats.

    x is quantized with `quantize_activations`: for w8a8 to int8, one scale
    per row (that is the scheme: SmoothQuant's W8A8); for the GGUF formats
    to int16, one scale per 32 values (their weight blocks). Each block's dot
    product is then a sum of integer products, exact in int32:

        q8_0, w8a8   y[t, n] = sum_b  dx[t,b] dw[n,b] * sum_j qx qw
        q4_0         y[t, n] = sum_b  dx[t,b] dw[n,b] * sum_j qx (qw - 8)
        q4_1         y[t, n] = sum_b  dx[t,b] (dw[n,b] * sum_j qx qw  +  m[n,b] * sum_j qx)

    Only the activations' rounding separates this from `linear` (at most
    d/2 per value of x); the rest is float arithmetic on exact integers.

    Why 16 bits for the GGUF formats, when llama.cpp quantizes their
    activations to 8: the CPU kernels widen both operands to 16-bit lanes
    for `vpmaddwd` anyway, so int16 activations cost nothing, and they keep
    the result within float rounding of `linear`. With int8 the default
    model's first answer changes (as llama.cpp's does on the same file):
    bench/RESULTS.md has the numbers. An int16 block's sum is at most
    32 * 32767 * 127, far inside int32.
    """
    T, K = x.shape
    N = w.shape[0]
    block = K if w.format == "w8a8" else BLOCK
    nb = K // block
    qx, dx = quantize_activations(x, block, ACTIVATION_BITS[w.format])
    qx = qx.reshape(T, nb, block).astype(np.int64)
    if w.format in ("q8_0", "w8a8"):
        qw = w.qs.reshape(N, nb, block).astype(np.int64)
    else:
        packed = w.qs.reshape(N, nb, BLOCK // 2)
        qw = np.concatenate([packed & 0x0F, packed >> 4], axis=-1).astype(np.int64)
        if w.format == "q4_0":
            qw -= 8
    isum = np.einsum("tbj,nbj->tnb", qx, qw).astype(F64)            # [T, N, nb], exact
    y = np.einsum("tnb,tb,nb->tn", isum, dx.astype(F64), w.d.astype(F64))
    if w.format == "q4_1":
        y += np.einsum("tb,tb,nb->tn", qx.sum(axis=-1).astype(F64), dx.astype(F64), w.m.astype(F64))
    return y.astype(F32)


def rope_tables(theta: float, head_dim: int, max_pos: int, scaling: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Cos/sin tables for rotary embeddings, each float32 [max_pos, head_dim // 2].

    Frequency i is inv_freq[i] = 1 / theta ** (2i / head_dim); the angle at
    position p is p * inv_freq[i]. `scaling` (ModelConfig.rope_scaling, None
    for plain RoPE) lowers some frequencies: see xllm/rope.py. Angles are
    computed in float64 so that large positions keep their precision, then the
    tables are rounded to float32.
    """
    if head_dim % 2:
        raise ValueError(f"rope_tables: head_dim must be even, got {head_dim}")
    angles = rope_angles(theta, head_dim, max_pos, scaling)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary position embedding, Hugging Face "rotate-half" layout.

    x [T, H, hd]; row t is rotated by the angles of position positions[t].
    Element i of the first half pairs with element i + hd/2:
        out[i]        = x[i] * c - x[i + hd/2] * s
        out[i + hd/2] = x[i + hd/2] * c + x[i] * s
    with c = cos[pos, i], s = sin[pos, i].
    """
    half = x.shape[-1] // 2
    positions = np.asarray(positions)
    if positions.size and (positions.min() < 0 or positions.max() >= cos.shape[0]):
        raise ValueError(f"rope: position out of range [0, {cos.shape[0]})")
    c = cos[positions].astype(F64)[:, None, :]          # [T, 1, half]
    s = sin[positions].astype(F64)[:, None, :]
    x1 = x[..., :half].astype(F64)
    x2 = x[..., half:].astype(F64)
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(F32)


def quantize_kv_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 with one scale per head: x [..., hd] float32 -> (q int8 [..., hd], s float32 [...]).

    s = max|x| / 127 and q = round(x / s) (to nearest, ties to even), clipped
    to [-127, 127], both computed in float32, so that q * s is within s / 2
    (plus float32 rounding) of x. A head of zeros, or one so tiny that s
    rounds to 0, gets s = 0 and q = 0. A head holding NaN or inf gets s = NaN
    and q = 0: dequantized, it is all NaN rather than some finite guess.
    """
    x = np.asarray(x, F32)
    finite = np.isfinite(x).all(axis=-1)
    amax = np.where(np.isfinite(x), np.abs(x), F32(0)).max(axis=-1)
    s = (amax / F32(127)).astype(F32)
    ok = finite & (s > 0)
    safe = np.where(ok, s, F32(1))[..., None]
    q = np.where(ok[..., None], np.clip(np.rint(x / safe), -127, 127), 0).astype(np.int8)
    return q, np.where(finite, s, F32(np.nan)).astype(F32)


def store_kv(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
             slot_mapping: np.ndarray, k_scale: np.ndarray | None = None,
             v_scale: np.ndarray | None = None) -> None:
    """Write the new keys/values into the paged caches: cache[slot_mapping[t]] = new[t].

    The caches decide how a number is stored:
      * float32: as is;
      * float16: the nearest float16 (numpy's astype(np.float16): ties to even,
        beyond +-65504 inf, NaN stays NaN);
      * int8: `quantize_kv_int8` of each token's head, the scales going into
        k_scale / v_scale [S, Hkv] float32 at the same slots.
    """
    slot_mapping = np.asarray(slot_mapping)
    if slot_mapping.size and (slot_mapping.min() < 0 or slot_mapping.max() >= k_cache.shape[0]):
        raise ValueError(f"store_kv: slot out of range [0, {k_cache.shape[0]})")
    if k_cache.dtype == np.int8:
        k_cache[slot_mapping], k_scale[slot_mapping] = quantize_kv_int8(k)
        v_cache[slot_mapping], v_scale[slot_mapping] = quantize_kv_int8(v)
    else:
        k_cache[slot_mapping] = k            # numpy rounds to float16 when the cache is float16
        v_cache[slot_mapping] = v


def attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, block_table: np.ndarray,
              block_size: int, cu_q: np.ndarray, positions: np.ndarray, scale: float,
              k_scale: np.ndarray | None = None, v_scale: np.ndarray | None = None) -> np.ndarray:
    """Causal paged attention over a ragged batch with grouped-query heads.

    q [T, H, hd]; caches [S, Hkv, hd]; block_table [B, MAXB]; cu_q [B+1].
    Sequence b owns query rows cu_q[b] .. cu_q[b+1]-1. Row t attends to the
    keys of its sequence at positions 0 .. positions[t]; key position p of
    sequence b is in cache slot block_table[b, p // block_size] * block_size
    + p % block_size. Query head h reads kv head h // (H // Hkv).

    A cached key or value is read as its float value: float32 and float16
    as they are, int8 times its scale (k_scale, v_scale [S, Hkv]).
    """
    T, H, hd = q.shape
    Hkv = k_cache.shape[1]
    group = H // Hkv
    out = np.zeros((T, H, hd), dtype=F32)
    for b in range(len(cu_q) - 1):
        lo, hi = int(cu_q[b]), int(cu_q[b + 1])
        if hi <= lo:
            continue
        pos = positions[lo:hi].astype(np.int64)                 # [t]
        n = int(pos.max()) + 1                                  # keys this sequence needs
        p = np.arange(n)
        slots = block_table[b, p // block_size].astype(np.int64) * block_size + p % block_size
        keys, vals = k_cache[slots].astype(F64), v_cache[slots].astype(F64)      # [n, Hkv, hd]
        if k_scale is not None:                                 # int8: dequantize
            keys *= k_scale[slots].astype(F64)[..., None]
            vals *= v_scale[slots].astype(F64)[..., None]
        keys = np.repeat(keys, group, axis=1)                   # [n, H, hd]
        vals = np.repeat(vals, group, axis=1)
        scores = np.einsum("thd,nhd->htn", q[lo:hi].astype(F64), keys) * scale
        future = p[None, :] > pos[:, None]                      # [t, n]: key after query
        scores = np.where(future[None], -np.inf, scores)
        scores -= scores.max(axis=-1, keepdims=True)
        probs = np.exp(scores)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[lo:hi] = np.einsum("htn,nhd->thd", probs, vals)
    return out


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU activation: [T, 2F] -> [T, F], out = silu(g) * u with g, u the two halves.

    sigmoid is evaluated from exp(-|g|), which never overflows.
    """
    F = gate_up.shape[-1] // 2
    g = gate_up[:, :F].astype(F64)
    u = gate_up[:, F:].astype(F64)
    e = np.exp(-np.abs(g))
    sig = np.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return (g * sig * u).astype(F32)


def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Elementwise x + y of two arrays of the same shape (the residual add)."""
    if x.shape != y.shape:
        raise ValueError(f"add: shapes differ: {x.shape} vs {y.shape}")
    return (x + y).astype(F32)


def logits(x: np.ndarray, rows: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Output projection of selected rows only: linear(x[rows], w).  -> [R, V]."""
    return linear(x[rows], w)


class ReferenceOps(HostOps):
    """The device "reference": the functions above behind the `Ops` interface."""

    name = "reference"
    linear_kernels = {fmt: linear for fmt in WEIGHT_FORMATS}
    int_linear_kernels = {fmt: linear_int for fmt in FORMATS}
    embedding_kernels = {fmt: embedding for fmt in WEIGHT_FORMATS}

    rmsnorm = staticmethod(rmsnorm)
    rope = staticmethod(rope)
    store_kv = staticmethod(store_kv)
    attention = staticmethod(attention)
    silu_mul = staticmethod(silu_mul)
    add = staticmethod(add)
