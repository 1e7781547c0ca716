"""Chat formats: how a conversation becomes token ids.

A conversation keeps each answer as the token ids the model generated, not
as re-encoded text, so the ids of earlier turns never change from one prompt
to the next, and the engine's prefix cache reuses their keys and values
(only the new turn is computed).

Special tokens (`<|im_start|>`, BOS, EOS) come only from the format itself;
what the user types is encoded as plain text, so a user who types
"<|im_end|>" gets those characters, not the control token.

Formats:
- chatml (SmolLM2, Qwen, ...):
      <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{text}<|im_end|>\\n<|im_start|>assistant\\n
- llama2 (Llama-2 chat):  <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{text} [/INST]
- raw: the text as it is (base models, plain completion).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Iterator


@dataclass(frozen=True)
class Special:
    """A control token named by its text (e.g. "<|im_start|>") or by role ("bos", "eos")."""

    name: str


def encode_parts(tok, parts) -> list[int]:
    """Token ids of a list of plain strings and `Special` tokens."""
    ids: list[int] = []
    text = ""
    for part in parts:
        if isinstance(part, Special):
            if text:
                ids += tok.encode(text)
                text = ""
            ids.append(_special_id(tok, part.name))
        else:
            text += part
    if text:
        ids += tok.encode(text)
    return ids


def _special_id(tok, name: str) -> int:
    if name == "bos":
        return tok.bos_id
    if name == "eos":
        return tok.eos_id
    i = tok.token_to_id(name)
    if i is None:
        raise ValueError(f"the tokenizer has no token {name!r} that the chat format needs")
    return i


class ChatFormat:
    name = "raw"
    stop_tokens: tuple[str, ...] = ()

    def opening(self, system: str | None) -> list:
        return []

    def user(self, text: str, first: bool, system: str | None) -> list:
        return [text]

    def after_answer(self, stopped: bool) -> list:
        return []


class ChatML(ChatFormat):
    name = "chatml"
    stop_tokens = ("<|im_end|>",)

    def opening(self, system):
        if not system:
            return []
        return [Special("<|im_start|>"), "system\n" + system, Special("<|im_end|>"), "\n"]

    def user(self, text, first, system):
        return [Special("<|im_start|>"), "user\n" + text, Special("<|im_end|>"), "\n",
                Special("<|im_start|>"), "assistant\n"]

    def after_answer(self, stopped):
        return ([] if stopped else [Special("<|im_end|>")]) + ["\n"]


class Llama2Chat(ChatFormat):
    name = "llama2"

    def user(self, text, first, system):
        if first and system:
            text = f"<<SYS>>\n{system}\n<</SYS>>\n\n{text.strip()}"
        return [Special("bos"), f"[INST] {text.strip()} [/INST]"]

    def after_answer(self, stopped):
        return [] if stopped else [Special("eos")]


FORMATS = {f.name: f for f in (ChatML, Llama2Chat, ChatFormat)}


def detect_format(tok, metadata: dict) -> tuple[ChatFormat, str | None]:
    """The chat format and default system prompt a model's files imply."""
    template = str(metadata.get("tokenizer.chat_template") or metadata.get("chat_template") or "")
    if "<|im_start|>" in template or (not template and tok.token_to_id("<|im_start|>") is not None):
        m = re.search(r"<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
        return ChatML(), (m.group(1) if m else None)
    if "[INST]" in template:
        return Llama2Chat(), None
    return ChatFormat(), None


class Conversation:
    """A chat so far, turn by turn, and the token ids of the next prompt.

    Each turn keeps the user's text and the ids the model answered, so the
    ids of earlier turns never change from one prompt to the next and the
    engine's prefix cache finds their keys and values (only the new turn is
    computed). When the prompt would outgrow the context, the oldest turns
    are dropped (the system prompt stays); `dropped` counts them.
    """

    def __init__(self, tok, fmt: ChatFormat, system: str | None = None):
        self.tok, self.fmt, self.system = tok, fmt, system
        self.turns: list[tuple[str, list[int]]] = []    # (user text, answer ids)
        self.dropped = 0
        self.stop_ids = tuple(sorted(set(tok.eos_ids) | {_special_id(tok, s) for s in fmt.stop_tokens}))

    def reset(self) -> None:
        self.turns, self.dropped = [], 0

    def render(self, turns: list[tuple[str, list[int]]], text: str) -> list[int]:
        """The ids of `turns` followed by a new user message and the cue for the answer."""
        ids = encode_parts(self.tok, self.fmt.opening(self.system))
        for i, (user, answer) in enumerate(turns):
            stopped = bool(answer) and answer[-1] in self.stop_ids
            ids += encode_parts(self.tok, self.fmt.user(user, i == 0, self.system))
            ids += answer + encode_parts(self.tok, self.fmt.after_answer(stopped))
        return ids + encode_parts(self.tok, self.fmt.user(text, not turns, self.system))

    def add_user(self, text: str) -> list[int]:
        """The prompt for a new message after every turn so far."""
        return self.render(self.turns, text)

    def prompt_for(self, text: str, context: int, room: int) -> list[int]:
        """The prompt for a new message, dropping the oldest turns until it
        leaves `room` tokens of the `context` for the answer. A message too
        long for the context even alone drops nothing (the engine refuses
        its prompt, and the conversation stays as it was)."""
        for first in range(len(self.turns) + 1):
            ids = self.render(self.turns[first:], text)
            if len(ids) + room <= context:
                break
        if len(ids) < context:
            del self.turns[:first]
            self.dropped += first
        return ids

    def add_answer(self, text: str, answer_ids: list[int]) -> None:
        """Record the turn: the user's `text` and the ids the model generated."""
        self.turns.append((text, list(answer_ids)))


class ChatSession:
    """A conversation with a model: `send` streams the answer's text.

    Every answer is a request of the shared `Engine` (`xllm.engine`); the
    prompt is the whole conversation, and the engine's prefix cache holds
    the keys and values of the earlier turns, so a turn computes only its
    own new tokens. `last_turn` says how many; `notice` (a function of one
    string) is told once when old turns start being dropped.
    """

    def __init__(self, engine, tok, fmt: ChatFormat, system: str | None = None, notice=None):
        self.engine, self.tok = engine, tok
        self.convo = Conversation(tok, fmt, system)
        self.notice = notice or (lambda message: None)
        self._told = False
        self.last_output = None
        self.last_turn = {"prompt_tokens": 0, "computed_tokens": 0, "answer_tokens": 0,
                          "first_token_s": 0.0, "decode_s": 0.0}

    def reset(self) -> None:
        self.convo.reset()
        self._told = False

    def request(self, text: str, params) -> tuple[list[int], object]:
        """The prompt ids and the params of the request that answers `text`."""
        context = self.engine.model.config.context_length
        prompt = self.convo.prompt_for(text, context, min(params.max_tokens, context // 2))
        if self.convo.dropped and not self._told:
            self._told = True
            self.notice(f"the conversation no longer fits the model's context of {context} tokens: "
                        "dropping its oldest turns from now on")
        stop_ids = tuple(sorted(set(params.stop_token_ids) | set(self.convo.stop_ids)))
        return prompt, replace(params, stop_token_ids=stop_ids)

    def send(self, text: str, params) -> Iterator[str]:
        """Stream the answer to `text`. Closing the iterator early (or Ctrl-C
        inside it) keeps the part already written as the answer."""
        import time

        prompt, params = self.request(text, params)
        t0 = time.perf_counter()
        rid = self.engine.add_request(prompt, params)
        out = None
        try:
            while out is None or not out.finished:
                for ev in self.engine.step():
                    if ev.request_id == rid:
                        out = ev.output
                        if ev.text:
                            yield ev.text
        finally:
            if out is None or not out.finished:
                out = self.engine.abort(rid) or out
            answer = list(out.token_ids) if out is not None else []
            self.convo.add_answer(text, answer)
            self.last_output = out
            t_end = time.perf_counter()
            t_first = (out.first_token_time if out is not None else None) or t_end
            self.last_turn.update(prompt_tokens=len(prompt), answer_tokens=len(answer),
                                  computed_tokens=len(prompt) - (out.num_cached_tokens if out is not None else 0),
                                  first_token_s=t_first - t0, decode_s=t_end - t_first)
