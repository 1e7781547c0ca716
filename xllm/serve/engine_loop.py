"""One engine, stepped by one background thread, fed by many asyncio handlers.

    handler (event loop)                      engine thread
    --------------------                      -------------
    sub = loop.submit([(prompt, params)])  -> inbox  -> engine.add_request
    await sub.accepted()                   <- Accepted or RequestError
    async for ev in sub.events(): ...      <- StepOutputs of each step
    sub.abort()  (client went away)        -> inbox  -> engine.abort: blocks freed

Why an inbox instead of calling `engine.add_request` from the handler:
`Engine` holds its lock for a whole step (a forward pass), so a handler
calling it would freeze the event loop, and every other client with it,
for up to a step; and a thread that steps in a loop re-takes a lock before
a waiting thread wakes, so the handler could wait for many steps. The
engine thread instead empties the inbox between two steps: a request
joins the batch at the next step, and an abort frees its blocks before the
next step (both "at once" as far as the batch can tell).

Outputs go back through `loop.call_soon_threadsafe`, the one asyncio call
that may be made from another thread: it puts one step's outputs for one
HTTP request on that request's `asyncio.Queue`, which only the event loop
touches.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import traceback
from dataclasses import dataclass
from typing import AsyncIterator, Callable, NamedTuple

from ..engine import Engine, RequestError, StepOutput
from ..sampling import SamplingParams
from .metrics import EngineGauges, ServerMetrics


class Accepted(NamedTuple):
    """The engine queued this request (its checks passed)."""

    request_id: int


@dataclass
class _Add:
    request_id: int
    prompt: str | list[int]
    params: SamplingParams
    deliver: Callable[[list], None]       # thread-safe: hands a list of events to the request's event loop


@dataclass
class _Abort:
    request_id: int


class Submission:
    """The requests of one HTTP call (the n choices of each prompt), as its handler sees them."""

    def __init__(self, engine_loop: EngineLoop, request_ids: list[int]):
        self._engine_loop = engine_loop
        self.request_ids = request_ids
        self.queue: asyncio.Queue[list] = asyncio.Queue()   # one list of events per engine step
        self.unfinished = set(request_ids)
        self.aborted = False

    async def accepted(self) -> None:
        """Wait until the engine took every request; raise the first `RequestError` (then none runs)."""
        waiting, error = set(self.request_ids), None
        held: list = []       # outputs of a step that came before the last Accepted
        while waiting:
            for ev in await self.queue.get():
                if isinstance(ev, Accepted):
                    waiting.discard(ev.request_id)
                elif isinstance(ev, RequestError):
                    waiting.discard(ev.request_id)
                    self.unfinished.discard(ev.request_id)
                    error = error or ev
                else:
                    held.append(ev)
        if error is not None:
            self.abort()
            raise error
        if held:
            self.queue.put_nowait(held)

    async def events(self) -> AsyncIterator[StepOutput]:
        """Every output of every request, until all have finished or `abort` was called."""
        while self.unfinished:
            for ev in await self.queue.get():
                if ev.request_id in self.unfinished:
                    if ev.finished:
                        self.unfinished.discard(ev.request_id)
                    yield ev

    def abort(self) -> None:
        """Stop every unfinished request (the engine frees their blocks before its next step)."""
        if self.unfinished:
            self.aborted = True
            for rid in self.unfinished:
                self._engine_loop.abort(rid)
            self.unfinished.clear()
            self.queue.put_nowait([])       # wakes `events`, which then ends


class EngineLoop:
    """The thread that owns `engine`: adds, aborts, steps, and hands outputs back."""

    def __init__(self, engine: Engine, metrics: ServerMetrics):
        self.engine, self.metrics = engine, metrics
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._deliver: dict[int, Callable[[list], None]] = {}   # request id -> where its outputs go
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="xllm-engine", daemon=True)
        self._publish(0)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------ the event loop's side

    def submit(self, requests: list[tuple[str | list[int], SamplingParams]]) -> Submission:
        """Queue requests for the engine; call from a coroutine (the outputs come back to its loop)."""
        loop = asyncio.get_running_loop()
        sub = Submission(self, [self.engine.new_request_id() for _ in requests])

        def deliver(events: list) -> None:
            loop.call_soon_threadsafe(sub.queue.put_nowait, events)

        for rid, (prompt, params) in zip(sub.request_ids, requests):
            self._inbox.put(_Add(rid, prompt, params, deliver))
        self._wake.set()
        return sub

    def abort(self, request_id: int) -> None:
        self._inbox.put(_Abort(request_id))
        self._wake.set()

    # ------------------------------------------------------------ the engine thread

    def _run(self) -> None:
        while not self._stopping:
            if not self.engine.has_unfinished():
                self._wake.wait()
            self._wake.clear()         # before emptying the inbox: a later submit sets it again
            self._take_inbox()
            outputs: list[StepOutput] = []
            if self.engine.has_unfinished():
                try:
                    outputs = self.engine.step()
                except Exception:      # a bug in the engine: fail its requests, keep serving
                    traceback.print_exc(file=sys.stderr)
                    self._fail_all()
            self._hand_back(outputs)

    def _take_inbox(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(cmd, _Add):
                try:
                    self.engine.add_request(cmd.prompt, cmd.params, request_id=cmd.request_id)
                except RequestError as e:
                    cmd.deliver([e])
                    continue
                self._deliver[cmd.request_id] = cmd.deliver
                cmd.deliver([Accepted(cmd.request_id)])
            elif self._deliver.pop(cmd.request_id, None) is not None:
                out = self.engine.abort(cmd.request_id)
                if out is not None:
                    self.metrics.request_done("abort", len(out.prompt_token_ids), out.ttft, None)

    def _hand_back(self, outputs: list[StepOutput]) -> None:
        """Each request's outputs to its handler (one call per HTTP request), and the metrics."""
        by_target: dict[Callable[[list], None], list[StepOutput]] = {}
        new_tokens = 0
        for ev in outputs:
            deliver = self._deliver.get(ev.request_id)
            if deliver is None:
                continue
            by_target.setdefault(deliver, []).append(ev)
            if ev.output.finish_reason != "error":
                new_tokens += 1          # each request in a step samples one token
            if ev.finished:
                del self._deliver[ev.request_id]
                out = ev.output
                self.metrics.request_done(out.finish_reason, len(out.prompt_token_ids), out.ttft, out.tpot)
        for deliver, events in by_target.items():
            deliver(events)
        self._publish(new_tokens)

    def _publish(self, new_tokens: int) -> None:
        """The engine's state for /metrics (read here, by the only thread that changes it)."""
        sched, cache = self.engine.scheduler, self.engine.cache
        self.metrics.step_done(EngineGauges(len(sched.running), len(sched.waiting), cache.used_blocks,
                                            cache.num_blocks, sched.stats.prefix_hit_rate), new_tokens)

    def _fail_all(self) -> None:
        for rid in list(self._deliver):
            out = self.engine.abort(rid)
            if out is not None:
                out.finish_reason, out.error = "error", "the engine step failed (see the server's log)"
                self._deliver.pop(rid)([StepOutput(rid, "", True, out)])
                self.metrics.request_done("error", len(out.prompt_token_ids), None, None)
