"""Bodies of the integer path of linear: integer activations times int8 or 4-bit weights.

`reference.quantize_activations` and `reference.linear_int` are the
specification. In short: each block of a token's x becomes integers qx and
one scale dx (int16 per 32 values for the GGUF formats, int8 per whole row
for w8a8), and a weight block's dot product with it is a sum of integer
products, exact in int32, scaled once:

    q8_0, w8a8   dx * dw * sum_j qx[j] qw[j]
    q4_0, q4_1   dx * (dw * sum_j qx[j] qw[j]  +  o * c * sum_j qx[j])

with o, c as in qblock.py (q4_1: o = m, c = 1; q4_0: o = d, c = -8, since
d * (q - 8) = d * q - 8 d).

Why integers: decode reads every weight once per token, and a float kernel
spends more time turning each int8 into a float than reading it (cpu/qmatmul.py).
Multiplying small integers into int32 is what the CPU's SIMD units do best:
`vpmovsxbw` widens 32 int8 to 16-bit lanes and `vpmaddwd` multiplies 16-bit
pairs and adds them into 32-bit lanes, 16 products per instruction
(cpu/simd.py). Since the lanes are 16 bits wide anyway, int16 activations
cost no more than int8 ones, and they are 256 times finer.

Numba computes integer arithmetic in 64 bits. Writing a running sum as

    s = i32(s + i32(a) * i32(b))

truncates every step back to 32 bits, which is what the int32 accumulation
of the specification means. The sums cannot overflow: a block's sum is at
most 32 * 32767 * 128 (int16 x, blocks of 32) or 127 * 128 * K (int8 x,
w8a8 rows of K values, up to 132,000).
"""

from __future__ import annotations

import numpy as np

f32 = np.float32
i32 = np.int32
_TINY = f32(np.finfo(np.float32).tiny)     # the smallest normal float32
_MAX = f32(np.finfo(np.float32).max)       # the largest finite float32


# ---------------------------------------------------------------- quantizing a token's activations

def block_scale(x, k0, n, qmax):
    """(d, inv) for the block x[k0 : k0 + n]: d = max|x| / qmax and inv = 1 / d.

    The caller must compile this without fast-math: with it, LLVM may turn
    x * (1 / d) into x / d, which rounds differently (a tie of rint then
    goes the other way), and the specification's q would not be repeated.

    As `reference.quantize_activations`: d = inv = 0 for a block too small
    for a normal d; d = NaN for a block holding a NaN or an infinity, so that
    every product with the block is NaN. (The test for those is a comparison,
    which NaN fails: arithmetic such as x - x would not do, as the kernels'
    fast-math flags let LLVM reassociate (b + x) - x into b.)
    """
    amax = f32(0.0)
    bad = False
    for j in range(n):
        a = abs(x[k0 + j])
        if a > amax:
            amax = a
        if not a <= _MAX:
            bad = True
    d = amax / qmax
    inv = f32(0.0)
    if d >= _TINY:
        inv = f32(1.0) / d
    else:
        d = f32(0.0)
    if bad:
        d = f32(np.nan)
        inv = f32(0.0)
    return d, inv


def quantize_row(x, qmax, xq, xd, xsum, b0, step):
    """Token x [K] as integer blocks b = b0, b0 + step, ...: xq [nb, bs], xd float32 [nb] (bs = K / nb).

    xq is int8 (qmax = 127) or int16 (qmax = 32767). q = rint(x * inv),
    rounding half to even; xsum[b] (int32) is the sum of block b's q (the
    4-bit formats need it). A NaN block's q are 0 (its d already makes every
    result NaN).
    """
    bs = xq.shape[1]
    for b in range(b0, xq.shape[0], step):
        d, inv = block_scale(x, b * bs, bs, qmax)
        s = i32(0)
        for j in range(bs):
            v = x[b * bs + j] * inv
            q = i32(np.rint(v)) if v == v else i32(0)
            xq[b, j] = q
            s = i32(s + q)
        xd[b] = d
        xsum[b] = s


# ---------------------------------------------------------------- integer dot products, four rows at once
#
# As in qblock.py, four weight rows share each load of x (the rows of
# qblock.group4: a quarter of the matrix apart, so each is a sequential
# stream). The CPU runs the same arithmetic through cpu/simd.py, whose
# accumulators keep 16 lanes (so its float sums are added in another order);
# these bodies are what it computes, written plainly, and what runs when
# numba is off (NUMBA_DISABLE_JIT=1).

def idot4_q8(xq, xd, qs, d, n0, n1, n2, n3, b0, step):
    """Part of x . row n for the rows n0..n3 of a q8_0 or w8a8 matrix: blocks b0, b0 + step, ...

    xq [nb, bs], xd [nb]: the token from `quantize_row`; qs int8 [N, nb, bs], d [N, nb].
    """
    nb, bs = qs.shape[1], qs.shape[2]
    a0 = f32(0.0); a1 = f32(0.0); a2 = f32(0.0); a3 = f32(0.0)
    for b in range(b0, nb, step):
        s0 = i32(0); s1 = i32(0); s2 = i32(0); s3 = i32(0)
        for j in range(bs):
            xv = i32(xq[b, j])
            s0 = i32(s0 + i32(qs[n0, b, j]) * xv)
            s1 = i32(s1 + i32(qs[n1, b, j]) * xv)
            s2 = i32(s2 + i32(qs[n2, b, j]) * xv)
            s3 = i32(s3 + i32(qs[n3, b, j]) * xv)
        xdb = xd[b]
        a0 += d[n0, b] * xdb * f32(s0)
        a1 += d[n1, b] * xdb * f32(s1)
        a2 += d[n2, b] * xdb * f32(s2)
        a3 += d[n3, b] * xdb * f32(s3)
    return a0, a1, a2, a3


def idot4_q4(xq, xd, xsum, qs, d, o, c, n0, n1, n2, n3, b0, step):
    """Part of x . row n for the rows n0..n3 of a q4_0/q4_1 matrix: blocks b0, b0 + step, ...

    The token comes from `quantize_row` (blocks of 32); qs uint8 [N, nb, 16]:
    the low nibble of byte j is value j, the high nibble value j + 16.
    """
    nb, half = qs.shape[1], qs.shape[2]
    a0 = f32(0.0); a1 = f32(0.0); a2 = f32(0.0); a3 = f32(0.0)
    for b in range(b0, nb, step):
        s0 = i32(0); s1 = i32(0); s2 = i32(0); s3 = i32(0)
        for j in range(half):
            xl = i32(xq[b, j])
            xh = i32(xq[b, 16 + j])
            q0 = i32(qs[n0, b, j]); q1 = i32(qs[n1, b, j]); q2 = i32(qs[n2, b, j]); q3 = i32(qs[n3, b, j])
            s0 = i32(s0 + (q0 & 15) * xl + (q0 >> 4) * xh)
            s1 = i32(s1 + (q1 & 15) * xl + (q1 >> 4) * xh)
            s2 = i32(s2 + (q2 & 15) * xl + (q2 >> 4) * xh)
            s3 = i32(s3 + (q3 & 15) * xl + (q3 >> 4) * xh)
        xdb = xd[b]
        xs = f32(xsum[b]) * f32(c)
        a0 += xdb * (d[n0, b] * f32(s0) + o[n0, b] * xs)
        a1 += xdb * (d[n1, b] * f32(s1) + o[n1, b] * xs)
        a2 += xdb * (d[n2, b] * f32(s2) + o[n2, b] * xs)
        a3 += xdb * (d[n3, b] * f32(s3) + o[n3, b] * xs)
    return a0, a1, a2, a3
