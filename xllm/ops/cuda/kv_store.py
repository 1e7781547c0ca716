"""store_kv on the GPU: the new tokens' keys and values into their cache slots.

One thread block per (token row, kv head); its threads share the head's
head_dim elements through the `lane, lanes` arguments of the bodies in
xllm/ops/kernels/kv_format.py. A float head is stored element by element; an
int8 head first needs its largest |x|, which the block finds with one
`block_max` before every thread quantizes its elements.

"Nothing is written when a slot is out of range" (the CPU's promise) needs
every slot checked before any block writes, and the blocks of one kernel
cannot wait for each other. So two kernels run in order on the stream:
`_check_slots` reports the first bad slot it meets (BAD_SLOT) into the error
array, and `_store_rows` writes nothing at all when that array holds an error.
(An error left there by an earlier operator, not yet raised by a download,
stops the store as well: that call raises at the next download anyway.)
"""

from __future__ import annotations

from numba import cuda, float32

from .. import checks
from . import errors
from .bodies import kv_format
from .reduce import WARP, block_max


@cuda.jit
def _check_slots(slot_mapping, n_slots, err):
    """Report a slot_mapping entry outside [0, n_slots) (thread per entry)."""
    for t in range(cuda.grid(1), slot_mapping.shape[0], cuda.gridsize(1)):
        slot = slot_mapping[t]
        if slot < 0 or slot >= n_slots:
            errors.report(err, checks.BAD_SLOT, t, slot, n_slots)


@cuda.jit(device=True)
def _store_head(x, t, h, cache, scales, slot, scratch):
    """Head h of row t of x into cache[slot, h], shared by the block's threads.

    `scales` is None for float caches (the compiler keeps one branch).
    """
    lane, lanes = cuda.threadIdx.x, cuda.blockDim.x
    if scales is None:
        kv_format.store_float_head(x, t, h, cache, slot, lane, lanes)
    else:
        amax = block_max(kv_format.head_amax(x, t, h, lane, lanes), scratch)
        kv_format.store_int8_head(x, t, h, cache, scales, slot, kv_format.int8_scale(amax), lane, lanes)


@cuda.jit(device=True)
def _store_rows(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, err):
    """k_cache[slot_mapping[t]] = k[t] (and v) in the cache's format; a block per (row, kv head)."""
    scratch = cuda.shared.array(WARP, float32)
    if err[0] != 0:                                  # a bad slot (or an earlier error): write nothing
        return
    Hkv = k.shape[1]
    for item in range(cuda.blockIdx.x, k.shape[0] * Hkv, cuda.gridDim.x):
        t = item // Hkv
        h = item - t * Hkv
        slot = slot_mapping[t]
        _store_head(k, t, h, k_cache, k_scale, slot, scratch)
        _store_head(v, t, h, v_cache, v_scale, slot, scratch)


# Two kernels, as a GPU kernel cannot take None for the float caches' scales (CudaOps.launch).
@cuda.jit
def _store_kv_float(k, v, k_cache, v_cache, slot_mapping, err):
    """`_store_rows` into a float32 or float16 cache."""
    _store_rows(k, v, k_cache, v_cache, None, None, slot_mapping, err)


@cuda.jit
def _store_kv_int8(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, err):
    """`_store_rows` into an int8 cache with its scales."""
    _store_rows(k, v, k_cache, v_cache, k_scale, v_scale, slot_mapping, err)


def store_kv(ops, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
    """k_cache[slot_mapping[t]] = k[t] and likewise for v, in place (see the CPU's kv_storage.store_kv).

    A bad slot raises ValueError at the next download or synchronize; nothing is written then.
    """
    checks.store_kv(k, v, k_cache, v_cache, slot_mapping)
    kc, vc = checks.kv_caches("store_kv", k_cache, v_cache, k_scale, v_scale)
    T, Hkv = k.shape[0], k.shape[1]
    ops.launch(_check_slots, ops.blocks(-(-T // ops.threads)), ops.threads, slot_mapping, kc.shape[0], ops.err)
    if k_scale is None:
        ops.launch(_store_kv_float, ops.blocks(T * Hkv), ops.threads, k, v, kc, vc, slot_mapping, ops.err)
    else:
        ops.launch(_store_kv_int8, ops.blocks(T * Hkv), ops.threads, k, v, kc, vc, k_scale, v_scale, slot_mapping,
                   ops.err)
