"""exp(x) for x <= 0 in float32, written so that LLVM can vectorize it.

`math.exp` compiles to a call into the C library, one number at a time, and
a loop containing a call cannot become SIMD code. Softmax and SiLU call exp
once per score or activation, so that call was a large part of both. The
function below uses only arithmetic, comparisons and bit operations; inside
a loop LLVM turns it into AVX2 code that computes eight exps at once.

The method (the classic one of the Cephes library):

  1. Split x = n * ln2 + r with n = round(x / ln2), so |r| <= ln2 / 2.
     (The rounding is floor(x / ln2 + 1/2) through a conversion to int32,
     which both SIMD units and GPUs do in one instruction; numpy's floor
     has no GPU version.)
  2. exp(r) = 1 + r + r^2 * P(r), P a degree-5 polynomial fitted on that
     interval.
  3. exp(x) = exp(r) * 2^n, where 2^n is built directly as float32 bits:
     exponent field n + 127, mantissa 0.

Only x <= 0 is needed (softmax computes exp(s - max), SiLU exp(-|g|)), so
the result is at most 1 and never overflows. Below -87 the true value is
under 2^-126, the smallest normal float32; the result is then 0. NaN in
gives NaN out.

Accuracy: n * ln2 is subtracted in two parts, as Cephes does: LN2_HI has
so few significant bits that n * LN2_HI is exact, and LN2_LO carries the
rest of ln2. Computed as written (on a GPU, in the CUDA simulator, with
NUMBA_DISABLE_JIT=1) the error is under 1e-7 relative. Under the CPU
kernels' fast-math flags LLVM merges the two parts back into one float32
ln2, which is off by 1.9e-9, so r is off by up to |n| times that: about 1
unit in the last place (ulp) of float32 for x > -10, up to 4.5 ulp (3e-7
relative) near -87. Softmax and SiLU need far less: a term of exp(-87) is
1e-38 of the largest one. tests/test_ops_pointwise.py checks both bounds
against numpy.
"""

from __future__ import annotations

import numpy as np

f32 = np.float32

LOG2E = f32(1.4426950408889634)
LN2_HI = f32(0.693359375)          # ln2 to 10 bits: n * LN2_HI is exact for |n| <= 2^13
LN2_LO = f32(-2.12194440e-4)       # ln2 - LN2_HI
P0, P1, P2 = f32(1.9875691500e-4), f32(1.3981999507e-3), f32(8.3334519073e-3)
P3, P4, P5 = f32(4.1665795894e-2), f32(1.6666665459e-1), f32(5.0000001201e-1)
SMALLEST = f32(-87.0)               # exp(-87) ~ 1.6e-38, just above 2^-126


def exp_nonpositive(x):
    """exp(x) for float32 x <= 0 (0 below -87; NaN stays NaN)."""
    xc = SMALLEST if x < SMALLEST else x            # the result is 0 there anyway; no overflow below (NaN stays)
    y = xc * LOG2E + f32(0.5)
    y = y if y > f32(-126.0) else f32(-126.0)      # keeps 2^n normal and NaN out of the int
    n = f32(np.int32(y))                           # y rounded toward zero ...
    n = n - f32(1.0) if n > y else n               # ... then down: n = floor(y), the nearest integer to x / ln2
    r = (xc - n * LN2_HI) - n * LN2_LO              # |r| <= ln2 / 2
    p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
    e_r = f32(1.0) + (r + p * (r * r))              # exp(r)
    two_n = np.int32((np.int32(n) + 127) << 23).view(np.float32)
    return f32(0.0) if x < SMALLEST else e_r * two_n
