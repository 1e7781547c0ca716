"""How the KV cache stores a number: float32, float16 or int8 with a scale.

The cache is the largest thing a long conversation keeps in memory, so it can
be stored narrower than the float32 the model computes in. `store_kv` narrows
each key and value on the way in, `attention` widens them back to float32 as
it reads them (`f16.widen`); nothing else in the engine sees the format.

  fp32  4 bytes a number, stored as is.
  fp16  2 bytes: the nearest float16 (ties to even), exactly as numpy's
        astype(np.float16). The kernels see a float16 cache as its raw bits,
        a uint16 view of the same memory (`checks.kv_caches`), and convert
        with the integer arithmetic of f16.py.
  int8  1 byte, plus one float32 scale per token per kv head (4 bytes per
        head_dim numbers: 1.06 bytes a number at head_dim 64). The head_dim
        numbers x of one token's head are stored as q = round(x / s), with
        s = max|x| / 127, so q lies in [-127, 127] and x ~ q * s within s / 2.
        A head of zeros gets s = 0 and q = 0; a head holding NaN or inf gets
        s = NaN, so whatever reads it turns NaN instead of silently finite.

A float head is stored element by element (`store_float_head`). An int8 head
needs its largest |x| before any element can be stored, so it takes three
steps: each lane finds the largest |x| of its elements (`head_amax`), the
device combines the lanes' values (a CPU thread has one lane, a GPU block
takes the maximum across its threads), and every lane stores its elements
with the scale of the total (`int8_scale`, `store_int8_head`).
The numpy specification is `xllm.ops.reference.store_kv`.
"""

from __future__ import annotations

import math

import numpy as np

from .f16 import f32_to_f16_bits

f32 = np.float32


# ---------------------------------------------------------------- float caches

def narrow(x, like):
    """Float32 x as an element of a float cache whose elements are like `like`:
    the bits of the nearest float16 for a uint16 (float16) cache, else x."""
    if isinstance(like, np.uint16):
        return f32_to_f16_bits(x)
    return f32(x)


def store_float_head(x, t, h, cache, slot, lane, lanes):
    """cache[slot, h, d] = x[t, h, d] narrowed to the cache's format, for this lane's d.

    x [T, Hkv, hd] float32; cache [S, Hkv, hd] float32 or uint16 (float16 bits).
    """
    for d in range(lane, x.shape[2], lanes):
        # The element being replaced is passed for its type only (the compilers drop the read).
        cache[slot, h, d] = narrow(x[t, h, d], cache[slot, h, d])


# ---------------------------------------------------------------- int8 caches

def head_amax(x, t, h, lane, lanes):
    """The largest |x[t, h, d]| over this lane's d, or inf when one of them is NaN or inf.

    (The maximum over lanes is then inf exactly when the head holds NaN or inf.)
    """
    amax = f32(0.0)
    for d in range(lane, x.shape[2], lanes):
        a = abs(x[t, h, d])
        if not math.isfinite(a):
            a = f32(np.inf)
        amax = max(amax, a)
    return amax


def int8_scale(amax):
    """The scale of a head whose largest |x| is amax (see head_amax): amax / 127
    in float32, 0 for a head of zeros (or one so tiny that amax / 127 is 0),
    NaN for a head holding NaN or inf."""
    s = amax / f32(127.0)
    return s if math.isfinite(s) else f32(np.nan)


def int8_quantize(x, s):
    """round(x / s) clipped to [-127, 127] as an int8; 0 when s is 0 or NaN.

    round() is to nearest, ties to even (as np.rint), and the clip catches an
    x / s that rounds a hair above 127. The division is written as a
    division, as in the specification: x * (1 / s) may round differently.
    """
    if not s > 0:
        return np.int8(0)
    return np.int8(min(max(round(x / s), -127), 127))


def store_int8_head(x, t, h, q_cache, scales, slot, s, lane, lanes):
    """q_cache[slot, h, d] = int8_quantize(x[t, h, d], s) for this lane's d;
    lane 0 also writes the scale, scales[slot, h] = s.

    x [T, Hkv, hd] float32; q_cache [S, Hkv, hd] int8; scales [S, Hkv] float32;
    s = int8_scale(largest head_amax of all lanes).
    """
    if lane == 0:
        scales[slot, h] = s
    for d in range(lane, x.shape[2], lanes):
        q_cache[slot, h, d] = int8_quantize(x[t, h, d], s)


# ---------------------------------------------------------------- one thread, any format

def store_head(x, t, h, cache, scales, slot):
    """cache[slot, h] = head h of row t of x in the cache's format, by one thread (the CPU's way).

    `scales` is None for float caches (the compiler keeps one branch), the
    int8 cache's scales [S, Hkv] otherwise.
    """
    if scales is None:
        store_float_head(x, t, h, cache, slot, 0, 1)
    else:
        store_int8_head(x, t, h, cache, scales, slot, int8_scale(head_amax(x, t, h, 0, 1)), 0, 1)
