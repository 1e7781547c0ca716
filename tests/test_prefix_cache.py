"""Automatic prefix caching: the block pool's digests, reference counts and
partial blocks (`xllm.kv_cache`), and the scheduler that starts sequences
from them (`xllm.scheduler`).

The scheduler tests drive it with a fake model that, unlike the one in
tests/test_scheduler.py, lets sequences share blocks: the "key and value" it
writes at a slot is (position, a hash of every token up to and including that
position), which is what a real key and value depend on. A row may read any
block, shared or not, but everything it reads must be exactly what its own
tokens would have written; and it may only write into a block that nobody
else holds and that nobody can find by digest. After every step, every
computed position of every running sequence is read back and checked. A block
shared after a different prefix, a hit that covers a token nobody computed, a
block evicted while still findable or written while shared: each shows up as
a wrong entry. A hit that ends inside a cached full block is copied into a
fresh block before the step (`StepPlan.copies`): the fake model copies the
entries, so a copy from the wrong block, of too many slots, or from a block
overwritten since the plan shows up the same way.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from tests.ops_helpers import CUDA_DEVICE
from xllm.config import ModelConfig
from xllm.kv_cache import ROOT_DIGEST, BlockManager, KVCache, PrefixHit, block_digest
from xllm.scheduler import Scheduler, Sequence, Status, StepPlan

VOCAB = 997
MOD = 2_147_483_647


def prefix_hashes(tokens: list[int]) -> list[int]:
    """h[p]: a hash of tokens[0..p], the fake key and value of position p."""
    out, h = [], 17
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % MOD
        out.append(h)
    return out


def next_token(tokens: list[int]) -> int:
    """The fake model's next token: a function of the whole prefix."""
    return prefix_hashes(tokens)[-1] % VOCAB


def alone(prompt: list[int], max_tokens: int) -> list[int]:
    """What a request generates when it runs by itself."""
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(next_token(ids))
    return ids[len(prompt):]


class ContentModel:
    """One forward step over a simulated KV pool of (position, prefix hash)."""

    def __init__(self, blocks: BlockManager):
        self.blocks = blocks
        self.pool: dict[int, tuple[int, int]] = {}
        self.computed: Counter = Counter()        # sequence id -> tokens its rows computed
        self.copied = 0                           # slots copied from block to block

    def slot(self, seq_id: int, pos: int) -> int:
        bs = self.blocks.block_size
        return self.blocks.tables[seq_id][pos // bs] * bs + pos % bs

    def step(self, plan: StepPlan) -> dict[int, int]:
        self.copy(plan)
        sampled = {}
        for row in plan.rows:
            seq, n = row.seq, len(row.token_ids)
            sid, bs = seq.seq_id, self.blocks.block_size
            assert self.blocks.blocks_needed(sid, n) == 0, "the scheduler did not set aside blocks for a row"
            assert self.blocks.reserve(sid, n) == row.start      # what Batch.build does
            h = prefix_hashes(seq.all_ids[: row.start + n])
            for pos in range(row.start, row.start + n):
                block = self.blocks.tables[sid][pos // bs]
                assert self.blocks.ref_count(block) == 1, f"sequence {sid} writes into shared block {block}"
                assert not self.blocks.is_cached(block), f"sequence {sid} writes into findable block {block}"
                self.pool[self.slot(sid, pos)] = (pos, h[pos])
            self.computed[sid] += n
            self.verify(seq, row.start + n)
            if row.sample:
                sampled[sid] = self.pool[self.slot(sid, row.start + n - 1)][1] % VOCAB
        return sampled

    def copy(self, plan: StepPlan) -> None:
        """What `KVCache.copy_blocks` does, before the rows run: the first
        slots of each source block into its destination. The source is pinned
        (nobody could have taken and overwritten it since the plan); the
        destination is the sequence's own and nobody can find it."""
        bs = self.blocks.block_size
        for c in plan.copies:
            assert self.blocks.ref_count(c.src) >= 1, f"the source of {c} is not pinned"
            assert self.blocks.ref_count(c.dst) == 1 and not self.blocks.is_cached(c.dst)
            for i in range(c.tokens):
                self.pool[c.dst * bs + i] = self.pool.get(c.src * bs + i)
            self.copied += c.tokens
        self.blocks.copies_done(plan.copies)

    def verify(self, seq: Sequence, upto: int) -> None:
        """Positions 0..upto-1 of `seq` read back its own keys and values."""
        want = prefix_hashes(seq.all_ids[:upto])
        for pos in range(upto):
            got = self.pool.get(self.slot(seq.seq_id, pos))
            assert got == (pos, want[pos]), f"sequence {seq.seq_id} reads a wrong key/value at position {pos}"


def run_to_end(sched: Scheduler, model: ContentModel) -> list[StepPlan]:
    plans = []
    while sched.has_unfinished():
        plan = sched.schedule()
        sched.check()
        sched.update(plan, model.step(plan))
        sched.check()
        for s in sched.running:
            model.verify(s, s.num_computed)
        plans.append(plan)
    return plans


# ------------------------------------------------------------------ the block pool alone

def stored(bm: BlockManager, seq_id: int, tokens: list[int]) -> None:
    """Let `seq_id` store `tokens` and give its full blocks their digests."""
    bm.reserve(seq_id, len(tokens))
    bm.cache_full_blocks(seq_id, tokens)


def test_full_blocks_are_found_shared_and_counted():
    bm = BlockManager(8, 4)
    a = list(range(10))
    stored(bm, 0, a)                                  # blocks 0, 1 full; block 2 holds 8, 9
    assert bm.cached_blocks == 2
    hit = bm.find_prefix(a[:8] + [50, 51, 52], max_tokens=10)
    assert (hit.blocks, hit.partial, hit.num_tokens) == ([0, 1], None, 8)
    assert bm.blocks_to_admit(hit, 11) == 1           # a third block for 8..10; found ones are held
    bm.admit(1, hit)
    assert bm.tables[1] == [0, 1] and bm.lengths[1] == 8
    assert [bm.ref_count(b) for b in (0, 1, 2)] == [2, 2, 1] and bm.used_blocks == 3
    bm.check()
    bm.free(0, a)
    assert [bm.ref_count(b) for b in (0, 1, 2)] == [1, 1, 0] and bm.free_blocks == 6
    bm.check()
    bm.free(1)
    assert bm.free_blocks == 8 and bm.used_blocks == 0
    bm.check()
    # Free but still findable: a new sequence takes them out of the free list.
    hit = bm.find_prefix(a + [0], max_tokens=10)
    assert (hit.blocks, hit.partial, hit.num_tokens) == ([0, 1], 2, 10)
    assert bm.blocks_to_admit(hit, 11) == 3           # all three found blocks were free
    bm.admit(2, hit)
    assert bm.free_blocks == 5 and bm.tables[2] == [0, 1, 2]
    bm.check()


def test_the_hit_is_whole_blocks_then_the_start_of_a_block_within_max_tokens():
    bm = BlockManager(8, 4)
    stored(bm, 0, list(range(12)))
    hit = bm.find_prefix(list(range(12)), max_tokens=11)    # 2 blocks, and 3 tokens of the third copied
    assert (hit.blocks, hit.partial, hit.source, hit.copied, hit.num_tokens) == ([0, 1], None, 2, 3, 11)
    assert bm.find_prefix(list(range(12)), max_tokens=12).num_tokens == 12
    hit = bm.find_prefix(list(range(12)), max_tokens=7)
    assert (hit.blocks, hit.source, hit.copied, hit.num_tokens) == ([0], 1, 3, 7)
    assert hit.without_copy() == PrefixHit([0], hit.digests, num_tokens=4)
    assert bm.find_prefix([0, 1, 2, 9] + list(range(4, 12)), max_tokens=11).num_tokens == 3   # of block 0
    assert bm.find_prefix([9] + list(range(1, 12)), max_tokens=11) == PrefixHit()


def test_digests_chain_so_the_same_block_after_another_prefix_does_not_hit():
    bm = BlockManager(8, 2)
    stored(bm, 0, [1, 2, 3, 4])
    assert bm.find_prefix([9, 9, 3, 4, 5], 4).num_tokens == 0      # block [3, 4] after [9, 9]
    assert bm.find_prefix([1, 2, 3, 4, 5], 4).num_tokens == 4
    d0 = block_digest(ROOT_DIGEST, [1, 2])
    assert block_digest(d0, [3, 4]) != block_digest(ROOT_DIGEST, [3, 4])
    assert block_digest(d0, [3, 4]) != block_digest(block_digest(ROOT_DIGEST, [9, 9]), [3, 4])


def test_free_blocks_are_handed_out_plain_first_then_least_recently_freed():
    bm = BlockManager(6, 2)
    for s in range(4):                                # sequence s fills block s with [s, s]
        stored(bm, s, [s, s])
    for s in (2, 0, 3, 1):
        bm.free(s, [s, s])
    assert bm.free_blocks == 6 and bm.cached_blocks == 4
    bm.allocate(9, 4)                                 # the two never-used blocks first
    assert bm.tables[9] == [4, 5] and bm.evicted == 0
    bm.allocate(9, 6)                                 # then the least recently freed: 2
    assert bm.tables[9][2] == 2 and bm.evicted == 1
    assert bm.find_prefix([2, 2, 7], 2).num_tokens == 0           # evicted
    assert bm.find_prefix([0, 0, 7], 2).num_tokens == 2           # still there
    bm.allocate(9, 10)
    assert bm.tables[9][3:] == [0, 3] and bm.cached_blocks == 1
    bm.check()


def test_a_sequence_is_evicted_from_its_end():
    bm = BlockManager(3, 2)
    stored(bm, 0, [1, 2, 3, 4, 5, 6])
    bm.free(0, [1, 2, 3, 4, 5, 6])
    bm.allocate(1, 2)                                 # evicts the last block, not the first
    assert bm.tables[1] == [2]
    assert bm.find_prefix([1, 2, 3, 4, 5, 6, 7], 6).num_tokens == 4
    bm.check()


def test_a_partial_block_is_adopted_by_one_sequence():
    bm = BlockManager(8, 4)
    a = [5, 6, 7, 8, 9, 10]                           # block 0 full, block 1 holds 9, 10
    stored(bm, 0, a)
    bm.free(0, a)
    assert bm.is_cached(1) and bm.free_blocks == 8
    hit = bm.find_prefix(a + [11, 12], max_tokens=7)
    assert (hit.blocks, hit.partial, hit.num_tokens) == ([0], 1, 6)
    hit2 = bm.find_prefix(a[:5] + [99, 98], max_tokens=6)         # a prefix of its tokens is enough
    assert (hit2.partial, hit2.num_tokens) == (1, 5)
    assert bm.find_prefix(a[:4] + [99], 4).partial is None
    bm.admit(1, hit)
    assert bm.tables[1] == [0, 1] and bm.lengths[1] == 6
    assert bm.ref_count(1) == 1 and not bm.is_cached(1)           # its own, writable
    with pytest.raises(ValueError, match="stale"):
        bm.admit(2, hit2)                                         # taken meanwhile
    assert bm.find_prefix(a + [11], 7).partial is None            # nobody else finds it
    bm.reserve(1, 2)                                              # positions 6, 7: block 1 is full
    bm.cache_full_blocks(1, a + [11, 12])
    assert bm.cached_blocks == 2
    bm.check()


def test_a_newer_partial_block_replaces_an_older_one_which_becomes_plain():
    bm = BlockManager(4, 4)
    stored(bm, 0, [1, 2])
    stored(bm, 1, [1, 3])
    bm.free(0, [1, 2])
    bm.free(1, [1, 3])                                # same parent (the root): replaces block 0
    assert not bm.is_cached(0) and bm.is_cached(1)
    assert bm.find_prefix([1, 2, 4], 2).num_tokens == 1           # [1] of [1, 3]
    assert bm.find_prefix([1, 3, 4], 2).num_tokens == 2
    bm.allocate(7, 4)
    assert bm.tables[7] == [0]                        # the plain one goes first
    bm.check()


def test_a_partial_block_is_forgotten_when_handed_out():
    bm = BlockManager(1, 4)
    stored(bm, 0, [1, 2])
    bm.free(0, [1, 2])
    bm.allocate(1, 3)
    assert bm.cached_blocks == 0 and bm.evicted == 1
    assert bm.find_prefix([1, 2, 3], 2).num_tokens == 0
    bm.check()


def test_truncate_lets_go_of_shared_blocks_and_unhashes_what_it_cuts_into():
    bm = BlockManager(8, 2)
    a = [1, 2, 3, 4, 5, 6]
    stored(bm, 0, a)
    bm.admit(1, bm.find_prefix(a + [7], 6))           # shares all three blocks
    bm.check()
    with pytest.raises(ValueError, match="inside block 1"):
        bm.truncate(1, 3)                             # block 1 is shared: cannot become writable
    bm.truncate(1, 2)                                 # whole blocks: only counts change
    assert bm.tables[1] == [0] and [bm.ref_count(b) for b in (0, 1, 2)] == [2, 1, 1]
    bm.check()
    bm.free(1)
    bm.truncate(0, 3)                                 # block 1 is its own now: loses its digest
    assert bm.tables[0] == [0, 1] and not bm.is_cached(1) and bm.is_cached(2)
    assert bm.find_prefix(a + [7], 6).num_tokens == 2
    bm.check()
    bm.reserve(0, 3)                                  # positions 3..5 again
    bm.cache_full_blocks(0, [1, 2, 3, 9, 5, 6])
    assert bm.find_prefix([1, 2, 3, 9, 5, 6, 0], 6).num_tokens == 6
    bm.check()


def test_check_catches_a_corrupted_pool():
    def pool() -> BlockManager:
        bm = BlockManager(6, 2)
        stored(bm, 0, [1, 2, 3, 4, 5])
        bm.admit(1, bm.find_prefix([1, 2, 3, 4, 9], 4))
        bm.free(0, [1, 2, 3, 4, 5])
        bm.check()
        return bm

    bm = pool()
    bm._refs[0] += 1                                  # a count off by one
    with pytest.raises(AssertionError, match="counts 2 holders but 1"):
        bm.check()
    bm = pool()
    bm._plain_free.append(bm._plain_free[0])          # a block free twice
    with pytest.raises(AssertionError, match="twice"):
        bm.check()
    bm = pool()
    bm.reserve(1, 2)                                  # block 3, positions 4, 5: written by 1
    digest = block_digest(ROOT_DIGEST, [7, 7])
    bm._block_of[digest], bm._digest_of[3] = 3, digest   # a digest on a block being written
    bm._parent_of[3], bm._children[ROOT_DIGEST][3] = ROOT_DIGEST, (7, 7)
    with pytest.raises(AssertionError, match="does not hold its digest's tokens"):
        bm.check()
    bm = pool()
    bm.tables[1].append(bm.tables[1][0])
    with pytest.raises(AssertionError, match="holds a block twice"):
        bm.check()
    bm = pool()
    bm._children[ROOT_DIGEST][0] = (1, 3)             # tokens that do not give the block's digest
    with pytest.raises(AssertionError, match="do not give its digest"):
        bm.check()
    bm = pool()
    copy = bm.admit(2, bm.find_prefix([1, 2, 3, 0, 0], 4))   # shares block 0, copies [3] of block 1
    assert copy is not None and bm.ref_count(copy.src) == 2 and bm.tables[2] == [0, copy.dst]
    bm.check()
    bm._refs[copy.src] -= 1                           # the pin forgotten
    with pytest.raises(AssertionError, match="1 tables hold it and 1 pending copies"):
        bm.check()


def test_without_token_ids_the_pool_is_plain():
    bm = BlockManager(4, 2)
    bm.reserve(0, 5)
    bm.free(0)
    assert bm.cached_blocks == 0 and bm.find_prefix([0] * 5, 4).num_tokens == 0
    assert bm.find_prefix([0] * 5, 4) == PrefixHit()
    bm.reserve(1, 2)
    assert bm.tables[1] == [0]                        # as before: block 0 on top again


def test_touch_empties_the_prefix_cache():
    config = ModelConfig(n_layers=1, dim=8, n_heads=2, n_kv_heads=1, hidden_dim=16, vocab_size=10)
    cache = KVCache(config, num_blocks=4, block_size=2)
    cache.reserve(0, 3)
    cache.blocks.cache_full_blocks(0, [1, 2, 3])
    cache.free(0, [1, 2, 3])
    assert cache.blocks.cached_blocks == 2 and cache.free_blocks == 4
    cache.touch()                                     # zeros every block: nothing findable is left
    assert cache.blocks.cached_blocks == 0 and cache.free_blocks == 4
    cache.blocks.check()


# ------------------------------------------------------------------ the scheduler

def test_a_five_turn_chat_computes_only_each_turns_new_tokens():
    """Turn t's prompt is turn t-1's prompt and answer, then the user's new
    message. Turn t-1 computed the keys and values of its prompt and of all
    its answer but the last token (that one was sampled by its last step and
    never ran), so turn t computes that token and its new message: nothing
    else, whether the old conversation ends inside a block or on its edge."""
    bs, answer = 16, 7
    sched = Scheduler(BlockManager(64, bs), max_num_seqs=4, max_num_batched_tokens=256)
    model = ContentModel(sched.blocks)
    messages = [[3] * 17, list(range(40, 73)), list(range(100, 124)), [5, 6, 7] * 3 + [8, 9], list(range(200, 227))]
    prompt: list[int] = []
    prompts, ends = [], []
    for turn, message in enumerate(messages):
        prompt = prompt + message
        prompts.append(len(prompt))
        seq = sched.add(Sequence(turn, prompt, max_tokens=answer))
        run_to_end(sched, model)
        assert seq.status is Status.FINISHED and seq.output == alone(prompt, answer)
        prompt_rows = model.computed[turn] - (answer - 1)      # every row but the decodes
        assert prompt_rows == (len(prompt) if turn == 0 else len(message) + 1)
        ends.append(seq.num_computed % bs)                    # where the conversation's KV ends
        prompt = prompt + seq.output
    assert ends[:4] == [7, 15, 14, 0]                         # in a block, at its end, on its edge
    assert sched.stats.prefix_queried_tokens == sum(prompts)
    assert sched.stats.prefix_hit_tokens == sum(p - len(m) - 1 for p, m in zip(prompts[1:], messages[1:]))
    assert sched.stats.prefix_hit_rate == sched.stats.prefix_hit_tokens / sum(prompts)
    assert sched.blocks.used_blocks == 0


def test_a_chat_turn_after_an_answer_that_ends_on_a_block_edge():
    bs = 4
    sched = Scheduler(BlockManager(16, bs), max_num_seqs=2, max_num_batched_tokens=32)
    model = ContentModel(sched.blocks)
    first = sched.add(Sequence(0, [1, 2, 3, 4, 5, 6], max_tokens=3))   # computes 6 + 2 = 8 tokens: 2 full blocks
    run_to_end(sched, model)
    second = sched.add(Sequence(1, first.prompt + first.output + [9], max_tokens=2))
    plans = run_to_end(sched, model)
    assert plans[0].rows[0].start == 8 and model.computed[1] == 2 + 1   # 2 prompt rows, 1 decode
    assert second.output == alone(second.prompt, 2)


def test_a_shared_system_prompt_is_computed_once_when_the_second_request_comes_later():
    bs = 16
    system = [(7 * i) % 50 for i in range(200)]       # 12 full blocks and 8 tokens
    a_prompt, b_prompt = system + [60, 61, 62, 63] * 5, system + [70, 71, 72]
    sched = Scheduler(BlockManager(64, bs), max_num_seqs=4, max_num_batched_tokens=512)
    model = ContentModel(sched.blocks)
    a = sched.add(Sequence(0, a_prompt, max_tokens=20))
    plan = sched.schedule()
    sched.update(plan, model.step(plan))              # a has computed its prompt and runs on
    b = sched.add(Sequence(1, b_prompt, max_tokens=5))
    plan = sched.schedule()
    # a decodes; b shares the 12 blocks of the system prompt that a filled. The system
    # prompt's last 8 tokens are in a's block 12, with 8 of a's own tokens: b copies them
    # into a block of its own (a still holds block 12, and it has a digest).
    assert [(r.seq.seq_id, r.start, len(r.token_ids)) for r in plan.rows] == [(0, 220, 1), (1, 200, 3)]
    assert sched.blocks.tables[1][:12] == sched.blocks.tables[0][:12]
    assert all(sched.blocks.ref_count(blk) == 2 for blk in sched.blocks.tables[0][:12])
    assert plan.copies == [(sched.blocks.tables[0][12], sched.blocks.tables[1][12], 8)]
    assert sched.blocks.ref_count(sched.blocks.tables[0][12]) == 2       # a's, and the copy's pin
    with pytest.raises(RuntimeError, match="copies of the last plan were not made"):
        sched.schedule()
    sched.update(plan, model.step(plan))
    assert sched.blocks.ref_count(sched.blocks.tables[0][12]) == 1 and not sched.blocks.pending_copies
    run_to_end(sched, model)
    assert a.output == alone(a_prompt, 20) and b.output == alone(b_prompt, 5)
    assert sched.stats.prefix_hit_tokens == 200 and sched.stats.prefix_queried_tokens == 220 + 203
    assert sched.stats.prefix_copied_tokens == 8 and model.copied == 8
    assert (a.num_cached_tokens, b.num_cached_tokens) == (0, 200)
    assert model.computed[1] == 3 + 4


def test_a_hit_inside_a_full_block_of_a_finished_request_is_copied():
    """a = system + question + answer filled block 2 with the system prompt's
    last 8 tokens and its own, so block 2 has a digest of a's tokens. b =
    system + another question finds blocks 0 and 1, then copies the first 8
    slots of block 2 into a fresh block: all 40 system tokens, none computed."""
    bs = 16
    system = [(3 * i + 1) % 40 for i in range(40)]
    a_prompt, b_prompt = system + [41, 42, 43], system + [44, 45, 46, 47]
    sched = Scheduler(BlockManager(16, bs), max_num_seqs=2, max_num_batched_tokens=64)
    model = ContentModel(sched.blocks)
    a = sched.add(Sequence(0, a_prompt, max_tokens=12))      # computes 43 + 11 = 54 tokens: 3 full blocks
    run_to_end(sched, model)
    a_blocks = sched.blocks.tables.get(0)
    assert a_blocks is None and sched.blocks.cached_blocks == 4            # 3 full, 1 partial
    b = sched.add(Sequence(1, b_prompt, max_tokens=3))
    plan = sched.schedule()
    assert [(r.start, len(r.token_ids)) for r in plan.rows] == [(40, 4)]
    (copy,) = plan.copies
    assert copy.tokens == 8 and sched.blocks.tables[1][2] == copy.dst != copy.src
    assert sched.blocks.is_cached(copy.src) and sched.blocks.ref_count(copy.src) == 1   # pinned, not free
    assert sched.blocks.free_blocks == 16 - 4                # blocks 0, 1, the pinned source, the fresh one
    sched.check()
    sched.update(plan, model.step(plan))                     # verify(): b's copied slots hold b's own KV
    assert sched.blocks.ref_count(copy.src) == 0 and sched.blocks.is_cached(copy.src)
    sched.check()
    run_to_end(sched, model)
    assert b.output == alone(b_prompt, 3) and b.num_cached_tokens == 40
    assert model.computed[1] == 4 + 2 and model.copied == 8
    assert sched.stats.prefix_hit_tokens == 40 and sched.stats.prefix_copied_tokens == 8
    # The copy's destination was b's own: it is findable now as b's partial block, and
    # the source still holds a's tokens for a's next turn.
    turn = a_prompt + a.output + [5]
    c = sched.add(Sequence(2, turn, max_tokens=1))
    run_to_end(sched, model)
    assert c.num_cached_tokens == len(turn) - 2               # all but a's last token and the new one


def test_a_copy_is_dropped_when_its_pinned_source_does_not_fit():
    """Pinning a free source block costs a block: in a pool that can hold the
    request but not that block too, the request computes those tokens."""
    bs = 4
    sched = Scheduler(BlockManager(2, bs), max_num_seqs=1, max_num_batched_tokens=16)
    model = ContentModel(sched.blocks)
    sched.add(Sequence(0, [1, 2, 3, 4, 5, 6, 7, 8], max_tokens=1))
    run_to_end(sched, model)                                  # blocks 0 and 1 full, free, findable
    b = sched.add(Sequence(1, [1, 2, 3, 4, 5, 6, 0, 0], max_tokens=1))
    assert sched.blocks.find_prefix(b.all_ids, 7).copied == 2  # 2 blocks + the pinned source: 3 > 2
    plan = sched.schedule()
    assert plan.copies == [] and [(r.start, len(r.token_ids)) for r in plan.rows] == [(4, 4)]
    sched.update(plan, model.step(plan))
    assert b.output == alone(b.prompt, 1) and sched.stats.prefix_copied_tokens == 0


def test_a_failed_copy_unpins_and_cuts_the_sequence_back():
    bs = 4
    blocks = BlockManager(8, bs)
    stored(blocks, 0, [1, 2, 3, 4, 5, 6, 7, 8])
    blocks.free(0, [1, 2, 3, 4, 5, 6, 7, 8])
    copy = blocks.admit(1, blocks.find_prefix([1, 2, 3, 4, 5, 6, 0], 6))
    assert copy.tokens == 2 and blocks.lengths[1] == 6 and blocks.ref_count(copy.src) == 1
    blocks.free(1, [1, 2, 3, 4, 5, 6])                       # before its copy: not kept findable
    assert not blocks.is_cached(copy.dst)
    blocks.copies_done([copy])
    blocks.check()
    copy = blocks.admit(2, blocks.find_prefix([1, 2, 3, 4, 5, 0], 5))
    blocks.copies_done([copy], ok=False)
    assert blocks.tables[2] == [0] and blocks.lengths[2] == 4 and blocks.ref_count(copy.src) == 0
    blocks.copies_done([copy], ok=False)                     # heard of already: nothing happens
    blocks.check()
    blocks.free(2, [1, 2, 3, 4, 5])
    assert not blocks.is_cached(copy.dst) and blocks.is_cached(copy.src)
    blocks.check()


def test_requests_that_arrive_together_both_miss():
    """Blocks get digests only once a step has filled them, so two requests
    admitted in the same step compute their common prefix twice (vLLM too)."""
    system = list(range(200))
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=4, max_num_batched_tokens=512)
    model = ContentModel(sched.blocks)
    sched.add(Sequence(0, system + [1], max_tokens=3))
    sched.add(Sequence(1, system + [2], max_tokens=3))
    plan = sched.schedule()
    assert [(r.start, len(r.token_ids)) for r in plan.rows] == [(0, 201), (0, 201)]
    sched.update(plan, model.step(plan))
    assert sched.blocks.cached_blocks == 12           # the first one's blocks keep the digests
    assert all(sched.blocks.is_cached(blk) for blk in sched.blocks.tables[0][:12])
    assert not any(sched.blocks.is_cached(blk) for blk in sched.blocks.tables[1])
    run_to_end(sched, model)
    # A third one now finds the 12 full blocks, then the partial block that
    # the last of the two to finish left (200 tokens of the system prompt,
    # then 2 and its answer): it adopts the block for its first 8 tokens.
    sched.add(Sequence(2, system + [3], max_tokens=1))
    plan = run_to_end(sched, model)[0]
    assert (plan.rows[0].start, len(plan.rows[0].token_ids)) == (200, 1)
    assert sched.stats.prefix_hit_tokens == 200


def test_a_chunked_prompt_is_found_as_far_as_it_got():
    sched = Scheduler(BlockManager(64, 16), max_num_seqs=4, max_num_batched_tokens=100, chunk_size=40)
    model = ContentModel(sched.blocks)
    sched.add(Sequence(0, list(range(150)), max_tokens=2))
    plan = sched.schedule()
    sched.update(plan, model.step(plan))              # 40 tokens: 2 full blocks
    sched.add(Sequence(1, list(range(150)), max_tokens=2))
    plan = sched.schedule()
    assert [(r.seq.seq_id, r.start, len(r.token_ids)) for r in plan.rows] == [(0, 40, 40), (1, 32, 40)]
    sched.update(plan, model.step(plan))
    run_to_end(sched, model)


def test_preemption_then_readmission_finds_its_own_blocks():
    """As in tests/test_scheduler.py, but b comes back to its first block,
    which nobody took: it recomputes 4 of its 8 thrown-away tokens."""
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=16)
    model = ContentModel(sched.blocks)
    a = sched.add(Sequence(0, [10] * 4, max_tokens=8))
    b = sched.add(Sequence(1, [20] * 4, max_tokens=8))
    for _ in range(5):
        plan = sched.schedule()
        sched.update(plan, model.step(plan))
    b_first, b_last = sched.blocks.tables[1]
    plan = sched.schedule()                            # a needs a third block: b must go
    assert plan.preempted == [b] and sched.stats.recomputed_tokens == 8
    # b's blocks went to the back of the cached free list, its last one first: a took that one.
    assert sched.blocks.tables[0][2] == b_last and sched.blocks.evicted == 1
    assert sched.blocks.is_cached(b_first) and sched.blocks.ref_count(b_first) == 0
    sched.update(plan, model.step(plan))
    while a.status is not Status.FINISHED:
        plan = sched.schedule()
        sched.update(plan, model.step(plan))
    plan = sched.schedule()
    assert [(r.seq.seq_id, r.start, len(r.token_ids)) for r in plan.rows] == [(1, 4, 5)]
    assert sched.blocks.tables[1][0] == b_first
    assert sched.stats.recomputed_tokens == 4
    assert sched.stats.prefix_hit_tokens == 0 and b.num_cached_tokens == 0   # readmissions are not queries
    sched.update(plan, model.step(plan))
    run_to_end(sched, model)
    assert a.output == alone([10] * 4, 8) and b.output == alone([20] * 4, 8)


def test_a_new_scheduler_on_the_same_pool_finds_what_the_last_one_left():
    blocks = BlockManager(16, 4)
    model = ContentModel(blocks)
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=32)
    sched.add(Sequence(0, list(range(10)), max_tokens=2))
    run_to_end(sched, model)
    sched = Scheduler(blocks, max_num_seqs=2, max_num_batched_tokens=32)
    seq = sched.add(Sequence(5, list(range(10)) + [3], max_tokens=1))
    plans = run_to_end(sched, model)
    assert plans[0].rows[0].start == 10 and seq.output == alone(seq.prompt, 1)


def test_without_prefix_caching_nothing_is_cached_and_nothing_is_found():
    system = list(range(40))
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=4, max_num_batched_tokens=64, prefix_caching=False)
    model = ContentModel(sched.blocks)
    sched.add(Sequence(0, system + [1], max_tokens=3))
    run_to_end(sched, model)
    sched.add(Sequence(1, system + [2], max_tokens=3))
    plans = run_to_end(sched, model)
    assert plans[0].rows[0].start == 0 and model.computed[1] == 41 + 2
    assert sched.blocks.cached_blocks == 0
    assert sched.stats.prefix_queried_tokens == sched.stats.prefix_hit_tokens == 0


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(0, 2 ** 32 - 1))
def test_with_nothing_in_common_both_settings_plan_alike(seed):
    """Requests whose first tokens all differ, in a pool big enough for no
    preemption: prefix caching finds nothing and changes no plan (block
    numbers may differ: cached free blocks are handed out last)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    requests = [(int(rng.integers(0, 6)), [1000 + i] + rng.integers(0, 50, int(rng.integers(0, 30))).tolist(),
                 int(rng.integers(1, 10))) for i in range(n)]
    bs = int(rng.choice([1, 2, 4, 8]))
    chunk = int(rng.integers(1, 16)) if seed % 2 else None
    logs = []
    for caching in (False, True):
        sched = Scheduler(BlockManager(200, bs), 3, 24, chunk, prefix_caching=caching)
        model, log, step = ContentModel(sched.blocks), [], 0
        pending = list(range(n))
        while pending or sched.has_unfinished():
            for i in [i for i in pending if requests[i][0] <= step]:
                pending.remove(i)
                sched.add(Sequence(i, list(requests[i][1]), requests[i][2]))
            plan = sched.schedule()
            log.append([(r.seq.seq_id, r.start, len(r.token_ids), r.sample) for r in plan.rows])
            sched.update(plan, model.step(plan))
            step += 1
        logs.append(log)
    assert logs[0] == logs[1]


# ------------------------------------------------------------------ many sequences at random

@dataclass
class Request:
    arrival: int
    prompt: list[int]
    max_tokens: int
    abort_at: int | None       # the step it is aborted at, if still unfinished


@st.composite
def shared_workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 4, 8]))
    num_blocks = draw(st.integers(3, 16))
    pool = num_blocks * block_size
    max_num_seqs = draw(st.integers(1, 6))
    max_batched = draw(st.integers(max_num_seqs, 40))
    chunk = draw(st.one_of(st.none(), st.integers(1, 16)))
    small = st.integers(0, 5)                          # a tiny vocabulary: accidental sharing too
    systems = draw(st.lists(st.lists(small, max_size=20), min_size=1, max_size=3))
    requests: list[Request] = []
    for _ in range(draw(st.integers(1, 10))):
        max_tokens = draw(st.integers(1, min(8, pool)))
        if requests and draw(st.booleans()):           # the next turn of an earlier request
            before = requests[draw(st.integers(0, len(requests) - 1))]
            start = before.prompt + alone(before.prompt, before.max_tokens)
            arrival = before.arrival + draw(st.integers(0, 20))
        else:
            start = list(draw(st.sampled_from(systems)))
            arrival = draw(st.integers(0, 10))
        prompt = start + draw(st.lists(small, min_size=1, max_size=6))
        prompt = prompt[-(pool - max_tokens + 1):]     # fits the pool alone (keeps its end: never empty)
        abort_at = draw(st.one_of(st.none(), st.none(), st.integers(arrival, arrival + 15)))
        requests.append(Request(arrival, prompt, max_tokens, abort_at))
    return block_size, num_blocks, max_num_seqs, max_batched, chunk, requests


def test_random_shared_prefixes_with_aborts_preemption_and_eviction():
    seen: Counter = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(shared_workloads())
    def run(w):
        block_size, num_blocks, max_num_seqs, max_batched, chunk, requests = w
        sched = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_batched, chunk)
        blocks = sched.blocks
        model = ContentModel(blocks)
        finished: dict[int, Sequence] = {}
        pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival)
        bound = max(r.arrival for r in requests) + 1 + sum(len(r.prompt) + r.max_tokens for r in requests)
        before = dict(seen)
        step = 0
        while pending or sched.has_unfinished():
            while pending and requests[pending[0]].arrival <= step:
                i = pending.pop(0)
                sched.add(Sequence(i, list(requests[i].prompt), requests[i].max_tokens))
            for i, r in enumerate(requests):
                if r.abort_at == step and sched.abort(i) is not None:
                    seen["aborted"] += 1
            computed = {s.seq_id: s.num_computed for s in sched.waiting}
            evicted = blocks.evicted
            plan = sched.schedule()
            sched.check()
            for r in plan.rows:
                if r.seq.seq_id in computed and r.start > 0:
                    seen["hit on admission"] += 1
                    if r.start % block_size and not any(c.dst in blocks.tables[r.seq.seq_id] for c in plan.copies):
                        seen["partial block adopted"] += 1
                    if r.seq.num_preemptions:
                        seen["readmission hit"] += 1
            if plan.copies:
                seen["copied"] += 1
                if any(blocks.ref_count(c.src) > 1 for c in plan.copies):
                    seen["copied from a held block"] += 1
            if plan.preempted:
                seen["preempted"] += 1
            if blocks.evicted > evicted:
                seen["evicted"] += 1
            if any(blocks.ref_count(b) > 1 for b in range(num_blocks)):
                seen["block shared while running"] += 1
            for s in sched.update(plan, model.step(plan)):
                finished[s.seq_id] = s
            sched.check()
            for s in sched.running:
                model.verify(s, s.num_computed)
            assert blocks.free_blocks + blocks.used_blocks == num_blocks
            step += 1
            assert step <= bound, "someone starves"
        assert blocks.used_blocks == 0 and not blocks.tables, "blocks leaked"
        for i, s in finished.items():
            assert s.output == alone(requests[i].prompt, requests[i].max_tokens)
        stats = sched.stats
        assert 0 <= stats.prefix_copied_tokens <= stats.prefix_hit_tokens <= stats.prefix_queried_tokens
        assert sched.stats.recomputed_tokens >= 0
        for name in seen:
            if seen[name] > before.get(name, 0):
                event(name)

    run()
    for name in ("hit on admission", "partial block adopted", "copied", "copied from a held block",
                 "readmission hit", "preempted", "evicted", "block shared while running", "aborted"):
        assert seen[name] > 0, f"no generated case had: {name}"


# ------------------------------------------------------------------ with the real model

def run_model(model, cache: KVCache, sched: Scheduler) -> tuple[list[np.ndarray], list[StepPlan]]:
    """Step a real model until the scheduler is done, as `Engine.step` does
    (greedy tokens); the logits of every sampled row, and the plans."""
    from xllm.model import Batch

    logits, plans = [], []
    while sched.has_unfinished():
        plan = sched.schedule()
        cache.copy_blocks(plan.copies)
        out = model.forward(Batch.build(cache, plan.batch_rows()), cache, np.asarray(plan.logit_rows(), np.int32))
        logits.extend(out)
        plans.append(plan)
        sched.update(plan, {s.seq_id: int(np.argmax(row)) for s, row in zip(plan.sample_seqs(), out)})
        sched.check()
    return logits, plans


def test_the_tiny_model_gives_the_same_logits_from_cached_blocks():
    """The real path: Batch.build and the forward pass read shared and adopted
    blocks through the block table; the logits equal those of computing all."""
    from xllm.testing import tiny_llama

    model = tiny_llama(device="reference")

    def chat(prefix_caching: bool) -> tuple[list[np.ndarray], list[int]]:
        cache = KVCache(model.config, num_blocks=16, block_size=4, device=model.device)
        sched = Scheduler(cache, max_num_seqs=2, max_num_batched_tokens=64, prefix_caching=prefix_caching)
        logits, computed, prompt = [], [], [1, 17, 4, 63, 29, 8, 5]
        for turn, message in enumerate([[9, 10, 11], [12, 13, 14, 15, 16, 17, 18]]):
            prompt = prompt + message
            seq = sched.add(Sequence(turn, prompt, max_tokens=3))
            out, plans = run_model(model, cache, sched)
            logits += out
            computed += [plan.num_tokens for plan in plans]
            prompt = prompt + seq.output
        return logits, computed

    plain, plain_computed = chat(False)
    cached, cached_computed = chat(True)
    assert sum(cached_computed) < sum(plain_computed)
    assert len(plain) == len(cached)
    for a, b in zip(plain, cached):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * float(np.abs(a).max()))


SYSTEM = [(5 * i + 3) % 90 + 3 for i in range(200)]     # token ids of the tiny model's vocabulary (96)


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_the_tiny_model_gives_the_same_logits_after_a_copied_hit(kv_dtype):
    """a = system(40) + question + answer fills blocks 0..2 (block size 16);
    b = system + another question shares blocks 0 and 1 and copies the first
    8 slots of a's block 2, keys, values and int8 scales of every layer. b's
    logits are those of computing it all, and the copied slots are a's."""
    from xllm.testing import tiny_llama

    model = tiny_llama("cpu")
    system, bs = SYSTEM[:40], 16
    a_prompt, b_prompt = system + [7, 8, 9], system + [10, 11, 12, 13]

    def b_logits(prefix_caching: bool) -> tuple[list[np.ndarray], Sequence, KVCache, list[StepPlan]]:
        cache = KVCache(model.config, num_blocks=12, block_size=bs, kv_dtype=kv_dtype, device=model.ops)
        sched = Scheduler(cache, max_num_seqs=2, max_num_batched_tokens=64, prefix_caching=prefix_caching)
        if prefix_caching:
            sched.add(Sequence(0, a_prompt, max_tokens=8))       # 43 + 7 = 50 tokens computed
            run_model(model, cache, sched)
        b = sched.add(Sequence(1, b_prompt, max_tokens=4))
        logits, plans = run_model(model, cache, sched)
        return logits, b, cache, plans

    plain, b_plain, _, _ = b_logits(False)
    cached, b_cached, cache, plans = b_logits(True)
    (copy,) = plans[0].copies
    assert copy.tokens == 8 and b_cached.num_cached_tokens == 40 and plans[0].num_tokens == 4
    assert b_cached.output == b_plain.output
    assert len(plain) == len(cached) == 4
    for a, b in zip(plain, cached):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * float(np.abs(a).max()))
    src, dst = slice(copy.src * bs, copy.src * bs + 8), slice(copy.dst * bs, copy.dst * bs + 8)
    assert len(cache.pools) == (4 if kv_dtype == "int8" else 2)
    for pool in cache.pools:
        np.testing.assert_array_equal(pool[:, dst], pool[:, src])


@pytest.mark.parametrize("kv_dtype", ["fp32", "int8"])
def test_two_requests_sharing_a_200_token_system_prompt_compute_it_once(kv_dtype):
    """The issue's acceptance at the engine's block size, 128, with the tiny
    model: a = system(200) + question + a 100-token answer went past token
    256, so its block 1 (tokens 128..255) holds the system prompt's last 72
    tokens and 56 of its own. b = system + another question computes only
    its question, and generates what it does without the cache."""
    from xllm.engine import Engine
    from xllm.sampling import SamplingParams
    from xllm.testing import tiny_llama

    model = tiny_llama("cpu", context_length=512)
    a_prompt, b_prompt = SYSTEM + [7, 8, 9, 10, 11], SYSTEM + [12, 13, 14, 15, 16, 17, 18]
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
    engine = Engine(model, kv_dtype=kv_dtype, block_size=128, num_blocks=6)
    a = engine.run(a_prompt, params)
    assert len(a.token_ids) == 100 and a.num_cached_tokens == 0
    computed = engine.stats.prompt_tokens_computed
    b = engine.run(b_prompt, replace(params, max_tokens=4))
    assert b.finish_reason == "length" and b.num_cached_tokens == 200
    assert engine.stats.prompt_tokens_computed - computed == len(b_prompt) - 200
    stats = engine.scheduler.stats
    assert stats.prefix_hit_tokens == 200 and stats.prefix_copied_tokens == 72
    plain = Engine(model, kv_dtype=kv_dtype, block_size=128, num_blocks=6, prefix_caching=False)
    assert b.token_ids == plain.run(b_prompt, replace(params, max_tokens=4)).token_ids


def test_a_copy_that_fails_fails_its_step_and_leaves_the_cache_sound():
    """If copying raises, the engine fails the step's requests as for a
    failed forward pass; the source is unpinned, the destination is not kept
    findable, and the same request then runs normally."""
    from xllm.engine import Engine
    from xllm.sampling import SamplingParams
    from xllm.testing import tiny_llama

    model = tiny_llama("cpu")
    system = SYSTEM[:40]
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    engine = Engine(model, block_size=16, num_blocks=12)
    engine.run(system + [7, 8, 9], replace(params, max_tokens=8))   # 50 tokens computed: blocks 0..2 full
    pools = engine.cache.pools
    engine.cache.pools = [None] + pools                               # copying from it raises
    failed = engine.run(system + [10, 11], params)
    assert failed.finish_reason == "error" and "forward step failed" in failed.error
    engine.cache.pools = pools
    blocks = engine.cache.blocks
    assert not blocks.pending_copies and blocks.used_blocks == 0 and not engine.has_unfinished()
    engine.scheduler.check()
    b = engine.run(system + [10, 11], params)
    assert b.finish_reason == "length" and b.num_cached_tokens == 40
    plain = Engine(model, block_size=16, num_blocks=12, prefix_caching=False)
    assert b.token_ids == plain.run(system + [10, 11], params).token_ids


@pytest.mark.gpu
@pytest.mark.skipif(CUDA_DEVICE is None, reason="numba-cuda is not installed (CI installs it)")
def test_a_copied_hit_on_the_cuda_device():
    """The device copy (numba device arrays, one copy_to_device per layer and
    array) on a GPU, or under the simulator where there is none (CI); int8,
    so that the scales are copied too; a few tokens only: the simulator runs
    every GPU thread in Python."""
    from xllm.engine import Engine
    from xllm.sampling import SamplingParams
    from xllm.testing import tiny_llama

    model = tiny_llama(CUDA_DEVICE)
    bs, system = 4, SYSTEM[:10]
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    engine = Engine(model, kv_dtype="int8", block_size=bs, num_blocks=12)
    made = []
    copy_blocks = engine.cache.copy_blocks
    engine.cache.copy_blocks = lambda copies: (made.extend(copies), copy_blocks(copies))
    engine.run(system + [7, 8], replace(params, max_tokens=1))      # 12 tokens: blocks 0..2 full
    b = engine.run(system + [9, 10], params)
    (copy,) = made
    assert copy.tokens == 2 and b.num_cached_tokens == 10
    src, dst = slice(copy.src * bs, copy.src * bs + 2), slice(copy.dst * bs, copy.dst * bs + 2)
    for pool in engine.cache.pools:
        host = model.ops.download(pool)
        np.testing.assert_array_equal(host[:, dst], host[:, src])
    plain = Engine(model, kv_dtype="int8", block_size=bs, num_blocks=12, prefix_caching=False)
    assert b.token_ids == plain.run(system + [9, 10], params).token_ids


def test_reset_stats_forgets_what_preemption_threw_away_before():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=16)
    model = ContentModel(sched.blocks)
    sched.add(Sequence(0, [10] * 4, max_tokens=8))
    sched.add(Sequence(1, [20] * 4, max_tokens=8))
    for _ in range(6):                                 # b is preempted in the sixth step
        plan = sched.schedule()
        sched.update(plan, model.step(plan))
    assert sched.stats.recomputed_tokens == 8
    sched.reset_stats()
    run_to_end(sched, model)                           # b finds 4 of them again: not taken off 0
    assert sched.stats.recomputed_tokens == 0 and sched.stats.preemptions == 0
