"""decoder_layer on the CPU: a whole Llama layer in one compiled call.

`Ops.decoder_layer` (xllm/ops/interface.py) is nine operator calls. Called
from Python, each costs a few microseconds beyond its work: its checks,
numba's dispatch of a call with a dozen arguments, its output's allocation.
During decode the work is small (a layer of SmolLM2-135M: 3.5 M weights and
a few thousand other numbers), and on a 2-core CPU those microseconds were
a third of a decode step. `_layer` makes the same nine calls from compiled
code: the compiled functions the operators' wrappers call (`run_*` in each
module), so a layer gives the same bits either way (tests/test_ops_fused.py).

What Python still does, once per layer: check the shapes (`_fits`), and
turn each weight into a tuple of arrays whose numba types name its format
(`weight_args`). `linear_args` picks the kernel for such a tuple, as
`Ops.linear` does for a weight: numba resolves it from the tuple's types
when it compiles `_layer` (the `overload` below; with NUMBA_DISABLE_JIT=1
the plain function runs instead, to step through).

Errors: `_layer` checks every position, slot and block table entry before it
writes the cache, and returns the code of the first bad one (the wrapper
raises the operator's ValueError; nothing was written). A call with shapes
`_fits` refuses runs the composition instead, which raises the operator's
own error.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import overload

from ...weights import QuantWeight
from .. import checks
from ..checks import BAD_POSITION, BAD_SLOT
from ..interface import Ops
from . import intmatmul, kv_storage, matmul, paged_attention, pointwise, qmatmul
from .common import first_out_of_range


# ---------------------------------------------------------------- linear from a weight's arrays

def weight_args(w) -> tuple:
    """The arrays (and constants) of weight w for `linear_args`, one tuple type per format family:

        f32          (w,)                                        float32 [N, K]
        f16          (bits,)                                     uint16 [N, K]
        q8_0, w8a8   (qs, d, qmax, like, int_max_tokens)          qs int8 [N, nb, bs]
        q4_0, q4_1   (qs, d, o, c, int_max_tokens)                qs uint8 [N, nb, 16]
    """
    if isinstance(w, QuantWeight):
        return intmatmul.int_args(w)
    return checks.weight_arrays(w)


def linear_args(x, w, exact, workers):
    """`Ops.linear(x, weight)` for w = weight_args(weight), on `workers` threads; `exact` as `get_ops`."""
    if len(w) == 1:
        return (matmul.run_f32 if w[0].dtype == np.float32 else matmul.run_f16)(x, w[0], workers)
    if w[0].dtype == np.int8:
        return qmatmul.run_q8(x, w[0], w[1], workers) if exact else intmatmul.run_i8(x, *w, workers)
    return qmatmul.run_q4(x, *w[:4], workers) if exact else intmatmul.run_i4(x, *w, workers)


@overload(linear_args)
def _linear_args_compiled(x, w, exact, workers):
    """`linear_args` for numba: the same choice, made from w's types when `_layer` compiles."""
    if not isinstance(w, types.BaseTuple):
        return None
    first = w.types[0].dtype
    if len(w.types) == 1:
        if first == types.float32:
            return lambda x, w, exact, workers: matmul.run_f32(x, w[0], workers)
        return lambda x, w, exact, workers: matmul.run_f16(x, w[0], workers)
    if first == types.int8:
        def q8(x, w, exact, workers):
            if exact:
                return qmatmul.run_q8(x, w[0], w[1], workers)
            return intmatmul.run_i8(x, w[0], w[1], w[2], w[3], w[4], workers)
        return q8

    def q4(x, w, exact, workers):
        if exact:
            return qmatmul.run_q4(x, w[0], w[1], w[2], w[3], workers)
        return intmatmul.run_i4(x, w[0], w[1], w[2], w[3], w[4], workers)
    return q4


# ---------------------------------------------------------------- the layer

@numba.njit(cache=True)
def _layer(x, h, wqkv, wo, w_gate_up, w_down, ffn_norm, next_norm, eps, n_heads, n_kv_heads, positions, cos, sin,
           k_cache, v_cache, k_scale, v_scale, slot_mapping, block_table, block_size, cu_q, scale, exact, workers,
           use_simd):
    """`Ops.decoder_layer` -> (x, h, 0, 0); when an index is bad, nothing is done and the result
    is (x, h, code, where) with the code of `checks.INDEX_ERRORS` and the offending row."""
    T, hd = x.shape[0], k_cache.shape[2]
    bad = first_out_of_range(positions, cos.shape[0])
    if bad >= 0:
        return x, h, BAD_POSITION, bad
    bad = first_out_of_range(slot_mapping, k_cache.shape[0])
    if bad >= 0:
        return x, h, BAD_SLOT, bad
    tiles, code, where = paged_attention._plan(T, k_cache.shape[0], block_table, block_size, cu_q, positions)
    if code:
        return x, h, code, where
    qkv = linear_args(h, wqkv, exact, workers)
    q, _, _ = kv_storage.run_rope_store(qkv.reshape((T, n_heads + 2 * n_kv_heads, hd)), n_heads, n_kv_heads,
                                        positions, cos, sin, k_cache, v_cache, k_scale, v_scale, slot_mapping)
    a = paged_attention.run_planned(q, k_cache, v_cache, k_scale, v_scale, block_table, block_size, tiles,
                                    positions, scale, workers, use_simd)
    x, h = pointwise.run_add_rmsnorm(x, linear_args(a.reshape((T, n_heads * hd)), wo, exact, workers), ffn_norm, eps)
    gate = pointwise.run_silu_mul(linear_args(h, w_gate_up, exact, workers))
    x, h = pointwise.run_add_rmsnorm(x, linear_args(gate, w_down, exact, workers), next_norm, eps)
    return x, h, 0, 0


def _fits(x, h, wqkv, wo, w_gate_up, w_down, ffn_norm, next_norm, n_heads, n_kv_heads, head_dim, positions, cos,
          sin, k_cache, v_cache, slot_mapping, block_table, block_size, cu_q) -> bool:
    """Whether every shape is one the compiled layer can run (else the composition says what is wrong)."""
    if x.ndim != 2 or x.shape != h.shape or not (x.flags.c_contiguous and h.flags.c_contiguous):
        return False
    T, D = x.shape
    q_width = n_heads * head_dim
    F = w_gate_up.shape[0] // 2
    return (n_kv_heads > 0 and n_heads % n_kv_heads == 0 and head_dim % 2 == 0 and block_size >= 1
            and wqkv.shape == (q_width + 2 * n_kv_heads * head_dim, D) and wo.shape == (D, q_width)
            and w_gate_up.shape == (2 * F, D) and w_down.shape == (D, F)
            and ffn_norm.shape == (D,) and next_norm.shape == (D,)
            and k_cache.ndim == 3 and k_cache.shape == v_cache.shape and k_cache.shape[1:] == (n_kv_heads, head_dim)
            and positions.shape == (T,) and slot_mapping.shape == (T,)
            and cos.ndim == 2 and cos.shape == sin.shape and cos.shape[1] == head_dim // 2
            and block_table.ndim == 2 and cu_q.shape == (block_table.shape[0] + 1,))


def _raise_index_error(code, where, positions, slot_mapping, cos, k_cache):
    """The operator's ValueError for the code `_layer` returned."""
    if code == checks.BAD_POSITION:
        raise checks.index_error(code, where, positions[where], cos.shape[0])
    if code == checks.BAD_SLOT:
        raise checks.index_error(code, where, slot_mapping[where], k_cache.shape[0])
    raise checks.index_error(code, where)


def decoder_layer(ops: Ops, x, h, wqkv, wo, w_gate_up, w_down, ffn_norm, next_norm, eps, n_heads, n_kv_heads,
                  head_dim, positions, cos, sin, k_cache, v_cache, slot_mapping, block_table, block_size, cu_q, scale,
                  k_scale=None, v_scale=None):
    """`Ops.decoder_layer` for the CPU `ops` (its `exact` chooses the linear kernels), in one compiled call."""
    args = (x, h, wqkv, wo, w_gate_up, w_down, ffn_norm, next_norm, eps, n_heads, n_kv_heads, head_dim, positions,
            cos, sin, k_cache, v_cache, slot_mapping, block_table, block_size, cu_q, scale, k_scale, v_scale)
    if _fits(x, h, wqkv, wo, w_gate_up, w_down, ffn_norm, next_norm, n_heads, n_kv_heads, head_dim, positions,
             cos, sin, k_cache, v_cache, slot_mapping, block_table, block_size, cu_q):
        kc, vc = checks.kv_caches("decoder_layer", k_cache, v_cache, k_scale, v_scale)
        x, h, code, where = _layer(x, h, weight_args(wqkv), weight_args(wo), weight_args(w_gate_up),
                                   weight_args(w_down), ffn_norm, next_norm, float(eps), n_heads, n_kv_heads,
                                   positions, cos, sin, kc, vc, k_scale, v_scale, slot_mapping, block_table,
                                   block_size, cu_q, scale, ops.exact, numba.get_num_threads(),
                                   paged_attention._simd_applies(kc, vc, block_size))
        if code:
            _raise_index_error(code, where, positions, slot_mapping, cos, k_cache)
        return x, h
    return Ops.decoder_layer(ops, *args)       # raises the operator's error for a shape it cannot run


# ---------------------------------------------------------------- every layer

class LayerStack(list):
    """`CpuOps.prepare_layers`: the model's `LayerWeights`, and for each layer the weight
    arguments `_layer` takes (`weight_args` of its four matrices, then its two norms).
    `same_shapes`: every layer's weights have layer 0's shapes, so that checking layer 0's
    against a batch (`_fits`) checks them all."""

    def __init__(self, layers):
        super().__init__(layers)
        self.args = [tuple(weight_args(m) for m in w[:4]) + (w.ffn_norm, w.next_norm) for w in self]
        shapes = [tuple(tuple(m.shape) for m in w) for w in self]
        self.same_shapes = all(s == shapes[0] for s in shapes)


def prepare_layers(ops: Ops, layers) -> LayerStack:
    """`Ops.prepare_layers` for the CPU: each weight's kernel arguments, made once."""
    return LayerStack(layers)


def decoder_layers(ops: Ops, x, h, layers, eps, n_heads, n_kv_heads, head_dim, positions, cos, sin, k_caches,
                   v_caches, slot_mapping, block_table, block_size, cu_q, scale, k_scales=None, v_scales=None):
    """`Ops.decoder_layers` for the CPU: `_layer` for each layer, from Python.

    What `decoder_layer` does for every call is done here once per step: the
    shapes (`_fits` with layer 0, whose shapes every layer has) and the number
    of threads; only each layer's caches are looked at per layer (their dtype
    and shape, as `_layer` indexes them unchecked), all before the first layer
    runs, so that a bad one leaves every cache as it was.
    A call with shapes `_fits` refuses runs layer by layer (`Ops.decoder_layers`),
    which raises the operator's own error.
    """
    if not isinstance(layers, LayerStack):
        layers = LayerStack(layers)
    n = len(layers)
    if not (n and layers.same_shapes and len(k_caches) == n and len(v_caches) == n
            and _fits(x, h, *layers[0], n_heads, n_kv_heads, head_dim, positions, cos, sin, k_caches[0],
                      v_caches[0], slot_mapping, block_table, block_size, cu_q)):
        return Ops.decoder_layers(ops, x, h, layers, eps, n_heads, n_kv_heads, head_dim, positions, cos, sin,
                                  k_caches, v_caches, slot_mapping, block_table, block_size, cu_q, scale, k_scales,
                                  v_scales)
    shape, kv = k_caches[0].shape, []
    for i in range(n):          # every layer's caches checked before the first is written
        k_scale = None if k_scales is None else k_scales[i]
        v_scale = None if v_scales is None else v_scales[i]
        kc, vc = checks.kv_caches("decoder_layers", k_caches[i], v_caches[i], k_scale, v_scale)
        if kc.shape != shape or vc.shape != shape:
            raise ValueError(f"decoder_layers: layer {i}'s caches have shapes {kc.shape} and {vc.shape}, "
                             f"layer 0's {shape}")
        kv.append((kc, vc, k_scale, v_scale, paged_attention._simd_applies(kc, vc, block_size)))
    workers, eps = numba.get_num_threads(), float(eps)
    for w, (kc, vc, k_scale, v_scale, use_simd) in zip(layers.args, kv):
        x, h, code, where = _layer(x, h, *w, eps, n_heads, n_kv_heads, positions, cos, sin, kc, vc, k_scale,
                                   v_scale, slot_mapping, block_table, block_size, cu_q, scale, ops.exact, workers,
                                   use_simd)
        if code:        # the same indices in every layer: only layer 0 can find a bad one
            _raise_index_error(code, where, positions, slot_mapping, cos, kc)
    return x, h
