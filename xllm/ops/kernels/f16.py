"""float16 <-> float32 by integer arithmetic on the bits, exactly as numpy converts.

Numba cannot compute with float16 on the CPU, so a float16 array (a KV cache
stored in fp16, an fp16 weight matrix) reaches the kernels as its raw bits, a
uint16 view of the same memory, and these two bodies convert one number at a
time. They are plain integer arithmetic, so the same functions compile for
the GPU too, where they give the same results bit for bit.
"""

from __future__ import annotations

import numpy as np

# A float16 is 1 sign bit, 5 exponent bits (bias 15) and 10 mantissa bits; a
# float32 is 1, 8 (bias 127) and 23. Moving a normal number from one to the
# other is a shift of the mantissa by 13 bits and a change of exponent bias
# by 127 - 15 = 112. The special cases are the ends of the exponent range:
# exponent 0 (zero and subnormals, no implicit leading 1) and exponent all
# ones (inf when the mantissa is 0, NaN otherwise).

F16_MIN_NORMAL_AS_F32 = 0x38800000     # 2^-14, the smallest normal float16, as float32 bits
F16_OVERFLOW_AS_F32 = 0x477FF000       # 65520, halfway from 65504 (the largest float16) to 65536


def f32_to_f16_bits(x):
    """The bits (uint16) of the float16 nearest to float32 x, ties to even.

    Equal to np.float32(x).astype(np.float16).view(np.uint16) for every x,
    NaN payloads included.
    """
    a = np.int64(np.float32(x).view(np.uint32))
    sign = (a >> 16) & 0x8000
    a = a & 0x7FFFFFFF                                  # |x|, as bits
    if a > 0x7F800000:
        # NaN: keep the top 10 payload bits, but never all zero (that is inf).
        return np.uint16(sign | 0x7C00 | max((a & 0x7FFFFF) >> 13, 1))
    if a >= F16_OVERFLOW_AS_F32:
        return np.uint16(sign | 0x7C00)                 # too large (or inf): inf
    if a >= F16_MIN_NORMAL_AS_F32:
        # A normal float16: re-bias the exponent, then drop 13 mantissa bits,
        # rounding to nearest with ties to even. Adding 0xFFF rounds up exactly
        # when the dropped bits exceed half (0x1000); at exactly half the kept
        # lowest bit decides. A carry out of the mantissa correctly bumps the
        # exponent (and cannot reach inf: that case returned above).
        a -= 112 << 23
        a += 0xFFF + ((a >> 13) & 1)
        return np.uint16(sign | (a >> 13))
    # A subnormal float16 (or zero): it counts units of 2^-24. |x| is
    # mant * 2^(exp - 150), so the count is mant * 2^(exp - 126): mant shifted
    # right by 126 - exp bits, rounded to nearest, ties to even. Below
    # exponent 102 (|x| < 2^-25, less than half a unit) the count is 0.
    exp = a >> 23
    if exp < 102:
        return np.uint16(sign)
    mant = (a & 0x7FFFFF) | 0x800000                    # with the implicit leading 1
    shift = 126 - exp                                   # 14 .. 24
    units = mant >> shift
    rest = mant & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    if rest > half or (rest == half and (units & 1) == 1):
        units += 1                                      # 1024 = 0x400 is the smallest normal: still right
    return np.uint16(sign | units)


def f16_bits_to_f32(h):
    """The float32 value of the float16 whose bits are h (uint16); exact.

    Equal to np.uint16(h).view(np.float16).astype(np.float32) for every h,
    NaN payloads included.
    """
    h = np.int64(h)
    em = h & 0x7FFF                                     # exponent and mantissa
    if em >= 0x0400:
        # Normal, inf or NaN: move the bits into place and re-bias the
        # exponent; exponent 31 (inf, NaN) must become 255, 112 more again.
        bits = (em << 13) + (112 << 23)
        if em >= 0x7C00:
            bits += 112 << 23
        value = np.uint32(bits).view(np.float32)
    else:
        # Zero or subnormal: em units of 2^-24, a product float32 holds exactly.
        value = np.float32(em) * np.float32(2.0 ** -24)
    if h & 0x8000:
        value = -value
    return value


def widen(x):
    """The float32 value of one stored element: a uint16 is the bits of a
    float16, anything else (float32, int8, uint8) converts as a number.

    The test is on the element's type, so a compiler keeps one branch.
    """
    if isinstance(x, np.uint16):
        return f16_bits_to_f32(x)
    return np.float32(x)
