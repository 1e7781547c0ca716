"""convert/export_tokenizer.py, the `python -m xllm.tokenize` CLI, and load errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xllm.errors import ModelFormatError
from xllm.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
LLAMA2 = SHARED / "llama2-tokenizer.model"

SAMPLES = ["", "Hello world", "  two  spaces ", "日本語 😀 e\u0301", "line\nbreak\ttab", "<|im_start|>x<|im_end|>",
           "<s>[INST] hi [/INST]</s>", "12345 and 3.14", "\x00\x7f\ufeff"]


def _llama2() -> Path:
    """Llama 2's tokenizer.model from ../shared/data, or a skip when it is absent (CI has it)."""
    if not LLAMA2.exists():
        pytest.skip(f"{LLAMA2} is absent (it comes with ../shared, which CI has)")
    return LLAMA2


@pytest.fixture
def source(name, request) -> Path:
    """The tokenizer file of the parametrized family `name`: SmolLM2's is the default model's
    GGUF (the `default_gguf` fixture, tests/conftest.py), Llama 2's comes from ../shared/data."""
    return request.getfixturevalue("default_gguf") if name == "smollm2" else _llama2()


def _texts() -> list[str]:
    texts = list(SAMPLES)
    for name in ("prompts.txt", "shareGPT_sample.txt"):
        if (SHARED / name).exists():
            texts += (SHARED / name).read_text(encoding="utf-8").split("\n")
    return texts


def _run(module: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", module, *args], input=stdin.encode("utf-8"),
                          capture_output=True, cwd=REPO, env=env, timeout=300)


def same_behaviour(a, b):
    assert (a.family, a.vocab_size, a.bos_id, a.eos_id, a.eos_ids, a.add_bos, a.unk_id) == \
           (b.family, b.vocab_size, b.bos_id, b.eos_id, b.eos_ids, b.add_bos, b.unk_id)
    assert a.pieces == b.pieces and a.token_types == b.token_types
    for text in _texts():
        for special in (False, True):
            ids = a.encode(text, allow_special=special)
            assert b.encode(text, allow_special=special) == ids, text[:60]
            assert b.decode(ids) == a.decode(ids)
            assert b.decode(ids, skip_special=True) == a.decode(ids, skip_special=True)


# ----------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["smollm2", "llama2"])
def test_export_xllm_format_roundtrip(tmp_path, source):
    from convert.export_tokenizer import main

    out = tmp_path / "tokenizer.xllm.json"
    assert main([str(source), "-o", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["format"] == "xllm-tokenizer"
    same_behaviour(load_tokenizer(source), load_tokenizer(out))
    # a directory holding only the exported file loads too
    same_behaviour(load_tokenizer(source), load_tokenizer(tmp_path))


def test_export_llama2c_format_roundtrip(tmp_path):
    from convert.export_tokenizer import main

    out = tmp_path / "tokenizer.bin"
    assert main([str(_llama2()), "--format", "llama2c", "-o", str(out)]) == 0
    a, b = load_tokenizer(LLAMA2), load_tokenizer(out)
    for text in _texts():
        assert a.encode(text) == b.encode(text)
        assert b.decode(b.encode(text)) == a.decode(a.encode(text))


def test_export_llama2c_refuses_byte_level(tmp_path, default_gguf):
    from convert.export_tokenizer import main

    assert main([str(default_gguf), "--format", "llama2c", "-o", str(tmp_path / "t.bin")]) == 2


# ----------------------------------------------------------------- CLI
@pytest.mark.parametrize("name", ["smollm2", "llama2"])
def test_cli_encode_and_decode(source):
    tok = load_tokenizer(source)
    lines = ["Hello world", "日本語 😀", "", "  spaces  ", "<|im_end|></s>"]
    run = _run("xllm.tokenize", str(source), stdin="\n".join(lines) + "\n")
    assert run.returncode == 0, run.stderr
    out = run.stdout.decode("utf-8").split("\n")[:-1]
    assert out == [" ".join(map(str, tok.encode(line))) for line in lines]
    run = _run("xllm.tokenize", str(source), "--bos", stdin="Hi\n")
    bos = [] if tok.bos_id is None else [str(tok.bos_id)]
    assert run.stdout.decode().split() == bos + [str(i) for i in tok.encode("Hi")]
    ids_text = "\n".join(" ".join(map(str, tok.encode(line))) for line in lines) + "\n"
    run = _run("xllm.tokenize", str(source), "--decode", stdin=ids_text)
    assert run.returncode == 0, run.stderr
    assert run.stdout.decode("utf-8").split("\n")[:-1] == lines


def test_cli_in_process_special_tokens(default_gguf):
    from xllm.tokenize import main

    src = default_gguf
    out = io.StringIO()
    assert main([str(src), "--allow-special"], stdin=io.StringIO("<|im_start|>user\n"), stdout=out) == 0
    assert out.getvalue() == "1 4093\n"
    out = io.StringIO()
    assert main([str(src), "--decode", "--skip-special"], stdin=io.StringIO("1 4093 2\n"), stdout=out) == 0
    assert out.getvalue() == "user\n"


def test_cli_errors_are_one_line(tmp_path, default_gguf):
    run = _run("xllm.tokenize", str(tmp_path / "missing.gguf"), stdin="x\n")
    assert run.returncode == 2
    err = run.stderr.decode().strip()
    assert err.count("\n") == 0 and "missing.gguf" in err
    run = _run("xllm.tokenize", str(default_gguf), "--decode", stdin="1 x\n")
    assert run.returncode == 2 and run.stderr.decode().strip().count("\n") == 0


# ----------------------------------------------------------------- load errors
def test_load_errors_name_the_file(tmp_path):
    cases = {
        "missing.model": None,
        "garbage.model": b"\xff\xfe not a protobuf \x00\x01",
        "garbage.gguf": b"GGUF\x03\x00\x00\x00",
        "list.json": b"[1, 2, 3]",
        "wordpiece.json": json.dumps({"model": {"type": "WordPiece", "vocab": {"a": 0}}}).encode(),
        "broken.json": b"{not json",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(ModelFormatError) as e:
            load_tokenizer(path)
        assert name in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ModelFormatError, match="no tokenizer file"):
        load_tokenizer(empty)


def test_unigram_model_is_refused(tmp_path):
    import sentencepiece as spm  # in the test extra: a missing one fails, not skips
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["hello world", "hello there", "world peace"] * 20),
                                   model_writer=model, model_type="unigram", vocab_size=20,
                                   hard_vocab_limit=False, minloglevel=2)
    path = tmp_path / "tokenizer.model"
    path.write_bytes(model.getvalue())
    with pytest.raises(ModelFormatError, match="unigram"):
        load_tokenizer(path)
