"""Row-wise operators on the CPU: rmsnorm, rope, silu_mul, add, and add_rmsnorm.

The math of each is a body of xllm/ops/kernels/rows.py; the drivers below
hand out the rows (elements, for add) in a `prange` loop. Each driver is
compiled twice by `serial_and_parallel`, and the wrapper picks the threaded
copy only for large inputs (see `common.PARALLEL_MIN_ELEMENTS`), because
during decode these operators touch a few hundred floats and starting the
threads would cost more than the work itself.

rope indexes its tables with runtime data (positions): its driver checks
every position first and returns the first bad row (or -1), so a bad
position raises a ValueError in the wrapper instead of reading outside the
tables (compiled code has no bounds checks).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from .. import checks
from . import common
from .common import FAST, serial_and_parallel
from .common import first_out_of_range as _first_out_of_range
from .bodies import rows


# ---------------------------------------------------------------- rmsnorm

def _rmsnorm(x, w, eps, out):
    for t in prange(x.shape[0]):
        inv_rms = rows.rmsnorm_inv_rms(rows.rmsnorm_sum_squares(x, t, 0, 1), x.shape[1], eps)
        rows.rmsnorm_scale(x, w, inv_rms, out, t, 0, 1)


_rmsnorm_serial, _rmsnorm_parallel = serial_and_parallel(_rmsnorm, fastmath=FAST)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """y = x / sqrt(mean(x^2) + eps) * w per row.  x [T, D], w [D] -> new [T, D]."""
    checks.rmsnorm(x, w)
    out = common.empty(x.shape, np.float32)
    run = _rmsnorm_parallel if x.size >= common.PARALLEL_MIN_ELEMENTS else _rmsnorm_serial
    run(x, w, float(eps), out)
    return out


# ---------------------------------------------------------------- rope

def _rope(x, positions, cos, sin, out):
    bad = _first_out_of_range(positions, cos.shape[0])
    if bad < 0:
        for t in prange(x.shape[0]):
            pos = positions[t]
            for h in range(x.shape[1]):
                rows.rope_head(x, cos, sin, pos, out, t, h, 0, 1)
    return bad


# Without fast-math, as always: each product of a * c - b * s is rounded on its own (no fused multiply-add).
_rope_serial, _rope_parallel = serial_and_parallel(_rope)


def rope(x: np.ndarray, positions: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding, Hugging Face rotate-half layout.  x [T, H, hd] -> new [T, H, hd].

    cos, sin [P, hd // 2] from `rope_tables`; positions [T] int32, each < P.
    """
    checks.rope(x, positions, cos, sin)
    out = common.empty(x.shape, np.float32)
    run = _rope_parallel if x.size >= common.PARALLEL_MIN_ELEMENTS else _rope_serial
    bad = run(x, positions, cos, sin, out)
    if bad >= 0:
        raise checks.index_error(checks.BAD_POSITION, bad, positions[bad], cos.shape[0])
    return out


# ---------------------------------------------------------------- silu_mul

def _silu_mul(gate_up, out):
    for t in prange(gate_up.shape[0]):
        rows.silu_mul_row(gate_up, out, t, 0, 1)


# Both twins run as SIMD code because they use numpy's error model (see
# serial_and_parallel): with numba's default one, every `/` of the sigmoid is
# checked for a zero divisor, and that branch kept the serial loop scalar.
_silu_mul_serial, _silu_mul_parallel = serial_and_parallel(_silu_mul, fastmath=FAST)


@numba.njit(cache=True)
def run_silu_mul(gate_up):
    """silu_mul into a new array, the threads only for large inputs (`serial_and_parallel`)."""
    out = common.new_rows(gate_up.shape[0], gate_up.shape[1] // 2)
    if gate_up.size >= common.PARALLEL_MIN_ELEMENTS:
        _silu_mul_parallel(gate_up, out)
    else:
        _silu_mul_serial(gate_up, out)
    return out


def silu_mul(gate_up: np.ndarray) -> np.ndarray:
    """SwiGLU activation: gate_up [T, 2F] -> new [T, F], silu(gate) * up."""
    checks.silu_mul(gate_up)
    return run_silu_mul(gate_up)


# ---------------------------------------------------------------- add

def _add(x, y, out):
    for i in prange(x.shape[0]):
        rows.add(x, y, out, i)


_add_serial, _add_parallel = serial_and_parallel(_add)


def add(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x + y for two arrays of the same shape (any rank) -> new array."""
    checks.add(x, y)
    out = common.empty(x.shape, np.float32)
    run = _add_parallel if x.size >= common.PARALLEL_MIN_ELEMENTS else _add_serial
    run(x.reshape(-1), y.reshape(-1), out.reshape(-1))
    return out


# ---------------------------------------------------------------- add_rmsnorm

def _add_rmsnorm(x, y, w, eps, s, out):
    for t in prange(x.shape[0]):
        for d in range(x.shape[1]):
            rows.add(x[t], y[t], s[t], d)
        inv_rms = rows.rmsnorm_inv_rms(rows.rmsnorm_sum_squares(s, t, 0, 1), s.shape[1], eps)
        rows.rmsnorm_scale(s, w, inv_rms, out, t, 0, 1)


# Fast-math as `_rmsnorm` (for the sum of squares); a lone addition has nothing
# to reassociate or contract with, so s has the bits of `add`.
_add_rmsnorm_serial, _add_rmsnorm_parallel = serial_and_parallel(_add_rmsnorm, fastmath=FAST)


@numba.njit(cache=True)
def run_add_rmsnorm(x, y, w, eps):
    """add_rmsnorm into two new arrays, the threads only for large inputs."""
    s = common.new_rows(x.shape[0], x.shape[1])
    out = common.new_rows(x.shape[0], x.shape[1])
    if x.size >= common.PARALLEL_MIN_ELEMENTS:
        _add_rmsnorm_parallel(x, y, w, eps, s, out)
    else:
        _add_rmsnorm_serial(x, y, w, eps, s, out)
    return s, out


def add_rmsnorm(x: np.ndarray, y: np.ndarray, w: np.ndarray, eps: float) -> tuple[np.ndarray, np.ndarray]:
    """(s, rmsnorm(s, w, eps)) with s = x + y, in one pass over the rows.  x, y [T, D], w [D]."""
    checks.add(x, y)
    checks.rmsnorm(x, w)
    return run_add_rmsnorm(x, y, w, float(eps))
