"""Byte-level BPE (SmolLM2) against Hugging Face `tokenizers`, id for id.

The reference is built offline from the GGUF's own vocabulary and merges with
SmolLM2's pipeline (Digits(individual) + ByteLevel regex, ByteLevel decoder,
the CONTROL tokens as added special tokens), and is checked against the
known-good ids of the default chat prompt first.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import corpus_lines
from xllm.errors import ModelFormatError
from xllm.tokenizer import load_tokenizer, tokenizer_from_gguf_metadata
from xllm.tokenizer.gguf_loader import read_gguf_tokenizer_metadata
from xllm.tokenizer.pretokenize import GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN, PreTokenizer

CHAT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
CHAT_IDS = [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1, 520, 9531, 198]


@pytest.fixture(scope="module")
def smol_meta(default_gguf):
    """The tokenizer metadata of the default model's GGUF (tests/conftest.py)."""
    return read_gguf_tokenizer_metadata(default_gguf)


@pytest.fixture(scope="module")
def smol(smol_meta, default_gguf):
    return tokenizer_from_gguf_metadata(smol_meta, path=default_gguf)


def _reference(meta, with_specials: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    hf = Tokenizer(models.BPE(vocab, merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.decoder = decoders.ByteLevel()
    if with_specials:
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i, t in enumerate(types) if t in (3, 4)])
    return hf


@pytest.fixture(scope="module")
def ref(smol_meta):
    """HF reference with the special tokens (for allow_special=True)."""
    return _reference(smol_meta, True)


@pytest.fixture(scope="module")
def ref_plain(smol_meta):
    """HF reference without added tokens: special-token text is plain text."""
    return _reference(smol_meta, False)


# Text that stresses the pre-tokenizer: any assigned character (unassigned
# ones may be assigned in the reference's newer Unicode tables), plus
# hand-picked troublemakers.
TRICKY = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0", "\u3000", "\x1c", "\x85",
          "😀", "👍🏽", "👨‍👩‍👧", "日本語", "한국어", "e\u0301", "\u0301", "'s", "'S", "'ll", "'ve",
          "123", "1,000.5", "٣", "Ⅻ", "½", "a_b", "x²", "<|im_end|>", "<|im_start|>", "</s>", "\x00",
          "ſ", "K", "İ", "ß", "--", "...", "$", "™", "\ufeff", "\u200b", "\U0001d400"]
any_char = st.characters(exclude_categories=("Cs", "Cn"))
text_st = st.lists(st.one_of(st.text(any_char, max_size=8), st.sampled_from(TRICKY)),
                   max_size=12).map("".join)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_roundtrip(tok, ref, ids, text):
    """decode(encode(x)) == x, unless x holds a byte the vocabulary lacks
    (SmolLM2 has no piece for some control bytes; such bytes are dropped, as
    by tokenizers); decode always matches the reference's (`ref`, with specials)."""
    if not set(text.encode("utf-8")) & set(tok.missing_bytes):
        assert tok.decode(ids) == text
    assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


# ----------------------------------------------------------------- known ids
def test_reference_reproduces_known_ids(ref):
    assert ref.encode(CHAT).ids == CHAT_IDS


def test_chat_prompt_known_ids(smol):
    assert smol.encode(CHAT, allow_special=True) == CHAT_IDS
    assert smol.decode(CHAT_IDS) == CHAT


def test_metadata(smol):
    assert smol.vocab_size == 49152
    assert smol.bos_id == 1 and smol.eos_id == 2
    assert 2 in smol.eos_ids
    assert smol.add_bos is False
    assert smol.token_to_id("<|im_start|>") == 1
    assert smol.token_to_id("no such piece") is None
    assert smol.family == "byte_level"


def test_special_text_typed_by_user_is_plain_text(smol, ref_plain):
    ids = smol.encode(CHAT)
    assert 1 not in ids and 2 not in ids
    assert ids == ref_plain.encode(CHAT).ids
    assert smol.decode(ids) == CHAT


def test_bos_eos_and_skip_special(smol):
    ids = smol.encode("Hi", add_bos=True, add_eos=True)
    assert ids[0] == smol.bos_id and ids[-1] == smol.eos_id
    assert smol.decode(ids) == "<|im_start|>Hi<|im_end|>"
    assert smol.decode(ids, skip_special=True) == "Hi"


# ----------------------------------------------------------------- corpora
def test_corpus_lines_match_tokenizers(smol, ref_plain):
    for line in corpus_lines():
        assert smol.encode(line) == ref_plain.encode(line).ids, line[:80]


def test_corpus_whole_files_match_tokenizers(smol, ref_plain):
    text = "\n".join(corpus_lines())
    ids = smol.encode(text)
    assert ids == ref_plain.encode(text).ids
    assert smol.decode(ids) == text


# ----------------------------------------------------------------- hypothesis
@SETTINGS
@given(text=text_st)
def test_hypothesis_plain_text_matches_tokenizers(smol, ref, ref_plain, text):
    ids = smol.encode(text)
    assert ids == ref_plain.encode(text).ids
    _check_roundtrip(smol, ref, ids, text)


@SETTINGS
@given(text=text_st)
def test_hypothesis_with_special_tokens_matches_tokenizers(smol, ref, text):
    ids = smol.encode(text, allow_special=True)
    assert ids == ref.encode(text).ids
    _check_roundtrip(smol, ref, ids, text)


@settings(max_examples=200, deadline=None)
@given(ids=st.lists(st.integers(0, 49151), max_size=40))
def test_hypothesis_decode_matches_tokenizers(smol, ref, ids):
    assert smol.decode(ids) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("pattern", [GPT2_PATTERN, LLAMA3_PATTERN, QWEN2_PATTERN], ids=["gpt2", "llama3", "qwen2"])
def test_pretokenizer_patterns_match_tokenizers(pattern):
    from tokenizers import Regex, pre_tokenizers

    hf = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    ours = PreTokenizer([{"type": "regex", "pattern": pattern}])

    @settings(max_examples=300, deadline=None)
    @given(text_st)
    def check(text):
        assert ours.split(text) == [p for p, _ in hf.pre_tokenize_str(text)]
    check()


def test_unassigned_code_points_are_other(smol, ref_plain):
    text = "a\u0378b \U000e0080 c\U0010fffe"  # unassigned in every Unicode version so far
    assert smol.encode(text) == ref_plain.encode(text).ids


def test_long_word_is_not_quadratic(smol, ref_plain):
    text = "ab" * 20000 + " " * 5000 + "x" * 3000
    assert smol.encode(text) == ref_plain.encode(text).ids


# ----------------------------------------------------------------- tokenizer.json
def test_tokenizer_json_roundtrip(tmp_path, ref, ref_plain):
    path = tmp_path / "tokenizer.json"
    ref.save(str(path))
    tok = load_tokenizer(path)
    assert tok.encode(CHAT, allow_special=True) == CHAT_IDS
    for line in ["Hello world 2024!", "  tabs\tand\nnewlines  ", "日本語 😀"]:
        assert tok.encode(line) == ref_plain.encode(line).ids
    # a directory with tokenizer.json + tokenizer_config.json
    (tmp_path / "tokenizer_config.json").write_text(
        '{"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": false}')
    tok = load_tokenizer(tmp_path)
    assert tok.bos_id == 1 and tok.eos_id == 2 and 2 in tok.eos_ids


def test_gguf_file_loads(default_gguf):
    tok = load_tokenizer(default_gguf)
    assert tok.encode(CHAT, allow_special=True) == CHAT_IDS


def test_unknown_pretokenizer_is_a_format_error(smol_meta):
    meta = dict(smol_meta)
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.raises(ModelFormatError, match="tokenizer.ggml.pre"):
        tokenizer_from_gguf_metadata(meta, path="m.gguf")


def test_missing_tokenizer_metadata_is_a_format_error():
    with pytest.raises(ModelFormatError, match="m.gguf"):
        tokenizer_from_gguf_metadata({"general.architecture": "llama"}, path="m.gguf")
