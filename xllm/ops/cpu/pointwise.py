"""Row-wise operators: embedding, rmsnorm, rope, silu_mul, add and store_kv.

Each operator is written once as a function that handles one row (`_*_row`),
and driven by two compiled loops over the rows: `_*_serial` and `_*_parallel`
(a `prange`). The wrapper picks the parallel driver only for large inputs
(see `common.PARALLEL_MIN_ELEMENTS`), because during decode these operators
touch a few hundred floats and starting the threads would cost more than the
work itself.

Operators that index with runtime data (token ids, positions, cache slots)
check every index first and return the first bad row (or -1), so a bad index
raises a ValueError in the wrapper instead of reading or writing outside an
array (compiled code has no bounds checks).
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from ..quant import QuantWeight
from .common import FAST, PARALLEL_MIN_ELEMENTS
from .expf import exp_nonpositive
from .kv_storage import kernel_arrays, store_head


@numba.njit(cache=True)
def _first_out_of_range(idx, limit):
    """Index of the first element of idx outside [0, limit), or -1 if none."""
    for i in range(idx.shape[0]):
        if idx[i] < 0 or idx[i] >= limit:
            return i
    return -1


# ---------------------------------------------------------------- embedding

@numba.njit(cache=True)
def _embedding_row(table, ids, out, t):
    row = ids[t]
    for i in range(table.shape[1]):
        out[t, i] = table[row, i]


@numba.njit(cache=True)
def _embedding_serial(table, ids, out):
    bad = _first_out_of_range(ids, table.shape[0])
    if bad < 0:
        for t in range(ids.shape[0]):
            _embedding_row(table, ids, out, t)
    return bad


@numba.njit(parallel=True, cache=True)
def _embedding_parallel(table, ids, out):
    bad = _first_out_of_range(ids, table.shape[0])
    if bad < 0:
        for t in prange(ids.shape[0]):
            _embedding_row(table, ids, out, t)
    return bad


def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """out[t] = table[ids[t]].  table [V, D], ids [T] int32 -> new [T, D].

    table may also be a QuantWeight: its selected rows are dequantized (qmatmul.py).
    """
    if isinstance(table, QuantWeight):
        return qmatmul.qembedding(table, ids, parallel=ids.shape[0] * table.shape[1] >= PARALLEL_MIN_ELEMENTS)
    if table.ndim != 2 or ids.ndim != 1:
        raise ValueError(f"embedding: need table [V, D] and ids [T], got {table.shape} and {ids.shape}")
    out = np.empty((ids.shape[0], table.shape[1]), np.float32)
    run = _embedding_parallel if out.size >= PARALLEL_MIN_ELEMENTS else _embedding_serial
    bad = run(table, ids, out)
    if bad >= 0:
        raise ValueError(f"embedding: ids[{bad}] = {ids[bad]} is not a row of the {table.shape[0]}-row table")
    return out


# ---------------------------------------------------------------- rmsnorm

@numba.njit(cache=True, fastmath=FAST)
def _rmsnorm_row(x, w, eps, out, t):
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w, the mean summed in float64."""
    D = x.shape[1]
    sum_sq = 0.0
    for i in range(D):
        v = np.float64(x[t, i])
        sum_sq += v * v
    inv_rms = 1.0 / math.sqrt(sum_sq / max(D, 1) + eps)
    for i in range(D):
        out[t, i] = x[t, i] * inv_rms * w[i]


@numba.njit(cache=True, fastmath=FAST)
def _rmsnorm_serial(x, w, eps, out):
    for t in range(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


@numba.njit(parallel=True, cache=True, fastmath=FAST)
def _rmsnorm_parallel(x, w, eps, out):
    for t in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * w per row.  x [T, D], w [D] -> new [T, D]."""
    if x.ndim != 2 or w.shape != x.shape[1:]:
        raise ValueError(f"rmsnorm: need x [T, D] and w [D], got {x.shape} and {w.shape}")
    out = np.empty(x.shape, np.float32)
    run = _rmsnorm_parallel if x.size >= PARALLEL_MIN_ELEMENTS else _rmsnorm_serial
    run(x, w, float(eps), out)
    return out


# ---------------------------------------------------------------- rope

@numba.njit(cache=True)
def _rope_row(x, positions, cos, sin, out, t):
    """Rotate every head of row t by the angles of position positions[t] (rotate-half)."""
    H, hd = x.shape[1], x.shape[2]
    half = hd // 2
    pos = positions[t]
    for h in range(H):
        for i in range(half):
            c = cos[pos, i]
            s = sin[pos, i]
            a = x[t, h, i]             # first half
            b = x[t, h, i + half]      # second half
            out[t, h, i] = a * c - b * s
            out[t, h, i + half] = b * c + a * s


@numba.njit(cache=True)
def _rope_serial(x, positions, cos, sin, out):
    bad = _first_out_of_range(positions, cos.shape[0])
    if bad < 0:
        for t in range(x.shape[0]):
            _rope_row(x, positions, cos, sin, out, t)
    return bad


@numba.njit(parallel=True, cache=True)
def _rope_parallel(x, positions, cos, sin, out):
    bad = _first_out_of_range(positions, cos.shape[0])
    if bad < 0:
        for t in prange(x.shape[0]):
            _rope_row(x, positions, cos, sin, out, t)
    return bad


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, Hugging Face rotate-half layout.  x [T, H, hd] -> new [T, H, hd].

    cos, sin [P, hd // 2] from `rope_tables`; positions [T] int32, each < P.
    """
    if (x.ndim != 3 or x.shape[2] % 2 or cos.shape != sin.shape or cos.ndim != 2
            or cos.shape[1] != x.shape[2] // 2 or positions.shape != x.shape[:1]):
        raise ValueError(f"rope: need x [T, H, hd] (hd even), positions [T], cos/sin [P, hd/2], got "
                         f"{x.shape}, {positions.shape}, {cos.shape}, {sin.shape}")
    out = np.empty(x.shape, np.float32)
    run = _rope_parallel if x.size >= PARALLEL_MIN_ELEMENTS else _rope_serial
    bad = run(x, positions, cos, sin, out)
    if bad >= 0:
        raise ValueError(f"rope: positions[{bad}] = {positions[bad]} is outside the "
                         f"{cos.shape[0]}-position tables")
    return out


# ---------------------------------------------------------------- silu_mul

@numba.njit(cache=True, fastmath=FAST)
def _silu_mul_row(gate_up, out, t):
    """out[t, i] = silu(g) * u with g = gate_up[t, i], u = gate_up[t, F + i].

    sigmoid(g) comes from e = exp(-|g|) <= 1, which cannot overflow:
    1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0. Both sides are
    computed and one is selected, with the exp of expf.py, so the loop runs
    as SIMD code.
    """
    F = out.shape[1]
    one = np.float32(1.0)              # keeps the arithmetic in float32
    for i in range(F):
        g = gate_up[t, i]
        u = gate_up[t, F + i]
        e = exp_nonpositive(-abs(g))
        sig = (one if g >= 0 else e) / (one + e)
        out[t, i] = g * sig * u


@numba.njit(cache=True)
def _silu_mul_serial(gate_up, out):
    for t in range(gate_up.shape[0]):
        _silu_mul_row(gate_up, out, t)


@numba.njit(parallel=True, cache=True)
def _silu_mul_parallel(gate_up, out):
    for t in prange(gate_up.shape[0]):
        _silu_mul_row(gate_up, out, t)


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU activation: gate_up [T, 2F] -> new [T, F], silu(gate) * up."""
    if gate_up.ndim != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: need gate_up [T, 2F], got {gate_up.shape}")
    out = np.empty((gate_up.shape[0], gate_up.shape[1] // 2), np.float32)
    run = _silu_mul_parallel if gate_up.size >= PARALLEL_MIN_ELEMENTS else _silu_mul_serial
    run(gate_up, out)
    return out


# ---------------------------------------------------------------- add

@numba.njit(cache=True)
def _add_serial(x, y, out):
    for i in range(x.shape[0]):
        out[i] = x[i] + y[i]


@numba.njit(parallel=True, cache=True)
def _add_parallel(x, y, out):
    for i in prange(x.shape[0]):
        out[i] = x[i] + y[i]


def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x + y for two arrays of the same shape (any rank) -> new array."""
    if x.shape != y.shape:
        raise ValueError(f"add: shapes differ: {x.shape} vs {y.shape}")
    out = np.empty(x.shape, np.float32)
    run = _add_parallel if x.size >= PARALLEL_MIN_ELEMENTS else _add_serial
    run(x.reshape(-1), y.reshape(-1), out.reshape(-1))
    return out


# ---------------------------------------------------------------- store_kv

@numba.njit(cache=True)
def _store_kv_row(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, t):
    """Row t of k and v into slot slot_mapping[t], each head in the cache's format."""
    slot = slot_mapping[t]
    for h in range(k.shape[1]):
        store_head(k, t, h, k_cache, k_scale, slot)
        store_head(v, t, h, v_cache, v_scale, slot)


@numba.njit(cache=True)
def _store_kv_serial(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping):
    bad = _first_out_of_range(slot_mapping, k_cache.shape[0])
    if bad < 0:
        for t in range(k.shape[0]):
            _store_kv_row(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, t)
    return bad


@numba.njit(parallel=True, cache=True)
def _store_kv_parallel(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping):
    bad = _first_out_of_range(slot_mapping, k_cache.shape[0])
    if bad < 0:
        for t in prange(k.shape[0]):
            _store_kv_row(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, t)
    return bad


def store_kv(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
             slot_mapping: np.ndarray, k_scale: np.ndarray | None = None,
             v_scale: np.ndarray | None = None) -> None:
    """k_cache[slot_mapping[t]] = k[t] and likewise for v, in place.

    k, v [T, Hkv, hd] float32; caches [S, Hkv, hd] float32, float16 or int8;
    slot_mapping [T] int32, each < S. int8 caches also take k_scale and
    v_scale [S, Hkv] float32, written with one scale per token per kv head
    (see kv_storage.py). Nothing is written when a slot is out of range.
    """
    if (k.ndim != 3 or v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.ndim != 3
            or k_cache.shape[1:] != k.shape[1:] or slot_mapping.shape != k.shape[:1]):
        raise ValueError(f"store_kv: need k, v [T, Hkv, hd], caches [S, Hkv, hd], slot_mapping [T], got "
                         f"{k.shape}, {v.shape}, {k_cache.shape}, {v_cache.shape}, {slot_mapping.shape}")
    kc, vc = kernel_arrays("store_kv", k_cache, v_cache, k_scale, v_scale)
    run = _store_kv_parallel if k.size >= PARALLEL_MIN_ELEMENTS else _store_kv_serial
    bad = run(k, v, kc, vc, k_scale, v_scale, slot_mapping)
    if bad >= 0:
        raise ValueError(f"store_kv: slot_mapping[{bad}] = {slot_mapping[bad]} is not a slot of the "
                         f"{k_cache.shape[0]}-slot cache")


# At the end: qmatmul imports _first_out_of_range from this module.
from . import qmatmul  # noqa: E402
