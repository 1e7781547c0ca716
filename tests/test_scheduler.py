"""The continuous-batching scheduler, driven by a fake model.

The fake model stands in for `Batch.build` + `Llama.forward`. It writes each
row's tokens into a simulated KV pool (slot -> (sequence, position, token)),
through the block tables exactly as the real cache does, and "samples" the
next token as a hash of everything it reads back from the pool for that
sequence. So a sequence gets the tokens it would get alone only if its blocks
really hold its own tokens at the right positions: a block shared with another
sequence, a slot written twice, a chunk at the wrong position or a recompute
that forgets a generated token all change the tokens that come out.

That fake model insists that a sequence reads only KV it wrote itself, so the
tests that may share blocks through prefix caching run with
prefix_caching=False; tests/test_prefix_cache.py checks sharing with a fake
model that compares contents instead.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
from hypothesis import event, given, settings, strategies as st

from xllm.config import ModelConfig
from xllm.kv_cache import BlockManager, KVCache, OutOfBlocks
from xllm.scheduler import Scheduler, Sequence, Status, StepPlan

VOCAB = 997
STOP = 0          # the token that ends a request that honours stop tokens


def next_token(tokens: list[int]) -> int:
    """The fake model: a deterministic function of the whole prefix."""
    h = 17
    for t in tokens:
        h = (h * 1_000_003 + t + 1) % 2_147_483_647
    return h % VOCAB


def alone(prompt: list[int], max_tokens: int, honour_stop: bool = False) -> list[int]:
    """What a request generates when it runs by itself."""
    ids, out = list(prompt), []
    while len(out) < max_tokens:
        t = next_token(ids)
        out.append(t)
        ids.append(t)
        if honour_stop and t == STOP:
            break
    return out


class FakeModel:
    """One forward step over a simulated KV pool (see the module docstring)."""

    def __init__(self, blocks: BlockManager):
        self.blocks = blocks
        self.pool: list[tuple[int, int, int] | None] = [None] * (blocks.num_blocks * blocks.block_size)

    def slot(self, seq_id: int, pos: int) -> int:
        bs = self.blocks.block_size
        return self.blocks.tables[seq_id][pos // bs] * bs + pos % bs

    def step(self, plan: StepPlan) -> dict[int, int]:
        sampled = {}
        for row in plan.rows:
            sid, n = row.seq.seq_id, len(row.token_ids)
            # What Batch.build does: reserve() must find the blocks already set aside.
            assert self.blocks.blocks_needed(sid, n) == 0, "the scheduler did not set aside blocks for a row"
            assert self.blocks.reserve(sid, n) == row.start
            for k, tok in enumerate(row.token_ids):
                self.pool[self.slot(sid, row.start + k)] = (sid, row.start + k, tok)
            if row.sample:
                prefix = []
                for pos in range(row.start + n):
                    owner, at, tok = self.pool[self.slot(sid, pos)]
                    assert (owner, at) == (sid, pos), f"sequence {sid} reads another's KV at position {pos}"
                    prefix.append(tok)
                sampled[sid] = next_token(prefix)
        return sampled


@dataclass
class Request:
    arrival_step: int
    prompt: list[int]
    max_tokens: int
    honour_stop: bool = False


def drive(sched: Scheduler, requests: list[Request], seen: Counter | None = None) -> dict[int, Sequence]:
    """Run `requests` to the end (request i gets id i), checking the
    scheduler's invariants at every step; return the finished sequences."""
    seen = Counter() if seen is None else seen
    model = FakeModel(sched.blocks)
    finished: dict[int, Sequence] = {}
    pending = sorted(range(len(requests)), key=lambda i: requests[i].arrival_step)
    # No starvation: the oldest running request advances every step it exists,
    # so the work of all requests plus the idle steps before arrivals bounds the run.
    bound = max((r.arrival_step for r in requests), default=0) + 1 + \
        sum(len(r.prompt) + r.max_tokens for r in requests)
    step = 0
    while pending or sched.has_unfinished():
        while pending and requests[pending[0]].arrival_step <= step:
            i = pending.pop(0)
            sched.add(Sequence(i, list(requests[i].prompt), requests[i].max_tokens))
        plan = sched.schedule()
        sched.check()
        assert plan.num_tokens <= sched.max_num_batched_tokens
        assert len({r.seq.seq_id for r in plan.rows}) == len(plan.rows), "a sequence twice in one step"
        if plan.preempted:
            seen["preempted"] += 1
            if any(s.output for s in plan.preempted):
                seen["preempted after generating"] += 1
        if any(not r.sample for r in plan.rows):
            seen["chunked prompt"] += 1
        if any(r.is_decode for r in plan.rows) and any(not r.is_decode for r in plan.rows):
            seen["prefill beside decode"] += 1
        skipped = [s for s in sched.running if s not in {r.seq for r in plan.rows}]
        if skipped:
            seen["running but waits"] += 1
        sampled = model.step(plan)
        stopped = {sid for sid, t in sampled.items() if requests[sid].honour_stop and t == STOP}
        for seq in sched.update(plan, sampled, stopped):
            assert seq.seq_id not in finished, f"request {seq.seq_id} finished twice"
            assert seq.status is Status.FINISHED and sched.blocks.capacity(seq.seq_id) == 0
            finished[seq.seq_id] = seq
        sched.check()
        assert sched.blocks.free_blocks + sched.blocks.used_blocks == sched.blocks.num_blocks
        step += 1
        assert step <= bound, f"not finished after {step} steps: someone starves"
    assert sched.blocks.free_blocks == sched.blocks.num_blocks and not sched.blocks.tables, "blocks leaked"
    return finished


# ------------------------------------------------------------------ properties

@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4, 4, 4, 8]))
    num_blocks = draw(st.integers(2, 16))
    pool = num_blocks * block_size
    max_num_seqs = draw(st.integers(1, 6))
    max_batched = draw(st.integers(max_num_seqs, 40))
    chunk = draw(st.one_of(st.none(), st.integers(1, 16)))
    requests = []
    for _ in range(draw(st.integers(1, 8))):
        max_tokens = draw(st.integers(1, min(12, pool)))
        prompt_len = draw(st.integers(1, min(30, pool - max_tokens + 1)))   # fits the pool alone
        prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=prompt_len, max_size=prompt_len))
        requests.append(Request(draw(st.integers(0, 12)), prompt, max_tokens, draw(st.booleans())))
    return block_size, num_blocks, max_num_seqs, max_batched, chunk, requests


def test_random_workloads_finish_exactly_once_with_their_own_tokens():
    seen: Counter = Counter()

    @settings(max_examples=300, deadline=None, database=None)
    @given(workloads())
    def run(w):
        block_size, num_blocks, max_num_seqs, max_batched, chunk, requests = w
        sched = Scheduler(BlockManager(num_blocks, block_size), max_num_seqs, max_batched, chunk,
                          prefix_caching=False)
        before = dict(seen)
        finished = drive(sched, requests, seen)
        assert sorted(finished) == list(range(len(requests))), "a request was lost"
        for i, r in enumerate(requests):
            want = alone(r.prompt, r.max_tokens, r.honour_stop)
            assert finished[i].output == want, f"request {i} generated other tokens than alone"
            assert finished[i].finish_reason == ("length" if want[-1] != STOP or not r.honour_stop
                                                 or len(want) == r.max_tokens else "stop")
        assert sched.stats.peak_blocks_used <= num_blocks
        for name in seen:
            if seen[name] > before.get(name, 0):
                event(name)

    run()
    # The generated cases did exercise the hard paths, not just the easy ones.
    for name in ("preempted", "preempted after generating", "chunked prompt",
                 "prefill beside decode", "running but waits"):
        assert seen[name] > 0, f"no generated case had: {name}"


@settings(max_examples=60, deadline=None, database=None)
@given(st.integers(2, 10), st.integers(5, 12), st.integers(4, 8))
def test_a_tiny_pool_forces_preemption_and_recovers(n_requests, max_tokens, prompt_len):
    """Everyone arrives at once into a pool where two prompts fit but two
    whole requests do not: the second one admitted must be preempted."""
    requests = [Request(0, [i] * prompt_len, max_tokens) for i in range(n_requests)]
    blocks_each = -(-(prompt_len + max_tokens - 1) // 4)
    pool = max(blocks_each, 2 * -(-prompt_len // 4))
    sched = Scheduler(BlockManager(pool, 4), max_num_seqs=4, max_num_batched_tokens=16)
    finished = drive(sched, requests)
    assert [finished[i].output for i in range(n_requests)] == [alone(r.prompt, max_tokens) for r in requests]
    assert sched.stats.preemptions > 0 and sched.stats.peak_blocks_used == pool


# ------------------------------------------------------------------ single rules

def plan_rows(plan: StepPlan) -> list[tuple[int, int, int, bool]]:
    """(id, start, number of tokens, samples) of every row: easy to compare."""
    return [(r.seq.seq_id, r.start, len(r.token_ids), r.sample) for r in plan.rows]


def run_step(sched: Scheduler, model: FakeModel) -> StepPlan:
    plan = sched.schedule()
    sched.update(plan, model.step(plan))
    sched.check()
    return plan


def test_a_long_prompt_is_split_into_chunks():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=64, chunk_size=4)
    model = FakeModel(sched.blocks)
    seq = sched.add(Sequence(7, list(range(10)), max_tokens=2))
    plans = [run_step(sched, model) for _ in range(4)]
    assert [plan_rows(p) for p in plans] == [[(7, 0, 4, False)], [(7, 4, 4, False)], [(7, 8, 2, True)],
                                              [(7, 10, 1, True)]]
    assert plans[0].logit_rows() == [] and plans[2].logit_rows() == [1]
    assert plans[1].rows[0].token_ids == [4, 5, 6, 7]
    assert seq.status is Status.FINISHED and seq.output == alone(list(range(10)), 2)
    assert sched.stats.tokens_per_step == [4, 4, 2, 1]


def test_prefill_chunks_run_beside_decodes_in_one_step():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=4, max_num_batched_tokens=8, chunk_size=8)
    model = FakeModel(sched.blocks)
    sched.add(Sequence(0, [1, 2, 3], max_tokens=10))
    sched.add(Sequence(1, [4, 5], max_tokens=10))
    assert plan_rows(run_step(sched, model)) == [(0, 0, 3, True), (1, 0, 2, True)]
    sched.add(Sequence(2, list(range(20)), max_tokens=3))
    plan = run_step(sched, model)
    # Both decodes, then as much of the new prompt as the 8-token budget leaves.
    assert plan_rows(plan) == [(0, 3, 1, True), (1, 2, 1, True), (2, 0, 6, False)]
    assert [r.is_decode for r in plan.rows] == [True, True, False]
    assert plan.logit_rows() == [0, 1]
    assert [s.seq_id for s in plan.sample_seqs()] == [0, 1]
    assert plan.batch_rows()[2] == (2, list(range(6)))
    assert plan_rows(run_step(sched, model)) == [(0, 4, 1, True), (1, 3, 1, True), (2, 6, 6, False)]


def test_a_prefill_chunk_leaves_budget_for_the_decodes_behind_it():
    """An older sequence still prefilling must not crowd out newer decodes."""
    sched = Scheduler(BlockManager(32, 4), max_num_seqs=3, max_num_batched_tokens=8, chunk_size=4)
    model = FakeModel(sched.blocks)
    sched.add(Sequence(0, list(range(40)), max_tokens=2))
    sched.add(Sequence(1, [1], max_tokens=9))
    sched.add(Sequence(2, [2], max_tokens=9))
    assert plan_rows(run_step(sched, model)) == [(0, 0, 4, False), (1, 0, 1, True), (2, 0, 1, True)]
    sched.chunk_size = 8                         # 0 alone could now fill the whole step
    plan = run_step(sched, model)
    assert plan_rows(plan) == [(0, 4, 6, False), (1, 1, 1, True), (2, 1, 1, True)]


def test_max_num_seqs_caps_the_running_sequences():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=64)
    model = FakeModel(sched.blocks)
    for i in range(5):
        sched.add(Sequence(i, [i, i], max_tokens=3))
    assert plan_rows(run_step(sched, model)) == [(0, 0, 2, True), (1, 0, 2, True)]
    assert [s.seq_id for s in sched.waiting] == [2, 3, 4]
    run_step(sched, model)
    plan = run_step(sched, model)                # 0 and 1 finish here, freeing two places
    assert [r.seq.seq_id for r in plan.rows] == [0, 1] and len(sched.running) == 0
    assert plan_rows(run_step(sched, model)) == [(2, 0, 2, True), (3, 0, 2, True)]
    assert sched.stats.peak_running == 2


def test_max_num_batched_tokens_caps_every_step():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=4, max_num_batched_tokens=5)
    model = FakeModel(sched.blocks)
    for i in range(4):
        sched.add(Sequence(i, [i] * 3, max_tokens=2))
    # 3 + 2 of the next prompt: admission stops once the budget is spent.
    assert plan_rows(run_step(sched, model)) == [(0, 0, 3, True), (1, 0, 2, False)]
    assert plan_rows(run_step(sched, model)) == [(0, 3, 1, True), (1, 2, 1, True), (2, 0, 3, True)]
    while sched.has_unfinished():
        run_step(sched, model)
    assert max(sched.stats.tokens_per_step) <= 5


def test_admission_stops_at_the_first_request_that_does_not_fit():
    """Strict arrival order: a small request does not overtake a big one."""
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=64)
    model = FakeModel(sched.blocks)
    sched.add(Sequence(0, [0] * 8, max_tokens=2))     # 2 blocks
    sched.add(Sequence(1, [1] * 12, max_tokens=1))    # 3 blocks: does not fit beside 0
    sched.add(Sequence(2, [2], max_tokens=1))         # would fit, but arrived after 1
    assert plan_rows(run_step(sched, model)) == [(0, 0, 8, True)]
    assert [s.seq_id for s in sched.waiting] == [1, 2]


def test_preemption_takes_the_newest_and_it_recomputes_its_output():
    # Without prefix caching: b recomputes everything (with it, b would find its
    # first block again: tests/test_prefix_cache.py).
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=4, max_num_batched_tokens=16, prefix_caching=False)
    model = FakeModel(sched.blocks)
    a = sched.add(Sequence(0, [10] * 4, max_tokens=8))
    b = sched.add(Sequence(1, [20] * 4, max_tokens=8))
    run_step(sched, model)                            # both prompts: 1 block each
    for _ in range(4):                                # positions 4..7: a second block each
        run_step(sched, model)
    assert sched.blocks.free_blocks == 0 and len(b.output) == 5
    plan = run_step(sched, model)                     # a needs a third block: b must go
    assert [s.seq_id for s in plan.preempted] == [1] and plan_rows(plan) == [(0, 8, 1, True)]
    assert b.status is Status.WAITING and b.num_computed == 0 and b.num_preemptions == 1
    assert list(sched.waiting) == [b] and 1 not in sched.blocks.tables
    assert sched.stats.preemptions == 1 and sched.stats.recomputed_tokens == 8
    while a.status is not Status.FINISHED:
        run_step(sched, model)
    plan = run_step(sched, model)                     # b comes back: prompt + its 5 tokens
    assert plan_rows(plan) == [(1, 0, 9, True)]
    assert plan.rows[0].token_ids == [20] * 4 + b.output[:5]
    while sched.has_unfinished():
        run_step(sched, model)
    assert a.output == alone([10] * 4, 8) and b.output == alone([20] * 4, 8)


def test_a_sequence_in_the_middle_preempts_the_newest_not_an_older_one():
    sched = Scheduler(BlockManager(3, 4), max_num_seqs=4, max_num_batched_tokens=16)
    model = FakeModel(sched.blocks)
    a = sched.add(Sequence(0, [1] * 2, max_tokens=5))   # room left in its block
    b = sched.add(Sequence(1, [2] * 4, max_tokens=5))   # its block is full
    c = sched.add(Sequence(2, [3] * 4, max_tokens=5))
    run_step(sched, model)
    plan = run_step(sched, model)
    assert plan.preempted == [c] and plan_rows(plan) == [(0, 2, 1, True), (1, 4, 1, True)]
    assert a.status is b.status is Status.RUNNING and list(sched.waiting) == [c]


def test_the_newest_sequence_waits_when_no_one_newer_can_give_a_block():
    sched = Scheduler(BlockManager(3, 4), max_num_seqs=4, max_num_batched_tokens=16)
    model = FakeModel(sched.blocks)
    sched.add(Sequence(0, [1] * 6, max_tokens=3))   # positions 0..5: 2 blocks
    b = sched.add(Sequence(1, [2] * 3, max_tokens=4))   # positions 0..2: 1 block
    run_step(sched, model)
    plan = run_step(sched, model)
    # b's next token (position 4) needs a block; a holds the others and is older.
    assert plan_rows(plan) == [(0, 6, 1, True), (1, 3, 1, True)]
    plan = run_step(sched, model)                       # a finishes at 3 tokens
    assert plan_rows(plan) == [(0, 7, 1, True)] and not plan.preempted
    assert b.status is Status.RUNNING and b.num_computed == 4
    assert plan_rows(run_step(sched, model)) == [(1, 4, 1, True)]


def test_stopped_sequences_finish_early_and_free_their_blocks():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=16)
    model = FakeModel(sched.blocks)
    seq = sched.add(Sequence(0, [1, 2, 3, 4, 5], max_tokens=10))
    plan = sched.schedule()
    assert sched.update(plan, model.step(plan), stopped={0}) == [seq]
    assert seq.finish_reason == "stop" and len(seq.output) == 1
    assert sched.blocks.free_blocks == 8 and not sched.has_unfinished()


def test_abort_frees_a_request_wherever_it_is():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=1, max_num_batched_tokens=16)
    model = FakeModel(sched.blocks)
    a = sched.add(Sequence(0, [1] * 5, max_tokens=4))
    b = sched.add(Sequence(1, [2] * 5, max_tokens=4))
    run_step(sched, model)
    assert sched.abort(1) is b and b.finish_reason == "abort"      # was waiting
    plan = sched.schedule()
    assert sched.abort(0) is a and sched.blocks.free_blocks == 8   # running, mid-step
    assert sched.update(plan, {}) == []                           # its row is skipped
    sched.check()
    assert sched.abort(0) is None and not sched.has_unfinished()


def test_update_wants_a_token_for_exactly_the_sampling_rows():
    sched = Scheduler(BlockManager(8, 4), max_num_seqs=4, max_num_batched_tokens=16)
    sched.add(Sequence(0, [1, 2], max_tokens=3))
    plan = sched.schedule()
    with pytest.raises(ValueError, match=r"\[0\]"):
        sched.update(plan, {})
    with pytest.raises(ValueError):
        sched.update(plan, {0: 5, 9: 5})
    sched.update(plan, {0: 5})
    with pytest.raises(ValueError, match="changed since this plan"):
        sched.update(plan, {0: 5})                             # the same plan twice


def test_add_refuses_requests_that_can_never_run():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=2, max_num_batched_tokens=8, max_seq_len=20)
    with pytest.raises(ValueError, match=r"request 3: prompt 15 \+ max_tokens 3 needs 5 KV blocks of 4 tokens, "
                                         r"the whole pool has 4"):
        sched.add(Sequence(3, [0] * 15, max_tokens=3))
    sched.add(Sequence(4, [0] * 15, max_tokens=2))             # 16 KV tokens: exactly the pool
    with pytest.raises(ValueError, match="already scheduled"):
        sched.add(Sequence(4, [0], max_tokens=1))
    with pytest.raises(ValueError, match="empty prompt"):
        sched.add(Sequence(5, [], max_tokens=1))
    with pytest.raises(ValueError, match="max_tokens=0"):
        sched.add(Sequence(6, [1], max_tokens=0))
    with pytest.raises(ValueError, match="context of 20"):
        sched.add(Sequence(7, [1] * 10, max_tokens=11))
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=4)


# ------------------------------------------------------------------ the block pool

def test_block_manager_reserve_allocate_truncate_free():
    bm = BlockManager(4, 4)
    assert bm.reserve(0, 6) == 0 and bm.tables[0] == [0, 1] and bm.lengths[0] == 6
    bm.allocate(1, 5)                                # capacity only: nothing stored yet
    assert bm.tables[1] == [2, 3] and bm.lengths.get(1, 0) == 0 and bm.free_blocks == 0
    assert bm.blocks_needed(1, 8) == 0 and bm.blocks_needed(0, 3) == 1
    with pytest.raises(OutOfBlocks):
        bm.allocate(0, 9)
    assert bm.tables[0] == [0, 1]                    # all or nothing
    bm.truncate(0, 3)
    assert bm.tables[0] == [0] and bm.lengths[0] == 3
    bm.free(1)
    bm.check()
    assert bm.free_blocks == 3 and bm.used_blocks == 1 and bm.peak_used == 4


def test_kv_cache_keeps_its_api_on_top_of_the_block_manager():
    config = ModelConfig(n_layers=2, dim=8, n_heads=2, n_kv_heads=1, hidden_dim=16, vocab_size=10)
    cache = KVCache(config, num_blocks=8, block_size=4)
    cache.reserve(0, 12)                             # take blocks 0..2
    cache.free(0)                                    # they come back, 0 on top again
    cache.reserve(9, 4)                              # block 0
    assert list(cache.reserve(1, 6)) == [4, 5, 6, 7, 8, 9]   # blocks [1, 2]
    assert cache.tables[1] == [1, 2] and cache.lengths[1] == 6
    assert cache.block_table([1, 9]).tolist() == [[1, 2], [0, 0]]
    assert cache.free_blocks == 5 and cache.used_blocks == 3 and cache.blocks_needed(1, 3) == 1
    assert len(cache.k) == 2 and cache.k[0].shape == (32, 1, 4)


def test_pool_size_from_a_memory_budget():
    config = ModelConfig(n_layers=30, dim=576, n_heads=9, n_kv_heads=3, hidden_dim=1536, vocab_size=49152)
    per_block = 2 * 30 * 128 * 3 * 64 * 4            # 5.6 MiB
    assert KVCache.for_budget(config, 100 * per_block + 5).num_blocks == 100
    assert KVCache.for_budget(config, 10).num_blocks == 1     # at least one block
    assert KVCache.for_budget(config, 3 * per_block // 4, block_size=32).num_blocks == 3


def test_plans_feed_batch_build_unchanged():
    """The engine passes plan.batch_rows() to Batch.build, whose reserve finds
    the scheduler's blocks ready: positions and slots match the plan."""
    from xllm.model import Batch

    config = ModelConfig(n_layers=1, dim=8, n_heads=2, n_kv_heads=1, hidden_dim=16, vocab_size=10)
    cache = KVCache(config, num_blocks=6, block_size=4)
    sched = Scheduler(cache, max_num_seqs=4, max_num_batched_tokens=8, chunk_size=5)
    sched.add(Sequence(0, list(range(7)), max_tokens=3))
    sched.add(Sequence(1, [3, 4], max_tokens=3))
    while sched.has_unfinished():
        plan = sched.schedule()
        used = cache.used_blocks
        batch = Batch.build(cache, plan.batch_rows())
        assert cache.used_blocks == used, "Batch.build took blocks the scheduler had not set aside"
        assert batch.positions.tolist() == [r.start + k for r in plan.rows for k in range(len(r.token_ids))]
        want = [cache.tables[r.seq.seq_id][p // 4] * 4 + p % 4
                for r in plan.rows for p in range(r.start, r.start + len(r.token_ids))]
        assert batch.slot_mapping.tolist() == want
        sched.update(plan, {s.seq_id: 1 for s in plan.sample_seqs()})
        sched.check()
        assert all(cache.lengths[s.seq_id] == s.num_computed for s in sched.running)
    assert not sched.has_unfinished() and cache.free_blocks == 6
