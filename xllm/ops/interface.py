"""`Ops`: what every device provides, with the same names and signatures.

The forward pass (`xllm/model.py`) and the KV cache (`xllm/kv_cache.py`) call
nothing but these, so they run unchanged on every device:

    memory      upload, download, empty, zeros, upload_weight, prepare_layers, split_qkv,
                synchronize
    operators   embedding, rmsnorm, linear, rope, rope_tables, store_kv, attention,
                silu_mul, add, logits
    fused       add_rmsnorm, rope_store, decoder_layer, decoder_layers: compositions
                of the operators above, written here once; a device may replace
                one with a single call (the CPU does), with the same result to
                rounding

A fused operator exists because each operator call costs a few microseconds
beyond its work (checks, dispatch, allocation): during decode, a layer's
glue operators touch a few thousand numbers each, and eight of its fourteen
calls were such glue (split, two ropes, store, two adds, two norms); with
add_rmsnorm and rope_store a layer makes nine calls. `decoder_layer` is the
whole layer, those nine calls: the CPU runs it as one compiled call, as a
GPU would replay a captured graph of them. `decoder_layers` is every layer
of the model in turn, with the weights `prepare_layers` made once when the
model was built: what a device must ask of each layer's weights and caches
(their kernel arguments, whether their shapes fit) is then asked once per
model or once per step, not once per layer and step.

An array of a device is whatever that device computes on: numpy arrays for
"cpu" and "reference", numba.cuda device arrays for "cuda" (and the
simulator's stand-ins for "cuda-sim"). `upload` takes a numpy array to the
device, `download` brings one back. Every operator takes and returns arrays
of its device; float arrays are float32, index arrays int32, and every
operator returns a new array except `store_kv`, which writes into the caches.
The meaning of each operator is its numpy version in `xllm/ops/reference.py`.

Weights come in several formats (`xllm/weights.py`: "f32", "f16", "q8_0",
"q4_0", "q4_1", "w8a8"). A device lists its kernel for each format in
`linear_kernels` and `embedding_kernels`, and `linear`, `embedding` and
`logits` below pick one by `weight_format(w)`: this is the one place where
quantized weights are dispatched, for every device.

`linear_kernels` compute exactly x @ w.dequantize().T in float32. A device
may also list `int_linear_kernels`: for those formats it quantizes x to
integers and multiplies integers (`reference.linear_int` is the
specification; it is what llama.cpp does, and about twice as fast on a CPU). An `Ops` made with
`exact=False` (the default of `get_ops`) uses them; `exact=True` never does.

Errors: a bad shape raises ValueError at the call on every device (the checks
are in `checks.py`). A bad index (a token id past the table, a slot past the
cache) raises ValueError on the CPU at the call; a GPU finds it while the
kernel runs, skips the bad element, and raises the same ValueError at the
next `download` or `synchronize`, as CUDA itself reports errors.
"""

from __future__ import annotations

import math
from functools import cached_property
from typing import NamedTuple

import numpy as np

from ..weights import QuantWeight, weight_format
from . import checks

OPS = ("embedding", "rmsnorm", "linear", "rope", "rope_tables", "store_kv", "attention",
       "silu_mul", "add", "logits")
FUSED = ("add_rmsnorm", "rope_store", "decoder_layer", "decoder_layers")
MEMORY = ("upload", "download", "empty", "zeros", "upload_weight", "prepare_layers", "split_qkv", "synchronize")


class LayerWeights(NamedTuple):
    """One layer's weights, uploaded, in the order `decoder_layer` takes them. next_norm is
    the next layer's first norm (attn_norm), or the model's final norm after the last layer."""

    wqkv: object
    wo: object
    w_gate_up: object
    w_down: object
    ffn_norm: object
    next_norm: object


class Ops:
    """The interface; each device subclasses it (see the module docstring)."""

    name = "?"
    linear_kernels: dict = {}      # weight format -> fn(x, w) -> [T, N], exact float32
    int_linear_kernels: dict = {}  # weight format -> fn(x, w) -> [T, N], activations quantized
    embedding_kernels: dict = {}   # weight format -> fn(table, ids) -> [T, D]

    def __init__(self, exact: bool = False):
        self.exact = exact

    @cached_property
    def _linear(self) -> dict:
        """The kernel `linear` uses for each format: the integer one unless exact."""
        return {**self.linear_kernels, **({} if self.exact else self.int_linear_kernels)}

    # ------------------------------------------------------------------ memory

    def upload(self, a: np.ndarray):
        """This device's copy of the numpy array `a` (C-contiguous)."""
        raise NotImplementedError

    def download(self, a) -> np.ndarray:
        """A numpy array with the values of this device's array `a`."""
        raise NotImplementedError

    def empty(self, shape, dtype):
        """A new uninitialised array of this device."""
        raise NotImplementedError

    def zeros(self, shape, dtype):
        """A new array of this device, filled with zeros."""
        raise NotImplementedError

    def upload_weight(self, w, f32: bool = False):
        """A weight (array or QuantWeight) as this device computes with it.

        GGUF blocks and float16 matrices keep their format; a float32 matrix
        takes the device's preferred storage (float16 on a GPU, float32 on the
        CPU); vectors (norms) are float32. `f32=True` makes every float matrix
        float32 instead.
        """
        raise NotImplementedError

    def prepare_layers(self, layers):
        """A model's layers, a list of `LayerWeights` of uploaded weights, as `decoder_layers`
        takes them; made once, when the model is built. Here the list itself: a device
        that runs the layers otherwise returns a list of the same `LayerWeights` that
        also carries what it needs (the CPU: each weight's kernel arguments)."""
        return list(layers)

    def split_qkv(self, qkv, n_heads: int, n_kv_heads: int, head_dim: int):
        """The stacked projection qkv [T, (H + 2 Hkv) hd] as three new arrays
        q [T, H, hd], k [T, Hkv, hd], v [T, Hkv, hd]."""
        raise NotImplementedError

    def synchronize(self) -> None:
        """Wait for every kernel launched so far; raise an index error one of them found."""

    # ------------------------------------------------------------------ operators

    def embedding(self, table, ids):
        """out[t] = table[ids[t]].  table [V, D] (any weight format), ids [T] -> [T, D]."""
        checks.embedding(table, ids)
        return self._kernel(self.embedding_kernels, "embedding", table)(table, ids)

    def linear(self, x, w):
        """y = x @ w.T.  x [T, K], w [N, K] (any weight format) -> [T, N]."""
        checks.linear(x, w)
        return self._kernel(self._linear, "linear", w)(x, w)

    def logits(self, x, rows, w):
        """linear(x[rows], w): the output projection of the rows that need logits.  -> [R, V]."""
        return self.linear(self.take_rows(x, rows), w)

    def take_rows(self, x, rows):
        """x[rows] as a new array: x [T, D], rows [R] int32 -> [R, D]."""
        raise NotImplementedError

    def rope_tables(self, theta: float, head_dim: int, max_pos: int, scaling: dict | None = None):
        """(cos, sin), each [max_pos, head_dim // 2], on this device (see reference.rope_tables;
        `scaling` is ModelConfig.rope_scaling). Built on the host for every device; the model
        asks again for longer tables as its batches reach further (`Llama._rope_tables`)."""
        from .reference import rope_tables

        cos, sin = rope_tables(theta, head_dim, max_pos, scaling)
        return self.upload(cos), self.upload(sin)

    def rmsnorm(self, x, w, eps: float):
        raise NotImplementedError

    def rope(self, x, positions, cos, sin):
        raise NotImplementedError

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None) -> None:
        raise NotImplementedError

    def attention(self, q, k_cache, v_cache, block_table, block_size: int, cu_q, positions, scale: float,
                  k_scale=None, v_scale=None):
        raise NotImplementedError

    def silu_mul(self, gate_up):
        raise NotImplementedError

    def add(self, x, y):
        raise NotImplementedError

    # ------------------------------------------------------------------ fused operators

    def add_rmsnorm(self, x, y, w, eps: float):
        """(s, rmsnorm(s, w, eps)) with s = x + y: a residual connection and the norm after it.
        x, y [T, D], w [D] -> two new [T, D]."""
        s = self.add(x, y)
        return s, self.rmsnorm(s, w, eps)

    def rope_store(self, qkv, n_heads: int, n_kv_heads: int, head_dim: int, positions, cos, sin,
                   k_cache, v_cache, slot_mapping, k_scale=None, v_scale=None):
        """From the stacked projection qkv [T, (H + 2 Hkv) hd] to the cache: split it
        (`split_qkv`), rotate q and k (`rope`), write k and v at slot_mapping
        (`store_kv`); returns the rotated q [T, H, hd]. A bad position or slot
        raises ValueError before anything is written."""
        q, k, v = self.split_qkv(qkv, n_heads, n_kv_heads, head_dim)
        q = self.rope(q, positions, cos, sin)
        self.store_kv(self.rope(k, positions, cos, sin), v, k_cache, v_cache, slot_mapping, k_scale, v_scale)
        return q

    def decoder_layer(self, x, h, wqkv, wo, w_gate_up, w_down, ffn_norm, next_norm, eps: float,
                      n_heads: int, n_kv_heads: int, head_dim: int, positions, cos, sin, k_cache, v_cache,
                      slot_mapping, block_table, block_size: int, cu_q, scale: float, k_scale=None, v_scale=None):
        """One Llama layer (xllm/model.py), from the residual stream x [T, D] and h = x after
        the layer's first norm, to the next layer's (x, h): h is normed with `next_norm`, the
        next layer's first norm or the model's final one. The layer's keys and values go
        into the caches at slot_mapping, as `rope_store` writes them; the other arguments
        are those of `rope_store` and `attention`, whose errors it raises."""
        T = x.shape[0]
        q = self.rope_store(self.linear(h, wqkv), n_heads, n_kv_heads, head_dim, positions, cos, sin,
                            k_cache, v_cache, slot_mapping, k_scale, v_scale)
        a = self.attention(q, k_cache, v_cache, block_table, block_size, cu_q, positions, scale, k_scale, v_scale)
        x, h = self.add_rmsnorm(x, self.linear(a.reshape(T, n_heads * head_dim), wo), ffn_norm, eps)
        return self.add_rmsnorm(x, self.linear(self.silu_mul(self.linear(h, w_gate_up)), w_down), next_norm, eps)

    def decoder_layers(self, x, h, layers, eps: float, n_heads: int, n_kv_heads: int, head_dim: int, positions,
                       cos, sin, k_caches, v_caches, slot_mapping, block_table, block_size: int, cu_q,
                       scale: float, k_scales=None, v_scales=None):
        """Every layer in turn: `decoder_layer` with the weights of layer i (`layers` from
        `prepare_layers`) and its caches k_caches[i], v_caches[i] (and k_scales[i],
        v_scales[i] for int8; the lists of `KVCache.k`, `.v`, `.k_scale`, `.v_scale`).
        Every layer sees the same positions, slots and block tables, so a bad one raises
        at the first layer, before anything is written."""
        if len(k_caches) != len(layers) or len(v_caches) != len(layers):
            raise ValueError(f"decoder_layers: {len(layers)} layers, but {len(k_caches)} key caches and "
                             f"{len(v_caches)} value caches")
        for i, w in enumerate(layers):
            x, h = self.decoder_layer(x, h, *w, eps, n_heads, n_kv_heads, head_dim, positions, cos, sin,
                                      k_caches[i], v_caches[i], slot_mapping, block_table, block_size, cu_q, scale,
                                      None if k_scales is None else k_scales[i],
                                      None if v_scales is None else v_scales[i])
        return x, h

    # ------------------------------------------------------------------ helpers

    def _kernel(self, kernels: dict, op: str, w):
        fmt = weight_format(w)
        try:
            return kernels[fmt]
        except KeyError:
            raise ValueError(f"{op}: device {self.name!r} has no kernel for {fmt} weights "
                             f"(it has {', '.join(kernels)})") from None

    def __repr__(self) -> str:
        return f"<xllm ops for device {self.name!r}{', exact' if self.exact else ''}>"


class HostOps(Ops):
    """Memory for the devices that compute on numpy arrays ("cpu", "reference")."""

    def upload(self, a):
        return np.ascontiguousarray(a)

    def download(self, a):
        return np.asarray(a)

    def empty(self, shape, dtype):
        return aligned_array(np.empty, shape, dtype)

    def zeros(self, shape, dtype):
        # np.zeros maps pages lazily: memory is touched only where it is written.
        return aligned_array(np.zeros, shape, dtype)

    def upload_weight(self, w, f32: bool = False):
        if isinstance(w, QuantWeight) or (w.dtype == np.float16 and w.ndim == 2 and not f32):
            return w
        w = np.ascontiguousarray(w, dtype=np.float32)
        if w.ndim == 2 and w.nbytes >= ALIGN_FROM and w.ctypes.data % ALIGN:   # the GEMM's tiles load its rows
            w = _copy_to(aligned_array(np.empty, w.shape, w.dtype), w)
        return w

    def split_qkv(self, qkv, n_heads, n_kv_heads, head_dim):
        checks.split_qkv(qkv, n_heads, n_kv_heads, head_dim)
        T, q_end, k_end = qkv.shape[0], n_heads * head_dim, (n_heads + n_kv_heads) * head_dim
        q = qkv[:, :q_end].copy().reshape(T, n_heads, head_dim)       # copies even of one row, so
        k = qkv[:, q_end:k_end].copy().reshape(T, n_kv_heads, head_dim)   # that qkv is freed at once
        v = qkv[:, k_end:].copy().reshape(T, n_kv_heads, head_dim)
        return q, k, v

    def take_rows(self, x, rows):
        return x[rows]          # numpy raises IndexError for a row past the end


ALIGN = 64              # bytes
ALIGN_FROM = 64 << 10   # smaller arrays are made as numpy makes them


def aligned_array(make, shape, dtype) -> np.ndarray:
    """make(shape, dtype) (np.empty or np.zeros) with its data starting on a 64-byte cache line.

    numpy starts a large array 16 bytes into a line, so every 64-byte SIMD
    load from it (AVX-512) would touch two lines: the CPU kernels that load
    the same rows from the L1 cache many times (attention's KV cache, the
    GEMM's tiles) ran at half speed that way. Arrays under ALIGN_FROM bytes
    (one token's activations) are left as they come: aligning costs a few
    microseconds a call, more than a decode step's kernels lose to split loads.
    """
    dtype = np.dtype(dtype)
    shape = (int(shape),) if isinstance(shape, (int, np.integer)) else tuple(shape)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < ALIGN_FROM:
        return make(shape, dtype)
    buf = make(nbytes + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start : start + nbytes].view(dtype).reshape(shape)


def _copy_to(dst: np.ndarray, src: np.ndarray) -> np.ndarray:
    dst[...] = src
    return dst
