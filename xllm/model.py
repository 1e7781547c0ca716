"""The Llama forward pass, written once for every device.

It calls only the operators and memory functions of the device registry
(`xllm.ops.get_ops`, interface in `xllm/ops/interface.py`), so the same code
runs the numba CPU kernels, the numpy reference, or the CUDA kernels (on a
GPU or under the simulator). Weights go to the device once, when the model
is built; each step uploads the batch's few index arrays and downloads only
the logits of the rows that sample.

The input is a *ragged batch*: the tokens of several sequences laid end to
end, with no padding. Sequence b owns rows cu_q[b]..cu_q[b+1]-1 of every
activation; each row carries its own absolute position, and attention finds a
sequence's earlier keys through its row of the KV cache's block table. One
sequence prefilling 100 tokens and three sequences decoding one token each
are the same call: 103 rows.

One layer, for rows x[T, dim]:

    h      = rmsnorm(x) ;  q, k, v = split(h @ Wqkv^T)
    q, k   = rope(q), rope(k)          (positions of each row)
    cache <- k, v                      (at each row's slot)
    x      = x + attention(q, cache) @ Wo^T
    h      = rmsnorm(x)
    x      = x + (silu(h @ Wgate^T) * (h @ Wup^T)) @ Wdown^T

The layer is one operator, `Ops.decoder_layer` (xllm/ops/interface.py):
nine operator calls, written there as the lines above. It takes the glue
between the matrix products in two fused operators (`Ops.add_rmsnorm`,
`Ops.rope_store`): a residual addition with the norm after it (the next
layer's first norm, or the final one), and split + rope + cache store.
Each is a composition of the operators above, one call where a device
fuses it; the CPU runs a whole layer as one compiled call, since a decode
step's operators are small enough that calling them from Python was a
third of its time. The forward pass makes one call for all the layers,
`Ops.decoder_layers`, with the layers' weights as the device prepared them
once (`Ops.prepare_layers`): the checks and argument lists each layer's call
needed then cost a tenth of a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .kv_cache import KVCache, blocks_for
from .ops import LayerWeights, ops_for
from .weights import concat as quant_concat, is_quant

ROPE_TABLE_START = 4096     # positions the RoPE tables cover at first; they double as needed


@dataclass
class Batch:
    """One forward step's rows (see the module docstring)."""

    tokens: np.ndarray        # [T] int32 token ids
    positions: np.ndarray     # [T] int32 absolute position of each row
    cu_q: np.ndarray          # [B+1] int32 row offsets of the sequences
    block_table: np.ndarray   # [B, max_blocks] int32 KV blocks of each sequence
    slot_mapping: np.ndarray  # [T] int32 cache slot each row's key/value goes to

    @classmethod
    def build(cls, cache: KVCache, seqs: list[tuple[int, list[int]]]) -> "Batch":
        """Rows for `seqs`, a list of (sequence id, new token ids), reserving
        cache slots for the new tokens after what each sequence already holds."""
        tokens, positions, slots, cu = [], [], [], [0]
        for seq_id, ids in seqs:
            start = cache.lengths.get(seq_id, 0)
            slots.append(cache.reserve(seq_id, len(ids)))
            tokens.extend(ids)
            positions.extend(range(start, start + len(ids)))
            cu.append(cu[-1] + len(ids))
        return cls(
            tokens=np.asarray(tokens, np.int32),
            positions=np.asarray(positions, np.int32),
            cu_q=np.asarray(cu, np.int32),
            block_table=cache.block_table([s for s, _ in seqs]),
            slot_mapping=np.concatenate(slots).astype(np.int32),
        )


def prepare_weights(config: ModelConfig, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Turn a loader's canonical weights into the layout the forward pass reads.

    The q, k and v projections are stacked into one matrix (one pass over the
    activations instead of three), and so are the gate and up projections.
    The output projection is the embedding table when the model ties them,
    unless the weights hold one of their own (W8A8 quantizes a tied table's
    copy for it: xllm/quantize.py).
    Matrices keep their storage (QuantWeight blocks, float16); the rest becomes float32.
    """
    out = {"tok_embeddings": weights["tok_embeddings"], "norm": weights["norm"]}
    own = "output" in weights or not config.tied_embeddings
    out["output"] = weights["output"] if own else weights["tok_embeddings"]
    for i in range(config.n_layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = weights[p + "attn_norm"]
        out[p + "ffn_norm"] = weights[p + "ffn_norm"]
        out[p + "wqkv"] = _stack([weights[p + "wq"], weights[p + "wk"], weights[p + "wv"]])
        out[p + "wo"] = weights[p + "wo"]
        out[p + "w_gate_up"] = _stack([weights[p + "w_gate"], weights[p + "w_up"]])
        out[p + "w_down"] = weights[p + "w_down"]
    return {k: v if is_quant(v) or v.dtype == np.float16 else np.ascontiguousarray(v, dtype=np.float32)
            for k, v in out.items()}


def _stack(parts):
    """Rows of `parts` one after another: quantized blocks stay quantized when
    every part has the same format, anything else becomes float32."""
    if all(is_quant(p) for p in parts) and len({p.format for p in parts}) == 1:
        return quant_concat(parts)
    return np.concatenate([p.dequantize() if is_quant(p) else p for p in parts])


class Llama:
    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray], device="cpu", f32: bool = False,
                 exact: bool = False):
        """`weights` in the layout of `prepare_weights`, on the host.

        `device`: "cpu", "cuda", "cuda-sim", "reference", "auto" (a GPU when
        one works), or an `Ops` object. The weights are uploaded once; a GPU stores float matrices
        as float16 unless `f32` (GGUF blocks stay as they are everywhere). `exact`
        multiplies quantized weights in float32 instead of quantizing the
        activations to integers (`xllm.ops.get_ops`); it does not apply to an `Ops` object.
        """
        self.config = config
        self.ops = ops_for(device, exact)
        self.device = self.ops.name
        uploaded: dict[int, object] = {}        # tied embeddings: one upload for both names
        self.w = {}
        for name, w in weights.items():
            if id(w) not in uploaded:
                uploaded[id(w)] = self.ops.upload_weight(w, f32)
            self.w[name] = uploaded[id(w)]
        self.layers = self.ops.prepare_layers([
            LayerWeights(*(self.w[f"layers.{i}.{k}"] for k in ("wqkv", "wo", "w_gate_up", "w_down", "ffn_norm")),
                         self.w[f"layers.{i + 1}.attn_norm" if i + 1 < config.n_layers else "norm"])
            for i in range(config.n_layers)])
        self.cos, self.sin = self._rope_tables(min(config.context_length, ROPE_TABLE_START))
        self.scale = float(config.head_dim) ** -0.5

    def _rope_tables(self, n_positions: int):
        """(cos, sin) [n_positions, head_dim // 2] on the device. They start at
        ROPE_TABLE_START positions and double when a batch reaches past them: at a
        context of 2^20 the full tables would take 0.9 GB (head_dim 64, float32 x 2)
        for conversations that rarely go that far. Row p depends on p alone, for
        every scaling (xllm/rope.py), so a longer table extends the shorter one."""
        c = self.config
        return self.ops.rope_tables(c.rope_theta, c.head_dim, n_positions, c.rope_scaling)

    def forward(self, batch: Batch, cache: KVCache, logit_rows: np.ndarray) -> np.ndarray:
        """Run every row of `batch` through the model, writing its keys and values
        into `cache` (on the model's device); return the logits
        [len(logit_rows), vocab] of the chosen rows, as a numpy array."""
        c, ops, w = self.config, self.ops, self.w
        if batch.positions.size and int(batch.positions.max()) >= c.context_length:
            raise ValueError(f"position {int(batch.positions.max())} is past the model's context length {c.context_length}")
        if batch.positions.size and int(batch.positions.max()) >= self.cos.shape[0]:
            self.cos, self.sin = self._rope_tables(min(c.context_length, max(2 * self.cos.shape[0],
                                                                             int(batch.positions.max()) + 1)))
        H, KV, hd = c.n_heads, c.n_kv_heads, c.head_dim
        positions, cu_q = ops.upload(batch.positions), ops.upload(batch.cu_q)
        block_table, slots = ops.upload(batch.block_table), ops.upload(batch.slot_mapping)
        x = ops.embedding(w["tok_embeddings"], ops.upload(batch.tokens))
        h = ops.rmsnorm(x, w["layers.0.attn_norm"], c.rms_eps)
        # Each layer leaves h normed for the next one (after the last, by the final norm).
        x, h = ops.decoder_layers(x, h, self.layers, c.rms_eps, H, KV, hd, positions, self.cos, self.sin, cache.k,
                                  cache.v, slots, block_table, cache.block_size, cu_q, self.scale, cache.k_scale,
                                  cache.v_scale)
        rows = ops.upload(np.asarray(logit_rows, np.int32))
        return ops.download(ops.logits(h, rows, w["output"]))

    def logits_for(self, ids: list[int], kv_dtype: str = "fp32", chunk: int = 256,
                   block_size: int = 128) -> np.ndarray:
        """Logits after every prefix of `ids`, from a fresh cache: [len(ids), vocab].

        For evaluation (perplexity, comparing with other engines): the
        prompt runs in chunks of `chunk` rows through a cache of its own.
        Generation goes through the engine (`xllm.engine`)."""
        if not 0 < len(ids) <= self.config.context_length:
            raise ValueError(f"logits_for needs 1..{self.config.context_length} tokens, got {len(ids)}")
        cache = KVCache(self.config, blocks_for(len(ids), block_size), block_size, kv_dtype, device=self.ops)
        outs = []
        for start in range(0, len(ids), chunk):
            part = [int(t) for t in ids[start : start + chunk]]
            batch = Batch.build(cache, [(0, part)])
            outs.append(self.forward(batch, cache, np.arange(len(part), dtype=np.int32)))
        return np.concatenate(outs)
