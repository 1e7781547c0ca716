"""How the KV cache stores a number: float32, float16 or int8 with a scale.

The cache is the largest thing a long conversation keeps in memory, so it can
be stored narrower than the float32 the model computes in. `store_kv` narrows
each key and value on the way in, `attention` widens them back to float32 as
it reads them; nothing else in the engine sees the storage format.

  fp32  4 bytes a number, stored as is.
  fp16  2 bytes: the nearest float16 (ties to even), exactly as numpy's
        astype(np.float16). Numba cannot compute with float16 on the CPU, so
        the kernels see a float16 cache as its raw bits (a uint16 view of the
        same memory) and convert with the integer arithmetic below.
  int8  1 byte, plus one float32 scale per token per kv head (4 bytes per
        head_dim numbers: 1.06 bytes a number at head_dim 64). The head_dim
        numbers x of one token's head are stored as q = round(x / s), with
        s = max|x| / 127, so q lies in [-127, 127] and x ~ q * s within s / 2.
        A head of zeros gets s = 0 and q = 0; a head holding NaN or inf gets
        s = NaN, so whatever reads it turns NaN instead of silently finite.

`widen` and `narrow` turn one stored element into float32 and back for the
float formats; `quantize_head` does a whole head for int8, because its scale
depends on every number of the head. `kernel_arrays` checks what a caller
passed and hands the kernels arrays they can read (float16 as uint16 bits).
The numpy specification of all three is `xllm.ops.reference.store_kv`.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import types
from numba import prange
from numba.extending import overload

from . import common
from .common import first_out_of_range as _first_out_of_range

# The storage dtypes by name, and the bytes one token's keys or values take
# in one layer: head_dim numbers of the dtype per kv head, plus a float32
# scale per kv head for int8.
KV_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}


def kv_dtype_name(dtype) -> str:
    """The name ("fp32", "fp16", "int8") of a cache array's dtype."""
    for name, d in KV_DTYPES.items():
        if np.dtype(dtype) == d:
            return name
    raise ValueError(f"KV cache dtype {np.dtype(dtype)} is not one of float32, float16, int8")


# ---------------------------------------------------------------- float16 as bits
#
# A float16 is 1 sign bit, 5 exponent bits (bias 15) and 10 mantissa bits; a
# float32 is 1, 8 (bias 127) and 23. Moving a normal number from one to the
# other is a shift of the mantissa by 13 bits and a change of exponent bias
# by 127 - 15 = 112. The special cases are the ends of the exponent range:
# exponent 0 (zero and subnormals, no implicit leading 1) and exponent all
# ones (inf when the mantissa is 0, NaN otherwise).

F16_MIN_NORMAL_AS_F32 = 0x38800000     # 2^-14, the smallest normal float16, as float32 bits
F16_OVERFLOW_AS_F32 = 0x477FF000       # 65520, halfway from 65504 (the largest float16) to 65536


@numba.njit(cache=True)
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


@numba.njit(cache=True)
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


# ---------------------------------------------------------------- one element, by storage type

def widen(x):
    """The float32 value of one stored cache element.

    A float32 or int8 element converts as a number (int8 still needs its scale,
    which the caller applies); a uint16 element is the bits of a float16.
    In compiled code the choice is made once, by the element's type.
    """
    if isinstance(x, np.uint16):
        return f16_bits_to_f32(x)
    return np.float32(x)


@overload(widen)
def _widen_compiled(x):
    if x == types.uint16:
        return lambda x: f16_bits_to_f32(x)
    return lambda x: np.float32(x)


def narrow(x, cache):
    """Float32 x as an element of the float cache `cache` (float32, or uint16 float16 bits)."""
    if cache.dtype == np.uint16:
        return f32_to_f16_bits(x)
    return np.float32(x)


@overload(narrow)
def _narrow_compiled(x, cache):
    if cache.dtype == types.uint16:
        return lambda x, cache: f32_to_f16_bits(x)
    return lambda x, cache: np.float32(x)


# ---------------------------------------------------------------- one head, int8

@numba.njit(cache=True)
def quantize_head(x, t, h, q_cache, scales, slot):
    """Store head h of row t of x [T, Hkv, hd] into q_cache[slot, h] (int8)
    and its scale into scales[slot, h]: s = max|x| / 127, q = round(x / s).

    round() is to nearest, ties to even (np.rint), and the result is clipped
    to [-127, 127] in case x / s rounds a hair above 127. The division is
    written as a division, as in the specification: x * (1 / s) may round
    differently.
    """
    hd = x.shape[2]
    amax = np.float32(0.0)
    finite = True
    for d in range(hd):
        a = abs(x[t, h, d])
        if not math.isfinite(a):
            finite = False
        elif a > amax:
            amax = a
    s = amax / np.float32(127.0)
    if not finite or s == 0:
        # NaN or inf anywhere: the scale is NaN, so every read of this head is
        # NaN. All zeros (or so tiny that max / 127 is 0): zeros, scale 0.
        scales[slot, h] = np.float32(np.nan) if not finite else np.float32(0.0)
        for d in range(hd):
            q_cache[slot, h, d] = 0
        return
    scales[slot, h] = s
    for d in range(hd):
        r = np.rint(x[t, h, d] / s)
        q_cache[slot, h, d] = np.int8(min(max(r, np.float32(-127.0)), np.float32(127.0)))


@numba.njit(cache=True)
def store_head(x, t, h, cache, scales, slot):
    """cache[slot, h] = head h of row t of x, in the cache's storage format.

    `scales` is None for float caches, so the compiler keeps only one branch.
    """
    if scales is None:
        for d in range(x.shape[2]):
            cache[slot, h, d] = narrow(x[t, h, d], cache)
    else:
        quantize_head(x, t, h, cache, scales, slot)


# ---------------------------------------------------------------- checking the caller's arrays

def kernel_arrays(op: str, k_cache: np.ndarray, v_cache: np.ndarray, k_scale, v_scale):
    """Check a key/value cache pair and its scales; return (k, v) as the kernels read them.

    Float32 and int8 caches pass unchanged, float16 ones as uint16 views of
    the same memory (see the module docstring). int8 caches need k_scale and
    v_scale, float32 [S, Hkv]; float caches take none.
    """
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{op}: k_cache and v_cache have different dtypes, {k_cache.dtype} and {v_cache.dtype}")
    name = kv_dtype_name(k_cache.dtype)
    if name == "int8":
        if k_scale is None or v_scale is None:
            raise ValueError(f"{op}: an int8 KV cache needs k_scale and v_scale")
        want = k_cache.shape[:2]
        for what, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s.dtype != np.float32 or s.shape != want:
                raise ValueError(f"{op}: {what} must be float32 {want}, got {s.dtype} {s.shape}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"{op}: k_scale and v_scale are for int8 caches, not {name}")
    if name == "fp16":
        return k_cache.view(np.uint16), v_cache.view(np.uint16)
    return k_cache, v_cache


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
    run = _store_kv_parallel if k.size >= common.PARALLEL_MIN_ELEMENTS else _store_kv_serial
    bad = run(k, v, kc, vc, k_scale, v_scale, slot_mapping)
    if bad >= 0:
        raise ValueError(f"store_kv: slot_mapping[{bad}] = {slot_mapping[bad]} is not a slot of the "
                         f"{k_cache.shape[0]}-slot cache")


