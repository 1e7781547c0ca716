"""Quantized weights: QuantWeight against gguf, and the loader.

A QuantWeight stands for the float32 matrix `dequantize()` gives, so:
  * `dequantize` must equal gguf's own dequantizer bit for bit;
  * loading a GGUF with keep_quant=True must give weights whose dequantize()
    is exactly what keep_quant=False loads.

The operators on quantized weights (linear, logits, embedding on every
device) are tested in tests/test_ops_matmul.py, with the helpers below
(`from_gguf`, `f16_scales`) making the weights.
"""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_loaders import random_weights, tiny_config, write_gguf
from xllm.loader import load_checkpoint
from xllm.loader.dequant import keep_blocks
from xllm.quantize import quantize_w8a8
from xllm.weights import FORMATS, QuantWeight, concat, is_quant

EXAMPLES = settings(max_examples=30, deadline=None)
QTYPE = {"q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}


# ---------------------------------------------------------------- helpers

def from_gguf(values: np.ndarray, fmt: str) -> tuple[QuantWeight, np.ndarray]:
    """Quantize float32 values [N, K] with gguf; return our QuantWeight of the blocks and gguf's dequantization.

    w8a8 is not a GGUF format: its rows are quantized by xllm's own quantizer
    (one symmetric scale per row), and the expected values are d * q.
    """
    if fmt == "w8a8":
        qw = quantize_w8a8(values)
        return qw, qw.d * qw.qs.astype(np.float32)
    packed = gguf.quants.quantize(values, QTYPE[fmt])
    qw = keep_blocks(np.ascontiguousarray(packed).view(np.uint8).ravel(), QTYPE[fmt], values.shape)
    return qw, gguf.quants.dequantize(packed, QTYPE[fmt]).reshape(values.shape)


def f16_scales(rng, shape, low, high) -> np.ndarray:
    """Random scales that a GGUF can hold: float16 values, as float32."""
    return rng.uniform(low, high, shape).astype(np.float16).astype(np.float32)


shapes = st.tuples(st.integers(1, 70), st.integers(1, 10).map(lambda b: 32 * b))


# ---------------------------------------------------------------- QuantWeight itself

@EXAMPLES
@given(data=st.data(), fmt=st.sampled_from(FORMATS), shape=shapes, scale=st.sampled_from([1e-3, 1.0, 300.0]))
def test_dequantize_is_bit_exact_against_gguf(data, fmt, shape, scale):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    values = (rng.standard_normal(shape) * scale).astype(np.float32)
    values[rng.random(shape) < 0.05] = 0.0                 # some zeros, and sometimes a zero block
    if shape[0] > 1:
        values[0, :32] = 0.0
    qw, expected = from_gguf(values, fmt)
    ours = qw.dequantize()
    assert ours.dtype == np.float32 and ours.shape == shape and ours.flags.c_contiguous
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
    assert qw.shape == shape and qw.format == fmt and qw.ndim == 2 and is_quant(qw) and not is_quant(values)
    if fmt == "w8a8":                                          # one byte a value, one scale a row
        assert qw.nbytes == shape[0] * (shape[1] + 4) and qw.blocks.shape == (shape[0], 1, shape[1])
    else:
        per_block = {"q8_0": 36, "q4_0": 20, "q4_1": 24}[fmt]  # bytes per 32 values, scales as float32
        assert qw.nbytes == shape[0] * shape[1] // 32 * per_block


def test_dequantize_formula_by_hand():
    # One block of each format, values written out.
    q = np.arange(-16, 16, dtype=np.int8)
    w = QuantWeight("q8_0", q.reshape(1, 32), np.array([[0.5]], np.float32))
    np.testing.assert_array_equal(w.dequantize()[0], 0.5 * q)
    nibbles = np.arange(32) % 16                            # element j and j + 16 share byte j
    packed = (nibbles[:16] | (nibbles[16:] << 4)).astype(np.uint8).reshape(1, 16)
    d, m = np.array([[2.0]], np.float32), np.array([[-1.5]], np.float32)
    np.testing.assert_array_equal(QuantWeight("q4_1", packed, d, m).dequantize()[0], 2.0 * nibbles - 1.5)
    np.testing.assert_array_equal(QuantWeight("q4_0", packed, d).dequantize()[0], 2.0 * (nibbles - 8))
    assert w.blocks.shape == (1, 1, 32) and QuantWeight("q4_0", packed, d).blocks.shape == (1, 1, 16)
    row = np.arange(-32, 32, dtype=np.int8).reshape(1, 64)     # w8a8: one scale for the whole row
    np.testing.assert_array_equal(QuantWeight("w8a8", row, d).dequantize()[0], 2.0 * row[0])
    with pytest.raises(ValueError, match=r"d must be float32 \(1, 1\)"):
        QuantWeight("w8a8", row, np.ones((1, 2), np.float32))


def test_rows_permutes_and_selects():
    rng = np.random.default_rng(0)
    for fmt in FORMATS:
        qw, _ = from_gguf(rng.standard_normal((11, 96)).astype(np.float32), fmt)
        full = qw.dequantize()
        perm = rng.permutation(11)
        np.testing.assert_array_equal(qw.rows(perm).dequantize(), full[perm])
        np.testing.assert_array_equal(qw.rows([3, 3, 0]).dequantize(), full[[3, 3, 0]])
        assert qw.rows([]).shape == (0, 96)
        with pytest.raises(IndexError):
            qw.rows([11])


def test_concat_stacks_rows_and_refuses_mixed_formats():
    rng = np.random.default_rng(1)
    parts = [from_gguf(rng.standard_normal((n, 64)).astype(np.float32), "q4_1")[0] for n in (5, 2, 7)]
    both = concat(parts)
    assert both.shape == (14, 64) and both.format == "q4_1"
    np.testing.assert_array_equal(both.dequantize(), np.concatenate([p.dequantize() for p in parts]))
    assert QuantWeight.concat(parts).shape == (14, 64)
    q8 = from_gguf(rng.standard_normal((3, 64)).astype(np.float32), "q8_0")[0]
    with pytest.raises(ValueError, match="formats differ"):
        concat([parts[0], q8])
    with pytest.raises(ValueError, match="row lengths differ"):
        concat([parts[0], from_gguf(rng.standard_normal((3, 96)).astype(np.float32), "q4_1")[0]])
    with pytest.raises(ValueError):
        concat([parts[0], parts[0].dequantize()])
    with pytest.raises(ValueError):
        concat([])


def test_to_arrays_and_back_including_from_one_flat_buffer():
    rng = np.random.default_rng(2)
    for fmt in FORMATS:
        qw, _ = from_gguf(rng.standard_normal((6, 128)).astype(np.float32), fmt)
        arrays = qw.to_arrays()
        assert set(arrays) == ({"qs", "d", "m"} if fmt == "q4_1" else {"qs", "d"})
        back = QuantWeight.from_arrays(fmt, qw.shape, arrays)
        np.testing.assert_array_equal(back.dequantize(), qw.dequantize())
        # as a cache would store it: all arrays as bytes in one buffer, read back as flat slices
        buf = np.concatenate([a.view(np.uint8).ravel() for a in arrays.values()])
        flat, at = {}, 0
        for name, a in arrays.items():
            flat[name] = buf[at: at + a.nbytes]
            at += a.nbytes
        back = QuantWeight.from_arrays(fmt, list(qw.shape), flat)
        np.testing.assert_array_equal(back.dequantize(), qw.dequantize())


def test_constructor_checks_the_arrays():
    d = np.zeros((2, 1), np.float32)
    with pytest.raises(ValueError, match="unknown format"):
        QuantWeight("q5_0", np.zeros((2, 16), np.uint8), d)
    with pytest.raises(ValueError, match="int8"):
        QuantWeight("q8_0", np.zeros((2, 32), np.uint8), d)
    with pytest.raises(ValueError, match="multiple of 32"):
        QuantWeight("q8_0", np.zeros((2, 40), np.int8), d)
    with pytest.raises(ValueError, match="m must be"):
        QuantWeight("q4_1", np.zeros((2, 16), np.uint8), d)
    with pytest.raises(ValueError, match="no offsets"):
        QuantWeight("q4_0", np.zeros((2, 16), np.uint8), d, d)
    with pytest.raises(ValueError, match="d must be"):
        QuantWeight("q4_0", np.zeros((2, 16), np.uint8), d.astype(np.float64))


# ---------------------------------------------------------------- the loader

def test_gguf_keep_quant_keeps_q8_0_q4_0_q4_1_f16_and_dequantizes_the_rest(tmp_path):
    cfg = tiny_config(tied_embeddings=True)
    weights = random_weights(cfg, seed=3)
    types = {"tok_embeddings": Q.Q8_0, "layers.0.wq": Q.Q4_1, "layers.0.wk": Q.Q4_0, "layers.0.wv": Q.Q8_0,
             "layers.0.wo": Q.F16, "layers.0.w_gate": Q.Q4_1, "layers.0.w_up": Q.Q5_0,
             "layers.1.wq": Q.Q8_0, "layers.1.wk": Q.Q4_1, "layers.1.w_down": Q.BF16}
    write_gguf(tmp_path / "q.gguf", cfg, weights, types)
    plain = load_checkpoint(tmp_path / "q.gguf")
    kept = load_checkpoint(tmp_path / "q.gguf", keep_quant=True)
    assert list(kept.weights) == list(plain.weights)
    for name, w in kept.weights.items():
        expected_format = {Q.Q8_0: "q8_0", Q.Q4_0: "q4_0", Q.Q4_1: "q4_1"}.get(types.get(name))
        if types.get(name) == Q.F16:                     # a float16 matrix stays 2 bytes a weight
            assert isinstance(w, np.ndarray) and w.dtype == np.float16, name
            np.testing.assert_array_equal(w.astype(np.float32), plain.weights[name], err_msg=name)
        elif expected_format is None:
            assert isinstance(w, np.ndarray) and w.dtype == np.float32, name
            np.testing.assert_array_equal(w, plain.weights[name], err_msg=name)
        else:
            assert is_quant(w) and w.format == expected_format, name
            # same values, rows of wq/wk reordered from the file's RoPE order like the float32 ones
            np.testing.assert_array_equal(w.dequantize().view(np.uint32), plain.weights[name].view(np.uint32),
                                          err_msg=name)


def test_keep_quant_is_ignored_by_formats_without_blocks(tmp_path):
    cfg = tiny_config()
    write_gguf(tmp_path / "f.gguf", cfg, random_weights(cfg))
    ck = load_checkpoint(tmp_path / "f.gguf", keep_quant=True)
    assert not any(is_quant(w) for w in ck.weights.values())


def test_default_model_keep_quant_is_lossless(smollm2_path):
    plain = load_checkpoint(smollm2_path)
    kept = load_checkpoint(smollm2_path, keep_quant=True)
    formats = {}
    for name, w in kept.weights.items():
        formats[getattr(w, "format", "f32")] = formats.get(getattr(w, "format", "f32"), 0) + 1
        got = w.dequantize() if is_quant(w) else w
        np.testing.assert_array_equal(got.view(np.uint32), plain.weights[name].view(np.uint32), err_msg=name)
    # every layer matrix is Q4_1 and the (tied) embedding table Q8_0 in this file
    assert formats == {"q4_1": 7 * 30, "q8_0": 1, "f32": 2 * 30 + 1}
    assert kept.weights["tok_embeddings"].format == "q8_0"
    quant_bytes = sum(w.nbytes for w in kept.weights.values())
    assert quant_bytes < sum(w.nbytes for w in plain.weights.values()) / 4
    assert math.isclose(quant_bytes / 1e6, 111.6, rel_tol=0.01)
