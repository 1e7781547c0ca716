"""The engine loop that every caller shares, and `LLM` on top of it.

    from xllm import LLM, SamplingParams
    llm = LLM()                                   # the default model
    for out in llm.generate(["Hi!", "Tell me a joke."], SamplingParams(max_tokens=64)):
        print(out.text, out.finish_reason)

`Engine` is the loop itself (the shape of vLLM's and nano-vllm's):

    rid = engine.add_request(prompt, params)      # checked here, queued
    while engine.has_unfinished():
        for out in engine.step():                 # one forward pass
            print(out.request_id, out.text, out.finished)
    engine.abort(rid)                             # a caller that went away

One `Scheduler` (`xllm.scheduler`) plans every step for the life of the
engine: one token for every running request that is decoding, and chunks
of prompts for requests that are starting; the model runs them all as one
ragged batch; each request that reached the end of its tokens samples one
with its own random generator. Requests join the batch as soon as there is
room and leave as soon as they finish. The block pool caches the keys and
values of earlier prompts (prefix caching), so a chat's next turn, or a
request that shares a system prompt with an earlier one, computes only its
new tokens.

The chat CLI (`xllm.chat`, `python -m xllm.main`), `LLM.generate` and
`LLM.stream` all go through `add_request` and `step`, so every caller gets
the same sampling, stop strings, statistics and checks.

A request fails alone:
- `add_request` checks everything knowable (prompt type and token range,
  length against the context, every SamplingParams field) and raises a
  `RequestError` naming the request and the field; nothing is queued.
- What still goes wrong inside one request (a sampling or decoding error,
  logits that are not finite) finishes that request with
  `finish_reason="error"` and its message; the others go on untouched.
- If the forward pass itself raises, every request of that step finishes
  with "error" (the step's keys and values cannot be trusted); requests
  that were not in the step go on.

Threads: `add_request`, `abort` and `step` hold one lock, so they can be
called from any thread. `LLM.generate`/`LLM.stream` let several threads
share the running batch: whichever thread runs a step hands every request's
output to the thread that asked for it.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Sequence as Seq

import numpy as np

from . import planner
from .errors import XllmError
from .kv_cache import KVCache
from .model import Batch
from .sampling import SamplingParams, sample
from .scheduler import Scheduler, Sequence


class RequestError(XllmError, ValueError):
    """A request that cannot run, found when it is added; names the request and the problem."""

    def __init__(self, request_id: int, problem: str):
        self.request_id = request_id
        super().__init__(f"request {request_id}: {problem}")


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None      # "length", "stop", "eos", "abort" or "error"
    error: str | None = None              # what went wrong, with finish_reason "error"
    cut_by_context: bool = False          # stopped because the model's context was full
    num_cached_tokens: int = 0            # prompt tokens whose keys and values came from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        """Seconds from submission to the first generated token."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean seconds per output token after the first."""
        if self.finish_time is None or self.first_token_time is None or len(self.token_ids) < 2:
            return None
        return (self.finish_time - self.first_token_time) / (len(self.token_ids) - 1)


class StepOutput(NamedTuple):
    """What one step did for one request: the text it may show now, and
    the request's whole output so far (final when `finished`)."""

    request_id: int
    text: str
    finished: bool
    output: RequestOutput


class _Request:
    """What the engine keeps per request beside the scheduler's Sequence."""

    def __init__(self, out: RequestOutput, params: SamplingParams, tokenizer, max_tokens: int):
        self.out, self.params = out, params
        self.rng = np.random.default_rng(params.seed)
        self.stream = tokenizer.stream_decoder(prefix_ids=out.prompt_token_ids) if tokenizer else None
        self.held = ""   # text not yet shown: it might be the start of a stop string
        self.max_tokens = max_tokens   # params.max_tokens, or less where the context ends first

    def add_token(self, token: int, visible: bool) -> str:
        """Record one generated token; return the text that can be shown now."""
        self.out.token_ids.append(token)
        if self.stream is None or not visible:
            return ""
        self.held += self.stream.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        if self.stream is not None:
            self.held += self.stream.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self.out.text + self.held
        for s in self.params.stop:
            cut = text.find(s, max(0, len(self.out.text) - len(s)))
            if cut >= 0:
                self.out.finish_reason = "stop"
                new, self.held = text[len(self.out.text):cut], ""
                self.out.text += new
                return new
        keep = 0 if final else max((len(s) - 1 for s in self.params.stop), default=0)
        keep = min(keep, len(self.held))
        new = self.held[: len(self.held) - keep]
        self.held = self.held[len(self.held) - keep:]
        self.out.text += new
        return new


@dataclass
class EngineStats:
    steps: int = 0
    prompt_tokens_computed: int = 0      # rows that were prompt (or recomputed) tokens
    generated_tokens: int = 0
    requests_added: int = 0              # accepted by add_request
    requests_failed: int = 0             # finished with "error"


class Engine:
    """The step loop over one model, one KV pool and one scheduler (module docstring).

    `model`: a `Llama`; `tokenizer`: its tokenizer, or None (prompts are
    then token ids and outputs have no text). `num_blocks` overrides the
    pool size that `kv_cache_bytes` would pay for.
    """

    def __init__(self, model, tokenizer=None, *, kv_dtype: str = "fp32", block_size: int = 128,
                 kv_cache_bytes: int = 1 << 30, num_blocks: int | None = None, max_num_seqs: int = 32,
                 max_num_batched_tokens: int = 512, prefix_caching: bool = True):
        self.model, self.tokenizer = model, tokenizer
        config = model.config
        if num_blocks is None:
            # As many blocks as the planner says the budget pays for, so
            # `bench.plan` and the engine cannot disagree about KV memory.
            num_blocks = planner.kv_pool_blocks(config, kv_dtype, block_size, kv_cache_bytes)
            if num_blocks < 1:
                raise XllmError(f"a KV budget of {kv_cache_bytes} bytes holds no block of {block_size} tokens "
                                f"({planner.kv_pool_bytes(config, kv_dtype, block_size, 1)} bytes each)")
        self.cache = KVCache(config, num_blocks, block_size, kv_dtype=kv_dtype, device=model.ops)
        self.scheduler = Scheduler(self.cache, max_num_seqs, max_num_batched_tokens,
                                   max_seq_len=config.context_length, prefix_caching=prefix_caching)
        self.eos = frozenset(tokenizer.eos_ids if tokenizer else config.eos_ids)
        # A model's embedding table may have padding rows past the tokenizer's
        # vocabulary (the loader refuses the other way round); those ids have
        # no text, so they are never sampled.
        self.sample_vocab = min(config.vocab_size, tokenizer.vocab_size) if tokenizer else config.vocab_size
        self.stats = EngineStats()
        self._requests: dict[int, _Request] = {}
        self._next_id = 0
        self._lock = threading.RLock()
        self._undelivered: list[StepOutput] = []     # outputs of a step that raised (`_interrupted`)

    # ------------------------------------------------------------ requests

    def new_request_id(self) -> int:
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            return rid

    def add_request(self, prompt, params: SamplingParams | None = None, request_id: int | None = None) -> int:
        """Check and queue one request; return its id.

        `prompt`: a string (needs a tokenizer) or a list of token ids.
        Raises `RequestError` (one line naming the request and the problem)
        for anything that could never run; then nothing is queued."""
        with self._lock:
            rid = self.new_request_id() if request_id is None else request_id
            ids, params, max_tokens = self._check(rid, prompt, params)
            out = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                                arrival_time=time.perf_counter())
            try:
                self.scheduler.add(Sequence(rid, ids, max_tokens))
            except ValueError as e:    # e.g. more KV blocks than the whole pool has
                raise RequestError(rid, str(e).removeprefix(f"request {rid}: ")) from None
            self._requests[rid] = _Request(out, params, self.tokenizer, max_tokens)
            self.stats.requests_added += 1
            return rid

    def _check(self, rid: int, prompt, params) -> tuple[list[int], SamplingParams, int]:
        """The prompt's token ids, the params, and the most tokens the context leaves room for."""
        if params is None:
            params = SamplingParams()
        if not isinstance(params, SamplingParams):
            raise RequestError(rid, f"params must be a SamplingParams, got {type(params).__name__}")
        try:
            params.check()
        except ValueError as e:
            raise RequestError(rid, str(e)) from None
        vocab = self.sample_vocab
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError(rid, "a text prompt needs a tokenizer: this engine was given a model without one")
            try:
                ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos)
            except Exception as e:     # e.g. a lone surrogate, which has no UTF-8 bytes
                raise RequestError(rid, f"the prompt cannot be tokenized: {type(e).__name__}: {e}") from None
        elif isinstance(prompt, (bytes, bytearray, memoryview)):
            raise RequestError(rid, "the prompt is bytes: give a str (decode it first) or a list of token ids")
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = list(prompt)
            bad = [t for t in ids if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
            if bad:
                raise RequestError(rid, f"prompt token {bad[0]!r} is not a token id in 0..{vocab - 1}")
            ids = [int(t) for t in ids]
        else:
            raise RequestError(rid, f"the prompt must be a str or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise RequestError(rid, "the prompt is empty")
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise RequestError(rid, f"stop_token_ids: {bad[0]} is not a token id in 0..{vocab - 1}")
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        ctx = self.model.config.context_length
        if len(ids) >= ctx:
            raise RequestError(rid, f"the prompt has {len(ids)} tokens and the model's context is {ctx}, "
                                    "which leaves no room for an answer (truncate_prompt_tokens keeps the last ones)")
        # A request may ask for more tokens than the context leaves: it stops
        # where the context is full and says so (cut_by_context).
        return ids, params, min(params.max_tokens, ctx - len(ids))

    def abort(self, request_id: int) -> RequestOutput | None:
        """Stop a request now and free its blocks; its output so far, or None if unknown or done."""
        with self._lock:
            req = self._requests.pop(request_id, None)
            if req is None:
                return None
            self.scheduler.abort(request_id)
            req.out.finish_reason = "abort"
            req.out.finish_time = time.perf_counter()
            return req.out

    def has_unfinished(self) -> bool:
        with self._lock:
            return bool(self._requests)

    def set_limits(self, max_num_seqs: int | None = None, max_num_batched_tokens: int | None = None) -> None:
        """Change the scheduler's budgets (when no request is in flight)."""
        with self._lock:
            if self._requests:
                raise RuntimeError("set_limits needs an idle engine")
            s = self.scheduler
            seqs = max_num_seqs or s.max_num_seqs
            tokens = max_num_batched_tokens or s.max_num_batched_tokens
            if seqs < 1 or tokens < seqs:
                raise ValueError(f"need max_num_batched_tokens ({tokens}) >= max_num_seqs ({seqs}) >= 1")
            s.max_num_seqs, s.max_num_batched_tokens = seqs, tokens
            s.chunk_size = tokens

    # ------------------------------------------------------------ one step

    def step(self) -> list[StepOutput]:
        """Run one forward pass; every request it touched, with its new text."""
        with self._lock:
            if self._undelivered:
                outputs, self._undelivered = self._undelivered, []
                return outputs
            if not self._requests:
                return []
            plan = self.scheduler.schedule()
            if not plan:
                raise RuntimeError("the scheduler made an empty step with requests unfinished")
            try:
                self.cache.copy_blocks(plan.copies)   # prefix hits inside cached blocks; unpins their sources
                batch = Batch.build(self.cache, plan.batch_rows())
                logits = self.model.forward(batch, self.cache, np.asarray(plan.logit_rows(), np.int32))
            except Exception as e:
                return [self._fail(row.seq.seq_id, f"the forward step failed: {e}") for row in plan.rows]
            except BaseException:      # Ctrl-C mid-step: the step's keys and values are half written
                self._interrupted(plan)
                raise
            try:
                return self._advance(plan, logits)
            except BaseException:      # Ctrl-C (or a bug) before the scheduler counted the step
                self._interrupted(plan)
                raise

    def _interrupted(self, plan) -> None:
        """A step cut short cannot be trusted, so its unfinished requests end
        with "error". Their outputs come out of the next `step`, so that a
        caller waiting for them (another thread's stream) hears of it."""
        self._undelivered += [self._fail(row.seq.seq_id, "interrupted")
                              for row in plan.rows if row.seq.seq_id in self._requests]

    def _advance(self, plan, logits: np.ndarray) -> list[StepOutput]:
        """Sample each request's next token, stop the ones that are done, and
        tell the scheduler; the requests' outputs."""
        self.stats.steps += 1
        self.stats.prompt_tokens_computed += sum(len(r.token_ids) for r in plan.rows if not r.is_decode)
        now = time.perf_counter()
        sampled, stopped, events, failed = {}, set(), [], []
        for row_logits, seq in zip(logits, plan.sample_seqs()):
            rid = seq.seq_id
            req = self._requests[rid]
            try:
                token = self._sample(row_logits, req, seq)
                is_stop = (token in self.eos and not req.params.ignore_eos) or token in req.params.stop_token_ids
                if req.out.first_token_time is None:
                    req.out.first_token_time = now
                    req.out.num_cached_tokens = seq.num_cached_tokens
                text = req.add_token(token, visible=not is_stop)
            except Exception as e:
                failed.append((rid, f"{type(e).__name__}: {e}"))
                continue
            sampled[rid] = token
            if is_stop:
                req.out.finish_reason = "eos"
            if is_stop or req.out.finish_reason == "stop":
                stopped.add(rid)
            events.append((rid, text))
        outputs = [self._fail(rid, message) for rid, message in failed]   # they leave before the update
        self.stats.generated_tokens += len(sampled)
        finished = {s.seq_id for s in self.scheduler.update(plan, sampled, stopped)}
        for rid, text in events:
            req = self._requests[rid]
            if rid in finished:
                del self._requests[rid]
                try:
                    text += req.finish()
                except Exception as e:      # the last piece of text could not be decoded
                    req.out.finish_reason, req.out.error = "error", f"{type(e).__name__}: {e}"
                    self.stats.requests_failed += 1
                if req.out.finish_reason is None:
                    req.out.finish_reason = "length"
                    req.out.cut_by_context = len(req.out.token_ids) < req.params.max_tokens
                req.out.finish_time = now
            outputs.append(StepOutput(rid, text, rid in finished, req.out))
        return outputs

    def _sample(self, row_logits: np.ndarray, req: _Request, seq: Sequence) -> int:
        row_logits = row_logits[: self.sample_vocab]
        if not np.isfinite(row_logits).all():
            raise FloatingPointError("the model's logits are not finite (NaN or inf)")
        return sample(row_logits, req.params, req.rng, seq.all_ids)

    def _fail(self, rid: int, message: str) -> StepOutput:
        req = self._requests.pop(rid)
        self.scheduler.abort(rid)
        req.out.finish_reason, req.out.error = "error", message
        req.out.finish_time = time.perf_counter()
        self.stats.requests_failed += 1
        return StepOutput(rid, "", True, req.out)

    def run(self, prompt, params: SamplingParams | None = None) -> RequestOutput:
        """Add one request and step until it is done (tests, benchmarks, scripts).
        Other requests in the engine advance too, but their outputs are not returned."""
        rid = self.add_request(prompt, params)
        while True:
            for ev in self.step():
                if ev.request_id == rid and ev.finished:
                    return ev.output

    def reset_stats(self) -> None:
        """Start the engine's and the scheduler's counters afresh (benchmarks)."""
        with self._lock:
            self.stats = EngineStats()
            self.scheduler.reset_stats()


class LLM:
    """Many requests served together by continuous batching, on an `Engine`.

    `generate` and `stream` may be called from several threads at once (or
    a second `stream` while one is open): their requests join the same
    running batch.
    """

    def __init__(self, model=None, tokenizer=None, *,
                 kv_dtype: str = "fp32", block_size: int = 128, kv_cache_bytes: int = 1 << 30,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512, device: str = "auto",
                 prefix_caching: bool = True, exact: bool = False, quantize=None):
        """`model`: a checkpoint path (default: the default model), or a `Llama`
        already built (then prompts are token ids unless `tokenizer` is given:
        a tokenizer file or directory, or a tokenizer object).
        `device`: "auto" (a GPU when one works, else the CPU), "cpu", "cuda" or
        "cuda-sim"; a built model brings its own. `exact`: multiply quantized
        weights in float32 rather than with integer activations (see `Llama`).
        `quantize`: "w8a8" (or "q8_0", "fp16", or an `xllm.quantize.QuantizeOptions`
        for smoothing) quantizes a checkpoint's float weights at load."""
        from .download import default_model_path
        from .load import load_model
        from .model import Llama

        if isinstance(model, Llama):
            from .tokenizer import load_tokenizer

            self.model, self.metadata = model, {}
            self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        else:
            path = model or default_model_path()
            self.model, self.tokenizer, self.metadata = load_model(path, tokenizer, device, exact=exact,
                                                                  quantize=quantize)
        self.engine = Engine(self.model, self.tokenizer, kv_dtype=kv_dtype, block_size=block_size,
                             kv_cache_bytes=kv_cache_bytes, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens, prefix_caching=prefix_caching)
        self.cache = self.engine.cache
        self.kv_pool_bytes = self.cache.pool_bytes
        self._outputs: dict[int, deque[StepOutput]] = {}   # request id -> outputs its caller has not read
        self._step_lock = threading.Lock()

    @property
    def stats(self) -> EngineStats:
        return self.engine.stats

    @property
    def scheduler_stats(self):
        """Peak blocks, preemptions, steps, prefix-cache hits (since `engine.reset_stats()`)."""
        return self.engine.scheduler.stats

    def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress=None) -> list[RequestOutput]:
        """Run every prompt (a string or a list of token ids) to the end; outputs in prompt order.

        A request that cannot run (a bad prompt or parameter) comes back at
        once with finish_reason "error" and its message in `error`; the
        others run as if it had not been there."""
        outs: dict[int, RequestOutput] = {}
        for i, _, done in self.stream(prompts, params):
            if done is not None:
                outs[i] = done
                if progress:
                    progress(done)
        return [outs[i] for i in sorted(outs)]

    def stream(self, prompts, params=None) -> Iterator[tuple[int, str, RequestOutput | None]]:
        """Yield (prompt index, new text, output-if-finished-else-None) as tokens arrive.
        Closing the iterator early aborts its unfinished requests."""
        if isinstance(prompts, (str, bytes)) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")

        index: dict[int, int] = {}
        failed = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            rid = self.engine.new_request_id()
            self._outputs[rid] = deque()
            try:
                self.engine.add_request(prompt, p, request_id=rid)
            except RequestError as e:
                del self._outputs[rid]
                failed.append((i, RequestOutput(rid, prompt if isinstance(prompt, str) else None, [],
                                                finish_reason="error", error=str(e))))
                continue
            index[rid] = i
        try:
            for i, out in failed:
                yield i, "", out
            while index:
                for ev in self._next_outputs(index):
                    i = index[ev.request_id]
                    if ev.finished:
                        del index[ev.request_id]
                        yield i, ev.text, ev.output
                    elif ev.text:
                        yield i, ev.text, None
        finally:
            for rid in list(index):   # a caller that stopped early: give the blocks back
                self.engine.abort(rid)
                self._outputs.pop(rid, None)

    def _next_outputs(self, index: dict[int, int]) -> list[StepOutput]:
        """Outputs for the requests in `index`: ones already waiting, else one more step."""
        with self._step_lock:
            mine = self._take(index)
            if not mine:
                for ev in self.engine.step():
                    queue = self._outputs.get(ev.request_id)
                    if queue is not None:
                        queue.append(ev)
                mine = self._take(index)
                if not mine and not self.engine.has_unfinished():   # nothing left that could answer them
                    raise RuntimeError(f"requests {sorted(index)} left the engine without an output "
                                       "(aborted through LLM.engine while a stream waited for them)")
        return mine

    def _take(self, index: dict[int, int]) -> list[StepOutput]:
        got = []
        for rid in index:
            queue = self._outputs[rid]
            while queue:
                got.append(queue.popleft())
        for ev in got:
            if ev.finished:
                self._outputs.pop(ev.request_id, None)
        return got
