"""The OpenAI API's request bodies, checked and turned into engine requests.

A request body becomes a `Job`: the prompts (text or token ids) with one
`SamplingParams` per choice, whether to stream, and how to name things in
the answer. Anything wrong becomes an `ApiError` naming the field, which
the app answers with HTTP 400 and OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`.

Fields and their mapping to `SamplingParams` (xllm/sampling.py):
- `max_tokens` (completions: default 16, as OpenAI; chat: default and
  `max_completion_tokens`: until the context is full), `temperature`
  (default 1.0, as OpenAI; 0 is greedy), `top_p`, `seed`, `stop` (a string
  or a list): as they are.
- `n`: n requests of the same prompt; a seeded request's choice i uses
  seed + i, so the choices differ and each can be reproduced alone.
- `presence_penalty` and `frequency_penalty` (-2..2, default 0): the engine
  has one penalty, the CTRL paper's `repetition_penalty`, which divides the
  logit of every token already seen (prompt included) by theta when
  positive. OpenAI's penalties subtract from those logits instead, the
  frequency one once per occurrence. They map to
  theta = 1 + (presence_penalty + frequency_penalty) / 10: for a logit near
  10 to 15, the height of SmolLM2's likely tokens, theta = 1.1 lowers it by
  about 1 to 1.4, what a penalty of 1 would subtract. The count of
  occurrences is not used.
- Extensions that vLLM also takes: `top_k`, `repetition_penalty` (theta
  itself; not together with the two above), `ignore_eos`.
- Not supported, refused when set: logprobs, echo, suffix, best_of,
  logit_bias, tools; other unknown fields are ignored.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace

from ..chat import Conversation
from ..sampling import SamplingParams
from .config import ServedModel

MAX_N = 64
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "best_of", "logit_bias", "tools", "tool_choice",
               "functions", "function_call")
# Which request field each SamplingParams field comes from (for the error's "param").
PARAM_OF = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "seed": "seed",
            "max_tokens": "max_tokens", "stop": "stop", "ignore_eos": "ignore_eos",
            "repetition_penalty": "repetition_penalty"}


class ApiError(Exception):
    """A request the API refuses; `status` is the HTTP status of the answer."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type_, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One HTTP request, ready for the engine: choice i runs `requests[i]`."""

    chat: bool
    requests: list[tuple[str | list[int], SamplingParams]]   # prompt by prompt, n choices each
    n: int
    stream: bool
    include_usage: bool       # stream_options.include_usage: a last chunk with the token counts


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def parse_job(body: dict, served: ServedModel, chat: bool) -> Job:
    """The engine requests of a /v1/completions (chat=False) or /v1/chat/completions body."""
    model = body.get("model")
    if model is not None and model != served.name:
        raise ApiError(f"the model {model!r} does not exist: this server serves {served.name!r}", "model",
                       code="model_not_found")
    for name in UNSUPPORTED:
        v = body.get(name)
        if v not in (None, False, 0, [], "none") and not (name == "best_of" and v == 1):
            raise ApiError(f"{name} is not supported by this server", name)
    stream = _bool(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError("stream_options must be an object", "stream_options")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise ApiError(f"n must be an integer in 1..{MAX_N}, got {n!r}", "n")

    if chat:
        prompt, stop_ids = chat_prompt(body.get("messages"), served)
        prompts = [prompt]
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        default_max = served.context_length        # the engine stops where the context is full
    else:
        prompts, stop_ids = completion_prompts(body.get("prompt")), ()
        limit, default_max = body.get("max_tokens"), 16
    params = sampling_params(body, default_max if limit is None else limit, stop_ids)
    requests = [(p, params if params.seed is None else replace(params, seed=params.seed + i))
                for p in prompts for i in range(n)]
    return Job(chat, requests, n, stream, _bool(options, "include_usage"))


def sampling_params(body: dict, max_tokens, stop_ids: tuple[int, ...]) -> SamplingParams:
    """The body's sampling fields as SamplingParams; its own checks name the field."""
    presence, frequency = (_penalty(body, name) for name in ("presence_penalty", "frequency_penalty"))
    theta = body.get("repetition_penalty")
    if theta is not None and (presence or frequency):
        raise ApiError("give repetition_penalty or presence_penalty/frequency_penalty, not both",
                       "repetition_penalty")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, list):
        stop = tuple(stop)
    fields = dict(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                  top_k=body.get("top_k", 0), seed=body.get("seed"), max_tokens=max_tokens,
                  repetition_penalty=1.0 + (presence + frequency) / 10 if theta is None else theta,
                  stop=stop, ignore_eos=body.get("ignore_eos", False), stop_token_ids=stop_ids)
    for name in ("temperature", "top_p", "top_k"):     # JSON null means the default, as for OpenAI
        if fields[name] is None:
            fields[name] = SamplingParams.__dataclass_fields__[name].default
    try:
        return SamplingParams(**fields)
    except ValueError as e:            # "<field> must be ...": the message starts with the field's name
        field = str(e).split(" ", 1)[0]
        raise ApiError(str(e), PARAM_OF.get(field)) from None


def completion_prompts(prompt) -> list[str | list[int]]:
    """A prompt as OpenAI takes it: a string, a list of strings, token ids, or lists of token ids."""
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return [prompt]
        if all(isinstance(p, list) and p for p in prompt):
            return [list(p) for p in prompt]
    raise ApiError("prompt must be a non-empty string, a list of strings, a list of token ids or a list of such lists",
                   "prompt")


def chat_prompt(messages, served: ServedModel) -> tuple[list[int], tuple[int, ...]]:
    """The token ids of a conversation in the model's chat format, and its end-of-turn ids.

    The conversation is rendered by `xllm.chat.Conversation`, as the chat CLI
    does: an optional system message first (default: the model's own), then
    user and assistant messages in turn, ending with a user message."""
    if not isinstance(messages, list) or not messages:
        raise ApiError("messages must be a non-empty list of {role, content} objects", "messages")
    texts = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(f"messages[{i}] must be an object whose role is system, user or assistant", "messages")
        texts.append((m["role"], _content(m.get("content"), i)))
    system = served.default_system
    if texts[0][0] == "system":
        system = texts.pop(0)[1]
    roles = [role for role, _ in texts]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise ApiError("messages must alternate user and assistant after an optional system message, "
                       "and end with a user message", "messages")
    tok = served.tokenizer
    turns = [(texts[i][1], tok.encode(texts[i + 1][1])) for i in range(0, len(texts) - 1, 2)]
    convo = Conversation(tok, served.chat_format, system)
    return convo.render(turns, texts[-1][1]), convo.stop_ids


def _content(content, i: int) -> str:
    """A message's text: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(f"messages[{i}].content must be a string or a list of text parts", "messages")


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(f"{name} must be true or false, got {v!r}", name)
    return v


def _penalty(body: dict, name: str) -> float:
    v = body.get(name) or 0.0
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not -2.0 <= v <= 2.0:
        raise ApiError(f"{name} must be a number in -2..2, got {v!r}", name)
    return float(v)
