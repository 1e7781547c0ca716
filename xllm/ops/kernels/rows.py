"""Bodies of the row-wise operators: rmsnorm (and, below, the others of pointwise).

A row-wise operator reads row t of its input and writes row t of its output.
Bodies that walk a row take `lane, lanes` and do the elements lane,
lane + lanes, ... (see the package docstring): a CPU thread passes (0, 1),
the threads of a GPU block pass their index and their number.
"""

from __future__ import annotations

import math

import numpy as np


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
