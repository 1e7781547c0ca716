"""Memory planner and roofline model: the bytes and FLOPs of a Llama forward step.

Two questions before launching a model:

  * Memory: how many bytes do the weights, the KV cache and one step's
    activations take, and how many sequences fit in a budget? The engine sizes
    its KV pool with `blocks_for_budget`, so what `bench.plan` prints and what
    the engine allocates come from the same arithmetic.
  * Time: for each operator of a step, how many FLOPs does it do and how many
    bytes must it move? On a device with peak P FLOP/s and bandwidth W B/s an
    operator cannot take less than max(FLOPs / P, bytes / W): the larger term
    is its bottleneck (the "roofline" model).

Symbols, as the original xLLM README writes them:
    L layers, h1 model width (dim), h2 SwiGLU width (hidden_dim), v vocabulary,
    hq = query heads x head_dim, hkv = kv heads x head_dim (both are h1 for
    Llama-2-7B, so formulas print h1 there), b sequences, s prompt tokens,
    n generated tokens, T rows in a step (bs in prefill, b in decode).

Worked example (Llama-2-7B, b=48, s=68, n=512, fp32 KV, 128-token blocks):
each sequence holds s+n = 580 tokens, which need ceil(580/128) = 5 blocks =
640 token slots; K and V of one token in one layer are 2 * h1 * 4 bytes, so
    KV = 2 * b * h1 * L * 640 * 4 = 2 * 48 * 4096 * 32 * 640 * 4 = 30 GiB.

Not modelled: allocator overhead, the kernels' small scratch (attention
streams its scores through n floats per thread, never a [T, H, n] array),
and the Python objects around the arrays.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import XllmError

GiB = 1 << 30
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}
SCALE_BYTES = 4       # int8 storage keeps one fp32 scale per row (weights) or per token per head (KV)


class BudgetTooSmall(XllmError):
    """The memory budget does not hold the weights, the activations and one KV block."""


def _width(dtype: str) -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# ---------------------------------------------------------------- formulas
# A formula is a polynomial: {("h1", "h2"): 3, ("h1",): 1} is 3h1h2 + h1. The same
# object gives the number (`_value`) and the text printed beside it (`_render`),
# so a table cannot show a formula that differs from what it computed.

Poly = dict


def _symbols(c: ModelConfig) -> dict[str, tuple[str, float]]:
    """Each model symbol's (printed name, value); hq and hkv print as h1 when equal to it."""
    return {"L": ("L", c.n_layers), "h1": ("h1", c.dim), "h2": ("h2", c.hidden_dim), "v": ("v", c.vocab_size),
            "hq": ("h1" if c.q_dim == c.dim else "hq", c.q_dim),
            "hkv": ("h1" if c.kv_dim == c.dim else "hkv", c.kv_dim),
            "nkv": ("nkv", c.n_kv_heads), "hd": ("hd", c.head_dim)}


def _value(poly: Poly, sym: dict) -> float:
    return float(sum(k * math.prod(sym[s][1] for s in term) for term, k in poly.items()))


def _times(poly: Poly, *factor: str) -> Poly:
    return {factor + term: k for term, k in poly.items()}


def _render(poly: Poly, sym: dict) -> str:
    """The text of a formula, printing each symbol by its name in `sym`."""
    merged: dict[tuple, float] = {}
    for term, k in poly.items():
        key = tuple(f"[{sym[s][0]}]" if "/" in sym[s][0] else sym[s][0] for s in term)
        merged[key] = merged.get(key, 0) + k
    return _join({key: k for key, k in merged.items() if k})


def _join(terms: dict[tuple, float]) -> str:
    """Printed terms joined by +; factors every term starts with go in front: bsh1(2h1+4hkv)."""
    heads = {key[0] for key in terms if key}
    if len(terms) > 1 and len(heads) == 1 and all(len(key) > 1 for key in terms):
        inner = _join({key[1:]: k for key, k in terms.items()})
        return heads.pop() + (f"({inner})" if _is_sum(inner) else inner)
    return "+".join((f"{k:g}" if k != 1 or not key else "") + "".join(key) for key, k in terms.items())


def _is_sum(text: str) -> bool:
    """Whether a printed formula has a + outside brackets (and so needs them after a factor)."""
    depth = 0
    for ch in text:
        depth += (ch in "([") - (ch in ")]")
        if ch == "+" and depth == 0:
            return True
    return False


def formula(config: ModelConfig, poly: Poly, **names: str) -> str:
    """The printed form of a formula over model symbols; `names` prints step symbols (T="bs")."""
    return _render(poly, {**_symbols(config), **{k: (v, 0) for k, v in names.items()}})


def _sum(polys) -> Poly:
    out: Poly = {}
    for p in polys:
        for term, k in p.items():
            out[term] = out.get(term, 0) + k
    return out


# ---------------------------------------------------------------- weights

@dataclass(frozen=True)
class WeightBytes:
    """Bytes of the weights, grouped as the original's table groups them."""

    embedding: int        # v x h1 lookup table (0 when tied: the head's matrix is the table)
    attention: int        # all layers: wq, wk, wv, wo and the attention norm
    mlp: int              # all layers: w_gate, w_up, w_down and the ffn norm
    head: int             # output projection v x h1 and the final norm

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.head


def weight_polys(config: ModelConfig) -> dict[str, tuple[Poly, Poly, Poly]]:
    """Per group: (matrix parameters, vector parameters, matrix output rows) as formulas;
    attention and mlp are per layer (times L).

    Per layer: wq [hq, h1], wk and wv [hkv, h1], wo [h1, hq], the two norms
    [h1], w_gate and w_up [h2, h1], w_down [h1, h2]. Output rows count int8
    scales (one per row). The original's weight formula is matrices +
    vectors: (4h1h1+2h1+3h1h2)L + vh1+h1 for Llama-2-7B.
    """
    return {
        "embedding": ({} if config.tied_embeddings else {("v", "h1"): 1}, {}, {}),
        "attention": ({("h1", "hq"): 2, ("h1", "hkv"): 2}, {("h1",): 1}, {("hq",): 1, ("hkv",): 2, ("h1",): 1}),
        "mlp": ({("h1", "h2"): 3}, {("h1",): 1}, {("h2",): 2, ("h1",): 1}),
        "head": ({("v", "h1"): 1}, {("h1",): 1}, {("v",): 1}),
    }


PER_LAYER = ("attention", "mlp")


def weight_bytes(config: ModelConfig, dtype: str = "fp32", embedding_dtype: str | None = None) -> WeightBytes:
    """Bytes of the weights stored as `dtype` (fp32, fp16, bf16, or int8 = W8A8).

    int8 keeps one fp32 scale per output row of every matrix; norm vectors
    stay fp32 there (they scale activations, they are not matmul operands).
    The embedding is a lookup table, not a matmul operand, so W8A8 leaves it
    in float: `embedding_dtype` defaults to `dtype`, and to fp32 for int8.
    The original kept its embedding in fp32 next to fp16 weights (pass
    embedding_dtype="fp32" to reproduce its table). A tied model has one
    table, counted in `head` at `dtype`.
    """
    wb, sym = _width(dtype), _symbols(config)
    eb = _width(embedding_dtype or ("fp32" if dtype == "int8" else dtype))
    int8 = dtype == "int8"
    out = {}
    for group, (matrices, vectors, rows) in weight_polys(config).items():
        n = (_value(matrices, sym) * (eb if group == "embedding" else wb)
             + _value(vectors, sym) * (SCALE_BYTES if int8 else wb)
             + (_value(rows, sym) * SCALE_BYTES if int8 else 0))
        out[group] = int(n) * (config.n_layers if group in PER_LAYER else 1)
    return WeightBytes(**out)


# ---------------------------------------------------------------- KV cache

def kv_bytes_per_token(config: ModelConfig, kv_dtype: str = "fp32") -> int:
    """Bytes one token's keys and values take over all layers: 2 * L * hkv * width
    (+ 2 * L * nkv fp32 scales for int8: one per token per kv head)."""
    per_layer = config.kv_dim * _width(kv_dtype) + (config.n_kv_heads * SCALE_BYTES if kv_dtype == "int8" else 0)
    return 2 * config.n_layers * per_layer


def kv_pool_bytes(config: ModelConfig, kv_dtype: str, block_size: int, num_blocks: int) -> int:
    """Bytes of a KV pool of `num_blocks` blocks of `block_size` tokens (what `KVCache` allocates)."""
    return num_blocks * block_size * kv_bytes_per_token(config, kv_dtype)


def kv_pool_blocks(config: ModelConfig, kv_dtype: str, block_size: int, budget_bytes: int) -> int:
    """The most whole blocks a KV pool can have within `budget_bytes`."""
    return max(0, budget_bytes // (block_size * kv_bytes_per_token(config, kv_dtype)))


def blocks_per_sequence(tokens: int, block_size: int) -> int:
    """ceil(tokens / block_size): a sequence takes a new block only when the last one is full."""
    return -(-tokens // block_size)


def kv_cache_bytes(config: ModelConfig, kv_dtype: str, block_size: int, batch: int, tokens: int) -> int:
    """Bytes of the blocks `batch` sequences of `tokens` tokens each hold.

    For a sequence of s prompt tokens that generates n we take tokens = s + n,
    as the original does: the last sampled token is written too when a chat
    continues, and otherwise the figure is one token high, which changes the
    block count only when s + n - 1 is a multiple of the block size.
    """
    return kv_pool_bytes(config, kv_dtype, block_size, batch * blocks_per_sequence(tokens, block_size))


# ---------------------------------------------------------------- activations

@dataclass(frozen=True)
class ActivationPeak:
    """The most bytes of activation buffers alive at once during one forward step."""

    bytes: int
    step: str                      # the forward line at which the peak happens
    live: tuple[str, ...]          # the buffers alive there
    per_row: Poly                  # floats per step row (T) at the peak, as a formula
    per_logit_row: Poly            # floats per logit row (R) at the peak


_FORWARD_ORDER = ["x0", "h0", "x", "h", "qkv", "q", "k_rot", "attn", "o", "x1", "h1", "gate_up", "silu", "down",
                  "rows", "logits"]


class _Frame:
    """Replays a function's array allocations with CPython's reference counting:
    a rebound name frees its old array only after the new one exists."""

    def __init__(self, sym, width):
        self.sym, self.width = sym, width
        self.live: dict[str, tuple[Poly, Poly]] = {}
        self.peak = ActivationPeak(0, "", (), {}, {})

    def new(self, name: str, step: str, rows: Poly, logit_rows: Poly = None) -> None:
        self.live[name] = (rows, logit_rows or {})
        t_poly = _sum(r for r, _ in self.live.values())
        r_poly = _sum(lr for _, lr in self.live.values())
        n = int((_value(_times(t_poly, "T"), self.sym) + _value(_times(r_poly, "R"), self.sym)) * self.width)
        if n > self.peak.bytes:
            live = sorted(self.live, key=lambda b: (_FORWARD_ORDER.index(b.rstrip("'")), b))
            self.peak = ActivationPeak(n, step, tuple(b.replace("'", " (new)") for b in live), t_poly, r_poly)

    def drop(self, name: str) -> None:
        del self.live[name]

    def rename(self, name: str, new_name: str) -> None:
        """The array of name stays alive, held as new_name."""
        self.live[new_name] = self.live.pop(name)

    def rebind(self, name: str) -> None:
        """name = name' (the array made as name'): the old array of name is freed."""
        self.live.pop(name, None)
        self.live[name] = self.live.pop(name + "'")

    def assign(self, name: str, step: str, rows: Poly, logit_rows: Poly = None) -> None:
        self.new(name + "'", step, rows, logit_rows)
        self.rebind(name)


def activation_peak(config: ModelConfig, tokens: int, logit_rows: int, act_dtype: str = "fp32") -> ActivationPeak:
    """Peak live activation bytes of `Llama.forward` for `tokens` rows, `logit_rows` of them projected to logits.

    Replays xllm/model.py as the CPU runs it. Each operator returns a new
    array; the forward pass holds the first layer's inputs x0 and h0 (the
    embedding and its norm) until `decoder_layers` returns, which holds
    each layer's inputs x and h until `decoder_layer` returns; inside, the
    compiled layer (xllm/ops/cpu/layer.py) frees each array after its last
    use (`rope_store` rotates k into a temporary before storing it). For
    Llama-2-7B in prefill the peak is at silu_mul of the second layer on,
    where x0, h0, the layer's inputs x and h, the new x, gate_up and its
    silu output are alive: T(5h1+3h2) floats. In decode the logits often
    dominate: T(2h1) + R(h1+v) with the gathered rows.
    """
    f = _Frame({**_symbols(config), "T": ("T", tokens), "R": ("R", logit_rows)}, _width(act_dtype))
    h1, hq, hkv = {("h1",): 1}, {("hq",): 1}, {("hkv",): 1}
    f.assign("x", "x = embedding(tokens)", h1)
    f.assign("h", "h = rmsnorm(x)", h1)
    for layer in range(config.n_layers):
        f.new("qkv", "linear(h, wqkv)", {("hq",): 1, ("hkv",): 2})
        f.new("q", "q = rope_store(qkv, cache)", hq)
        f.new("k_rot", "rope_store: rotated k, then stored", hkv)
        f.drop("k_rot")
        f.drop("qkv")
        f.new("attn", "attn = attention(q, cache)", hq)
        f.drop("q")
        f.new("o", "linear(attn, wo)", h1)
        f.drop("attn")
        f.new("x1", "x1, h1 = add_rmsnorm(x, o)", h1)
        f.new("h1", "x1, h1 = add_rmsnorm(x, o)", h1)
        f.drop("o")
        f.new("gate_up", "linear(h1, w_gate_up)", {("h2",): 2})
        f.drop("h1")
        f.new("silu", "silu_mul(gate_up)", {("h2",): 1})
        f.drop("gate_up")
        f.new("down", "linear(silu, w_down)", h1)
        f.drop("silu")
        f.new("x'", "x, h = add_rmsnorm(x1, down)", h1)
        f.new("h'", "x, h = add_rmsnorm(x1, down)", h1)
        f.drop("down")
        f.drop("x1")
        if layer == 0:                       # the forward pass still holds the first inputs
            f.rename("x", "x0")
            f.rename("h", "h0")
        f.rebind("x")                        # decoder_layers' names take the layer's outputs
        f.rebind("h")
    f.drop("x0")                             # decoder_layers returned: the forward's names rebound
    f.drop("h0")
    f.new("rows", "h[logit_rows]", {}, h1)
    f.new("logits", "logits = linear(h[rows], output)", {}, {("v",): 1})
    return f.peak


# ---------------------------------------------------------------- whole plans

@dataclass(frozen=True)
class MemoryPlan:
    """The original's memory table for one setting: b sequences, s prompt and n generated tokens each."""

    weights: WeightBytes
    kv_cache: int
    prefill: ActivationPeak        # all b prompts in one step: T = bs rows, R = b logit rows
    decode: ActivationPeak         # one token per sequence: T = R = b

    @property
    def total(self) -> int:
        return self.weights.total + self.kv_cache + max(self.prefill.bytes, self.decode.bytes)


def plan_memory(config: ModelConfig, batch: int, input_len: int, output_len: int, *, weight_dtype: str = "fp32",
                kv_dtype: str = "fp32", block_size: int = 128, embedding_dtype: str | None = None,
                act_dtype: str = "fp32") -> MemoryPlan:
    """Weights, KV cache and activation peaks of `batch` sequences (xllm computes activations in fp32)."""
    return MemoryPlan(
        weight_bytes(config, weight_dtype, embedding_dtype),
        kv_cache_bytes(config, kv_dtype, block_size, batch, input_len + output_len),
        activation_peak(config, batch * input_len, batch, act_dtype),
        activation_peak(config, batch, batch, act_dtype))


def max_batch(config: ModelConfig, budget_bytes: int, input_len: int, output_len: int, **dtypes) -> int:
    """The largest b whose `plan_memory(...).total` fits in `budget_bytes` (0 if none does).

    `dtypes` are plan_memory's keywords. The total grows with b, so a
    doubling search followed by bisection finds the edge.
    """
    def fits(b):
        return plan_memory(config, b, input_len, output_len, **dtypes).total <= budget_bytes
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def blocks_for_budget(config: ModelConfig, budget_bytes: int, *, max_step_tokens: int, max_logit_rows: int,
                      block_size: int = 128, weight_dtype: str = "fp32", kv_dtype: str = "fp32",
                      embedding_dtype: str | None = None, act_dtype: str = "fp32") -> int:
    """How many KV blocks the engine can allocate in `budget_bytes`: what is left after the
    weights and the activation peak of its largest step (`max_step_tokens` rows,
    `max_logit_rows` of them with logits), in whole blocks.

    Raises BudgetTooSmall when not even one block fits.
    """
    weights = weight_bytes(config, weight_dtype, embedding_dtype).total
    acts = activation_peak(config, max_step_tokens, max_logit_rows, act_dtype).bytes
    blocks = kv_pool_blocks(config, kv_dtype, block_size, budget_bytes - weights - acts)
    if blocks < 1:
        need = weights + acts + kv_pool_bytes(config, kv_dtype, block_size, 1)
        raise BudgetTooSmall(f"memory budget {budget_bytes / GiB:.2f} GiB is below weights {weights / GiB:.2f} GiB "
                             f"+ activations {acts / GiB:.2f} GiB + one KV block: need {need / GiB:.2f} GiB")
    return blocks


# ---------------------------------------------------------------- cost of each operator

@dataclass(frozen=True)
class Phase:
    """The rows of one step. P: cached key positions read (each sequence's K/V
    once); A: (row, key) pairs attended. `names` print T, R, P, A in formulas."""

    name: str
    T: int
    R: int
    P: int
    A: int
    names: dict


def prefill_phase(batch: int, input_len: int) -> Phase:
    """All b prompts in one step; row t of a prompt attends t+1 keys, s(s+1)/2 in all."""
    b, s = batch, input_len
    return Phase("prefill", b * s, b, b * s, b * s * (s + 1) // 2,
                 {"T": "bs", "R": "b", "P": "bs", "A": "bs(s+1)/2"})


def decode_phase(batch: int, input_len: int, output_len: int) -> Phase:
    """The last decode step, the dearest: each of b rows attends s+n keys."""
    b, ctx = batch, input_len + output_len
    return Phase("decode", b, b, b * ctx, b * ctx, {"T": "b", "R": "b", "P": "b(s+n)", "A": "b(s+n)"})


@dataclass(frozen=True)
class OpCost:
    """One operator of a step: its work, its compulsory traffic, and both as formulas."""

    name: str
    per_layer: bool        # runs once in each of the L layers, else once per step
    matrix: bool           # limited by the matrix-math peak of the weight dtype, else by the fp32 peak
    flops: float
    bytes: float
    flops_formula: str
    bytes_formula: str


def step_costs(config: ModelConfig, phase: Phase, *, weight_dtype: str = "fp32", kv_dtype: str = "fp32",
               act_dtype: str = "fp32", embedding_dtype: str | None = None) -> list[OpCost]:
    """FLOPs and bytes of every operator of `Llama.forward`, in its order.

    Bytes are compulsory traffic: each input read once, each output written
    once (weights at their dtype with int8 row scales, activations at
    act_dtype, the cache at kv_dtype), the least any kernel can move. A
    multiply-add is 2 FLOPs; rmsnorm counts 4 per element, rope 3, silu_mul 5.
    """
    sym = {**_symbols(config), **{k: (phase.names[k], getattr(phase, k)) for k in "TRPA"}}
    w, a, c = _width(weight_dtype), _width(act_dtype), _width(kv_dtype)
    e = _width(embedding_dtype or ("fp32" if weight_dtype == "int8" else weight_dtype))
    vec = SCALE_BYTES if weight_dtype == "int8" else w
    kv_scale = SCALE_BYTES if kv_dtype == "int8" else 0
    costs = []

    def op(name, flops, traffic, per_layer=True, matrix=False):
        """traffic: [(bytes per element, formula)]."""
        traffic = [(width, p) for width, p in traffic if width and p]
        costs.append(OpCost(name, per_layer, matrix, _value(flops, sym), sum(wd * _value(p, sym) for wd, p in traffic),
                            _render(flops, sym) or "0",
                            " + ".join(f"{wd}*" + (f"({t})" if _is_sum(t) else t)
                                       for wd, t in ((wd, _render(p, sym)) for wd, p in traffic))))

    def linear(name, n, k, rows="T", per_layer=True):
        """y[rows, n] = x[rows, k] @ W[n, k]^T, n and k formulas in model symbols: 2 FLOPs per weight per row."""
        kn = {tk + tn: pk * pn for tk, pk in k.items() for tn, pn in n.items()}
        op(name, {(rows,) + t: 2 * m for t, m in kn.items()},
           [(w, kn), (SCALE_BYTES if weight_dtype == "int8" else 0, n), (a, _times(_sum([k, n]), rows))],
           per_layer, matrix=True)

    h1, h2, hq = {("h1",): 1}, {("h2",): 1}, {("hq",): 1}
    op("embedding", {}, [(e, {("T", "h1"): 1}), (a, {("T", "h1"): 1})], per_layer=False)
    norm = lambda name: op(name, {("T", "h1"): 4}, [(a, {("T", "h1"): 2}), (vec, h1)])
    norm("attn rmsnorm")
    linear("qkv linear", {("hq",): 1, ("hkv",): 2}, h1)
    op("split q,k,v (copies)", {}, [(a, {("T", "hq"): 2, ("T", "hkv"): 4})])
    op("rope q,k", {("T", "hq"): 3, ("T", "hkv"): 3}, [(a, {("T", "hq"): 2, ("T", "hkv"): 2}), (4, {("T", "hd"): 1})])
    op("store_kv", {}, [(a, {("T", "hkv"): 2}), (c, {("T", "hkv"): 2}), (kv_scale, {("T", "nkv"): 2})])
    op("attention", {("A", "hq"): 4}, [(a, {("T", "hq"): 2}), (c, {("P", "hkv"): 2}), (kv_scale, {("P", "nkv"): 2})],
       matrix=True)
    linear("o linear", h1, hq)
    op("residual add", {("T", "h1"): 1}, [(a, {("T", "h1"): 3})])
    norm("ffn rmsnorm")
    linear("gate_up linear", {("h2",): 2}, h1)
    op("silu_mul", {("T", "h2"): 5}, [(a, {("T", "h2"): 3})])
    linear("down linear", h1, h2)
    op("residual add", {("T", "h1"): 1}, [(a, {("T", "h1"): 3})])
    op("final rmsnorm", {("T", "h1"): 4}, [(a, {("T", "h1"): 2}), (vec, h1)], per_layer=False)
    linear("logits", {("v",): 1}, h1, rows="R", per_layer=False)
    return costs


# ---------------------------------------------------------------- devices and the roofline

@dataclass(frozen=True)
class Device:
    """Peak FLOP/s by math dtype, memory bandwidth in bytes/s, memory size, and where the figures come from."""

    name: str
    flops: dict
    bandwidth: float
    memory: int
    source: str

    def peak(self, dtype: str) -> float:
        return self.flops.get(dtype, self.flops["fp32"])


# Dense (no sparsity) peaks from NVIDIA's spec sheets. Matrix math at fp16/bf16 is the
# tensor-core rate with fp32 accumulation, which is what cuBLAS uses for fp16 GEMMs.
DEVICES = {
    "4090": Device("RTX 4090", {"fp32": 82.6e12, "fp16": 165.2e12, "bf16": 165.2e12, "int8": 660.6e12},
                   1008e9, 24 * GiB, "Ada whitepaper, appendix A: fp16 tensor w/ fp32 accumulate 165.2 TFLOP/s, "
                   "int8 660.6 TOP/s, fp32 (= non-tensor fp16) 82.6; 1008 GB/s. The original's table used 73 "
                   "TFLOP/s: --tflops 73 reproduces it"),
    "a100-80gb": Device("A100 80GB SXM", {"fp32": 19.5e12, "fp16": 312e12, "bf16": 312e12, "int8": 624e12},
                        2039e9, 80 * GiB, "A100 datasheet: fp16/bf16 tensor 312 TFLOP/s, int8 624 TOP/s, fp32 19.5; "
                        "2039 GB/s HBM2e"),
    "h100-sxm": Device("H100 SXM", {"fp32": 67e12, "fp16": 989.4e12, "bf16": 989.4e12, "int8": 1978.9e12},
                       3.35e12, 80 * GiB, "H100 datasheet (dense, half the sparse figures): fp16/bf16 tensor "
                       "989 TFLOP/s, int8 1979 TOP/s, fp32 67; 3.35 TB/s HBM3"),
    "t4": Device("Tesla T4", {"fp32": 8.1e12, "fp16": 65e12, "int8": 130e12}, 320e9, 16 * GiB,
                 "T4 datasheet: fp16 tensor 65 TFLOP/s, int8 130 TOP/s, fp32 8.1; 320 GB/s"),
}


def measure_cpu(seconds: float = 1.5) -> Device:
    """This CPU, measured now with numpy (about `seconds`): bandwidth and fp32 matmul FLOP/s.

    Bandwidth is the faster of two 64 MiB streams, bigger than a last-level
    cache: a copy (read + write bytes) and a matrix-vector product through
    numpy's BLAS (the bytes of the matrix read), the access pattern of decode;
    reads alone often stream faster than copies. FLOP/s is a 1024^3 float32
    matmul through BLAS. Each is the fastest of repeated calls, so a busy
    machine lowers the figures less. xllm's CPU kernels compute in fp32
    whatever the storage dtype, so every dtype gets the fp32 figure.
    """
    def fastest(fn, budget):
        fn()
        best, end = float("inf"), time.perf_counter() + budget
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    rng = np.random.default_rng(0)
    src = np.ones(16 << 20, np.float32)
    dst = np.empty_like(src)
    copy = 2 * src.nbytes / fastest(lambda: np.copyto(dst, src), seconds / 4)
    w, x = src.reshape(4096, 4096), np.ones(4096, np.float32)
    read = w.nbytes / fastest(lambda: w @ x, seconds / 4)
    m = rng.standard_normal((1024, 1024), dtype=np.float32)
    flops = 2 * 1024 ** 3 / fastest(lambda: m @ m, seconds / 2)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Device(f"this CPU ({os.cpu_count()} cores)", {"fp32": flops}, max(copy, read), memory,
                  f"measured now with numpy: copy {copy / 1e9:.1f} GB/s, matrix-vector read {read / 1e9:.1f} GB/s, "
                  f"float32 matmul {flops / 1e9:.1f} GFLOP/s")


@dataclass(frozen=True)
class Bound:
    """An operator on a device's roofline."""

    cost: OpCost
    compute_s: float          # FLOPs / peak
    memory_s: float           # bytes / bandwidth

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def bottleneck(self) -> str:
        return "compute" if self.compute_s > self.memory_s else "memory"

    @property
    def intensity(self) -> float:
        """FLOPs per byte: above the device's peak / bandwidth ("ridge point") an op is compute bound."""
        return self.cost.flops / self.cost.bytes if self.cost.bytes else math.inf


def roofline(costs: list[OpCost], device: Device, weight_dtype: str = "fp32") -> list[Bound]:
    """Each operator's time bound on `device`: matrix ops at the weight dtype's peak, the rest at fp32."""
    return [Bound(c, c.flops / device.peak(weight_dtype if c.matrix else "fp32"), c.bytes / device.bandwidth)
            for c in costs]


def step_seconds(bounds: list[Bound], n_layers: int) -> float:
    """The bound of a whole step: per-layer operators L times, the others once."""
    return sum(b.seconds * (n_layers if b.cost.per_layer else 1) for b in bounds)


# ---------------------------------------------------------------- model presets

MODELS = {
    "llama2-7b": ModelConfig(32, 4096, 32, 32, 11008, 32000, context_length=4096, name="Llama-2-7B"),
    "llama2-13b": ModelConfig(40, 5120, 40, 40, 13824, 32000, context_length=4096, name="Llama-2-13B"),
    "llama3-8b": ModelConfig(32, 4096, 32, 8, 14336, 128256, rope_theta=500000.0, context_length=8192,
                             name="Llama-3-8B"),
    "tinyllama-1.1b": ModelConfig(22, 2048, 32, 4, 5632, 32000, context_length=2048, name="TinyLlama-1.1B"),
    "smollm2-135m": ModelConfig(30, 576, 9, 3, 1536, 49152, rope_theta=100000.0, context_length=8192,
                                tied_embeddings=True, name="SmolLM2-135M"),
    "smollm2-360m": ModelConfig(32, 960, 15, 5, 2560, 49152, rope_theta=100000.0, context_length=8192,
                                tied_embeddings=True, name="SmolLM2-360M"),
}


def model_config(name_or_path: str) -> ModelConfig:
    """A preset's config (see MODELS), or the config read from a checkpoint's metadata (no weights loaded)."""
    if name_or_path.lower() in MODELS:
        return MODELS[name_or_path.lower()]
    from .loader import load_checkpoint
    return load_checkpoint(name_or_path, load_weights=False).config
