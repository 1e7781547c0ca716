"""Chat formats: how a conversation becomes token ids.

A conversation is kept as token ids, not re-rendered text: each user turn
appends its own ids, each answer appends the ids the model generated. So
the ids of earlier turns never change, and the KV cache of a `Session`
is reused across turns (only the new turn is computed).

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
from dataclasses import dataclass
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
    """The token ids of a chat so far, turn by turn."""

    def __init__(self, tok, fmt: ChatFormat, system: str | None = None):
        self.tok, self.fmt, self.system = tok, fmt, system
        self.ids: list[int] = []
        self.turns = 0
        self.stop_ids = tuple(sorted(set(tok.eos_ids) | {_special_id(tok, s) for s in fmt.stop_tokens}))

    def reset(self) -> None:
        self.ids, self.turns = [], 0

    def add_user(self, text: str) -> list[int]:
        """Append a user message (with the cue for the answer); return the whole prompt."""
        if self.turns == 0:
            self.ids += encode_parts(self.tok, self.fmt.opening(self.system))
        self.ids += encode_parts(self.tok, self.fmt.user(text, self.turns == 0, self.system))
        self.turns += 1
        return list(self.ids)

    def add_answer(self, answer_ids: list[int]) -> None:
        """Append the ids the model generated, closing the turn as the format wants."""
        stopped = bool(answer_ids) and answer_ids[-1] in self.stop_ids
        self.ids += list(answer_ids) + encode_parts(self.tok, self.fmt.after_answer(stopped))


class ChatSession:
    """A conversation with a model: `send` streams the answer's text.

    The model's KV cache stays between turns (`xllm.generate.Session`), so a
    turn computes only its own new tokens; `last_turn` says how many.
    """

    def __init__(self, model, tok, fmt: ChatFormat, system: str | None = None, kv_dtype: str = "fp32"):
        from .generate import Session

        self.tok = tok
        self.session = Session(model, kv_dtype=kv_dtype)
        self.convo = Conversation(tok, fmt, system)
        self.last_turn = {"prompt_tokens": 0, "computed_tokens": 0, "answer_tokens": 0,
                          "first_token_s": 0.0, "decode_s": 0.0}

    def reset(self) -> None:
        self.convo.reset()
        self.session.reset()

    def send(self, text: str, params) -> Iterator[str]:
        """Stream the answer to `text`. Closing the iterator early (or Ctrl-C
        inside it) keeps the part already written as the answer."""
        import time

        prompt = self.convo.add_user(text)
        stream = self.tok.stream_decoder(prefix_ids=prompt)
        out: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        try:
            for token in self.session.generate(prompt, params.max_tokens, params, self.convo.stop_ids):
                if t_first is None:
                    t_first = time.perf_counter()
                    self.last_turn["computed_tokens"] = self.session.last_prefill_computed
                out.append(token)
                if token not in self.convo.stop_ids:
                    piece = stream.push(token)
                    if piece:
                        yield piece
            rest = stream.flush()
            if rest:
                yield rest
        finally:
            self.convo.add_answer(out)
            t_end = time.perf_counter()
            self.last_turn.update(prompt_tokens=len(prompt), answer_tokens=len(out),
                                  first_token_s=(t_first or t_end) - t0, decode_s=t_end - (t_first or t_end))
