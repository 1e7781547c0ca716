"""`python -m xllm.main` as a user runs it: the default model answers, and bad
input gives one line naming the file and the problem, never a traceback."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

from .conftest import REPO


def xllm_main(*args, timeout=600, input=None):
    return subprocess.run([sys.executable, "-m", "xllm.main", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, input=input)


def assert_one_line_error(run, *must_contain):
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{run.stderr}"
    assert "Traceback" not in run.stderr
    for text in must_contain:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"


def test_default_model_answers_capital_of_france(smollm2_path):
    run = xllm_main("-p", "What is the capital of France?", "-n", "24")
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout


def test_chat_keeps_the_conversation_and_reset(smollm2_path):
    turns = "What is the capital of France?\nAnd of Italy?\n/reset\nHello\n/exit\n"
    run = xllm_main("-n", "16", "--stats", input=turns)
    assert run.returncode == 0, run.stderr
    stats = [line for line in run.stderr.splitlines() if line.startswith("[prompt")]
    assert len(stats) == 3
    # The second turn computes only its own new tokens: fewer than its whole prompt.
    prompt2, computed2 = (int(stats[1].split()[1]), int(stats[1].split()[3]))
    assert computed2 < prompt2


def write_llama2c(path, dim=16, hidden=32, layers=1, heads=2, kv_heads=2, vocab=40, seq_len=32):
    head = dim // heads
    n = vocab * dim + layers * (2 * dim + 2 * dim * dim + 2 * kv_heads * head * dim + 3 * hidden * dim) \
        + dim + seq_len * head
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(struct.pack("7i", dim, hidden, layers, heads, kv_heads, vocab, seq_len))
        f.write(rng.standard_normal(n).astype(np.float32).tobytes())


def test_llama2c_without_tokenizer_is_one_line_error(tmp_path):
    model = tmp_path / "tiny.bin"
    write_llama2c(model)
    run = xllm_main("--model", model, "-p", "hi", "--no-cache")
    assert_one_line_error(run, str(model), "tokenizer")


def test_missing_tokenizer_file_is_one_line_error(tmp_path):
    model = tmp_path / "tiny.bin"
    write_llama2c(model)
    missing = tmp_path / "nope.model"
    run = xllm_main("--model", model, "--tokenizer", missing, "-p", "hi", "--no-cache")
    assert_one_line_error(run, str(missing))


def test_truncated_gguf_is_one_line_error(smollm2_path, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as src:
        cut.write_bytes(src.read(smollm2_path.stat().st_size // 2))
    run = xllm_main("--model", cut, "-p", "hi", "--no-cache")
    assert_one_line_error(run, str(cut), "truncated")


def test_unsupported_architecture_is_one_line_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    run = xllm_main("--model", tmp_path, "-p", "hi", "--no-cache")
    assert_one_line_error(run, str(tmp_path), "GPT2LMHeadModel")


def test_safetensors_wrong_shape_is_one_line_error(tmp_path):
    pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(tmp_path, safe_serialization=True)
    # Claim a wider model than the tensors hold.
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    run = xllm_main("--model", tmp_path, "-p", "hi", "--no-cache")
    assert_one_line_error(run, "model.safetensors", "mlp")
