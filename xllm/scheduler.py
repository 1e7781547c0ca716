"""Continuous batching: which tokens of which requests run in the next step.

Many requests share one model and one KV pool (`xllm.kv_cache`). Instead of
running a fixed batch to the end, the engine asks the `Scheduler` before every
forward pass which rows to run, so a request can join as soon as there is room
and leave as soon as it is done. One step is one ragged batch that mixes

* *decode* rows: one token, the last one a running sequence generated, whose
  key and value are not in the cache yet;
* *prefill* rows: the next chunk of a sequence's tokens that have no keys and
  values yet. A long prompt is split into chunks of at most `chunk_size`
  tokens over several steps, so it never stalls the decodes beside it.

A sequence needs a new token sampled only when its row reaches the end of
everything it has (prompt + output); a middle chunk of a prompt needs no logits.

Budgets, checked at every step:

* `max_num_seqs`: at most this many sequences are running (hold blocks);
* `max_num_batched_tokens`: at most this many rows in one step;
* the free blocks of the pool.

Order. Running sequences come first, oldest first, and each gets its next
decode token or prefill chunk. Then waiting sequences are admitted strictly in
arrival order while the budgets allow: the first one that does not fit stops
admission, so a big request is never overtaken forever by small ones.

Preemption. When a running sequence needs a block and none is free, the most
recently admitted running sequence is *preempted*: all its blocks go back to
the pool, it forgets its cached tokens (num_computed = 0) and goes back to the
front of the waiting queue. When it is admitted again it *recomputes*: its
prefill covers the prompt and the tokens it had already generated, then it
carries on generating. Nothing it generated is lost or produced twice.

Prefix caching (`prefix_caching=True`, the default; `xllm.kv_cache` explains
the block pool's side). Admitting a waiting sequence first asks the pool for
the longest start of its tokens that cached blocks already hold
(`BlockManager.find_prefix`); the sequence starts with those blocks and
`num_computed` at the hit, so its prefill computes only the rest. After every
step, `update` gives a digest to each block that the step filled, and a
sequence that leaves (finished, aborted or preempted) hands the pool its
computed tokens with its blocks, so they stay findable until evicted. Hence:

* The hit is capped at num_tokens - 1: the last token must run, its row gives
  the logits of the next token. The cap also keeps shared blocks read-only:
  found full blocks end at or before the hit, and the first token computed
  (at the hit) goes after them.
* The admission check counts the blocks the hit covers: the sequence needs
  new blocks only for the tokens after them, but found blocks that are free
  (nobody holds them; they wait in the pool, findable) leave the free list too
  (`BlockManager.blocks_to_admit`).
* A chat's next turn, whose prompt is the previous prompt and answer plus the
  new message, computes only the new message and the previous answer's last
  token: that token was sampled by the last step and never ran, so its key and
  value were never computed. (The partly filled last block is found too: see
  partial blocks in `xllm.kv_cache`.)
* Two requests with the same start admitted in the same step both miss: the
  blocks get digests only when a step has filled them (vLLM does the same). If
  both then fill the same tokens, the first one's block keeps the digest.
* A preempted sequence readmitted finds its own blocks if nobody has taken
  them since: they went to the back of the cached free list.
* A hit may end inside a cached full block (a system prompt that a longer
  request continued in the same block): the sequence then gets a fresh block
  and the plan carries a copy of the matched slots into it
  (`StepPlan.copies`), which the engine makes before building the batch
  (`KVCache.copy_blocks`). Until then the source block is pinned, so
  `schedule` refuses to plan again while copies are pending. When the pinned
  source would leave the pool one block short for the admission, the
  sequence is admitted without the copy (it computes those tokens), so
  copying never makes a request wait longer than computing would.

Why nobody starves: the oldest running sequence is never preempted (victims
are always newer than the sequence that needs the block), it may preempt all
the others, and `add` refuses a request whose prompt + max_tokens could not fit
the whole pool on its own. So the oldest running sequence advances at least
one token every step until it finishes, and then the next oldest is oldest.
Since running sequences are always older than waiting ones (admission is in
arrival order and a preempted sequence is the newest running one, which goes
to the front of the queue), every request eventually becomes the oldest.
Prefix caching changes none of this: once the others are preempted, every
held block is in the oldest sequence's table (once: a table never holds a
block twice), and every other block can be handed out, cached or not, so it
still finds its next block (pins last only from `schedule` to the copies at
the start of the step). Sharing only makes sequences need fewer blocks; a
hit that copies needs one more (the pinned source) when the source was free,
and where that does not fit, the sequence starts from the same hit without
the copy, which needs no more blocks than computing everything after the
shared blocks would.

The engine's loop, one forward pass per step:

    plan = scheduler.schedule()                       # blocks are set aside here
    cache.copy_blocks(plan.copies)                    # partial hits copied, sources unpinned
    batch = Batch.build(cache, plan.batch_rows())     # takes no new block
    logits = model.forward(batch, cache, plan.logit_rows())
    tokens = {s.seq_id: sample(row) for s, row in zip(plan.sample_seqs(), logits)}
    done = scheduler.update(plan, tokens, stopped={ids whose token is a stop id})

The scheduler is plain Python with no model inside, so its rules are tested
by driving it with a fake model (tests/test_scheduler.py).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .kv_cache import BlockCopy, BlockManager, KVCache, PrefixHit, blocks_for


class Status(enum.Enum):
    WAITING = "waiting"     # in the queue; holds no blocks
    RUNNING = "running"     # admitted; holds blocks for its computed tokens
    FINISHED = "finished"   # done; its blocks are back in the pool


@dataclass(eq=False)
class Sequence:
    """One request: its prompt, what it has generated so far, and how much of
    that has keys and values in the cache. (eq=False: two sequences are the
    same only if they are the same object, and a Sequence can go in a set.)"""

    seq_id: int
    prompt: list[int]
    max_tokens: int
    output: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    num_computed: int = 0            # leading tokens of all_ids whose KV is cached
    arrival: int = -1                # set by Scheduler.add: 0, 1, 2, ... in order
    num_preemptions: int = 0
    finish_reason: str | None = None  # "length", "stop" or "abort" once finished
    num_cached_tokens: int = 0        # prompt tokens the prefix cache held at its first admission

    @property
    def all_ids(self) -> list[int]:
        """prompt + output: every token the sequence has, in order."""
        return self.prompt + self.output

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def num_uncomputed(self) -> int:
        """Tokens without keys and values yet: 1 for a decode, more for a prefill."""
        return self.num_tokens - self.num_computed

    @property
    def max_kv_tokens(self) -> int:
        """The most tokens this request ever keeps in the cache: the prompt and
        every generated token but the last one (nothing runs after the last)."""
        return len(self.prompt) + self.max_tokens - 1


@dataclass
class Row:
    """One sequence's part of a step: `token_ids` at positions start.. of it."""

    seq: Sequence
    token_ids: list[int]
    start: int                       # position of token_ids[0]; == seq.num_computed
    sample: bool                     # reaches the end of all_ids: sample a token

    @property
    def is_decode(self) -> bool:
        """One token the model generated itself (not part of the prompt)."""
        return len(self.token_ids) == 1 and self.start >= len(self.seq.prompt)


@dataclass
class StepPlan:
    """What one forward pass runs: rows in batch order; the copies of cached
    slots to make before it (`KVCache.copy_blocks`); and the sequences that
    were preempted while planning it (for logs; the scheduler has handled them)."""

    rows: list[Row] = field(default_factory=list)
    copies: list[BlockCopy] = field(default_factory=list)   # (source block, destination block, tokens)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rows)

    def __bool__(self) -> bool:
        return bool(self.rows)

    def batch_rows(self) -> list[tuple[int, list[int]]]:
        """(sequence id, new token ids) for every row: the input of Batch.build."""
        return [(r.seq.seq_id, r.token_ids) for r in self.rows]

    def logit_rows(self) -> list[int]:
        """Indices, among the step's flattened tokens, of the rows to compute
        logits for: the last token of every row that samples."""
        out, end = [], 0
        for r in self.rows:
            end += len(r.token_ids)
            if r.sample:
                out.append(end - 1)
        return out

    def sample_seqs(self) -> list[Sequence]:
        """The sequences that get a new token this step, in `logit_rows` order."""
        return [r.seq for r in self.rows if r.sample]


@dataclass
class SchedulerStats:
    """Counters for benchmarks and tests."""

    steps: int = 0                    # non-empty plans made
    preemptions: int = 0
    # Cached tokens thrown away by preemption, counted when preempted, less
    # those a readmitted sequence finds again in the prefix cache: the tokens
    # computed twice (or to be, for a sequence still waiting).
    recomputed_tokens: int = 0
    tokens_per_step: list[int] = field(default_factory=list)
    peak_running: int = 0             # most sequences running at once
    peak_blocks_used: int = 0         # most KV blocks in use at once
    # Prefix caching, counted at each request's first admission only (a
    # readmission after preemption is in recomputed_tokens instead):
    prefix_queried_tokens: int = 0    # prompt tokens of the requests admitted
    prefix_hit_tokens: int = 0        # of those, found in the cache (not computed)
    prefix_copied_tokens: int = 0     # of those, copied from a block that went on differently

    @property
    def prefix_hit_rate(self) -> float:
        """The share of admitted prompt tokens the prefix cache held (0.0 before any)."""
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0


class Scheduler:
    """Plans every step of continuous batching over one KV block pool.

    `blocks` is the pool's `BlockManager`, or a `KVCache` (its manager is used).
    `chunk_size` caps one prefill row (default: max_num_batched_tokens).
    `max_seq_len`, when given, is the model's context: a request longer than
    it is refused at `add`.
    `prefix_caching`: start admitted sequences from the blocks of the pool
    that already hold their first tokens (module docstring). The cache lives
    in the pool, so it outlives the scheduler: a new Scheduler on the same
    pool finds what an earlier one left there.
    """

    def __init__(self, blocks: BlockManager | KVCache, max_num_seqs: int = 16,
                 max_num_batched_tokens: int = 512, chunk_size: int | None = None,
                 max_seq_len: int | None = None, prefix_caching: bool = True):
        self.blocks = blocks.blocks if isinstance(blocks, KVCache) else blocks
        self.prefix_caching = prefix_caching
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {max_num_seqs}")
        if max_num_batched_tokens < max_num_seqs:
            # Every running sequence can then always decode in the same step.
            raise ValueError(f"max_num_batched_tokens ({max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({max_num_seqs})")
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.chunk_size = chunk_size or max_num_batched_tokens
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.max_seq_len = max_seq_len
        self.waiting: deque[Sequence] = deque()   # arrival order; preempted ones at the front
        self.running: list[Sequence] = []         # admission order, oldest first
        self.seqs: dict[int, Sequence] = {}       # every unfinished sequence by id
        self.stats = SchedulerStats()
        self._arrivals = 0
        self._lost: dict[int, int] = {}           # preempted sequence id -> tokens it had computed

    # ------------------------------------------------------------ requests

    def add(self, seq: Sequence) -> Sequence:
        """Queue a new request. Raise ValueError for one that could never run."""
        name = f"request {seq.seq_id}"
        if seq.seq_id in self.seqs:
            raise ValueError(f"{name} is already scheduled")
        if not seq.prompt:
            raise ValueError(f"{name} has an empty prompt")
        if seq.max_tokens < 1:
            raise ValueError(f"{name} asks for max_tokens={seq.max_tokens}, needs >= 1")
        if seq.output or seq.num_computed or seq.status is not Status.WAITING:
            raise ValueError(f"{name} was already run; add a fresh Sequence")
        total = len(seq.prompt) + seq.max_tokens
        if self.max_seq_len is not None and total > self.max_seq_len:
            raise ValueError(f"{name}: prompt {len(seq.prompt)} + max_tokens {seq.max_tokens} = {total} tokens "
                             f"is more than the model's context of {self.max_seq_len}")
        need = blocks_for(seq.max_kv_tokens, self.blocks.block_size)
        if need > self.blocks.num_blocks:
            raise ValueError(f"{name}: prompt {len(seq.prompt)} + max_tokens {seq.max_tokens} needs {need} KV blocks "
                             f"of {self.blocks.block_size} tokens, the whole pool has {self.blocks.num_blocks}")
        seq.arrival = self._arrivals
        self._arrivals += 1
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)
        return seq

    def abort(self, seq_id: int) -> Sequence | None:
        """Drop an unfinished request (a client went away); free its blocks."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self._free(seq)
        self._lost.pop(seq_id, None)
        seq.status, seq.finish_reason = Status.FINISHED, "abort"
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def reset_stats(self) -> None:
        """Start the counters afresh (benchmarks). Tokens that preemptions
        threw away before are forgotten, so what readmissions find of them
        later is not taken off the new count either."""
        self.stats = SchedulerStats()
        self._lost.clear()

    # ------------------------------------------------------------ planning

    def schedule(self) -> StepPlan:
        """Plan the next step and set aside the blocks its rows will fill.

        The rows' tokens go into the cache when the engine builds the batch
        (`Batch.build` -> `reserve`), which then finds the blocks already there.
        Before that, the engine makes the plan's copies (`KVCache.copy_blocks`):
        a plan is refused while the last one's copies are pending.
        """
        if self.blocks.pending_copies:
            raise RuntimeError(f"the copies of the last plan were not made: {self.blocks.pending_copies} "
                               "(KVCache.copy_blocks, or BlockManager.copies_done)")
        plan = StepPlan()
        budget = self.max_num_batched_tokens

        # 1. Running sequences, oldest first. Indexing by i because preemption
        #    shortens self.running from the end while we walk it.
        later_decodes = sum(1 for s in self.running if s.num_uncomputed == 1)
        i = 0
        while i < len(self.running):
            seq = self.running[i]
            if seq.num_uncomputed == 1:
                later_decodes -= 1
            # Leave one token of budget for every running decode after this one,
            # so a prefill chunk never pushes a decode out of the step
            # (max_num_batched_tokens >= max_num_seqs makes that always possible).
            n = min(seq.num_uncomputed, self.chunk_size, budget - later_decodes)
            if n > 0:
                preempted = len(plan.preempted)
                n = self._make_room(seq, n, plan)
                if len(plan.preempted) > preempted:   # victims come from after i
                    later_decodes = sum(1 for s in self.running[i + 1:] if s.num_uncomputed == 1)
            if n > 0:
                self._add_row(plan, seq, n)
                budget -= n
            i += 1

        # 2. Waiting sequences, in order, while everything fits. None is admitted
        #    in a step that preempted: the pool is short, admitting would thrash.
        while self.waiting and not plan.preempted and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            admission = self._fit(seq, budget)
            if admission is None:
                break
            hit, n = admission
            self.waiting.popleft()
            self._admit(seq, hit, plan)
            self._add_row(plan, seq, n)
            budget -= n

        if plan:
            self.stats.steps += 1
            self.stats.tokens_per_step.append(plan.num_tokens)
            self.stats.peak_running = max(self.stats.peak_running, len(self.running))
            self.stats.peak_blocks_used = max(self.stats.peak_blocks_used, self.blocks.used_blocks)
        return plan

    def _find_prefix(self, seq: Sequence) -> PrefixHit:
        """What the pool already holds of `seq`'s tokens; at most all but the
        last, which must run to give logits (nothing without prefix caching)."""
        if not self.prefix_caching:
            return PrefixHit()
        return self.blocks.find_prefix(seq.all_ids, seq.num_tokens - 1)

    def _fit(self, seq: Sequence, budget: int) -> tuple[PrefixHit, int] | None:
        """How `seq` starts if the free blocks let it start now: its prefix
        hit and the tokens of its first row; None if it must wait. A hit
        that copies pins its source beside the fresh block: when that is a
        block too many, the same hit without the copy is tried."""
        hit = self._find_prefix(seq)
        for h in (hit, hit.without_copy()) if hit.source is not None else (hit,):
            n = min(seq.num_tokens - h.num_tokens, self.chunk_size, budget)
            if self.blocks.blocks_to_admit(h, h.num_tokens + n) <= self.blocks.free_blocks:
                return h, n
        return None

    def _admit(self, seq: Sequence, hit: PrefixHit, plan: StepPlan) -> None:
        """Move the head of the queue to running, its table starting with
        `hit`; a copy that hit needs goes into `plan`."""
        copy = self.blocks.admit(seq.seq_id, hit)
        if copy is not None:
            plan.copies.append(copy)
        seq.num_computed = hit.num_tokens
        seq.status = Status.RUNNING
        self.running.append(seq)
        if self.prefix_caching and not seq.num_preemptions:
            seq.num_cached_tokens = hit.num_tokens
            self.stats.prefix_queried_tokens += seq.num_tokens
            self.stats.prefix_hit_tokens += hit.num_tokens
            self.stats.prefix_copied_tokens += hit.copied
        # A readmission: what the cache gave back is not computed twice after all.
        self.stats.recomputed_tokens -= min(self._lost.pop(seq.seq_id, 0), hit.num_tokens)

    def _free(self, seq: Sequence) -> None:
        """Let go of `seq`'s blocks; with prefix caching they stay findable by
        the tokens they hold (its computed ones)."""
        if self.prefix_caching:
            self.blocks.free(seq.seq_id, seq.all_ids[: seq.num_computed])
        else:
            self.blocks.free(seq.seq_id)

    def _make_room(self, seq: Sequence, n: int, plan: StepPlan) -> int:
        """How many of the `n` tokens `seq` wants this step its blocks can take,
        preempting newer running sequences while that helps. 0: it waits."""
        target = seq.num_computed + n
        while self.blocks.blocks_to_hold(seq.seq_id, target) > self.blocks.free_blocks:
            # The newest running sequence comes after `seq` in the walk of
            # schedule(), so it has no row in this step yet.
            victim = self.running[-1]
            if victim is seq:
                break   # nobody newer left to take blocks from
            self._preempt(victim, plan)
        # Whatever could not be freed: shrink to what fits (a prefill chunk may).
        fits = self.blocks.capacity(seq.seq_id) + self.blocks.free_blocks * self.blocks.block_size
        return max(0, min(n, fits - seq.num_computed))

    def _preempt(self, seq: Sequence, plan: StepPlan) -> None:
        """Send the newest running sequence back to the front of the queue."""
        self.running.remove(seq)
        self._free(seq)
        self.stats.preemptions += 1
        self.stats.recomputed_tokens += seq.num_computed
        self._lost[seq.seq_id] = seq.num_computed
        seq.num_preemptions += 1
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        plan.preempted.append(seq)

    def _add_row(self, plan: StepPlan, seq: Sequence, n: int) -> None:
        start = seq.num_computed
        self.blocks.allocate(seq.seq_id, start + n)
        ids = seq.all_ids[start : start + n]
        plan.rows.append(Row(seq=seq, token_ids=ids, start=start, sample=start + n == seq.num_tokens))

    # ------------------------------------------------------------ after the step

    def update(self, plan: StepPlan, sampled: Mapping[int, int],
               stopped: Iterable[int] = ()) -> list[Sequence]:
        """Record a step the engine ran: every row's tokens are now cached, and
        `sampled` maps each sequence of `plan.sample_seqs()` to its new token.
        A sequence finishes when it has max_tokens tokens or its id is in
        `stopped` (the engine saw a stop token). Finished sequences leave and
        free their blocks; they are returned, in plan order."""
        stopped = set(stopped)
        may = {s.seq_id for s in plan.sample_seqs()}
        must = {s.seq_id for s in plan.sample_seqs() if s.status is Status.RUNNING}   # not aborted meanwhile
        if not must <= set(sampled) <= may:
            raise ValueError(f"update needs a token for each of the sequences {sorted(must)}, got {sorted(sampled)}")
        finished = []
        for row in plan.rows:
            seq = row.seq
            if seq.finish_reason == "abort":
                continue   # aborted while the step ran; already gone
            if seq.status is not Status.RUNNING or seq.num_computed != row.start:
                raise ValueError(f"request {seq.seq_id} changed since this plan was made")
            seq.num_computed += len(row.token_ids)
            bs = self.blocks.block_size
            if self.prefix_caching and seq.num_computed // bs > row.start // bs:   # the row filled a block
                self.blocks.cache_full_blocks(seq.seq_id, seq.all_ids[: seq.num_computed])
            if not row.sample:
                continue
            seq.output.append(sampled[seq.seq_id])
            if len(seq.output) >= seq.max_tokens or seq.seq_id in stopped:
                seq.finish_reason = "length" if len(seq.output) >= seq.max_tokens else "stop"
                seq.status = Status.FINISHED
                self.running.remove(seq)
                self._free(seq)
                del self.seqs[seq.seq_id]
                finished.append(seq)
        return finished

    # ------------------------------------------------------------ checking

    def check(self) -> None:
        """Raise AssertionError unless the bookkeeping agrees with itself:
        blocks free or owned once, only running sequences own blocks, each has
        blocks for its cached tokens, and the queues hold each request once."""
        self.blocks.check()
        running = {s.seq_id for s in self.running}
        waiting = {s.seq_id for s in self.waiting}
        assert len(running) == len(self.running) and len(waiting) == len(self.waiting), "a request is queued twice"
        assert not running & waiting, "a request is both running and waiting"
        assert running | waiting == set(self.seqs), "a request is lost or finished but still queued"
        assert len(self.running) <= self.max_num_seqs
        owners = {sid for sid, table in self.blocks.tables.items() if table}
        assert owners <= running, f"sequences {sorted(owners - running)} hold blocks but are not running"
        for s in self.running:
            assert s.status is Status.RUNNING
            assert self.blocks.capacity(s.seq_id) >= s.num_computed, f"request {s.seq_id} lost cached tokens"
            assert s.num_computed < s.num_tokens, f"request {s.seq_id} has nothing left to compute"
        for s in self.waiting:
            assert s.status is Status.WAITING and s.num_computed == 0
        arrivals = [s.arrival for s in self.running] + [s.arrival for s in self.waiting]
        assert arrivals == sorted(arrivals), "running and waiting are not in arrival order"
