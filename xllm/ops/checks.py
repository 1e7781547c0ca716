"""Argument checks and error messages shared by every device's operators.

Shapes are checked on the host before any kernel runs, by the functions
below, so a bad call fails the same way on every device. Indices that come
from data (token ids, positions, cache slots, block tables) can only be
checked where the data is: the CPU kernels check them before they touch
memory, the GPU kernels as they go (`xllm/ops/cuda/errors.py`). Both report
a problem as a code from `INDEX_ERRORS` with the offending index, value and
limit, and `index_error` turns that into the one message users see.
"""

from __future__ import annotations

import numpy as np

from ..weights import QuantWeight, weight_format

# ---------------------------------------------------------------- index errors found by kernels

BAD_ID = 1              # embedding: a token id is not a row of the table
BAD_POSITION = 2        # rope: a position is past the cos/sin tables
BAD_SLOT = 3            # store_kv: a slot is not in the cache
BAD_CU_Q = 4            # attention: cu_q is not a valid offsets array
NEGATIVE_POSITION = 5   # attention: a position is negative
PAST_TABLE = 6          # attention: a position needs a block past its block_table row
BAD_BLOCK = 7           # attention: a block_table entry in use is not a block of the cache
BAD_ROW = 8             # logits: a row index is not a row of x

INDEX_ERRORS = {
    BAD_ID: (ValueError, "embedding: ids[{index}] = {value} is not a row of the {limit}-row table"),
    BAD_POSITION: (ValueError, "rope: positions[{index}] = {value} is outside the {limit}-position tables"),
    BAD_SLOT: (ValueError, "store_kv: slot_mapping[{index}] = {value} is not a slot of the {limit}-slot cache"),
    BAD_CU_Q: (ValueError, "attention: cu_q must start at 0, never decrease, and end at the number of "
                           "query rows (at index {index})"),
    NEGATIVE_POSITION: (ValueError, "attention: a position is negative (at index {index})"),
    PAST_TABLE: (ValueError, "attention: a position needs a block beyond the end of its block_table row "
                             "(at index {index})"),
    BAD_BLOCK: (ValueError, "attention: a block_table entry in use is not a block of the cache (at index {index})"),
    BAD_ROW: (IndexError, "logits: rows[{index}] = {value} is not a row of the {limit}-row x"),
}


def index_error(code: int, index: int, value: int = 0, limit: int = 0) -> Exception:
    """The exception for an index problem a kernel reported (see INDEX_ERRORS)."""
    kind, template = INDEX_ERRORS[int(code)]
    return kind(template.format(index=int(index), value=int(value), limit=int(limit)))


# ---------------------------------------------------------------- shapes

def embedding(table, ids) -> None:
    if len(table.shape) != 2 or len(ids.shape) != 1:
        raise ValueError(f"embedding: need table [V, D] and ids [T], got {tuple(table.shape)} and {tuple(ids.shape)}")


def linear(x, w) -> None:
    if len(x.shape) != 2 or len(w.shape) != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"linear: need x [T, K] and w [N, K], got {tuple(x.shape)} and "
                         f"{tuple(w.shape)} ({weight_format(w)})")


def rmsnorm(x, w) -> None:
    if len(x.shape) != 2 or tuple(w.shape) != tuple(x.shape[1:]):
        raise ValueError(f"rmsnorm: need x [T, D] and w [D], got {tuple(x.shape)} and {tuple(w.shape)}")


def rope(x, positions, cos, sin) -> None:
    if (len(x.shape) != 3 or x.shape[2] % 2 or tuple(cos.shape) != tuple(sin.shape) or len(cos.shape) != 2
            or cos.shape[1] != x.shape[2] // 2 or tuple(positions.shape) != tuple(x.shape[:1])):
        raise ValueError(f"rope: need x [T, H, hd] (hd even), positions [T], cos/sin [P, hd/2], got "
                         f"{tuple(x.shape)}, {tuple(positions.shape)}, {tuple(cos.shape)}, {tuple(sin.shape)}")


def silu_mul(gate_up) -> None:
    if len(gate_up.shape) != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_mul: need gate_up [T, 2F], got {tuple(gate_up.shape)}")


def add(x, y) -> None:
    if tuple(x.shape) != tuple(y.shape):
        raise ValueError(f"add: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")


def split_qkv(qkv, n_heads: int, n_kv_heads: int, head_dim: int) -> None:
    if len(qkv.shape) != 2 or qkv.shape[1] != (n_heads + 2 * n_kv_heads) * head_dim:
        raise ValueError(f"split_qkv: need qkv [T, (H + 2 Hkv) hd] = [T, {(n_heads + 2 * n_kv_heads) * head_dim}], "
                         f"got {tuple(qkv.shape)}")


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    if (len(k.shape) != 3 or tuple(v.shape) != tuple(k.shape) or tuple(k_cache.shape) != tuple(v_cache.shape)
            or len(k_cache.shape) != 3 or tuple(k_cache.shape[1:]) != tuple(k.shape[1:])
            or tuple(slot_mapping.shape) != tuple(k.shape[:1])):
        raise ValueError(f"store_kv: need k, v [T, Hkv, hd], caches [S, Hkv, hd], slot_mapping [T], got "
                         f"{tuple(k.shape)}, {tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}, "
                         f"{tuple(slot_mapping.shape)}")


def attention(q, k_cache, v_cache, block_table, block_size, cu_q, positions) -> None:
    if (len(q.shape) != 3 or len(k_cache.shape) != 3 or tuple(v_cache.shape) != tuple(k_cache.shape)
            or q.shape[2] != k_cache.shape[2] or k_cache.shape[1] == 0 or q.shape[1] % k_cache.shape[1] != 0):
        raise ValueError(f"attention: need q [T, H, hd] and caches [S, Hkv, hd] with H a multiple of Hkv, "
                         f"got q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    if (len(block_table.shape) != 2 or block_table.shape[0] != cu_q.shape[0] - 1
            or tuple(positions.shape) != tuple(q.shape[:1])):
        raise ValueError(f"attention: need block_table [B, MAXB], cu_q [B+1], positions [T], got "
                         f"{tuple(block_table.shape)}, {tuple(cu_q.shape)}, {tuple(positions.shape)} for q {tuple(q.shape)}")
    if block_size < 1:
        raise ValueError(f"attention: block_size must be >= 1, got {block_size}")


# ---------------------------------------------------------------- weights as the kernels read them

_Q4_0_C, _Q4_1_C = np.float32(-8.0), np.float32(1.0)     # c of value = d * q + o * c


def weight_arrays(w) -> tuple:
    """The arrays (and constants) a linear or embedding kernel reads for the weight w.

    Works on numpy and device arrays alike; the formats are those of xllm/weights.py
    (the registry has already accepted w's format, and decode calls this per operator,
    so it asks no more than it must):

        f32           (w,)                  float32 [N, K]
        f16           (w.view(uint16),)     its bits: kernels convert them (kernels/f16.py)
        q8_0, w8a8    (qs, d)               qs = w.blocks, int8 [N, K/32, 32] ([N, 1, K] for w8a8)
        q4_0, q4_1    (qs, d, o, c)         qs = w.blocks, uint8 [N, K/32, 16]; each value is
                                            d * q + o * c: q4_1 o = m, c = 1; q4_0 o = d, c = -8
    """
    if not isinstance(w, QuantWeight):
        return (w.view(np.uint16),) if w.dtype == np.float16 else (w,)
    if w.m is not None:
        return (w.blocks, w.d, w.m, _Q4_1_C)
    if w.format in ("q8_0", "w8a8"):
        return (w.blocks, w.d)
    return (w.blocks, w.d, w.d, _Q4_0_C)


# ---------------------------------------------------------------- KV cache formats

KV_DTYPES = {"fp32": np.dtype(np.float32), "fp16": np.dtype(np.float16), "int8": np.dtype(np.int8)}


def kv_dtype_name(dtype) -> str:
    """The name ("fp32", "fp16", "int8") of a cache array's dtype."""
    for name, d in KV_DTYPES.items():
        if np.dtype(dtype) == d:
            return name
    raise ValueError(f"KV cache dtype {np.dtype(dtype)} is not one of float32, float16, int8")


def kv_caches(op: str, k_cache, v_cache, k_scale, v_scale):
    """Check a key/value cache pair and its scales; return (k, v) as the kernels read them.

    Float32 and int8 caches pass unchanged, float16 ones as uint16 views of
    the same memory (the kernels convert the bits: xllm/ops/kernels/kv_format.py).
    int8 caches need k_scale and v_scale, float32 [S, Hkv]; float caches take
    none. Works on numpy and device arrays alike.
    """
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"{op}: k_cache and v_cache have different dtypes, {k_cache.dtype} and {v_cache.dtype}")
    name = kv_dtype_name(k_cache.dtype)
    if name == "int8":
        if k_scale is None or v_scale is None:
            raise ValueError(f"{op}: an int8 KV cache needs k_scale and v_scale")
        want = tuple(k_cache.shape[:2])
        for what, s in (("k_scale", k_scale), ("v_scale", v_scale)):
            if s.dtype != np.float32 or tuple(s.shape) != want:
                raise ValueError(f"{op}: {what} must be float32 {want}, got {s.dtype} {tuple(s.shape)}")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"{op}: k_scale and v_scale are for int8 caches, not {name}")
    if name == "fp16":
        return k_cache.view(np.uint16), v_cache.view(np.uint16)
    return k_cache, v_cache
