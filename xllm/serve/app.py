"""The OpenAI-compatible HTTP app (Starlette) over one `EngineLoop`.

    POST /v1/completions        text completion, streaming or not
    POST /v1/chat/completions   the same through the model's chat format
    GET  /v1/models             the one model served
    GET  /health                200 while the engine thread runs
    GET  /metrics               Prometheus text (xllm/serve/metrics.py)

A generation request goes: body -> `protocol.parse_job` (400 on any bad
field) -> room check (503 past `max_num_seqs + max_queue` requests in
flight) -> `EngineLoop.submit` -> wait for the engine to accept it (400
with the engine's own message, e.g. a prompt longer than the context) ->
the answer, as one JSON object or as server-sent events ending with
`data: [DONE]`. Whatever happens to one request (a refusal, a client that
disconnects) touches no other: the engine aborts only that request and
frees its KV blocks before its next step.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager, contextmanager
from typing import AsyncIterator, Iterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from ..engine import RequestError, RequestOutput
from .config import ServeConfig, ServedModel, load_served_model
from .engine_loop import EngineLoop, Submission
from .metrics import ServerMetrics
from .protocol import ApiError, Job, parse_body, parse_job

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}   # engine -> OpenAI
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


class Server:
    """A loaded model, its engine thread, its metrics and the Starlette `app` serving them."""

    def __init__(self, config: ServeConfig, served: ServedModel | None = None):
        self.config = config
        self.served = served or load_served_model(config)
        self.metrics = ServerMetrics(self.served.name, config.replica)
        self.engine_loop = EngineLoop(self.served.engine, self.metrics)
        self.engine_loop.start()
        self.in_flight = 0          # engine requests submitted and not yet answered (event loop only)
        self.created = int(time.time())
        routes = [Route("/v1/completions", self.completions, methods=["POST"]),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/models", self.models), Route("/health", self.health), Route("/metrics", self.metrics_page)]
        self.app = Starlette(routes=routes, lifespan=self._lifespan)

    @asynccontextmanager
    async def _lifespan(self, app):
        yield
        self.engine_loop.stop()

    # ------------------------------------------------------------ small routes

    async def health(self, request: Request) -> Response:
        alive = self.engine_loop.is_alive()
        return JSONResponse({"status": "ok" if alive else "engine thread stopped"}, status_code=200 if alive else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.served.name, "object": "model", "created": self.created, "owned_by": "xllm",
             "max_model_len": self.served.context_length}]})

    async def metrics_page(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")

    # ------------------------------------------------------------ generation

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, chat=True)

    async def _generate(self, request: Request, chat: bool) -> Response:
        try:
            job = parse_job(parse_body(await request.body()), self.served, chat)
            room = self.config.max_num_seqs + self.config.max_queue - self.in_flight
            if len(job.requests) > room:
                raise ApiError(f"the server is full ({self.in_flight} requests in flight, "
                               f"--max-num-seqs {self.config.max_num_seqs} + --max-queue {self.config.max_queue}): "
                               "try again later", status=503, type_="server_error", code="queue_full")
            sub = self.engine_loop.submit(job.requests)
            self.in_flight += len(job.requests)
            try:
                await sub.accepted()
            except BaseException as e:       # refused, or this handler cancelled (the client went away)
                sub.abort()
                self._done(job)
                if isinstance(e, RequestError):
                    raise ApiError(str(e).removeprefix(f"request {e.request_id}: "),
                                   "messages" if chat else "prompt") from None
                raise
        except ApiError as e:
            self.metrics.request_rejected(e.status)
            return JSONResponse(e.body(), status_code=e.status)
        answer = Answer(job, sub, self.served.name)
        if job.stream:
            return EventStream(answer, on_close=lambda: self._done(job))
        try:
            with aborted_on_disconnect(request.receive, sub):
                body = await answer.whole()
        finally:
            self._done(job)
        if sub.aborted:              # nobody is listening: 499, nginx's "client closed the request"
            return Response(status_code=499)
        return JSONResponse(body, status_code=500 if "error" in body else 200)

    def _done(self, job: Job) -> None:
        self.in_flight -= len(job.requests)


class Answer:
    """The OpenAI answer to one job, built from the engine's outputs as they come."""

    def __init__(self, job: Job, sub: Submission, model: str):
        self.job, self.sub = job, sub
        self.index = {rid: i for i, rid in enumerate(sub.request_ids)}
        self.outputs: list[RequestOutput | None] = [None] * len(sub.request_ids)
        kind = "chat.completion" if job.chat else "text_completion"
        self.head = {"id": f"{'chatcmpl' if job.chat else 'cmpl'}-{uuid.uuid4().hex}", "object": kind,
                     "created": int(time.time()), "model": model}

    async def whole(self) -> dict:
        """The non-streamed answer: every choice's whole text, or the first error."""
        async for ev in self.sub.events():
            self.outputs[self.index[ev.request_id]] = ev.output
        if self.sub.aborted:
            return {}
        if (error := self._error()) is not None:
            return error
        choices = [self._choice(i, out.text, FINISH_REASONS[out.finish_reason], final=True)
                   for i, out in enumerate(self.outputs)]
        return {**self.head, "choices": choices, "usage": self._usage()}

    async def chunks(self) -> AsyncIterator[str]:
        """The streamed answer as server-sent events; stops early if the request was aborted."""
        head = {**self.head, "object": "chat.completion.chunk" if self.job.chat else "text_completion"}
        if self.job.chat:      # OpenAI's first chunk of each choice names the role
            yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}
                                           for i in range(len(self.outputs))]})
        async for ev in self.sub.events():
            i = self.index[ev.request_id]
            self.outputs[i] = ev.output
            if ev.output.finish_reason == "error":
                yield sse(self._error())
                self.sub.abort()
                yield "data: [DONE]\n\n"
                return
            if ev.text or ev.finished:
                reason = FINISH_REASONS[ev.output.finish_reason] if ev.finished else None
                yield sse({**head, "choices": [self._choice(i, ev.text, reason, final=False)]})
        if self.sub.aborted:
            return
        if self.job.include_usage:
            yield sse({**head, "choices": [], "usage": self._usage()})
        yield "data: [DONE]\n\n"

    def _choice(self, i: int, text: str, finish_reason: str | None, final: bool) -> dict:
        if not self.job.chat:
            return {"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason}
        body = {"role": "assistant", "content": text} if final else ({"content": text} if text else {})
        return {"index": i, "message" if final else "delta": body, "logprobs": None, "finish_reason": finish_reason}

    def _usage(self) -> dict:
        prompt = sum(len(out.prompt_token_ids) for out in self.outputs[::self.job.n] if out is not None)   # once per prompt
        completion = sum(len(out.token_ids) for out in self.outputs if out is not None)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _error(self) -> dict | None:
        for out in self.outputs:
            if out is not None and out.finish_reason == "error":
                return ApiError(f"generation failed: {out.error}", status=500, type_="server_error").body()
        return None


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


@contextmanager
def aborted_on_disconnect(receive, sub: Submission) -> Iterator[None]:
    """While inside, abort `sub` as soon as the client disconnects.

    A task reads the ASGI `receive`: the body is already read, so the next
    message is `http.disconnect` (when the client goes away, or once the
    response is complete, when the task is gone already)."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        sub.abort()

    task = asyncio.ensure_future(watch())
    try:
        yield
    finally:
        task.cancel()


class EventStream:
    """A `text/event-stream` response (an ASGI app) of an `Answer`'s chunks,
    aborting its requests the moment the client disconnects: a queued request
    sends nothing for a while, so waiting for a failed write would keep it."""

    def __init__(self, answer: Answer, on_close):
        self.answer, self.on_close = answer, on_close

    async def __call__(self, scope, receive, send) -> None:
        sub = self.answer.sub
        try:
            with aborted_on_disconnect(receive, sub):
                await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
                async for chunk in self.answer.chunks():
                    await send({"type": "http.response.body", "body": chunk.encode(), "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:            # the client went away during a write
            pass
        finally:                   # also when this task is cancelled (the server, or Ray, dropped the request)
            sub.abort()
            self.on_close()
