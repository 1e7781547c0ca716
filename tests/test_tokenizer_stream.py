"""Streaming detokenization: chunks concatenate to decode(ids), never split a character.

Run for both families: SmolLM2 (byte-level, from its GGUF) and Llama 2
(SentencePiece, from ../shared/data), plus a SentencePiece vocabulary given as
GGUF metadata, which must behave exactly like the tokenizer.model.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.tokenizer import load_tokenizer, tokenizer_from_gguf_metadata
from xllm.tokenizer.spm_model import parse_model_proto

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2 = SHARED / "llama2-tokenizer.model"

# Real generations of xllm running SmolLM2-135M-Instruct (Q4_1 GGUF), recorded:
# greedy, to "What is the capital of France?" ...
SMOL_GENERATION_TEXT = "The capital of France is Paris."
SMOL_GENERATION = [504, 3575, 282, 4649, 314, 7042, 30, 2]
# ... and sampled (temperature 0.7, seed 3) to "Translate 'good morning' into
# French, Japanese and Russian, and add an emoji."
SMOL_SAMPLED = [
    18, 50, 6522, 262, 41307, 98, 28, 14047, 559, 337, 18, 365, 14229, 5738, 25, 198, 198, 41928, 42, 476,
    50, 6522, 262, 41307, 98, 28, 14047, 559, 337, 18, 365, 14229, 5738, 25, 198, 198, 1348, 6330, 281,
    3432, 28, 4931, 28, 284, 6103, 28, 4669, 260, 17519, 284, 768, 2987, 30099, 281, 511, 1296, 4575, 30,
    657, 506, 253, 1454, 8483, 282, 253, 1273, 284, 7775, 4352, 281, 971, 2517, 30, 2]


@functools.lru_cache(maxsize=None)
def _tok(name: str, gguf: Path | None = None):
    """The tokenizer of `name`: "smollm2" from `gguf` (the `default_gguf` fixture), the others
    from ../shared/data (skipped when it is absent; CI has it)."""
    if name == "smollm2":
        return load_tokenizer(gguf)
    if not LLAMA2.exists():
        pytest.skip(f"{LLAMA2} is absent (it comes with ../shared, which CI has)")
    if name == "llama2":
        return load_tokenizer(LLAMA2)
    if name == "llama2-gguf":
        m = parse_model_proto(LLAMA2.read_bytes())
        meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": m.pieces,
                "tokenizer.ggml.scores": m.scores, "tokenizer.ggml.token_type": m.types,
                "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.add_bos_token": True}
        return tokenizer_from_gguf_metadata(meta, path="llama2.gguf")
    raise ValueError(name)


FAMILIES = ["smollm2", "llama2"]


@pytest.fixture
def tok(name, request):
    """The tokenizer of the parametrized family `name`; only SmolLM2 asks for the default model."""
    return _tok(name, request.getfixturevalue("default_gguf") if name == "smollm2" else None)


def stream(tok, ids, **kw) -> list[str]:
    dec = tok.stream_decoder(**kw)
    return [dec.push(i) for i in ids] + [dec.flush()]


def check_chunks(tok, ids, skip_special=False):
    chunks = stream(tok, ids, skip_special=skip_special)
    assert "".join(chunks) == tok.decode(ids, skip_special=skip_special)
    for c in chunks:
        c.encode("utf-8")  # no lone surrogates: every chunk is valid text
    return chunks


@pytest.mark.parametrize("name", FAMILIES)
def test_random_ids(tok):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40), st.booleans())
    def check(ids, skip):
        check_chunks(tok, ids, skip)
    check()


@pytest.mark.parametrize("name", FAMILIES)
def test_byte_tokens_and_split_characters(tok):
    """Ids that spell multi-byte characters byte by byte (incl. truncated ones)."""
    byte_ids = ([tok.token_to_id(f"<0x{b:02X}>") for b in range(256)] if tok.family == "sentencepiece"
                else tok.encode(bytes(range(0x80, 0x100)).decode("latin-1")))

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.one_of(st.sampled_from(byte_ids), st.integers(0, tok.vocab_size - 1)), max_size=30))
    def check(ids):
        check_chunks(tok, ids)
    check()
    emoji = tok.encode("😀")
    chunks = stream(tok, emoji)
    assert "".join(chunks) == "😀" and "\ufffd" not in "".join(chunks)
    # a truncated character at the end of the stream is one U+FFFD per the family's rule
    assert "".join(stream(tok, emoji[:-1])) == tok.decode(emoji[:-1])


@pytest.mark.parametrize("name", FAMILIES)
def test_real_text_streams_without_replacement_characters(tok):
    lines = [SMOL_GENERATION_TEXT, "Voilà ! 日本語のテキスト 😀👍🏽 e\u0301 — done.", "  indented\n\tcode()\n"]
    for p in ("prompts.txt", "shareGPT_sample.txt"):
        if (SHARED / p).exists():
            lines += (SHARED / p).read_text(encoding="utf-8").split("\n")
    for text in lines:
        ids = tok.encode(text)
        chunks = check_chunks(tok, ids)
        assert "".join(chunks) == text
        assert not any("\ufffd" in c for c in chunks)


def test_smollm2_real_generations_stream(default_gguf):
    tok = _tok("smollm2", default_gguf)
    assert tok.encode(SMOL_GENERATION_TEXT) + [tok.eos_id] == SMOL_GENERATION
    assert "".join(stream(tok, SMOL_GENERATION, skip_special=True)) == SMOL_GENERATION_TEXT
    assert "".join(stream(tok, SMOL_GENERATION)) == SMOL_GENERATION_TEXT + "<|im_end|>"
    chunks = check_chunks(tok, SMOL_SAMPLED, skip_special=True)
    text = "".join(chunks)
    assert text.startswith('"Bien sûr, bonsoir" (Good morning)') and "\ufffd" not in text
    assert "".join(stream(tok, SMOL_SAMPLED)) == tok.decode(SMOL_SAMPLED)


def test_sentencepiece_leading_space_rules():
    tok = _tok("llama2")
    hello = tok.encode("Hello world")  # "▁Hello", "▁world"
    # the first word of a text loses the dummy-prefix space ...
    assert "".join(stream(tok, hello)) == "Hello world"
    # ... also right after BOS, when BOS is skipped (llama2.c's rule)
    assert "".join(stream(tok, hello, skip_special=True, prefix_ids=[tok.bos_id])) == "Hello world"
    # but a continuation of a prompt keeps it
    prompt = tok.encode("The capital of France is", add_bos=True)
    paris = tok.encode("Paris")
    assert "".join(stream(tok, paris, prefix_ids=prompt, skip_special=True)) == " Paris"
    assert tok.decode(prompt + paris, skip_special=True) == "The capital of France is Paris"


def test_gguf_llama_metadata_matches_tokenizer_model():
    a, b = _tok("llama2"), _tok("llama2-gguf")
    assert b.family == "sentencepiece" and b.add_bos and (b.bos_id, b.eos_id) == (1, 2)
    for text in ["Hello world", " lead", "日本語 😀", "a\n\nb\tc ", "<s>x</s>"]:
        assert a.encode(text) == b.encode(text)
        assert a.encode(text, allow_special=True) == b.encode(text, allow_special=True)
        ids = a.encode(text)
        assert a.decode(ids) == b.decode(ids)
