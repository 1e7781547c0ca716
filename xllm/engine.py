"""`LLM`: many requests served together by continuous batching.

    from xllm.engine import LLM
    from xllm.sampling import SamplingParams
    llm = LLM()                                   # the default model
    for out in llm.generate(["Hi!", "Tell me a joke."], SamplingParams(max_tokens=64)):
        print(out.text, out.finish_reason)

Every step, the scheduler (`xllm.scheduler`) picks rows: one token for every
running request that is decoding, and chunks of prompts for requests that
are starting; the model runs them all as one ragged batch; each request that
reached the end of its tokens samples one with its own random generator.
Requests join the batch as soon as there is room and leave as soon as they
finish, so nobody waits for the slowest member of a fixed batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterator, Sequence as Seq

import numpy as np

from . import planner
from .errors import XllmError
from .kv_cache import KVCache
from .model import Batch
from .sampling import SamplingParams, sample
from .scheduler import Scheduler, Sequence


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None      # "length", "stop" or "eos"
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finish_time: float | None = None

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


class _Request:
    """What the engine keeps per request beside the scheduler's Sequence."""

    def __init__(self, out: RequestOutput, params: SamplingParams, tokenizer):
        self.out, self.params = out, params
        self.rng = np.random.default_rng(params.seed)
        self.stream = tokenizer.stream_decoder(prefix_ids=out.prompt_token_ids) if tokenizer else None
        self.held = ""   # text not yet shown: it might be the start of a stop string

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


class LLM:
    def __init__(self, model=None, tokenizer: str | None = None, *,
                 kv_dtype: str = "fp32", block_size: int = 128, kv_cache_bytes: int = 1 << 30,
                 max_num_seqs: int = 32, max_num_batched_tokens: int = 512, device: str = "auto"):
        """`model`: a checkpoint path (default: the default model), or a `Llama`
        already built (then prompts are token ids unless `tokenizer` is given).
        `device`: "auto" (a GPU when one works, else the CPU), "cpu", "cuda" or
        "cuda-sim"; a built model brings its own."""
        from .download import default_model_path
        from .load import load_model
        from .model import Llama

        if isinstance(model, Llama):
            from .tokenizer import load_tokenizer

            self.model, self.metadata = model, {}
            self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        else:
            path = model or default_model_path()
            self.model, self.tokenizer, self.metadata = load_model(path, tokenizer, device)
        config = self.model.config
        # The pool gets as many blocks as the planner says the budget pays for,
        # so `bench.plan` and the engine cannot disagree about KV memory.
        num_blocks = planner.kv_pool_blocks(config, kv_dtype, block_size, kv_cache_bytes)
        if num_blocks < 1:
            raise XllmError(f"a KV budget of {kv_cache_bytes} bytes holds no block of {block_size} tokens "
                            f"({planner.kv_pool_bytes(config, kv_dtype, block_size, 1)} bytes each)")
        self.cache = KVCache(config, num_blocks, block_size, kv_dtype=kv_dtype, device=self.model.ops)
        self.kv_pool_bytes = self.cache.pool_bytes
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.stats = EngineStats()
        self._next_id = 0

    def _new_scheduler(self) -> Scheduler:
        return Scheduler(self.cache, self.max_num_seqs, self.max_num_batched_tokens,
                         max_seq_len=self.model.config.context_length)

    def generate(self, prompts, params: SamplingParams | Seq[SamplingParams] | None = None,
                 progress=None) -> list[RequestOutput]:
        """Run every prompt (a string or a list of token ids) to the end; outputs in prompt order."""
        outs: dict[int, RequestOutput] = {}
        for rid, _, done in self.stream(prompts, params):
            if done is not None:
                outs[rid] = done
                if progress:
                    progress(done)
        return [outs[i] for i in sorted(outs)]

    def stream(self, prompts, params=None) -> Iterator[tuple[int, str, RequestOutput | None]]:
        """Yield (request index, new text, output-if-finished-else-None) as tokens arrive."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")

        sched = self._new_scheduler()
        requests: dict[int, _Request] = {}
        index: dict[int, int] = {}
        now = time.perf_counter()
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if isinstance(prompt, str) and self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer: this LLM was given a model without one")
            ids = self.tokenizer.encode(prompt, add_bos=self.tokenizer.add_bos) if isinstance(prompt, str) else list(prompt)
            rid = self._next_id
            self._next_id += 1
            out = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids, arrival_time=now)
            sched.add(Sequence(rid, ids, p.max_tokens))
            requests[rid] = _Request(out, p, self.tokenizer)
            index[rid] = i
        eos = set(self.tokenizer.eos_ids if self.tokenizer else self.model.config.eos_ids)

        try:
            while sched.has_unfinished():
                plan = sched.schedule()
                if not plan:
                    raise RuntimeError("the scheduler made an empty step with requests unfinished")
                batch = Batch.build(self.cache, plan.batch_rows())
                logits = self.model.forward(batch, self.cache, np.asarray(plan.logit_rows(), np.int32))
                self.stats.steps += 1
                self.stats.prompt_tokens_computed += sum(len(r.token_ids) for r in plan.rows if not r.is_decode)
                t = time.perf_counter()
                sampled, stopped, events = {}, set(), []
                for row_logits, seq in zip(logits, plan.sample_seqs()):
                    req = requests[seq.seq_id]
                    token = sample(row_logits, req.params, req.rng, seq.all_ids)
                    sampled[seq.seq_id] = token
                    is_eos = token in eos and not req.params.ignore_eos
                    req.out.first_token_time = req.out.first_token_time or t
                    text = req.add_token(token, visible=not is_eos)
                    if is_eos:
                        req.out.finish_reason = "eos"
                    if is_eos or req.out.finish_reason == "stop":
                        stopped.add(seq.seq_id)
                    events.append((seq.seq_id, text))
                self.stats.generated_tokens += len(sampled)
                finished = {s.seq_id for s in sched.update(plan, sampled, stopped)}
                for rid, text in events:
                    if rid in finished:
                        req = requests.pop(rid)
                        text += req.finish()
                        req.out.finish_reason = req.out.finish_reason or "length"
                        req.out.finish_time = t
                        yield index[rid], text, req.out
                    elif text:
                        yield index[rid], text, None
        finally:
            for rid in list(sched.seqs):   # a caller that stopped early: give the blocks back
                sched.abort(rid)
            self.last_scheduler_stats = sched.stats   # peak blocks, preemptions, steps of this call
