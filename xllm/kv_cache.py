"""The key/value cache: a pool of fixed-size blocks per layer.

Every layer owns two arrays of shape [num_blocks * block_size, n_kv_heads,
head_dim], one for keys and one for values. A sequence does not own a slice of
those arrays up front: it owns a list of block numbers (its *block table*) and
takes a new block from the pool only when its next token would not fit in the
blocks it already has. The token at position p of a sequence lives at slot

    block_table[p // block_size] * block_size + p % block_size

so sequences of any length share one pool without padding, and a finished
sequence gives its blocks back with `free`.

The arrays store keys and values as float32, float16 or int8 (`kv_dtype`
"fp32", "fp16", "int8"). int8 keeps beside them one float32 scale per token per
kv head (`k_scale`, `v_scale`, [num_blocks * block_size, n_kv_heads]): a
token's head of head_dim numbers x is stored as round(x / s), s = max|x| / 127.
`store_kv` narrows on the way in, `attention` widens as it reads; `layer(i)`
gives the four arrays of layer i as those operators take them
(see `xllm/ops/kernels/kv_format.py` for the formats).

The arrays live on a device (`device`, as for the model): one pool per kind
(keys, values and their scales) of shape [n_layers, slots, ...], allocated
through the device's `zeros`, and `layer(i)` hands out views of layer i.

Example (block_size 4): a sequence of 6 tokens with block table [7, 2] keeps
positions 0..3 in slots 28..31 and positions 4..5 in slots 8..9.

The file has two layers. `BlockManager` is the bookkeeping alone, in plain
Python: which blocks are free, which sequence owns which, how many tokens each
sequence has stored. It knows nothing about arrays, so the scheduler
(`xllm.scheduler`) and its tests use it without a model. `KVCache` puts the
per-layer arrays beside one `BlockManager` and turns block numbers into slots.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import ModelConfig
from .errors import XllmError
from .ops import ops_for


class OutOfBlocks(XllmError):
    """The pool has no free block left for a sequence that needs one."""


def blocks_for(num_tokens: int, block_size: int) -> int:
    """How many blocks hold `num_tokens` tokens: the ceiling of the division."""
    return -(-num_tokens // block_size)


class BlockManager:
    """Which KV blocks are free and which sequence owns which.

    Two numbers describe a sequence: its *capacity*, the tokens its blocks can
    hold (len(table) * block_size), and its *length*, the tokens actually
    stored. `reserve` raises both for tokens about to be written; `allocate`
    raises only the capacity, so a scheduler can set blocks aside for a step
    before the step writes anything (the later `reserve` then takes no block).
    """

    def __init__(self, num_blocks: int, block_size: int = 128):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"a KV pool needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))    # pop() hands out block 0 first
        self.tables: dict[int, list[int]] = {}               # sequence id -> its blocks
        self.lengths: dict[int, int] = {}                     # sequence id -> tokens stored
        self.peak_used = 0                                    # most blocks ever in use at once

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def capacity(self, seq_id: int) -> int:
        """How many tokens the blocks `seq_id` already owns can hold."""
        return len(self.tables.get(seq_id, ())) * self.block_size

    def blocks_to_hold(self, seq_id: int, num_tokens: int) -> int:
        """How many more blocks `seq_id` needs for a total of `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.tables.get(seq_id, ())))

    def blocks_needed(self, seq_id: int, new_tokens: int) -> int:
        """How many more blocks `seq_id` needs to store `new_tokens` more tokens."""
        return self.blocks_to_hold(seq_id, self.lengths.get(seq_id, 0) + new_tokens)

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Give `seq_id` blocks until it can hold `num_tokens` tokens in total.

        All or nothing: when the pool has too few free blocks, nothing is taken
        and `OutOfBlocks` is raised."""
        need = self.blocks_to_hold(seq_id, num_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more KV blocks, {len(self._free)} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._free.pop())
        self.peak_used = max(self.peak_used, self.used_blocks)

    def reserve(self, seq_id: int, new_tokens: int) -> int:
        """Make room for `new_tokens` more tokens of `seq_id` and count them as
        stored; return the position of the first one."""
        start = self.lengths.get(seq_id, 0)
        self.allocate(seq_id, start + new_tokens)
        self.lengths[seq_id] = start + new_tokens
        return start

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the tokens of `seq_id` from `length` on, returning emptied blocks."""
        table = self.tables.get(seq_id, [])
        keep = blocks_for(length, self.block_size)
        while len(table) > keep:
            self._free.append(table.pop())
        self.lengths[seq_id] = min(self.lengths.get(seq_id, 0), length)

    def free(self, seq_id: int) -> None:
        """Give every block of `seq_id` back to the pool and forget the sequence."""
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def check(self) -> None:
        """Raise AssertionError unless every block is either free or owned by
        exactly one sequence (a debugging and testing aid)."""
        owned = [b for table in self.tables.values() for b in table]
        every = sorted(owned + self._free)
        assert every == list(range(self.num_blocks)), "a block is lost, or held twice"
        for seq_id, length in self.lengths.items():
            assert length <= self.capacity(seq_id), f"sequence {seq_id} stores more tokens than its blocks hold"


KV_DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}
SCALE_DTYPE = np.float32                  # int8's per-token, per-kv-head scales


def _check_kv_dtype(kv_dtype: str) -> None:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown kv_dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}")


class KVLayer(NamedTuple):
    """One layer's cache arrays, as `store_kv` and `attention` take them.

    k, v [S, n_kv_heads, head_dim] of the storage dtype; k_scale, v_scale
    [S, n_kv_heads] float32 for int8, None otherwise.
    """

    k: np.ndarray
    v: np.ndarray
    k_scale: np.ndarray | None
    v_scale: np.ndarray | None


class KVCache:
    """The per-layer key and value arrays, and the `BlockManager` saying whose
    tokens are where (`self.blocks`).

    `kv_dtype` ("fp32", "fp16" or "int8") is how the arrays store a number;
    for int8, `k_scale` and `v_scale` are the per-layer scale arrays (else None).
    `device` is where the arrays live (the model's device).
    """

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 128, kv_dtype: str = "fp32",
                 device="cpu"):
        _check_kv_dtype(kv_dtype)
        self.blocks = BlockManager(num_blocks, block_size)
        self.kv_dtype = kv_dtype
        self.ops = ops_for(device)
        S, L = num_blocks * block_size, config.n_layers
        shape = (L, S, config.n_kv_heads, config.head_dim)
        dtype = KV_DTYPES[kv_dtype]
        self.pools = [self.ops.zeros(shape, dtype), self.ops.zeros(shape, dtype)]       # keys, values
        self.k = [self.pools[0][i] for i in range(L)]
        self.v = [self.pools[1][i] for i in range(L)]
        self.k_scale: list | None = None
        self.v_scale: list | None = None
        if kv_dtype == "int8":
            self.pools += [self.ops.zeros(shape[:3], SCALE_DTYPE), self.ops.zeros(shape[:3], SCALE_DTYPE)]
            self.k_scale = [self.pools[2][i] for i in range(L)]
            self.v_scale = [self.pools[3][i] for i in range(L)]

    @classmethod
    def for_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int = 128,
                   kv_dtype: str = "fp32", device: str = "cpu") -> "KVCache":
        """A cache with as many blocks as `budget_bytes` pays for (at least one),
        counted by the planner, so its tables and the engine agree."""
        from .planner import kv_pool_blocks

        _check_kv_dtype(kv_dtype)
        return cls(config, max(1, kv_pool_blocks(config, kv_dtype, block_size, budget_bytes)), block_size, kv_dtype,
                   device)

    def touch(self) -> None:
        """Write every page of the pool once.

        The arrays are mapped lazily, so the first token written into a page
        pays a page fault; on this project's virtual machines that is about
        3 ms per MB, an extra second the first time 32 requests fill 64
        blocks. A long-running server pays it once; a benchmark of steady
        throughput calls this before timing (llama.cpp likewise clears its
        whole KV buffer when it starts). It writes zeros, so it refuses while
        any sequence holds blocks.
        """
        if self.blocks.used_blocks:
            raise RuntimeError(f"KVCache.touch would erase {self.blocks.used_blocks} blocks in use")
        for pool in self.pools:
            if isinstance(pool, np.ndarray):     # device memory is resident from its allocation
                pool.fill(0)

    def layer(self, i: int) -> KVLayer:
        """Layer i's arrays for the operators:

            kv = cache.layer(i)
            ops.store_kv(k, v, kv.k, kv.v, slot_mapping, kv.k_scale, kv.v_scale)
            ops.attention(q, kv.k, kv.v, ..., scale, kv.k_scale, kv.v_scale)
        """
        if self.k_scale is None:
            return KVLayer(self.k[i], self.v[i], None, None)
        return KVLayer(self.k[i], self.v[i], self.k_scale[i], self.v_scale[i])

    @property
    def pool_bytes(self) -> int:
        """Bytes of every array of the cache, scales included (all of the
        pool, written or not: what the budget pays for)."""
        return sum(int(pool.nbytes) for pool in self.pools)

    # The bookkeeping lives in self.blocks; these names keep the cache's own API.
    @property
    def block_size(self) -> int:
        return self.blocks.block_size

    @property
    def num_blocks(self) -> int:
        return self.blocks.num_blocks

    @property
    def tables(self) -> dict[int, list[int]]:
        return self.blocks.tables

    @property
    def lengths(self) -> dict[int, int]:
        return self.blocks.lengths

    @property
    def free_blocks(self) -> int:
        return self.blocks.free_blocks

    @property
    def used_blocks(self) -> int:
        return self.blocks.used_blocks

    def blocks_needed(self, seq_id: int, new_tokens: int) -> int:
        """How many more blocks `seq_id` needs to hold `new_tokens` more tokens."""
        return self.blocks.blocks_needed(seq_id, new_tokens)

    def reserve(self, seq_id: int, new_tokens: int) -> np.ndarray:
        """Make room for `new_tokens` more tokens of `seq_id`; return their slots."""
        start = self.blocks.reserve(seq_id, new_tokens)
        return self.slots(seq_id, start, new_tokens)

    def slots(self, seq_id: int, start: int, count: int) -> np.ndarray:
        """The cache slots of positions start..start+count-1 of `seq_id`, which
        its blocks must already cover."""
        pos = np.arange(start, start + count)
        blocks = np.asarray(self.blocks.tables.get(seq_id, []), np.int64)[pos // self.block_size]
        return (blocks * self.block_size + pos % self.block_size).astype(np.int32)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the tokens of `seq_id` from `length` on, returning emptied blocks."""
        self.blocks.truncate(seq_id, length)

    def free(self, seq_id: int) -> None:
        """Give every block of `seq_id` back to the pool."""
        self.blocks.free(seq_id)

    def block_table(self, seq_ids: list[int]) -> np.ndarray:
        """The block tables of `seq_ids` as one [B, max_blocks] int32 array."""
        tables = self.blocks.tables
        width = max(1, max(len(tables[s]) for s in seq_ids))
        out = np.zeros((len(seq_ids), width), np.int32)
        for row, s in enumerate(seq_ids):
            out[row, : len(tables[s])] = tables[s]
        return out
