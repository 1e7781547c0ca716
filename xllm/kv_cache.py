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
Python: which blocks are free, which sequences hold which, how many tokens each
sequence has stored, and which blocks hold which tokens (the prefix cache,
below). It knows nothing about arrays, so the scheduler (`xllm.scheduler`) and
its tests use it without a model. `KVCache` puts the per-layer arrays beside
one `BlockManager` and turns block numbers into slots.

Prefix caching (vLLM's "automatic prefix caching")
--------------------------------------------------

Many requests start with the same tokens: a system prompt, or the whole
conversation so far when a chat sends its next turn. The key and value of a
token depend only on that token, its position and the tokens before it, so two
blocks that hold the same tokens after the same prefix hold the same numbers.
The pool keeps what finished requests computed and lets a new request start
from it instead of computing it again.

* Digests. A block *full* of computed tokens gets a digest, a hash of its
  tokens and, through the digest of the block before it, of every token
  before them:

      digest_0 = blake2b(ROOT_DIGEST + token ids of block 0)
      digest_i = blake2b(digest_{i-1} + token ids of block i)

  so the same tokens after a different prefix get a different digest. A map
  digest -> block finds them (`cache_full_blocks` fills it). The digest is 16
  bytes of blake2b: two different prefixes collide with odds of about 2^-64
  per pair even among billions of blocks, which we ignore, like vLLM.
* Reference counts. A block found by its digest may be in several block
  tables at once; its count is how many. `free` lowers the counts of a
  sequence's blocks and a block whose count reaches 0 is *free*: it can be
  handed out. But it keeps its digest, so a later request can still find it.
* Two free lists. Free blocks with nothing worth keeping (never used, or of
  unknown contents) are handed out first. Free blocks that can still be found
  wait in least-recently-freed order, and are handed out only when there is
  no other free block, oldest first: then their digest is *evicted* (deleted
  from the map) because their contents are about to be overwritten. A
  sequence's blocks are freed last block first, so the end of a prompt is
  evicted before its beginning (without its beginning it cannot be found
  anyway). `free_blocks` counts both lists: blocks that can be handed out now.
* Partial blocks. The last block of a sequence is rarely full. When a
  sequence is freed with its tokens (`free(seq_id, token_ids)`), that last,
  partly filled block is kept findable too, under (digest of the block before
  it, or ROOT_DIGEST; its tokens). Otherwise the next turn of a chat, whose
  prompt is the previous turn's prompt and answer plus the new message, would
  compute up to block_size - 1 old tokens again. One partial block is kept per
  parent digest: a newer one replaces an older one, which becomes a plain
  free block.
* Lookup. `find_prefix(token_ids, max_tokens)` walks the digests of the full
  blocks of `token_ids` while they are in the map. Where the walk stops,
  after the block whose digest is P, it looks among the cached blocks that
  come right after P (P's *children*: the full blocks whose parent is P, and
  the partial block kept under P) for the one whose tokens begin like the
  rest of `token_ids` for the most tokens, k (1 <= k < block_size). `admit`
  starts the sequence's table with what was found: the full blocks are
  shared (count + 1, and taken out of the free list if their count was 0);
  then come the k tokens, one of two ways:
  - *adopted*: the partial block, when it is the best match (or as good as
    the best), is taken out of the free list and of the partial map and
    becomes the sequence's own block; the sequence's next tokens overwrite
    whatever follows the matched tokens in it.
  - *copied*: a full block as the best match has a digest, so it is never
    written (others may hold it, or find it later): it cannot become the
    sequence's own. The sequence gets a fresh block instead, and the first k
    slots of the full block are copied into it, in every layer, before the
    step runs (`KVCache.copy_blocks`). This is what lets two
    requests share a 200-token system prompt at block size 128 when the
    first one went on past token 256: its block 1 holds the system prompt's
    last 72 tokens and 56 of its own, and is hashed with them.
  The scan compares token prefixes with every child of P, one token at a
  time: about (number of children of P) x k comparisons of Python ints, once
  per admission. P has as many children as distinct continuations of its
  prefix are cached, so this stays small unless many cached requests part
  ways right after P (then each admission after them scans them all; a trie
  of tokens would make it O(k), at more bookkeeping). Each cached full block
  keeps its tokens for that: a tuple of block_size ints (about 1 KB at block
  size 128, beside the 5.9 MB its fp32 keys and values take in SmolLM2-135M).

Why a block that is shared is never written. A sequence writes only at
positions from its length (tokens stored) on. A block gets a digest only when
every position of it is below the length of the sequence that filled it, and
it is shared only through `find_prefix`, which hands out full blocks whose
positions are all below the hit, where the new sequence's length starts. The
caller caps the hit below the sequence's last token (the scheduler asks for at
most num_tokens - 1: the last token must run to give logits), so the next token
goes after the shared blocks, into a block the sequence took from the free list
or adopted. `check` asserts it: a block with a digest sits only at an index of
a table covered by that sequence's own digests, so below its length.
(`truncate` is the one way to lower a length: it refuses to cut inside a block
someone else holds, and takes the digest away from a block it cuts into.)

Why adopting a partial block is safe. A partial block is in the partial map
only while its count is 0: it enters when its only holder frees it, and it
leaves when it is handed out or adopted. So whoever adopts it is its only
holder, and it has no digest, so nobody else can find it: no copy-on-write is
needed. Its matched tokens are exactly the ones the adopter would compute
(same tokens after the same prefix, through the parent digest).

Why copying is safe. The source must hold the k tokens' keys and values
from the time `admit` plans the copy until the copy runs (at the start of the
step being planned). `admit` *pins* it: it takes one reference to it, as a
block table would, so it is on no free list and cannot be handed out and
overwritten; and nobody writes into a block with a digest. `copies_done`,
which `KVCache.copy_blocks` calls after copying (also when copying fails),
lets go of the pins. The destination is a fresh block of the sequence alone;
its first k slots then hold exactly what the sequence would have computed
(same tokens after the same prefix), and the sequence's length starts after
them as for any hit. Until its copy is done a destination is never kept
findable (`free` skips it), and if the copy fails its sequence is cut back
to the blocks before it (the engine fails that request). A pinned block that
was free costs one more block than computing the k tokens would, so the
scheduler computes them instead when the pool is short of that block.

Why a digest names the contents of its block. Contents change only where a
sequence writes: after its length, in a block without a digest (above), or in
a block just handed out from the free list, whose digest was evicted first.

A `BlockManager` that is never given token ids (`cache_full_blocks`, `free`
with tokens) has no digests and behaves exactly as a plain pool.

Example (block_size 4): sequence A stored [1 2 3 4 | 5 6 7 8 | 9] and was
freed, so block 0 has digest d0, block 1 (parent d0) a digest of its own,
and block 2 is the partial block under block 1's digest. B = [1 2 3 4 5 6 0]
finds block 0 by its digest, then block 1 among d0's children, whose tokens
begin like B's next ones for k = 2: B's table is [0, fresh], slots 0 and 1 of
block 1 are copied into the fresh block, and B computes only the token 0.
"""

from __future__ import annotations

import hashlib
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
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


ROOT_DIGEST = bytes(16)       # the "digest of the block before" a sequence's first block


def block_digest(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The digest of a full block holding `token_ids` after the block whose
    digest is `parent` (ROOT_DIGEST for a sequence's first block)."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


@dataclass
class PrefixHit:
    """What `BlockManager.find_prefix` found of a sequence's tokens: whole
    blocks to share, then at most one of a partial block to adopt or a full
    block to copy the first `copied` slots of."""

    blocks: list[int] = field(default_factory=list)      # cached full blocks, in order
    digests: list[bytes] = field(default_factory=list)   # their digests
    partial: int | None = None                           # a partial block to adopt after them
    source: int | None = None                            # or a full block to copy from after them
    copied: int = 0                                      # how many tokens to copy from `source`
    num_tokens: int = 0                                  # tokens whose keys and values these hold

    def without_copy(self) -> PrefixHit:
        """The same hit, less the tokens it would copy (those are computed instead)."""
        if self.source is None:
            return self
        return PrefixHit(self.blocks, self.digests, num_tokens=self.num_tokens - self.copied)


class BlockCopy(NamedTuple):
    """Copy slots 0..tokens-1 of block `src` into block `dst` (every layer),
    before the step that reads them: planned by `BlockManager.admit`, carried
    by `StepPlan.copies`, done by `KVCache.copy_blocks`."""

    src: int
    dst: int
    tokens: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


class BlockManager:
    """Which KV blocks are free, which sequences hold which, and which blocks
    can be found again by their tokens (the prefix cache: module docstring).

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
        self.tables: dict[int, list[int]] = {}               # sequence id -> its blocks
        self.lengths: dict[int, int] = {}                     # sequence id -> tokens stored
        self.peak_used = 0                                    # most blocks ever in use at once
        self.evicted = 0                                      # cached blocks handed out, contents forgotten
        self._refs = [0] * num_blocks                         # block -> tables holding it + copies pinning it
        # Free blocks (count 0), in two lists (module docstring):
        self._plain_free = list(range(num_blocks - 1, -1, -1))   # nothing kept; pop() hands out block 0 first
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # findable; least recently freed first
        # The prefix cache:
        self._block_of: dict[bytes, int] = {}                 # digest -> the full block holding those tokens
        self._digest_of: dict[int, bytes] = {}                # and back
        self._parent_of: dict[int, bytes] = {}                # full block -> the digest of the block before it
        self._children: dict[bytes, dict[int, tuple[int, ...]]] = {}   # that digest -> {full block: its tokens}
        self._partial: dict[bytes, tuple[tuple[int, ...], int]] = {}   # parent digest -> (tokens, partial block)
        self._partial_parent: dict[int, bytes] = {}           # partial block -> its parent digest
        self._chains: dict[int, list[bytes]] = {}             # sequence id -> digests of its first full blocks
        # Copies planned by `admit` and not done yet: destination block -> (its sequence, the copy).
        # Each one pins its source: one reference more, as if one more table held it.
        self._pending: dict[int, tuple[int, BlockCopy]] = {}

    @property
    def free_blocks(self) -> int:
        """Blocks that can be handed out now, cached ones included."""
        return len(self._plain_free) + len(self._cached_free)

    @property
    def used_blocks(self) -> int:
        """Blocks some sequence holds or a pending copy pins (a shared block counts once)."""
        return self.num_blocks - self.free_blocks

    @property
    def cached_blocks(self) -> int:
        """Blocks that can be found by their tokens: full blocks with a digest,
        held or free, and partial blocks."""
        return len(self._digest_of) + len(self._partial)

    @property
    def pending_copies(self) -> list[BlockCopy]:
        """The copies `admit` planned that `copies_done` has not seen yet."""
        return [copy for _, copy in self._pending.values()]

    def ref_count(self, block: int) -> int:
        """How many block tables hold `block`, and pending copies read it."""
        return self._refs[block]

    def is_cached(self, block: int) -> bool:
        """Whether `block` can be found by its tokens (digest or partial entry)."""
        return block in self._digest_of or block in self._partial_parent

    def capacity(self, seq_id: int) -> int:
        """How many tokens the blocks `seq_id` already owns can hold."""
        return len(self.tables.get(seq_id, ())) * self.block_size

    def blocks_to_hold(self, seq_id: int, num_tokens: int) -> int:
        """How many more blocks `seq_id` needs for a total of `num_tokens` tokens."""
        return max(0, blocks_for(num_tokens, self.block_size) - len(self.tables.get(seq_id, ())))

    def blocks_needed(self, seq_id: int, new_tokens: int) -> int:
        """How many more blocks `seq_id` needs to store `new_tokens` more tokens."""
        return self.blocks_to_hold(seq_id, self.lengths.get(seq_id, 0) + new_tokens)

    # ------------------------------------------------------------ handing blocks out and back

    def _take_free(self) -> int:
        """One free block, now held once: a plain one if any, else the least
        recently freed cached one, whose contents are forgotten first."""
        if self._plain_free:
            block = self._plain_free.pop()
        else:
            block, _ = self._cached_free.popitem(last=False)
            self._forget(block)
            self.evicted += 1
        self._refs[block] = 1
        return block

    def _forget(self, block: int) -> None:
        """Take `block` out of the prefix cache: its contents may change."""
        digest = self._digest_of.pop(block, None)
        if digest is not None:
            del self._block_of[digest]
            parent = self._parent_of.pop(block)
            del self._children[parent][block]
            if not self._children[parent]:
                del self._children[parent]
        parent = self._partial_parent.pop(block, None)
        if parent is not None:
            del self._partial[parent]

    def _release(self, block: int) -> None:
        """One table less holds `block`; at 0 it goes to a free list."""
        self._refs[block] -= 1
        if self._refs[block] == 0:
            if self.is_cached(block):
                self._cached_free[block] = None      # the back: freed most recently
            else:
                self._plain_free.append(block)

    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Give `seq_id` blocks until it can hold `num_tokens` tokens in total.

        All or nothing: when the pool has too few free blocks, nothing is taken
        and `OutOfBlocks` is raised."""
        need = self.blocks_to_hold(seq_id, num_tokens)
        if need > self.free_blocks:
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more KV blocks, {self.free_blocks} free")
        table = self.tables.setdefault(seq_id, [])
        for _ in range(need):
            table.append(self._take_free())
        self.peak_used = max(self.peak_used, self.used_blocks)

    def reserve(self, seq_id: int, new_tokens: int) -> int:
        """Make room for `new_tokens` more tokens of `seq_id` and count them as
        stored; return the position of the first one."""
        start = self.lengths.get(seq_id, 0)
        self.allocate(seq_id, start + new_tokens)
        self.lengths[seq_id] = start + new_tokens
        return start

    def truncate(self, seq_id: int, length: int) -> None:
        """Forget the tokens of `seq_id` from `length` on, returning emptied blocks.

        The block that `length` cuts into (if any) will be written again, so it
        loses its digest; and it must be this sequence's alone: cutting inside
        a block another sequence holds raises ValueError (nothing changes).
        Whole blocks after it are let go like `free` does: a block that others
        still hold stays theirs, a cached one stays findable (its contents have
        not changed)."""
        table = self.tables.get(seq_id, [])
        keep = blocks_for(length, self.block_size)
        if length % self.block_size and keep <= len(table):
            cut = table[keep - 1]
            if self._refs[cut] > 1:
                raise ValueError(f"sequence {seq_id}: cannot truncate to {length} tokens inside block {cut}, "
                                 f"which {self._refs[cut] - 1} other sequence(s) or pending copies hold")
            self._forget(cut)
        if seq_id in self._chains:
            del self._chains[seq_id][length // self.block_size:]
        while len(table) > keep:
            self._release(table.pop())
        self.lengths[seq_id] = min(self.lengths.get(seq_id, 0), length)

    def free(self, seq_id: int, token_ids: Sequence[int] | None = None) -> None:
        """Let go of every block of `seq_id` and forget the sequence.

        With `token_ids`, the tokens whose keys and values its blocks hold
        (the scheduler passes the sequence's computed tokens), its full blocks
        get their digests first (`cache_full_blocks`) and its last, partly
        filled block is kept findable as a partial block. Without, nothing new
        enters the prefix cache."""
        if token_ids is not None and seq_id in self.tables:
            token_ids = token_ids[: self.lengths.get(seq_id, 0)]      # only what is stored
            self.cache_full_blocks(seq_id, token_ids)
            self._keep_partial(seq_id, token_ids)
        for block in reversed(self.tables.pop(seq_id, [])):          # the last block is evicted first
            self._release(block)
        self.lengths.pop(seq_id, None)
        self._chains.pop(seq_id, None)

    # ------------------------------------------------------------ the prefix cache

    def cache_full_blocks(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Give digests to the blocks of `seq_id` that `token_ids` fill.

        `token_ids` are the sequence's tokens whose keys and values its blocks
        hold, from position 0 (tokens past its length are ignored: they are
        not stored). Blocks that got their digest before are skipped. If a
        digest already names another block (two equal prompts computed in the
        same step), that block keeps it and this one stays without."""
        bs = self.block_size
        full = min(len(token_ids), self.lengths.get(seq_id, 0)) // bs
        if full == 0:
            return
        table = self.tables[seq_id]
        chain = self._chains.setdefault(seq_id, [])
        for i in range(len(chain), full):
            parent = chain[-1] if chain else ROOT_DIGEST
            digest = block_digest(parent, token_ids[i * bs : (i + 1) * bs])
            chain.append(digest)
            if digest not in self._block_of:
                self._block_of[digest] = table[i]
                self._digest_of[table[i]] = digest
                self._parent_of[table[i]] = parent
                self._children.setdefault(parent, {})[table[i]] = tuple(token_ids[i * bs : (i + 1) * bs])

    def _keep_partial(self, seq_id: int, token_ids: Sequence[int]) -> None:
        """Before `free`: make the partly filled last block of `seq_id`, which
        holds the tokens after the full blocks of `token_ids`, a partial block."""
        full = len(token_ids) // self.block_size
        tail = tuple(token_ids[full * self.block_size :])
        if not tail:
            return
        block = self.tables[seq_id][full]
        if block in self._pending:
            return     # its copy is not done: it does not hold those tokens
        if self._refs[block] != 1 or self.is_cached(block):
            return     # cannot happen: a block being filled has one holder and no digest
        parent = self._chains[seq_id][full - 1] if full else ROOT_DIGEST
        if parent in self._partial:                 # a newer partial block replaces the older one
            old = self._partial[parent][1]
            self._forget(old)
            del self._cached_free[old]
            self._plain_free.append(old)
        self._partial[parent] = (tail, block)
        self._partial_parent[block] = parent

    def find_prefix(self, token_ids: Sequence[int], max_tokens: int) -> PrefixHit:
        """The longest start of `token_ids`, at most `max_tokens` tokens, whose
        keys and values cached blocks hold: whole full blocks while their
        digests are in the map, then the first k tokens of the cached block
        after them that begins like the tokens that follow for the most
        tokens: the partial block (adopted), else a full block (copied).
        Changes nothing (see `admit`)."""
        bs = self.block_size
        max_tokens = min(max_tokens, len(token_ids))
        hit = PrefixHit()
        parent = ROOT_DIGEST
        while (len(hit.blocks) + 1) * bs <= max_tokens:
            i = len(hit.blocks)
            digest = block_digest(parent, token_ids[i * bs : (i + 1) * bs])
            block = self._block_of.get(digest)
            if block is None:
                break
            hit.blocks.append(block)
            hit.digests.append(digest)
            parent = digest
        hit.num_tokens = len(hit.blocks) * bs
        # The children of `parent`: fewer than block_size tokens can match
        # (all of them would have been found by digest), and no more than
        # max_tokens allows.
        room = max(0, min(bs - 1, max_tokens - hit.num_tokens))
        rest = token_ids[hit.num_tokens : hit.num_tokens + room]
        best, same = None, 0
        if parent in self._partial:            # first: on a tie, adopting beats copying
            tokens, best = self._partial[parent]
            same = common_prefix(tokens, rest)
        for block, tokens in self._children.get(parent, {}).items():
            if same == len(rest):
                break                          # nothing can match more
            k = common_prefix(tokens, rest)
            if k > same:
                best, same = block, k
        if same:
            if best in self._partial_parent:
                hit.partial = best
            else:
                hit.source, hit.copied = best, same
            hit.num_tokens += same
        return hit

    def blocks_to_admit(self, hit: PrefixHit, num_tokens: int) -> int:
        """How many free blocks a new sequence takes to hold `num_tokens`
        tokens (the hit's included) when it starts from `hit`: new blocks for
        what the hit does not cover (a copy's destination among them), and
        the found blocks that are free now (count 0), which leave the free
        list too: shared, adopted, or pinned as a copy's source."""
        found = len(hit.blocks) + (hit.partial is not None)
        idle = sum(1 for b in hit.blocks if self._refs[b] == 0) + (hit.partial is not None)
        if hit.source is not None and self._refs[hit.source] == 0:
            idle += 1
        return max(0, blocks_for(num_tokens, self.block_size) - found) + idle

    def admit(self, seq_id: int, hit: PrefixHit) -> BlockCopy | None:
        """Start the block table of `seq_id`, which holds no block yet, with
        what `find_prefix` found (just before: nothing may change in between):
        the full blocks shared, the partial block adopted, or a fresh block
        whose first `hit.copied` slots are to be copied from `hit.source`;
        its length is then `hit.num_tokens`. An empty hit changes nothing.

        Returns the copy to run before the sequence's first step, or None.
        Until `copies_done` hears of it, the copy's source is pinned (module
        docstring). Raises OutOfBlocks, changing nothing, if the pool is
        short of the blocks this takes."""
        if self.tables.get(seq_id):
            raise ValueError(f"sequence {seq_id} already holds blocks")
        if any(self._digest_of.get(b) != d for b, d in zip(hit.blocks, hit.digests)) or \
                (hit.partial is not None and hit.partial not in self._partial_parent) or \
                (hit.source is not None and hit.source not in self._digest_of):
            raise ValueError(f"sequence {seq_id}: the prefix hit is stale, the cache changed since find_prefix")
        if not hit.num_tokens:
            return None
        need = self.blocks_to_admit(hit, hit.num_tokens)
        if need > self.free_blocks:
            raise OutOfBlocks(f"sequence {seq_id} needs {need} more KV blocks, {self.free_blocks} free")
        for block in hit.blocks:
            if self._refs[block] == 0:
                del self._cached_free[block]
            self._refs[block] += 1
        table = list(hit.blocks)
        copy = None
        if hit.partial is not None:            # now this sequence's own block: it will write into it
            self._forget(hit.partial)
            del self._cached_free[hit.partial]
            self._refs[hit.partial] = 1
            table.append(hit.partial)
        elif hit.source is not None:
            if self._refs[hit.source] == 0:    # pinned before a fresh block is taken, which might evict it
                del self._cached_free[hit.source]
            self._refs[hit.source] += 1
            copy = BlockCopy(hit.source, self._take_free(), hit.copied)
            self._pending[copy.dst] = (seq_id, copy)
            table.append(copy.dst)
        self.tables[seq_id] = table
        self.lengths[seq_id] = hit.num_tokens
        self._chains[seq_id] = list(hit.digests)
        self.peak_used = max(self.peak_used, self.used_blocks)
        return copy

    def copies_done(self, copies: Sequence[BlockCopy], ok: bool = True) -> None:
        """Hear that `copies` (planned by `admit`) were made, or, with
        ok=False, that making them failed; either way their sources are
        unpinned (a source nobody holds goes back to the free list, as the
        most recently used). A destination whose copy failed does not hold
        the tokens its sequence's length counts, so the sequence is cut back
        to the blocks before it (`truncate`): that block is never kept
        findable, and the caller must not run the sequence on (the engine
        fails its request). Copies heard of before are skipped."""
        bs = self.block_size
        for copy in copies:
            seq_id, _ = self._pending.pop(copy.dst, (None, None))
            if seq_id is None:
                continue
            self._release(copy.src)
            if not ok and copy.dst in self.tables.get(seq_id, ()):
                self.truncate(seq_id, min(self.lengths[seq_id], self.tables[seq_id].index(copy.dst) * bs))

    def clear_cache(self) -> None:
        """Forget every digest and partial block; cached free blocks become
        plain free blocks (for `KVCache.touch`, which overwrites them)."""
        self._plain_free.extend(reversed(self._cached_free))
        self._cached_free.clear()
        self._block_of.clear()
        self._digest_of.clear()
        self._parent_of.clear()
        self._children.clear()
        self._partial.clear()
        self._partial_parent.clear()

    # ------------------------------------------------------------ checking

    def check(self) -> None:
        """Raise AssertionError unless the bookkeeping agrees with itself (a
        debugging and testing aid): every block is free or in use (held or
        pinned), not both; counts are the number of tables holding each block
        plus the pending copies reading it; the free lists hold each block
        once, cached ones in the cached list only; the digest, children and
        partial maps are consistent, and each cached full block's tokens give
        its digest; a block with a digest sits only where its holder's own
        digests say it holds those tokens, which is below its length, never
        where it writes; a pending copy's destination is its sequence's own
        block, after the blocks it shares."""
        held = Counter(b for table in self.tables.values() for b in table)
        pins = Counter(copy.src for _, copy in self._pending.values())
        for seq_id, table in self.tables.items():
            assert len(set(table)) == len(table), f"sequence {seq_id} holds a block twice"
        for block in range(self.num_blocks):
            assert self._refs[block] == held[block] + pins[block], \
                f"block {block} counts {self._refs[block]} holders but {held[block]} tables hold it " \
                f"and {pins[block]} pending copies read it"
        free = self._plain_free + list(self._cached_free)
        in_use = set(held) | set(pins)
        assert len(set(free)) == len(free), "a block is in the free lists twice"
        assert sorted(free + list(in_use)) == list(range(self.num_blocks)), "a block is lost, or both free and in use"
        assert not any(self.is_cached(b) for b in self._plain_free), "a findable block is in the plain free list"
        assert all(self.is_cached(b) for b in self._cached_free), "an unfindable block is in the cached free list"
        assert {b: d for d, b in self._block_of.items()} == self._digest_of, "the digest maps disagree"
        assert {b: p for p, kids in self._children.items() for b in kids} == self._parent_of, \
            "the children map disagrees with the parents"
        assert self._parent_of.keys() == self._digest_of.keys(), "a full block has a digest but no parent, or back"
        for parent, kids in self._children.items():
            assert kids, "an empty children entry is kept"
            for block, tokens in kids.items():
                assert block_digest(parent, tokens) == self._digest_of[block], \
                    f"block {block}'s tokens and parent do not give its digest"
        assert {b: p for p, (_, b) in self._partial.items()} == self._partial_parent, "the partial maps disagree"
        for tokens, block in self._partial.values():
            assert self._refs[block] == 0 and block not in self._digest_of, f"partial block {block} is held or full"
            assert 0 < len(tokens) < self.block_size, f"partial block {block} is empty or full"
        assert set(self._chains) <= set(self.tables), "digests kept for a sequence that holds no blocks"
        for seq_id, table in self.tables.items():
            chain = self._chains.get(seq_id, [])
            length = self.lengths.get(seq_id, 0)
            assert len(chain) * self.block_size <= length, f"sequence {seq_id} has digests for tokens it has not stored"
            assert length <= self.capacity(seq_id), f"sequence {seq_id} stores more tokens than its blocks hold"
            for i, block in enumerate(table):
                if block in self._digest_of:
                    assert i < len(chain) and chain[i] == self._digest_of[block], \
                        f"sequence {seq_id} holds block {block} at index {i}, " \
                        "where it does not hold its digest's tokens"
        for dst, (seq_id, copy) in self._pending.items():
            table = self.tables.get(seq_id, [])
            assert dst == copy.dst and dst in table, f"the destination of pending copy {copy} is not its sequence's"
            assert held[dst] == 1 and not self.is_cached(dst), f"the destination of pending copy {copy} is shared"
            assert table.index(dst) * self.block_size + copy.tokens <= self.lengths.get(seq_id, 0), \
                f"pending copy {copy} fills slots past its sequence's length"
            assert 0 < copy.tokens < self.block_size, f"pending copy {copy} is empty or a whole block"
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
                   kv_dtype: str = "fp32", device: str = "cpu") -> KVCache:
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
        any sequence holds blocks, and it empties the prefix cache: the free
        blocks that could still be found by their tokens no longer hold them.
        """
        if self.blocks.used_blocks:
            raise RuntimeError(f"KVCache.touch would erase {self.blocks.used_blocks} blocks in use")
        self.blocks.clear_cache()
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

    def copy_blocks(self, copies: Sequence[BlockCopy]) -> None:
        """Make the copies a step's plan carries (`StepPlan.copies`), before
        the step runs: slots 0..tokens-1 of each source block into its
        destination, in every layer and every array (keys, values, and
        int8's scales). Then the sources are unpinned
        (`BlockManager.copies_done`), also when copying raises, which
        cuts each copy's sequence back to before its destination.

        numpy pools (devices "cpu" and "reference") copy all layers by one
        slice assignment per array. numba device arrays ("cuda",
        "cuda-sim") copy one layer at a time, device to device: a layer's
        slots a..a+k-1 are one contiguous piece of memory, which
        `copy_to_device` copies in one call (4 arrays x n_layers calls per
        copy, each far cheaper than computing a token)."""
        bs = self.block_size
        try:
            for copy in copies:
                src = slice(copy.src * bs, copy.src * bs + copy.tokens)
                dst = slice(copy.dst * bs, copy.dst * bs + copy.tokens)
                for pool in self.pools:
                    if isinstance(pool, np.ndarray):
                        pool[:, dst] = pool[:, src]
                    else:
                        for layer in range(pool.shape[0]):
                            pool[layer, dst].copy_to_device(pool[layer, src])
        except BaseException:
            self.blocks.copies_done(copies, ok=False)
            raise
        self.blocks.copies_done(copies)

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

    def free(self, seq_id: int, token_ids: list[int] | None = None) -> None:
        """Give every block of `seq_id` back to the pool (with `token_ids`, the
        tokens it stored, its blocks stay findable: `BlockManager.free`)."""
        self.blocks.free(seq_id, token_ids)

    def block_table(self, seq_ids: list[int]) -> np.ndarray:
        """The block tables of `seq_ids` as one [B, max_blocks] int32 array."""
        tables = self.blocks.tables
        width = max(1, max(len(tables[s]) for s in seq_ids))
        out = np.zeros((len(seq_ids), width), np.int32)
        for row, s in enumerate(seq_ids):
            out[row, : len(tables[s])] = tables[s]
        return out
