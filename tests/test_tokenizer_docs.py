"""The worked examples in the tokenizer modules' docstrings run as written,
and a few behaviours that need no model file."""

from __future__ import annotations

import doctest
import importlib

import pytest

from xllm.tokenizer.base import BYTE, CONTROL, NORMAL, UNKNOWN
from xllm.tokenizer.bpe import SHORT_WORD, bpe_merge
from xllm.tokenizer.sentencepiece import SentencePieceBPE

MODULES = ["bpe", "byte_level", "normalize", "pretokenize", "spm_model", "spm_normalizer",
           "base", "stream", "sentencepiece", "load", "gguf_loader", "hf_json"]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(f"xllm.tokenizer.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0


def test_short_and_long_word_paths_merge_alike():
    import random

    rng = random.Random(0)
    alphabet = "abcd"
    pairs = {(a, b): rng.random() for a in alphabet for b in alphabet}
    pairs.update({(a + b, c): rng.random() for a in alphabet for b in alphabet for c in alphabet})
    pairs[("a", "a")] = 0.5
    pairs[("b", "b")] = 0.5  # a tie: the leftmost pair wins
    for n in (2, 5, SHORT_WORD, SHORT_WORD + 1, 300):
        for _ in range(20):
            word = [rng.choice(alphabet) for _ in range(n)]
            short = bpe_merge(list(word), pairs) if n <= SHORT_WORD else None
            heap = bpe_merge(list(word), pairs, pushed={})  # `pushed` forces the heap path
            if short is not None:
                assert short == heap
            assert "".join(heap) == "".join(word)


def test_ties_go_to_the_leftmost_pair():
    assert bpe_merge(list("aaa"), {("a", "a"): 0}) == ["aa", "a"]
    assert bpe_merge(list("a" * 100), {("a", "a"): 0}, pushed={}) == ["aa"] * 50


def _tiny_spm(**kw):
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "a", "b", "▁a", "ab", "▁ab"]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * 6
    scores = [0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0]
    return SentencePieceBPE(pieces, types, scores=scores, bos_id=1, eos_id=2, unk_id=0, add_bos=True, **kw)


def test_tiny_sentencepiece_model():
    tok = _tiny_spm()
    ab = tok.token_to_id("▁ab")
    assert tok.encode("ab") == [ab]
    assert tok.encode("ab ab", add_bos=True) == [1, ab, ab]
    assert tok.encode("c") == [tok.token_to_id("▁"), tok.token_to_id("<0x63>")]
    assert tok.decode(tok.encode(" ab c")) == " ab c"
    assert tok.decode([1, ab], skip_special=True) == "ab"
    assert tok.decode([1, ab]) == "<s> ab"
    nofb = _tiny_spm(byte_fallback=False)
    assert nofb.encode("xyz") == [nofb.token_to_id("▁"), 0]  # one <unk> for the run
    assert nofb.decode([0]) == " \u2047 "


def test_lone_surrogates_read_as_replacement_character():
    tok = _tiny_spm()
    assert tok.encode("a\ud800") == tok.encode("a\ufffd")
