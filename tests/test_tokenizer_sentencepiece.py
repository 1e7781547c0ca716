"""SentencePiece BPE against the `sentencepiece` library, id for id.

* the Llama-2 tokenizer from ../shared/data (skipped when absent);
* small BPE models trained by `sentencepiece` right here (no shared data
  needed): byte fallback on, with user-defined symbols and the default
  nmt_nfkc normalization; and byte fallback off (unknown characters);
* the same Llama-2 vocabulary as a Hugging Face tokenizer.json (merges by
  rank), against `tokenizers`.
"""

from __future__ import annotations

import codecs
import functools
import io
import random
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import corpus_lines
from xllm.errors import ModelFormatError
from xllm.tokenizer import load_tokenizer
from xllm.tokenizer.spm_model import iter_fields, parse_model_proto

sentencepiece = pytest.importorskip("sentencepiece")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
LLAMA2 = SHARED / "llama2-tokenizer.model"

TRICKY = [" ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n ", "\u00a0", "\u3000", "▁", "▁▁",
          "😀", "👍🏽", "日本語", "한국어", "e\u0301", "\u0301", "ﬁ", "①", "Ａ", "123", "½",
          "<s>", "</s>", "<unk>", "[INST]", "<0x0A>", "\x00", "\x7f", "\ufeff", "\u200b", "ß"]
any_char = st.characters(exclude_categories=("Cs",))
text_st = st.lists(st.one_of(st.text(any_char, max_size=8), st.sampled_from(TRICKY)),
                   max_size=12).map("".join)


def _need_llama2() -> Path:
    if not LLAMA2.exists():
        pytest.skip(f"{LLAMA2} is absent (it comes with ../shared, which CI has)")
    return LLAMA2


@functools.lru_cache(maxsize=1)
def _llama2():
    path = _need_llama2()
    return load_tokenizer(path), sentencepiece.SentencePieceProcessor(model_file=str(path))


@pytest.fixture(scope="module")
def llama2():
    return _llama2()


# ----------------------------------------------------------------- Llama 2
def test_llama2_metadata(llama2):
    tok, sp = llama2
    assert tok.family == "sentencepiece"
    assert tok.vocab_size == sp.get_piece_size() == 32000
    assert (tok.bos_id, tok.eos_id, tok.unk_id) == (sp.bos_id(), sp.eos_id(), sp.unk_id())
    assert tok.add_bos is True
    assert tok.eos_ids == (2,)
    assert tok.token_to_id("<0x0A>") == 13
    assert tok.token_to_id("▁the") == sp.piece_to_id("▁the")


def test_llama2_corpus_lines(llama2):
    tok, sp = llama2
    for line in corpus_lines():
        ids = tok.encode(line)
        assert ids == sp.encode(line), line[:80]
        assert tok.decode(ids) == sp.decode(ids) == line
        assert tok.encode(line, add_bos=True) == [1] + ids


def test_llama2_corpus_whole_files(llama2):
    tok, sp = llama2
    text = "\n".join(corpus_lines())
    assert tok.encode(text) == sp.encode(text)


@pytest.mark.parametrize("text", ["", " ", "  ", "a", " a", "a ", "\n", "\t x", "😀 日本語 e\u0301",
                                  "Hello world", "\x00\x01", "<s>hi</s>", "▁x", " " * 50, "x" * 3000])
def test_llama2_edge_cases(llama2, text):
    tok, sp = llama2
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids)
    if "▁" not in text:  # a typed "▁" reads back as a space, in sentencepiece too
        assert tok.decode(ids) == text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text_st)
def test_llama2_hypothesis(text):
    tok, sp = _llama2()
    ids = tok.encode(text)
    assert ids == sp.encode(text)
    decoded = sp.decode(ids)
    assert tok.decode(ids) == decoded
    if decoded == text:
        assert tok.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 31999), max_size=30))
def test_llama2_decode_random_ids(ids):
    tok, sp = _llama2()
    # sentencepiece prints control tokens as nothing: our skip_special=True
    assert tok.decode(ids, skip_special=True) == sp.decode(ids)


def test_llama2_special_tokens(llama2):
    tok, sp = llama2
    text = "<s>[INST] Hi [/INST] Hello</s>"
    assert tok.encode(text) == sp.encode(text)  # typed by a user: plain text
    ids = tok.encode(text, allow_special=True)
    # each part after a special token gets its own dummy prefix (llama.cpp, HF legacy)
    assert ids == [1] + sp.encode("[INST] Hi [/INST] Hello") + [2]
    assert tok.decode(ids) == "<s> [INST] Hi [/INST] Hello</s>"
    assert tok.decode(ids, skip_special=True) == "[INST] Hi [/INST] Hello"


def test_llama2c_tokenizer_bin_roundtrip(tmp_path, llama2):
    """Write the Llama-2 vocabulary in llama2.c's tokenizer.bin layout; it loads back the same."""
    tok, sp = llama2
    raw = []
    for i in range(sp.get_piece_size()):
        t = sp.id_to_piece(i)
        t = "\n<s>\n" if i == sp.bos_id() else "\n</s>\n" if i == sp.eos_id() else t
        raw.append(t.replace("▁", " ").encode())
    blob = struct.pack("<I", max(map(len, raw)))
    for i, b in enumerate(raw):
        blob += struct.pack("<fI", sp.get_score(i), len(b)) + b
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(blob)
    tok2 = load_tokenizer(path)
    assert (tok2.bos_id, tok2.eos_id) == (1, 2)
    for line in ["Hello world", " two  spaces", "日本語 😀", "\n\tx"]:
        assert tok2.encode(line) == tok.encode(line)
        assert tok2.decode(tok2.encode(line)) == line


# ----------------------------------------------------------------- protobuf reader
def test_protobuf_varints_and_fields():
    # field 1 string "hi", field 2 varint 150, field 3 fixed32, field 4 fixed64
    buf = bytes([0x0A, 2, ord("h"), ord("i"), 0x10, 0x96, 0x01]) + bytes([0x1D]) + struct.pack("<f", 1.5) \
        + bytes([0x21]) + struct.pack("<d", 2.0)
    fields = list(iter_fields(buf))
    assert fields[:2] == [(1, 2, b"hi"), (2, 0, 150)]
    assert struct.unpack("<f", fields[2][2])[0] == 1.5 and fields[3][:2] == (4, 1)


def test_truncated_model_is_a_format_error(tmp_path):
    path = _need_llama2()
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ModelFormatError, match="tokenizer.model"):
        load_tokenizer(bad)


def test_parse_llama2_model_fields():
    m = parse_model_proto(_need_llama2().read_bytes())
    assert m.model_type == 2 and m.byte_fallback
    assert m.normalizer_name == "identity" and m.add_dummy_prefix and not m.remove_extra_whitespaces
    assert len(m.pieces) == 32000 and m.types[0] == 2 and m.types[1] == 3 and m.types[3] == 6


# ----------------------------------------------------------------- trained here
def _training_corpus() -> list[str]:
    import this  # noqa: F401  (prints the Zen of Python once; harmless)

    zen = codecs.decode(this.s, "rot13").split("\n")
    rng = random.Random(1234)
    words = "the of and a to in is you that it he was for on are as with his they I at be this have from".split()
    extra = ["Привет мир, как дела?", "日本語のテキストです。東京は大きい。", "Ünïcödé façade naïve café",
             "numbers 12345 and 3.14159", "tabs\tand\nnewlines", "ﬁne ① Ａ full-width"]
    lines = zen + extra * 5
    for _ in range(400):
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))))
    return lines


@functools.lru_cache(maxsize=None)
def _trained(kind: str):
    """(xllm tokenizer, sentencepiece processor) of a model trained now."""
    opts = dict(model_type="bpe", vocab_size=400, character_coverage=0.98, byte_fallback=True,
                user_defined_symbols=["<sep>", "[INST]"], hard_vocab_limit=False, num_threads=1)
    if kind == "identity_unk":
        opts.update(byte_fallback=False, user_defined_symbols=[], normalization_rule_name="identity",
                    remove_extra_whitespaces=False)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(_training_corpus()), model_writer=model,
                                             minloglevel=2, **opts)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".model", delete=False) as f:
        f.write(model.getvalue())
    tok = load_tokenizer(f.name)
    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    Path(f.name).unlink()
    return tok, sp


@pytest.mark.parametrize("kind", ["nfkc_bytes", "identity_unk"])
def test_trained_model_samples(kind):
    tok, sp = _trained(kind)
    if kind == "nfkc_bytes":  # the parts this model is meant to exercise are there
        assert tok.normalizer.charsmap is not None and tok.byte_fallback
        assert tok.token_to_id("<sep>") is not None and tok.token_types[tok.token_to_id("<sep>")] == 4
    else:
        assert not tok.byte_fallback
    samples = _training_corpus()[:30] + TRICKY + ["<sep> x<sep>y [INST]hi", "  lead and trail  ", "a  b   c",
                                                   "ﬁ①Ａ", "Ünïcödé", "ȷ̀ ɤ 漢字 😀"]
    for text in samples:
        ids = tok.encode(text)
        assert ids == sp.encode(text), repr(text)
        assert tok.decode(ids) == sp.decode(ids), repr(text)


@pytest.mark.parametrize("kind", ["nfkc_bytes", "identity_unk"])
def test_trained_model_hypothesis(kind):
    tok, sp = _trained(kind)

    @settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(text_st)
    def check(text):
        ids = tok.encode(text)
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)
    check()


# ----------------------------------------------------------------- tokenizer.json
@functools.lru_cache(maxsize=1)
def _llama2_hf_json() -> str:
    """The Llama-2 vocabulary as a tokenizer.json, the way HF converts it:
    merges are all (left, right) splits of each piece, ordered by the piece's score."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    m = parse_model_proto(_need_llama2().read_bytes())
    vocab = {p: i for i, p in enumerate(m.pieces)}
    merges = []
    for i, p in enumerate(m.pieces):
        if m.types[i] != 1:
            continue
        local = [(p[:k], p[k:]) for k in range(1, len(p)) if p[:k] in vocab and p[k:] in vocab]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        merges += [(m.scores[i], lr) for lr in local]
    merges = [lr for _, lr in sorted(merges, key=lambda x: -x[0])]
    hf = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    return hf.to_str()


def test_llama2_tokenizer_json(tmp_path, llama2):
    from tokenizers import Tokenizer

    tok, sp = llama2
    path = tmp_path / "tokenizer.json"
    path.write_text(_llama2_hf_json(), encoding="utf-8")
    hf = Tokenizer.from_file(str(path))
    tj = load_tokenizer(path)
    assert tj.family == "sentencepiece" and tj.unk_id == 0
    for line in corpus_lines() + ["", " ", "a  b", "😀 日本語", "<s>x</s>", "\n\tx "]:
        ids = tj.encode(line)
        assert ids == sp.encode(line), line[:80]  # plain text, as sentencepiece sees it
        assert tj.decode(ids) == line
        # tokenizers always splits out its added tokens: compare with allow_special
        assert tj.encode(line, allow_special=True) == hf.encode(line, add_special_tokens=False).ids, line[:80]
    # special tokens are split out and each part gets its own "▁", as HF does
    text = "<s>[INST] Hi</s>"
    assert tj.encode(text, allow_special=True) == hf.encode(text, add_special_tokens=False).ids
