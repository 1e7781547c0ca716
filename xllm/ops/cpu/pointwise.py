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

from .. import checks
from . import common
from .common import FAST, serial_and_parallel
from .common import first_out_of_range as _first_out_of_range
from .bodies import expf, rows


# ---------------------------------------------------------------- rmsnorm

def _rmsnorm(x, w, eps, out):
    for t in prange(x.shape[0]):
        inv_rms = rows.rmsnorm_inv_rms(rows.rmsnorm_sum_squares(x, t, 0, 1), x.shape[1], eps)
        rows.rmsnorm_scale(x, w, inv_rms, out, t, 0, 1)


_rmsnorm_serial, _rmsnorm_parallel = serial_and_parallel(_rmsnorm, fastmath=FAST)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * w per row.  x [T, D], w [D] -> new [T, D]."""
    checks.rmsnorm(x, w)
    out = np.empty(x.shape, np.float32)
    run = _rmsnorm_parallel if x.size >= common.PARALLEL_MIN_ELEMENTS else _rmsnorm_serial
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
    run = _rope_parallel if x.size >= common.PARALLEL_MIN_ELEMENTS else _rope_serial
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
        e = expf.exp_nonpositive(-abs(g))
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
    run = _silu_mul_parallel if gate_up.size >= common.PARALLEL_MIN_ELEMENTS else _silu_mul_serial
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
    run = _add_parallel if x.size >= common.PARALLEL_MIN_ELEMENTS else _add_serial
    run(x.reshape(-1), y.reshape(-1), out.reshape(-1))
    return out


