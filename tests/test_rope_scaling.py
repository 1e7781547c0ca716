"""RoPE scaling ("llama3", "linear", "dynamic") against Hugging Face transformers.

A random Llama-3-shaped model (GQA, head_dim 16) is made and saved by
transformers with each scaling, loaded by xllm from the HF directory and from
a GGUF written as llama.cpp's converter writes it (llama3 as the
rope_freqs.weight tensor, linear as metadata), and run on a 700-token prompt:
past the 512 positions the scaling starts from.  The logits must agree with
transformers' within relative L2 1e-4.

"dynamic" is compared where xllm and transformers compute the same thing (see
xllm/rope.py): transformers fed the first 512 tokens in one call, then one
token per call with its KV cache.  A single transformers call over all 700
tokens rotates every position with the base of length 700, which xllm does
not do; the test checks that difference is there, so that a change in either
is noticed.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from xllm.config import ModelConfig
from xllm.loader import load_checkpoint
from xllm.rope import dynamic_theta, rope_angles

from .test_loaders import expect_error, random_weights, tiny_config, write_gguf, write_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from .test_vs_transformers import load_model_no_tokenizer, rel_l2  # noqa: E402

ORIGINAL = 512          # the context the scaling extends
PROMPT = 700            # tokens: 188 of them past ORIGINAL
THETA = 10000.0         # with head_dim 16: wavelengths 6 to 19869, so llama3 has all three bands

SCALINGS = {
    "llama3": dict(max_position_embeddings=8192, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": ORIGINAL}),
    "linear": dict(max_position_embeddings=2048, rope_scaling={"rope_type": "linear", "factor": 4.0}),
    # transformers' dynamic scaling counts from max_position_embeddings itself.
    "dynamic": dict(max_position_embeddings=ORIGINAL, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
}


def hf_model(kind: str, seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.3, rope_theta=THETA,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **SCALINGS[kind])
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module", params=list(SCALINGS))
def saved(request, tmp_path_factory):
    """(kind, transformers model, its saved directory)."""
    model = hf_model(request.param)
    path = tmp_path_factory.mktemp(f"rope_{request.param}")
    model.save_pretrained(path, safe_serialization=True)
    return request.param, model, path


def prompt(n: int = PROMPT, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 96, n)]


def hf_one_call(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def hf_token_by_token(model, ids: list[int], first: int) -> np.ndarray:
    """Logits of every position: ids[:first] in one call, then one token per call with the KV cache."""
    with torch.no_grad():
        out = model(torch.tensor([ids[:first]]), use_cache=True)
        rows, past = [out.logits[0]], out.past_key_values
        for t in ids[first:]:
            out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            rows.append(out.logits[0])
            past = out.past_key_values
    return torch.cat(rows).double().numpy()


def check_logits(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.shape == ref.shape
    for name, rows in (("all positions", slice(None)), (f"positions past {ORIGINAL}", slice(ORIGINAL, None)),
                       ("last position", slice(-1, None))):
        if not got[rows].size:
            continue
        err = rel_l2(got[rows], ref[rows])
        assert err < 1e-4, f"{name}: relative L2 {err:.2e}"


# ---------------------------------------------------------------- the frequencies themselves

@pytest.mark.parametrize("kind", list(SCALINGS))
def test_inverse_frequencies_match_transformers(kind):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = hf_model(kind).config
    ck_scaling = {"llama3": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_context": ORIGINAL},
                  "linear": {"type": "linear", "factor": 4.0},
                  "dynamic": {"type": "dynamic", "factor": 2.0, "original_context": ORIGINAL}}[kind]
    seq_len = PROMPT if kind == "dynamic" else None
    ref, attention_factor = ROPE_INIT_FUNCTIONS[kind](config, "cpu", seq_len=seq_len)
    assert attention_factor == 1.0          # none of the three rescales cos/sin
    # rope_angles row p is p * inv_freq; for dynamic, row PROMPT-1 uses the base of length PROMPT.
    p = PROMPT - 1
    ours = rope_angles(THETA, 16, PROMPT, ck_scaling)[p] / p
    np.testing.assert_allclose(ours, ref.double().numpy(), rtol=1e-6)


def test_dynamic_theta_is_plain_up_to_the_original_context():
    assert dynamic_theta(THETA, 16, 2.0, ORIGINAL, 1) == THETA
    assert dynamic_theta(THETA, 16, 2.0, ORIGINAL, ORIGINAL) == THETA
    assert dynamic_theta(THETA, 16, 2.0, ORIGINAL, ORIGINAL + 1) > THETA


# ---------------------------------------------------------------- HF directories

def test_hf_directory_matches_transformers(saved):
    kind, hf, path = saved
    ours, _, _ = load_model_no_tokenizer(path)
    ids = prompt()
    got = ours.logits_for(ids)
    if kind == "dynamic":
        assert ours.config.context_length == 2 * ORIGINAL
        ref = hf_token_by_token(hf_model(kind), ids, ORIGINAL)   # a fresh model: transformers keeps state
        check_logits(got, ref)
        # One transformers call over the whole prompt uses the base of length 700 everywhere.
        one_call = hf_one_call(hf_model(kind), ids)
        assert rel_l2(got[:ORIGINAL], one_call[:ORIGINAL]) > 1e-3
        # Within the original context, both are plain RoPE.
        short = prompt(300, seed=1)
        check_logits(ours.logits_for(short), hf_one_call(hf_model(kind), short))
    else:
        check_logits(got, hf_one_call(hf, ids))


def test_scaling_survives_the_prepared_weights_cache(saved, tmp_path, monkeypatch):
    from xllm.load import load_prepared

    kind, _, path = saved
    monkeypatch.setenv("XLLM_CACHE", str(tmp_path / "cache"))
    first = load_prepared(path)[0]
    again = load_prepared(path)[0]          # from the cache: asdict -> JSON -> ModelConfig(**cfg)
    assert first.rope_scaling is not None and first.rope_scaling["type"] == kind
    assert again == first


# ---------------------------------------------------------------- GGUF files

def llama_cpp_rope_freqs(theta: float, head_dim: int, factor: float, low_freq_factor: float,
                         high_freq_factor: float, old_context_len: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py (LlamaModel.generate_extra_tensors) makes it."""
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


def gguf_variants(kind: str) -> dict[str, dict]:
    """name -> write_gguf keyword arguments, for each way a llama.cpp file can carry `kind`."""
    if kind == "llama3":
        # The converter reads original_max_position_embeddings from the top level of config.json,
        # defaulting to 8192; Llama 3.1's files give 8192 either way.  Ours is ORIGINAL.
        freqs = llama_cpp_rope_freqs(THETA, 16, 8.0, 1.0, 4.0, ORIGINAL)
        assert freqs[0] == 1 and freqs[-1] == 8 and 1 < freqs[3] < 8           # all three bands
        return {"rope_freqs": dict(extra_tensors={"rope_freqs.weight": (Q.F32, freqs)}),
                "rope_freqs_with_type_none": dict(extra_tensors={"rope_freqs.weight": (Q.F32, freqs)},
                                                  extra_kv={"llama.rope.scaling.type": "none"})}
    if kind == "linear":
        return {"metadata": dict(extra_kv={"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}),
                "legacy_scale_linear": dict(extra_kv={"llama.rope.scale_linear": 4.0})}
    return {}


@pytest.mark.parametrize("saved", ["llama3", "linear"], indirect=True)   # GGUF has no dynamic scaling
def test_gguf_matches_transformers(saved, tmp_path):
    kind, hf, path = saved
    variants = gguf_variants(kind)
    assert variants
    ck = load_checkpoint(path)
    plain = ModelConfig(**{**ck.config.__dict__, "rope_scaling": None})
    ids = prompt(seed=2)
    ref = hf_one_call(hf, ids)
    for name, kwargs in variants.items():
        file = tmp_path / f"{name}.gguf"
        write_gguf(file, plain, ck.weights, **kwargs)
        ours, _, _ = load_model_no_tokenizer(file)
        assert ours.config.rope_scaling is not None, name
        check_logits(ours.logits_for(ids), ref)
        if ours.config.rope_scaling["type"] == "freq_factors":     # no config.json form: refused, not dropped
            from convert.export_hf import export_hf
            from xllm.errors import ModelFormatError

            with pytest.raises(ModelFormatError, match="rope_freqs"):
                export_hf(load_checkpoint(file), tmp_path / f"{name}_hf")


# ---------------------------------------------------------------- refusals

def test_hf_unsupported_scalings_are_one_line_errors(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    cases = [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, ["rope_scaling.rope_type", "'yarn'"]),
        ({"rope_scaling": {"type": "longrope", "factor": 4.0}}, ["rope_scaling.rope_type", "'longrope'"]),
        ({"rope_scaling": None, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
         ["rope_parameters.rope_type", "'yarn'"]),
        ({"partial_rotary_factor": 0.5}, ["'partial_rotary_factor'", "0.5"]),
        ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.25}},
         ["rope_parameters.partial_rotary_factor", "0.25"]),
        ({"rope_scaling": {"rope_type": "linear", "factor": "4"}}, ["rope_scaling.factor", "'4'"]),
        ({"rope_scaling": {"rope_type": "linear"}}, ["rope_scaling.factor", "None"]),
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 1e400}}, ["rope_scaling.factor"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                           "original_max_position_embeddings": 64}}, ["rope_scaling.high_freq_factor", "1.0"]),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 0.5}},
         ["rope_scaling.original_max_position_embeddings", "0.5"]),
    ]
    for i, (overrides, fragments) in enumerate(cases):
        write_hf(tmp_path / f"m{i}", cfg, weights, config_overrides=overrides)
        expect_error(tmp_path / f"m{i}", "config.json", *fragments)


def test_gguf_unsupported_scalings_are_one_line_errors(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    cases = [
        (dict(extra_kv={"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}),
         ["llama.rope.scaling.type", "'yarn'"]),
        (dict(extra_kv={"llama.rope.scaling.factor": -2.0}), ["llama.rope.scaling.factor", "-2.0"]),
        (dict(extra_tensors={"rope_freqs.weight": (Q.F32, np.ones(4, np.float32))}),
         ["rope_freqs.weight", "shape [4]", "[8]"]),
        (dict(extra_tensors={"rope_freqs.weight": (Q.F32, np.array([1, 1, 1, 0, 1, 1, 1, 1], np.float32))}),
         ["rope_freqs.weight", "positive", "0.0"]),
    ]
    for i, (kwargs, fragments) in enumerate(cases):
        write_gguf(tmp_path / f"m{i}.gguf", cfg, weights, **kwargs)
        expect_error(tmp_path / f"m{i}.gguf", f"m{i}.gguf", *fragments)


def test_config_json_round_trip_of_every_scaling_shape():
    for scaling in ({"type": "linear", "factor": 4.0},
                    {"type": "dynamic", "factor": 2.0, "original_context": 512},
                    {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_context": 8192},
                    {"type": "freq_factors", "factors": [1.0] * 4 + [2.5, 8.0, 8.0, 8.0]}):
        cfg = tiny_config(rope_scaling=scaling)
        assert cfg.invalid_field() is None
        back = ModelConfig(**{**json.loads(json.dumps(cfg.__dict__)), "eos_ids": cfg.eos_ids})
        assert back == cfg
    assert tiny_config(rope_scaling={"type": "yarn"}).invalid_field()[0] == "rope_scaling.type"


def test_export_keeps_the_scaling_or_refuses(saved, tmp_path):
    """convert.export_hf writes the scaling back (same logits from the export);
    llama2.c, which has plain RoPE only, refuses a scaled model."""
    from convert.export_hf import export_hf
    from convert.export_llama2c import export_llama2c
    from xllm.errors import ModelFormatError

    kind, _, path = saved
    ck = load_checkpoint(path)
    ours, _, _ = load_model_no_tokenizer(path)
    again, _, _ = load_model_no_tokenizer(export_hf(ck, tmp_path / "hf"))
    assert again.config.rope_scaling == ours.config.rope_scaling
    assert again.config.context_length == ours.config.context_length
    ids = prompt(seed=3)
    np.testing.assert_array_equal(again.logits_for(ids), ours.logits_for(ids))
    with pytest.raises(ModelFormatError, match="RoPE scaling"):
        export_llama2c(ck, tmp_path / "m.bin")
