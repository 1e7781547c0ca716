"""The quantizer (xllm/quantize.py) and convert/quantize.py, on tiny random models.

Q8_0 is checked byte for byte against the `gguf` package's quantizer; W8A8
against its error bound; smoothing against the float model it must not
change; each output of convert/quantize.py by loading it back.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from convert.export_hf import export_hf
from convert.quantize import main as quantize_main
from xllm.load import load_prepared
from xllm.loader import Checkpoint, load_checkpoint
from xllm.model import Llama, prepare_weights
from xllm.quantize import (QuantizeOptions, activation_maxima, q8_0_blocks, quantize_q8_0, quantize_w8a8,
                           quantize_weights, round_half_away, smooth_weights)
from xllm.testing import greedy, tiny_config, tiny_weights
from xllm.weights import QuantWeight

from .test_loaders import write_gguf

PROMPT = [1, 5, 9, 42, 17, 3]


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """A fresh prepared-weights cache per test, so no entry of another run is read."""
    monkeypatch.setenv("XLLM_CACHE", str(tmp_path / "cache"))


def tiny_hf(path, seed=0, tied=False):
    """The tiny random model written as a Hugging Face directory (float32 safetensors)."""
    config = tiny_config(tied_embeddings=tied)
    weights = tiny_weights(config, seed)
    export_hf(Checkpoint(config, weights, "hf"), path)
    return path


# ---------------------------------------------------------------- rounding, Q8_0, W8A8

def test_round_half_away_from_zero():
    x = np.array([0.5, 1.5, 2.5, -0.5, -2.5, 0.49999997, -0.49999997, 126.5, 3.0, -0.0], np.float32)
    assert round_half_away(x).tolist() == [1, 2, 3, -1, -3, 0, 0, 127, 3, 0]


def test_q8_0_is_bit_identical_to_gguf():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((48, 256)).astype(np.float32)
    w[0, :32] = 0                                            # a block of zeros: d = 0
    w[1, :64] = rng.integers(-254, 255, 64) / 2              # many exact ties x.5 after scaling
    w[1, 0] = 127                                            #   (amax 127: d = 1)
    w[2, :32] *= 1e6                                          # large (d still fits float16)
    w[3, :32] *= 1e-30                                        # tiny (d far below float16's range)
    w[4, :32] = np.float32(1e-3)                              # a constant block
    w[5, 32:64] = -rng.random(32, np.float32)                 # all negative
    ours = q8_0_blocks(quantize_q8_0(w))
    ref = gguf.quants.quantize(w, Q.Q8_0)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    # and the values are what gguf's dequantizer reads from those bytes
    assert np.array_equal(quantize_q8_0(w).dequantize(), gguf.quants.dequantize(ref, Q.Q8_0))


def test_q8_0_refuses_a_scale_past_float16():
    with pytest.raises(ValueError, match="past float16"):
        quantize_q8_0(np.full((1, 32), 1e8, np.float32))


def test_w8a8_error_is_at_most_half_a_step_and_zero_rows_stay_zero():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((40, 96)) * rng.random((40, 1)) * 10).astype(np.float32)
    w[3] = 0
    q = quantize_w8a8(w)
    assert q.format == "w8a8" and q.qs.dtype == np.int8 and q.d.shape == (40, 1)
    assert np.abs(q.qs).max() <= 127
    assert np.array_equal(np.abs(q.qs).max(axis=1)[q.d[:, 0] > 0], np.full(39, 127))   # the max maps to 127
    assert q.d[3, 0] == 0 and not q.qs[3].any()
    err = np.abs(q.dequantize() - w)
    assert (err <= q.d / 2 * (1 + 1e-6)).all()


def test_w8a8_refuses_nan():
    w = np.ones((2, 32), np.float32)
    w[1, 4] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_w8a8(w)


@pytest.mark.parametrize("tied", [False, True])
def test_w8a8_quantizes_the_output_projection_and_keeps_the_table_float(tied):
    config = tiny_config(tied_embeddings=tied)
    weights = tiny_weights(config)
    out = quantize_weights(config, weights, "w8a8")
    assert isinstance(out["layers.0.wq"], QuantWeight) and out["layers.0.wq"].format == "w8a8"
    assert out["tok_embeddings"].dtype == np.float32 and out["layers.1.ffn_norm"].dtype == np.float32
    # a tied model's output projection becomes an int8 copy of its table
    assert out["output"].format == "w8a8"
    source = weights["tok_embeddings"] if tied else weights["output"]
    assert np.array_equal(out["output"].qs, quantize_w8a8(source).qs)
    assert prepare_weights(config, out)["output"] is out["output"]
    q8 = quantize_weights(config, tiny_weights(config), "q8_0")
    assert q8["tok_embeddings"].format == "q8_0" and q8["layers.1.w_down"].format == "q8_0"


# ---------------------------------------------------------------- smoothing

def test_smoothing_leaves_the_float_model_unchanged():
    config = tiny_config()
    weights = tiny_weights(config)
    weights["layers.0.attn_norm"] = weights["layers.0.attn_norm"] * np.linspace(0.1, 8, config.dim, dtype=np.float32)
    maxima = activation_maxima(config, weights, list(range(3, 90)))
    assert set(maxima) == {f"layers.{i}.{k}" for i in range(config.n_layers) for k in ("attn", "ffn")}
    smoothed = smooth_weights(config, weights, maxima, alpha=0.5)
    assert not np.allclose(smoothed["layers.0.wq"], weights["layers.0.wq"])      # it did move something
    ids = [1, 7, 30, 44, 2, 90, 61, 5] * 4
    before = Llama(config, prepare_weights(config, weights), "cpu", f32=True).logits_for(ids)
    after = Llama(config, prepare_weights(config, smoothed), "cpu", f32=True).logits_for(ids)
    assert np.abs(after - before).max() < 1e-4


def test_smoothing_factors_move_the_outlier_into_the_weights():
    config = tiny_config(n_layers=1)
    weights = tiny_weights(config)
    maxima = {"layers.0.attn": np.ones(config.dim, np.float32), "layers.0.ffn": np.ones(config.dim, np.float32)}
    maxima["layers.0.attn"][5] = 100.0                                  # one outlier channel
    s = smooth_weights(config, weights, maxima, alpha=1.0)              # alpha 1: s = max|X|
    assert np.allclose(s["layers.0.wk"][:, 5], weights["layers.0.wk"][:, 5] * 100)
    assert np.allclose(s["layers.0.attn_norm"][5], weights["layers.0.attn_norm"][5] / 100)
    assert np.allclose(s["layers.0.w_up"], weights["layers.0.w_up"]) and np.array_equal(s["layers.0.wo"],
                                                                                         weights["layers.0.wo"])


# ---------------------------------------------------------------- convert/quantize.py round trips

@pytest.mark.parametrize("tied", [False, True])
def test_convert_w8a8_round_trip_matches_quantize_at_load(tmp_path, capsys, tied):
    src = tiny_hf(tmp_path / "tiny", tied=tied)
    out = tmp_path / "tiny-w8a8"
    assert quantize_main([str(src), "-o", str(out), "--scheme", "w8a8"]) == 0
    assert "largest per-channel error" in capsys.readouterr().out
    hf_config = json.loads((out / "config.json").read_text())
    qc = hf_config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "int-quantized"
    assert qc["ignore"] == [] and hf_config["tie_word_embeddings"] is False     # lm_head is int8 too
    group = qc["config_groups"]["group_0"]
    assert {k: group["weights"][k] for k in ("num_bits", "type", "symmetric", "strategy")} == \
        {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    assert group["input_activations"]["dynamic"] is True and group["input_activations"]["strategy"] == "token"

    loaded = load_checkpoint(out, keep_quant=True).weights
    assert loaded["layers.1.w_gate"].format == "w8a8" and loaded["output"].format == "w8a8"
    assert loaded["tok_embeddings"].dtype == np.float32
    config, at_load, _, _ = load_prepared(src, quantize=QuantizeOptions("w8a8"))
    file_config, from_file, _, _ = load_prepared(out)
    for name, w in at_load.items():
        if isinstance(w, QuantWeight):
            assert np.array_equal(w.qs, from_file[name].qs) and np.array_equal(w.d, from_file[name].d)
        else:
            assert np.array_equal(w, from_file[name])
    a = greedy(Llama(config, at_load, "cpu"), PROMPT, 12)
    b = greedy(Llama(file_config, from_file, "cpu"), PROMPT, 12)
    assert a == b
    # keep_quant=False (--f32): the same values, as float32
    flat = load_checkpoint(out).weights["layers.0.wq"]
    assert flat.dtype == np.float32 and np.array_equal(flat, loaded["layers.0.wq"].dequantize())


def test_quantize_at_load_is_cached(tmp_path):
    src = tiny_hf(tmp_path / "tiny")
    _, first, _, _ = load_prepared(src, quantize=QuantizeOptions("w8a8"))
    _, again, _, _ = load_prepared(src, quantize=QuantizeOptions("w8a8"))
    assert len(list((tmp_path / "cache" / "prepared").glob("*-w8a8"))) == 1
    assert again["layers.0.wqkv"].format == "w8a8"
    assert np.array_equal(first["layers.0.wqkv"].qs, again["layers.0.wqkv"].qs)


@pytest.mark.parametrize("scheme", ["q8_0", "fp16"])
def test_convert_gguf_round_trip(tmp_path, scheme):
    config = tiny_config()
    weights = tiny_weights(config)
    src = tmp_path / "tiny.gguf"
    write_gguf(src, config, weights)
    out = tmp_path / f"tiny-{scheme}.gguf"
    assert quantize_main([str(src), "-o", str(out), "--scheme", scheme]) == 0
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == (Q.Q8_0 if scheme == "q8_0" else Q.F16)
    assert types["blk.0.attn_norm.weight"] == Q.F32
    assert reader.fields["general.file_type"].contents() == (7 if scheme == "q8_0" else 1)
    src_reader = gguf.GGUFReader(src)
    for t, s in zip(reader.tensors, src_reader.tensors):
        if scheme == "q8_0" and len(t.shape) == 2:
            assert np.array_equal(np.asarray(t.data), gguf.quants.quantize(np.asarray(s.data), Q.Q8_0))

    loaded = load_checkpoint(out, keep_quant=True).weights
    if scheme == "fp16":
        assert loaded["layers.0.wq"].dtype == np.float16 and loaded["layers.0.attn_norm"].dtype == np.float32
        assert np.array_equal(loaded["layers.0.wq"].astype(np.float32), load_checkpoint(src).weights["layers.0.wq"])
    else:
        assert loaded["layers.0.wq"].format == "q8_0"
        _, at_load, _, _ = load_prepared(src, quantize=QuantizeOptions("q8_0"))
        _, from_file, _, _ = load_prepared(out)
        assert np.array_equal(at_load["layers.0.wqkv"].qs, from_file["layers.0.wqkv"].qs)
        assert greedy(Llama(config, at_load, "cpu"), PROMPT, 8) == greedy(Llama(config, from_file, "cpu"), PROMPT, 8)


def test_convert_to_gguf_needs_a_gguf_source(tmp_path, capsys):
    src = tiny_hf(tmp_path / "tiny")
    assert quantize_main([str(src), "-o", str(tmp_path / "x.gguf"), "--scheme", "q8_0"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "needs a GGUF source" in err


def test_options_are_checked():
    with pytest.raises(ValueError, match="scheme"):
        QuantizeOptions("int4")
    with pytest.raises(ValueError, match="alpha"):
        QuantizeOptions("w8a8", smooth=1.5)
    with pytest.raises(ValueError, match="smoothing is for w8a8"):
        QuantizeOptions("q8_0", smooth=0.5)
