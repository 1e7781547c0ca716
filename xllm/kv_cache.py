"""The key/value cache: a pool of fixed-size blocks per layer.

Every layer owns two arrays of shape [num_blocks * block_size, n_kv_heads,
head_dim], one for keys and one for values. A sequence does not own a slice of
those arrays up front: it owns a list of block numbers (its *block table*) and
takes a new block from the pool only when its next token would not fit in the
blocks it already has. The token at position p of a sequence lives at slot

    block_table[p // block_size] * block_size + p % block_size

so sequences of any length share one pool without padding, and a finished
sequence gives its blocks back with `free`.

Example (block_size 4): a sequence of 6 tokens with block table [7, 2] keeps
positions 0..3 in slots 28..31 and positions 4..5 in slots 8..9.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig
from .errors import XllmError


class OutOfBlocks(XllmError):
    """The pool has no free block left for a sequence that needs one."""


class KVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 128):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"KVCache needs num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_blocks * block_size, config.n_kv_heads, config.head_dim)
        # np.zeros maps pages lazily: memory is touched only where tokens are written.
        self.k = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(config.n_layers)]
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() hands out block 0 first
        self.tables: dict[int, list[int]] = {}               # sequence id -> its blocks
        self.lengths: dict[int, int] = {}                     # sequence id -> tokens stored

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def blocks_needed(self, seq_id: int, new_tokens: int) -> int:
        """How many more blocks `seq_id` needs to hold `new_tokens` more tokens."""
        have = len(self.tables.get(seq_id, ()))
        need = -(-(self.lengths.get(seq_id, 0) + new_tokens) // self.block_size)
        return max(0, need - have)

    def reserve(self, seq_id: int, new_tokens: int) -> np.ndarray:
        """Make room for `new_tokens` more tokens of `seq_id`; return their slots."""
        table = self.tables.setdefault(seq_id, [])
        start = self.lengths.setdefault(seq_id, 0)
        need = self.blocks_needed(seq_id, new_tokens)
        if need > len(self._free):
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more KV blocks, {len(self._free)} free")
        for _ in range(need):
            table.append(self._free.pop())
        pos = np.arange(start, start + new_tokens)
        blocks = np.asarray(table, np.int64)[pos // self.block_size]
        self.lengths[seq_id] = start + new_tokens
        return (blocks * self.block_size + pos % self.block_size).astype(np.int32)

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the tokens of `seq_id` from `length` on, returning emptied blocks."""
        table = self.tables.get(seq_id, [])
        keep = -(-length // self.block_size)
        while len(table) > keep:
            self._free.append(table.pop())
        self.lengths[seq_id] = min(self.lengths.get(seq_id, 0), length)

    def free(self, seq_id: int) -> None:
        """Give every block of `seq_id` back to the pool."""
        self._free.extend(reversed(self.tables.pop(seq_id, [])))
        self.lengths.pop(seq_id, None)

    def block_table(self, seq_ids: list[int]) -> np.ndarray:
        """The block tables of `seq_ids` as one [B, max_blocks] int32 array."""
        width = max(1, max(len(self.tables[s]) for s in seq_ids))
        out = np.zeros((len(seq_ids), width), np.int32)
        for row, s in enumerate(seq_ids):
            out[row, : len(self.tables[s])] = self.tables[s]
        return out
