"""The integer path of linear (integer activations) on the CPU, against `reference.linear_int`.

`get_ops("cpu")` multiplies q8_0, q4_0, q4_1 and w8a8 weights this way
(cpu/intmatmul.py); the exact float path is tested in tests/test_ops_matmul.py.

  * the activations' quantization (int8 numbers, scales, block sums) equals
    `reference.quantize_activations` exactly, NaN, infinities, zeros and
    tiny blocks included;
  * the integer accumulation is exact: with power-of-two scales every float
    operation after it is exact too, and the kernel equals the reference bit
    for bit;
  * with any scales, the result is within the rounding of a float32 sum of
    the per-block terms;
  * a token's result does not depend on the other tokens of the call (the
    same bits alone and in a batch), up to `INT_MAX_TOKENS` tokens, past
    which the GGUF formats take the float GEMM (bit for bit the exact one);
  * NaN in x reaches exactly the row it is in;
  * the plain bodies of kernels/qdot.py (what runs without numba) agree too.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ops_helpers import FEW_EXAMPLES, assert_close
from tests.test_quant import f16_scales
from xllm.ops import get_ops
from xllm.ops.cpu import intmatmul
from xllm.ops.kernels import qdot
from xllm.ops.reference import ACTIVATION_BITS, linear_int, quantize_activations
from xllm.weights import FORMATS, QuantWeight

cpu = get_ops("cpu")
INT_FORMATS = pytest.mark.parametrize("fmt", FORMATS)


def random_weight(rng, fmt: str, N: int, K: int, power_of_two: bool = False) -> QuantWeight:
    """Random integers and scales in `fmt`; power_of_two: every scale is +-1/8, which with
    integer-valued activations makes every float step after the integer sums exact."""
    nb = 1 if fmt == "w8a8" else K // 32

    def scales(low, high):
        if power_of_two:
            return (0.125 * rng.choice([-1, 1], (N, nb))).astype(np.float32)
        return f16_scales(rng, (N, nb), low, high)

    if fmt in ("q8_0", "w8a8"):
        return QuantWeight(fmt, rng.integers(-127, 128, (N, K), dtype=np.int8), scales(-0.1, 0.1))
    qs = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    return QuantWeight(fmt, qs, scales(-0.1, 0.1), scales(-1.0, 1.0) if fmt == "q4_1" else None)


def block_of(fmt: str, K: int) -> int:
    return K if fmt == "w8a8" else 32


def quantize_on_cpu(x: np.ndarray, block: int, bits: int):
    return intmatmul._quantized(x, x.shape[1] // block, bits)


def int_error_scale(x: np.ndarray, w: QuantWeight) -> float:
    """The largest sum over blocks of |each float term| of `linear_int`: the size of its rounding."""
    T, K = x.shape
    block = block_of(w.format, K)
    qx, dx = quantize_activations(x, block, ACTIVATION_BITS[w.format])
    qx = qx.reshape(T, K // block, block).astype(np.float64)
    ax = np.abs(qx).sum(-1) * np.abs(dx)                                    # [T, nb]
    weight = np.abs(w.dequantize().astype(np.float64)).reshape(w.shape[0], K // block, block).max(-1)
    return float(np.einsum("tb,nb->tn", ax, weight).max() * 2 + 1e-30)


# ---------------------------------------------------------------- quantizing the activations

@FEW_EXAMPLES
@given(data=st.data(), block=st.sampled_from([32, 64, 96]), bits=st.sampled_from([8, 16]))
def test_activations_are_quantized_exactly_as_the_reference(data, block, bits):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    T, nb = data.draw(st.integers(1, 9)), data.draw(st.integers(1, 6))
    x = (rng.standard_normal((T, nb * block)) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0.0
    x[0, :block] = 0.0                                            # an all-zero block
    if T > 1:
        x[1, :block] = np.float32(1e-40)                          # too small for a normal scale
    if T > 2:
        x[2, 3] = np.nan
    if T > 3:
        x[3, -1] = -np.inf
    if T > 4:
        x[4, :block] = np.arange(block) - block / 2 + 0.5         # ties: rint rounds them to even
    q_ref, d_ref = quantize_activations(x, block, bits)
    xq, xd, xsum = quantize_on_cpu(x, block, bits)
    assert xq.dtype == q_ref.dtype == (np.int8 if bits == 8 else np.int16)
    np.testing.assert_array_equal(np.isnan(xd), np.isnan(d_ref))
    finite = ~np.isnan(d_ref)
    np.testing.assert_array_equal(xd[finite], d_ref[finite])
    np.testing.assert_array_equal(xq.reshape(T, -1), q_ref)
    np.testing.assert_array_equal(xsum, q_ref.reshape(T, nb, block).astype(np.int64).sum(-1))
    # and the reference means what it says: q within half a step of x / d,
    # give or take the float32 rounding of x * (1 / d)
    ok = finite & (d_ref > 0)
    xb = x.reshape(T, nb, block).astype(np.float64)
    err = np.abs(xb - d_ref[..., None].astype(np.float64) * q_ref.reshape(T, nb, block))
    assert (err[ok] <= 0.5001 * d_ref[ok][:, None] + np.abs(xb[ok]) * 2.0 ** -22).all()


# ---------------------------------------------------------------- the products

@INT_FORMATS
@FEW_EXAMPLES
@given(data=st.data())
def test_integer_accumulation_is_exact(fmt, data):
    # Scales of 1/8 and 1/4 on the two sides, activations that quantize to
    # themselves: every float operation after the integer sums is exact (all
    # numbers are multiples of 1/32 below 2^19), so any difference would be
    # in the integer arithmetic itself. int16 activations: each block's
    # largest value meets a zero weight, so that the sums stay that small.
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    bits = ACTIVATION_BITS[fmt]
    T, N = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 40))
    K = 32 * data.draw(st.integers(1, 8 if bits == 8 else 2))
    w = random_weight(rng, fmt, N, K, power_of_two=True)
    block = block_of(fmt, K)
    qmax = 2 ** (bits - 1) - 1
    q = rng.integers(-127, 128, (T, K)).astype(np.float32)
    q.reshape(T, K // block, block)[..., 0] = qmax                # so that max|x| / qmax is the scale
    if bits == 16:
        if fmt == "q8_0":
            w.qs.reshape(N, K // 32, 32)[..., 0] = 0
        else:                                                     # value 0 is the low nibble of byte 0
            w.qs.reshape(N, K // 32, 16)[..., 0] &= 0xF0
            if fmt == "q4_0":
                w.qs.reshape(N, K // 32, 16)[..., 0] |= 8         # q4_0's zero is 8
    x = q * np.float32(0.25)
    assert (quantize_activations(x, block, bits)[1] == 0.25).all()
    np.testing.assert_array_equal(cpu.linear(x, w), linear_int(x, w))


@INT_FORMATS
@FEW_EXAMPLES
@given(data=st.data())
def test_linear_int_matches_the_reference(fmt, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    T = data.draw(st.integers(1, intmatmul.INT_MAX_TOKENS.get(fmt, 40)))
    N, K = data.draw(st.integers(1, 70)), 32 * data.draw(st.integers(1, 12))
    w = random_weight(rng, fmt, N, K)
    x = (rng.standard_normal((T, K)) * rng.uniform(0.01, 10)).astype(np.float32)
    out = cpu.linear(x, w)
    assert_close(out, linear_int(x, w), scale=int_error_scale(x, w))
    # only the activations' rounding separates it from the exact product
    exact = get_ops("reference", exact=True).linear(x, w)
    half_steps = np.abs(w.dequantize()).astype(np.float64) @ np.repeat(
        quantize_activations(x, block_of(fmt, K), ACTIVATION_BITS[fmt])[1], block_of(fmt, K), axis=1).T.astype(np.float64) / 2
    assert (np.abs(out - exact) <= half_steps.T * 1.001 + 1e-4 * int_error_scale(x, w)).all()


@INT_FORMATS
def test_a_token_gets_the_same_bits_alone_and_in_a_batch(fmt):
    rng = np.random.default_rng(5)
    T = intmatmul.INT_MAX_TOKENS.get(fmt, 9)
    for N in (1, 2, 3, 5, 17, 64):
        w = random_weight(rng, fmt, N, 96 if fmt != "w8a8" else 128)
        x = rng.standard_normal((T, w.shape[1])).astype(np.float32)
        together = cpu.linear(x, w)
        for t in (0, T // 2, T - 1):
            np.testing.assert_array_equal(cpu.linear(x[t:t + 1], w)[0], together[t])


@pytest.mark.parametrize("fmt", list(intmatmul.INT_MAX_TOKENS))
def test_past_int_max_tokens_the_float_gemm_takes_over(fmt):
    rng = np.random.default_rng(8)
    w = random_weight(rng, fmt, 30, 64)
    x = rng.standard_normal((intmatmul.INT_MAX_TOKENS[fmt] + 1, 64)).astype(np.float32)
    np.testing.assert_array_equal(cpu.linear(x, w), get_ops("cpu", exact=True).linear(x, w))


@INT_FORMATS
def test_nan_in_x_reaches_exactly_its_row(fmt):
    rng = np.random.default_rng(6)
    w = random_weight(rng, fmt, 20, 64)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[2, 40] = np.nan
    out = cpu.linear(x, w)
    assert np.isnan(out[2]).all() and not np.isnan(out[[0, 1, 3]]).any()


@INT_FORMATS
def test_no_tokens_and_bad_shapes(fmt):
    w = random_weight(np.random.default_rng(0), fmt, 4, 64)
    assert cpu.linear(np.ones((0, 64), np.float32), w).shape == (0, 4)
    with pytest.raises(ValueError, match="linear"):
        cpu.linear(np.ones((2, 32), np.float32), w)


def test_exact_ops_keep_the_float_path():
    w = random_weight(np.random.default_rng(1), "q8_0", 8, 64)
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    exact = get_ops("cpu", exact=True)
    assert exact.exact and not cpu.exact and exact is not cpu and get_ops("cpu") is cpu
    assert_close(exact.linear(x, w), get_ops("reference", exact=True).linear(x, w), scale=np.abs(x).sum() * 13)
    assert not np.array_equal(exact.linear(x, w), cpu.linear(x, w))    # the activations' rounding shows


# ---------------------------------------------------------------- the plain bodies (NUMBA_DISABLE_JIT=1)

@pytest.mark.parametrize("fmt", FORMATS)
def test_plain_bodies_compute_the_same(fmt):
    rng = np.random.default_rng(7)
    N, K = 6, 64 if fmt != "w8a8" else 96
    w = random_weight(rng, fmt, N, K)
    x = rng.standard_normal((1, K)).astype(np.float32)
    nb, bits = w.d.shape[1], ACTIVATION_BITS[fmt]
    xq = np.empty((nb, K // nb), np.int8 if bits == 8 else np.int16)
    xd = np.empty(nb, np.float32)
    xsum = np.empty(nb, np.int32)
    qdot.quantize_row(x[0], np.float32(2 ** (bits - 1) - 1), xq, xd, xsum, 0, 1)     # plain Python
    expected = linear_int(x, w)[0]
    qs = w.blocks
    for n in range(0, N, 4):
        rows = [min(n + i, N - 1) for i in range(4)]
        if fmt in ("q8_0", "w8a8"):
            got = qdot.idot4_q8(xq, xd, qs, w.d, *rows, 0, 1)
        else:
            o, c = (w.m, 1.0) if fmt == "q4_1" else (w.d, -8.0)
            got = qdot.idot4_q4(xq, xd, xsum, qs, w.d, o, c, *rows, 0, 1)
        np.testing.assert_allclose(got, expected[rows], rtol=1e-5, atol=1e-5 * np.abs(expected).max())
