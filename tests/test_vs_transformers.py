"""xllm's forward pass against an implementation we did not write: Hugging Face
transformers (torch, CPU, fp32).

- SmolLM2-135M-Instruct read from its GGUF by both (transformers dequantizes it
  to fp32 with `gguf_file=`): last-position logits within relative L2 error
  1e-4 on several prompts, identical greedy 64-token continuations, and the
  same perplexity over ../shared/data/shareGPT_sample.txt within 0.1%.
- Small random Llamas written by transformers to a directory (MHA and GQA),
  and the same weights exported to llama2.c's format.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from bench.perplexity import perplexity  # noqa: E402
from xllm.testing import greedy  # noqa: E402
from xllm.load import load_model  # noqa: E402

from .conftest import REPO, shared_file  # noqa: E402

torch.set_num_threads(2)

PROMPTS = [
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "The quick brown fox jumps over the lazy dog. Then the dog",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWrite a haiku about autumn leaves.<|im_end|>\n<|im_start|>assistant\n",
    "In 1492, Columbus sailed across the Atlantic Ocean. The voyage took",
    "Translate to French: I would like a cup of coffee, please.",
]


def rel_l2(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(ours.astype(np.float64) - ref) / np.linalg.norm(ref))


def hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n argmax tokens, continuing past EOS, with transformers' own KV cache."""
    out, past, feed = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(feed, past_key_values=past, use_cache=True)
            past = res.past_key_values
            token = int(res.logits[0, -1].argmax())
            out.append(token)
            feed = torch.tensor([[token]])
    return out


def check_model(ours, hf, prompts_ids: list[list[int]], n_greedy: int = 64) -> None:
    for ids in prompts_ids:
        ref = hf_logits(hf, ids)[-1]
        got = ours.logits_for(ids)[-1]
        err = rel_l2(got, ref)
        assert err < 1e-4, f"last-position logits differ: relative L2 {err:.2e} for prompt {ids[:8]}..."
        ours_greedy = greedy(ours, ids, n_greedy)
        assert ours_greedy == hf_greedy(hf, ids, n_greedy)


# ---------------------------------------------------------------- SmolLM2 GGUF

@pytest.fixture(scope="module")
def smol_hf(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(gguf_file=smollm2_path.name)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_path.parent, **kw)


@pytest.fixture(scope="module")
def smol_ours(smollm2_path):
    return load_model(smollm2_path)


def test_smollm2_logits_and_greedy_match_transformers(smol_hf, smol_ours):
    hf, hf_tok = smol_hf
    model, _, _ = smol_ours
    prompts = [hf_tok(p)["input_ids"] for p in PROMPTS]
    assert len(prompts) >= 5
    check_model(model, hf, prompts)


def test_smollm2_perplexity_matches_transformers(smol_hf, smol_ours, smollm2_path):
    text_file = shared_file("shareGPT_sample.txt")
    hf, _ = smol_hf
    model, tok, _ = smol_ours
    ids = tok.encode(text_file.read_text(encoding="utf-8"))
    ctx = 512
    assert len(ids) >= 2 * ctx, "the sample should give at least two windows"

    ref, _ = perplexity(lambda w: hf_logits(hf, w), ids, ctx)
    # The command itself, as a user runs it, on the same file.
    run = subprocess.run([sys.executable, "-m", "bench.perplexity", "--model", str(smollm2_path),
                          "--file", str(text_file), "--ctx", str(ctx)],
                         cwd=REPO, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("perplexity: ")
    ours = float(last.split()[-1])
    assert math.isfinite(ref) and 1.0 < ref < 1000.0
    assert abs(ours - ref) / ref < 1e-3, f"xllm {ours} vs transformers {ref}"


# ------------------------------------------------ random Llamas written by transformers

@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def random_llama(request, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(request.param)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=request.param,
                         max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.3,
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    path = tmp_path_factory.mktemp(f"llama_{request.param}kv")
    model.save_pretrained(path, safe_serialization=True)
    return model, path


def random_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, n)] for n in (1, 7, 33, 100, 150)]


def test_random_llama_hf_directory_matches_transformers(random_llama):
    hf, path = random_llama
    ours, _, _ = load_model_no_tokenizer(path)
    check_model(ours, hf, random_prompts(hf.config.vocab_size))


def test_random_llama_exported_to_llama2c_matches_transformers(random_llama, tmp_path):
    hf, path = random_llama
    out = tmp_path / "model.bin"
    run = subprocess.run([sys.executable, "-m", "convert.export_llama2c", str(path), str(out)],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    ours, _, _ = load_model_no_tokenizer(out)
    check_model(ours, hf, random_prompts(hf.config.vocab_size, seed=1))


def load_model_no_tokenizer(path):
    """The random models have no tokenizer files; only their weights are compared."""
    from xllm.load import load_prepared
    from xllm.model import Llama

    config, weights, metadata, _ = load_prepared(path, use_cache=False)
    return Llama(config, weights), None, metadata
