"""Bodies of the row-wise operators: rmsnorm, rope, silu_mul, add, and split_qkv's copy.

A row-wise operator reads row t of its input and writes row t of its output.
Bodies that walk a row take `lane, lanes` and do the elements lane,
lane + lanes, ... (see the package docstring): a CPU thread passes (0, 1),
the threads of a GPU block pass their index and their number. `silu_mul`
and `add` are single elements, which each device's loop hands out.
"""

from __future__ import annotations

import math

import numpy as np

from .expf import exp_nonpositive


# ---------------------------------------------------------------- rmsnorm
#
#   out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w
#
# in two steps around one sum: each lane adds up the squares of its elements
# (`rmsnorm_sum_squares`); the device adds the lanes' sums together (a CPU
# thread has one lane, a GPU block reduces); then every lane scales its
# elements (`rmsnorm_scale`) by `inv_rms` of the total.

def rmsnorm_sum_squares(x, t, lane, lanes):
    """Sum of x[t, i]^2 over this lane's elements, in float64."""
    total = 0.0
    for i in range(lane, x.shape[1], lanes):
        v = np.float64(x[t, i])
        total += v * v
    return total


def rmsnorm_inv_rms(sum_squares, D, eps):
    """1 / sqrt(mean of the squares + eps) for a row of D elements."""
    return 1.0 / math.sqrt(sum_squares / max(D, 1) + eps)


def rmsnorm_scale(x, w, inv_rms, out, t, lane, lanes):
    """out[t, i] = x[t, i] * inv_rms * w[i] for this lane's elements."""
    for i in range(lane, x.shape[1], lanes):
        out[t, i] = x[t, i] * inv_rms * w[i]


# ---------------------------------------------------------------- rope
#
# Rotary embedding, Hugging Face rotate-half layout: element i of a head pairs
# with element i + hd/2, and the pair is rotated by the angle of frequency i at
# the row's position. The caller checks that `pos` is a row of the tables.

def rope_head(x, cos, sin, pos, out, t, h, lane, lanes):
    """Rotate head h of row t (x, out [T, H, hd]) by the angles of position pos
    (cos, sin [P, hd/2]): this lane's pairs (i, i + hd/2)."""
    half = x.shape[2] // 2
    for i in range(lane, half, lanes):
        c = cos[pos, i]
        s = sin[pos, i]
        a = x[t, h, i]             # first half
        b = x[t, h, i + half]      # second half
        out[t, h, i] = a * c - b * s
        out[t, h, i + half] = b * c + a * s


# ---------------------------------------------------------------- silu_mul

def silu_mul(g, u):
    """silu(g) * u = g * sigmoid(g) * u for float32 g, u, in float32.

    sigmoid(g) comes from e = exp(-|g|) <= 1, which cannot overflow:
    1 / (1 + e) for g >= 0 and e / (1 + e) for g < 0. Both sides are
    computed and one is selected, with the exp of expf.py, so that a CPU
    loop over elements can become SIMD code (see cpu/pointwise.py). A NaN
    in g or u gives NaN.
    """
    one = np.float32(1.0)              # keeps the arithmetic in float32
    e = exp_nonpositive(-abs(g))
    sig = (one if g >= 0 else e) / (one + e)
    return g * sig * u


def silu_mul_row(gate_up, out, t, lane, lanes):
    """out[t, i] = silu_mul(gate_up[t, i], gate_up[t, F + i]) for this lane's i < F.

    gate_up [T, 2F] holds the gates then the ups; out [T, F].
    """
    F = out.shape[1]
    for i in range(lane, F, lanes):
        out[t, i] = silu_mul(gate_up[t, i], gate_up[t, F + i])


# ---------------------------------------------------------------- add

def add(x, y, out, i):
    """out[i] = x[i] + y[i] for flat arrays (any array, seen as one row)."""
    out[i] = x[i] + y[i]


# ---------------------------------------------------------------- split_qkv

def copy_columns(src, t, first, dst, lane, lanes):
    """dst[t, j] = src[t, first + j] for this lane's columns j of dst (both 2-D).

    split_qkv copies each row of qkv [T, (H + 2 Hkv) hd] into q, k and v,
    seen as [T, H hd] and [T, Hkv hd], with three calls.
    """
    for j in range(lane, dst.shape[1], lanes):
        dst[t, j] = src[t, first + j]
