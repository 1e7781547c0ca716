"""Bodies of linear and embedding: a weight row, in every format, as float32 numbers.

The formats are those of xllm/weights.py. The kernels read them as
`checks.weight_arrays` hands them over:

    f32, f16     w [N, K]: float32, or the uint16 bits of float16 (`f16.widen`
                 turns one element into float32 either way)
    q8_0         qs int8 [N, K/32, 32], d [N, K/32]             value d * q
    q4_0, q4_1   qs uint8 [N, K/32, 16], d, o [N, K/32], c      value d * q + o * c

The 4-bit formats share one form, d * q + o * c: q4_1 is o = m, c = 1, and
q4_0 is o = d, c = -8, since d * (q - 8) = d * q + d * (-8). Byte j of a
4-bit block packs value j (low nibble) and value j + 16 (high nibble).

Every body walks part of a row, so that the threads of a GPU block can share
it: `k0, step` (elements k0, k0 + step, ...) or `b0, step` (blocks b0,
b0 + step, ...). A CPU driver passes (0, 1) and gets the whole row, with the
loops it had before these bodies existed (cpu/qmatmul.py explains why each
loop is written the way it is: SIMD code depends on it).
"""

from __future__ import annotations

import numpy as np

from .f16 import widen

f32 = np.float32


# ---------------------------------------------------------------- float rows (f32, f16)

def dot(x, t, w, n, k0, step):
    """sum of x[t, k] * w[n, k] over k = k0, k0 + step, ... < K, in float32.

    x float32 [T, K]; w float32 or float16 bits [N, K].
    """
    acc = f32(0.0)
    for k in range(k0, x.shape[1], step):
        acc += x[t, k] * widen(w[n, k])
    return acc


def widen_row(w, n, dst, r, k0, step):
    """dst[r, k] = w[n, k] as float32, for k = k0, k0 + step, ... (a copy for float32 w)."""
    for k in range(k0, w.shape[1], step):
        dst[r, k] = widen(w[n, k])


# ---------------------------------------------------------------- dequantizing blocks
#
# These give exactly the numbers of QuantWeight.dequantize(): d * q is exact
# (a float16 scale times a small integer fits in float32), so the only
# rounding is the final "+ o * c", as in numpy. Fused multiply-adds change
# nothing for the same reason.

def dequant_q8(qs, d, n, dst, r, b0, step):
    """dst[r, b] = block b of row n of a q8_0 matrix, for b = b0, b0 + step, ...

    qs int8 [N, K/32, 32]; dst float32 [R, K/32, 32].
    """
    for b in range(b0, qs.shape[1], step):
        db = d[n, b]
        for j in range(qs.shape[2]):
            dst[r, b, j] = db * f32(qs[n, b, j])


def dequant_q4(qs, d, o, c, n, dst, r, b0, step):
    """dst[r, b] = block b of row n of a q4_0/q4_1 matrix, for b = b0, b0 + step, ...

    qs uint8 [N, K/32, 16]; dst float32 [R, K/32, 32]. The high nibble is used
    in place, as in `dot4_q4`: (d / 16) * (byte & 0xF0) is d * q_hi exactly
    (d / 16 is exact, and so are both products).
    """
    for b in range(b0, qs.shape[1], step):
        db = d[n, b]
        db16 = db * f32(0.0625)
        ob = o[n, b] * f32(c)
        for j in range(qs.shape[2]):
            byte = qs[n, b, j]
            dst[r, b, j] = db * f32(byte & 0x0F) + ob
            dst[r, b, 16 + j] = db16 * f32(byte & 0xF0) + ob


# ---------------------------------------------------------------- quantized dot products, four rows at once
#
# The scale is the same for the 32 values of a block, so it comes out of the
# block's sum:   x . row n = sum_b d[n,b] * (sum_j q[n,b,j] x[32b+j]) + o[n,b] * c * xsum[b].
# Four rows share each load of x. A row group is four rows a quarter of the
# matrix apart (`group4`); see cpu/qmatmul.py for why.

def group4(g, Q, N):
    """The rows of group g: g, g + Q, g + 2Q, g + 3Q (Q = ceil(N / 4)), clamped to N - 1.

    Rows past the end repeat the last row; `store4` skips their results.
    """
    last = N - 1
    return g, min(g + Q, last), min(g + 2 * Q, last), min(g + 3 * Q, last)


def store4(out, t, N, n0, n1, n2, n3, a0, a1, a2, a3):
    """out[t, row] = result, for the rows of a group that exist (see `group4`)."""
    out[t, n0] = a0
    if n1 < N:
        out[t, n1] = a1
    if n2 < N:
        out[t, n2] = a2
    if n3 < N:
        out[t, n3] = a3


def dot4_q8(xb, qs, d, n0, n1, n2, n3, b0, step):
    """Part of x . row n for the rows n0..n3 of a q8_0 matrix: blocks b0, b0 + step, ...

    xb is the token x as [K/32, 32] (block b is xb[b]); qs int8 [N, K/32, 32].
    """
    nb, bs = qs.shape[1], qs.shape[2]
    a0 = f32(0.0); a1 = f32(0.0); a2 = f32(0.0); a3 = f32(0.0)
    for b in range(b0, nb, step):
        s0 = f32(0.0); s1 = f32(0.0); s2 = f32(0.0); s3 = f32(0.0)
        for j in range(bs):                  # the SIMD loop: int8 -> float32, multiply-add
            xv = xb[b, j]
            s0 += f32(qs[n0, b, j]) * xv
            s1 += f32(qs[n1, b, j]) * xv
            s2 += f32(qs[n2, b, j]) * xv
            s3 += f32(qs[n3, b, j]) * xv
        a0 += d[n0, b] * s0
        a1 += d[n1, b] * s1
        a2 += d[n2, b] * s2
        a3 += d[n3, b] * s3
    return a0, a1, a2, a3


def split_x(x, c, xlo, xhi16, xsum_c, b0, step):
    """Lay out the token x [K] for `dot4_q4`, blocks b0, b0 + step, ...:

    xlo[b, j] = x[32b + j], xhi16[b, j] = x[32b + 16 + j] / 16 (xlo, xhi16
    float32 [K/32, 16]) and xsum_c[b] = c * (sum of block b of x) ([K/32]).
    """
    for b in range(b0, xlo.shape[0], step):
        s = f32(0.0)
        for j in range(16):
            lo = x[32 * b + j]
            hi = x[32 * b + 16 + j]
            xlo[b, j] = lo
            xhi16[b, j] = hi * f32(0.0625)
            s += lo + hi
        xsum_c[b] = c * s


def dot4_q4(xlo, xhi16, xsum_c, qs, d, o, n0, n1, n2, n3, b0, step):
    """Part of x . row n for the rows n0..n3 of a q4_0/q4_1 matrix: blocks b0, b0 + step, ...

    qs uint8 [N, K/32, 16]; the x side comes from `split_x`. `byte & 0xF0` is
    16 * q_hi, which xhi16 = x / 16 undoes exactly.
    """
    nb, half = qs.shape[1], qs.shape[2]
    a0 = f32(0.0); a1 = f32(0.0); a2 = f32(0.0); a3 = f32(0.0)
    for b in range(b0, nb, step):
        s0 = f32(0.0); s1 = f32(0.0); s2 = f32(0.0); s3 = f32(0.0)
        for j in range(half):                # the SIMD loop: unpack two nibbles, two multiply-adds
            xl = xlo[b, j]
            xh = xhi16[b, j]
            q0 = qs[n0, b, j]; q1 = qs[n1, b, j]; q2 = qs[n2, b, j]; q3 = qs[n3, b, j]
            s0 += f32(q0 & 0x0F) * xl + f32(q0 & 0xF0) * xh
            s1 += f32(q1 & 0x0F) * xl + f32(q1 & 0xF0) * xh
            s2 += f32(q2 & 0x0F) * xl + f32(q2 & 0xF0) * xh
            s3 += f32(q3 & 0x0F) * xl + f32(q3 & 0xF0) * xh
        xs = xsum_c[b]
        a0 += d[n0, b] * s0 + o[n0, b] * xs
        a1 += d[n1, b] * s1 + o[n1, b] * xs
        a2 += d[n2, b] * s2 + o[n2, b] * xs
        a3 += d[n3, b] * s3 + o[n3, b] * xs
    return a0, a1, a2, a3
