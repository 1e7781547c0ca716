"""linear, logits and embedding on every device, in every weight format, against the reference.

A weight in any format stands for a float32 matrix (xllm/weights.py), and the
reference operator is the float32 operator on that matrix. Weights come from
random floats: f32 as drawn, f16 by astype (or raw finite float16 bits,
subnormals included), the block formats by gguf's own quantizer
(`from_gguf`) or as raw random blocks (`quant_weights`).

  * linear and logits agree with the reference to within the rounding of a
    float32 dot product (`error_scale`); on a CUDA device also with the CPU;
  * embedding gives the rows exactly (quantized rows: `dequantize()`'s numbers);
  * bad token ids raise ValueError, bad logits rows IndexError, on every device;
  * NaN in x or in a weight row reaches exactly the outputs that meet it;
  * CPU only: every tile and block boundary of the GEMM, serial and parallel
    embedding, the many-token GEMM equal to the float32 GEMM on the converted
    weight, long rows, read-only (memory-mapped) weights.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.ops_helpers import (FEW_EXAMPLES, assert_close, cpu, device_params, dot_scale, f32_arrays, on,
                               parallel_flags, ref, serial_or_parallel, size, upload_weight)
from tests.test_quant import f16_scales, from_gguf
from xllm.weights import FORMATS, WEIGHT_FORMATS, QuantWeight

pytestmark = pytest.mark.gpu       # `pytest -m gpu` runs these on a GPU (README)

format_params = pytest.mark.parametrize("fmt", WEIGHT_FORMATS)


# ---------------------------------------------------------------- weights in every format

def as_format(values: np.ndarray, fmt: str):
    """float32 values [N, K] stored as `fmt` (K a multiple of 32 for the block formats)."""
    if fmt == "f32":
        return values
    if fmt == "f16":
        return values.astype(np.float16)
    return from_gguf(values, fmt)[0]


@st.composite
def quant_weights(draw, fmt, N, K):
    """A QuantWeight [N, K]: gguf-quantized random floats, or raw random blocks."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if draw(st.booleans()):
        values = (rng.standard_normal((N, K)) * rng.uniform(0.01, 2.0)).astype(np.float32)
        return from_gguf(values, fmt)[0]
    nb = 1 if fmt == "w8a8" else K // 32
    d = f16_scales(rng, (N, nb), -0.1, 0.1)
    if fmt in ("q8_0", "w8a8"):
        return QuantWeight(fmt, rng.integers(-128, 128, (N, K), dtype=np.int8), d)
    qs = rng.integers(0, 256, (N, K // 2), dtype=np.uint8)
    m = f16_scales(rng, (N, nb), -1.0, 1.0) if fmt == "q4_1" else None
    return QuantWeight(fmt, qs, d, m)


@st.composite
def weights(draw, fmt, N, K):
    """A weight [N, K] in format `fmt` (see the module docstring)."""
    if fmt in FORMATS:
        return draw(quant_weights(fmt, N, K))
    if fmt == "f16" and draw(st.booleans()):               # any finite float16, subnormals included
        rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
        bits = rng.integers(0, 0x7C00, (N, K)) | (rng.integers(0, 2, (N, K)) << 15)
        return bits.astype(np.uint16).view(np.float16)
    return as_format(draw(f32_arrays((N, K))), fmt)


def inner_sizes(device, fmt, n):
    """Row lengths K to draw: up to n for float formats; 1 to 10 blocks of 32 for the block
    formats (on the simulator up to 5, more and fewer than its 4 threads)."""
    if fmt in FORMATS:
        return st.integers(1, 5 if device == "cuda-sim" else 10).map(lambda b: 32 * b)
    return st.integers(1, size(device, n))


def float32_of(w) -> np.ndarray:
    return w.dequantize() if isinstance(w, QuantWeight) else np.asarray(w, np.float32)


def error_scale(x: np.ndarray, w) -> float:
    """The largest sum_k |x[t, k]| * (|d q| + |offset|)[n, k]: the size of the rounding errors.

    The one-token kernels compute d * sum(q x) + offset * sum(x) for every
    block, so their rounding error scales with the two parts separately, not
    with |d q + offset| (which may be much smaller when the two cancel). For
    float weights it is `dot_scale`.
    """
    if not isinstance(w, QuantWeight):
        return dot_scale(x, float32_of(w))
    N, K = w.shape
    if x.size == 0 or N == 0:
        return 0.0
    q = w.dequantize().astype(np.float64)
    if w.format == "q4_1":
        offset = np.repeat(w.m, 32, axis=1).astype(np.float64)
    elif w.format == "q4_0":
        offset = -8.0 * np.repeat(w.d, 32, axis=1).astype(np.float64)
    else:
        offset = np.zeros_like(q)
    return float((np.abs(x.astype(np.float64)) @ (np.abs(q - offset) + np.abs(offset)).T).max())


def random_x(rng, T, K, bound=4.0) -> np.ndarray:
    return rng.uniform(-bound, bound, (T, K)).astype(np.float32)


# ---------------------------------------------------------------- running with a weight

def run(device, op, *args):
    """ops.<op>(*args) on `device` (ops_helpers.on), every weight in its own format: `on`
    uploads numpy arrays (float32, float16) as they are, a QuantWeight goes up block by block."""
    return on(device, op, *[upload_weight(device, a) if isinstance(a, QuantWeight) else a for a in args])


def check(device, op, args, expected, compare):
    """Run op on device and compare with expected; on a CUDA device also with the CPU's output."""
    out = run(device, op, *args)
    compare(out, expected)
    if device != "cpu":
        compare(out, run("cpu", op, *args))
    return out


def exactly(actual, expected):
    assert actual.dtype == np.float32 and actual.shape == expected.shape
    np.testing.assert_array_equal(actual, expected)


# ---------------------------------------------------------------- linear and logits

@device_params
@format_params
@FEW_EXAMPLES
@given(data=st.data())
def test_linear(device, fmt, data):
    T, N = data.draw(st.integers(1, size(device, 70))), data.draw(st.integers(1, size(device, 110)))
    K = data.draw(inner_sizes(device, fmt, 200))
    w = data.draw(weights(fmt, N, K))
    x = data.draw(f32_arrays((T, K)))
    expected = ref.linear(x, w)
    out = check(device, "linear", (x, w), expected, lambda a, e: assert_close(a, e, scale=error_scale(x, w)))
    if device == "cpu" and T > 1 and fmt != "f32":
        # many tokens: the float32 GEMM on the converted rows, so exactly the float32 kernel's result
        np.testing.assert_array_equal(out, cpu.linear(x, float32_of(w)))


@device_params
@format_params
@FEW_EXAMPLES
@given(data=st.data())
def test_logits_of_selected_rows(device, fmt, data):
    T, V = data.draw(st.integers(1, size(device, 20))), data.draw(st.integers(1, size(device, 120)))
    D = data.draw(inner_sizes(device, fmt, 100))
    w = data.draw(weights(fmt, V, D))
    x = data.draw(f32_arrays((T, D)))
    rows = np.array(data.draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=T)), np.int32)
    out = check(device, "logits", (x, rows, w), ref.logits(x, rows, w),
                lambda a, e: assert_close(a, e, scale=error_scale(x, w)))
    assert out.shape == (len(rows), V)
    # and the reference really is the projection of those rows only
    np.testing.assert_allclose(ref.logits(x, rows, w), ref.linear(x, w)[rows], rtol=1e-6)


@device_params
@format_params
def test_linear_one_token_at_every_row_count(device, fmt):
    # The one-token kernels take rows in groups of four, a quarter of the matrix apart.
    rng = np.random.default_rng(3)
    counts = list(range(1, 18)) + [31, 33, 64, 99] if device != "cuda-sim" else list(range(1, 10)) + [17, 33]
    for N in counts:
        w = as_format(rng.standard_normal((N, 64)).astype(np.float32), fmt)
        x = random_x(rng, 1, 64)
        check(device, "linear", (x, w), ref.linear(x, w), lambda a, e: assert_close(a, e, scale=error_scale(x, w)))


@device_params
@format_params
def test_linear_rejects_mismatched_inner_dimension_and_takes_no_tokens(device, fmt):
    w = as_format(np.ones((4, 64), np.float32), fmt)
    with pytest.raises(ValueError, match="linear"):
        run(device, "linear", np.ones((2, 32), np.float32), w)
    assert run(device, "linear", np.ones((0, 64), np.float32), w).shape == (0, 4)


@device_params
@format_params
def test_logits_rejects_a_row_outside_x(device, fmt):
    w = as_format(np.ones((4, 64), np.float32), fmt)
    with pytest.raises(IndexError):
        run(device, "logits", np.ones((3, 64), np.float32), np.array([0, 3], np.int32), w)


@device_params
@format_params
@pytest.mark.parametrize("T", [1, 2, 7, 70])       # GEMV, leftover tokens, 4x3 tiles, two token blocks
def test_nan_reaches_exactly_the_affected_outputs(device, fmt, T):
    rng = np.random.default_rng(2)
    T = size(device, T)
    N, K = (50, 96) if device == "cpu" else (9, 64)
    x = random_x(rng, T, K)
    w = as_format(rng.standard_normal((N, K)).astype(np.float32), fmt)
    bad_row, bad_n = T // 2, N - 1
    x[bad_row, 5] = np.nan
    if isinstance(w, QuantWeight):
        w.d[bad_n, 0] = np.nan                           # a NaN scale: the whole block is NaN
    else:
        w[bad_n, 0] = np.nan
    out = run(device, "linear", x, w)
    assert np.isnan(out[bad_row]).all()                  # every row of w meets the NaN of x
    assert np.isnan(out[:, bad_n]).all()                 # every token meets the NaN of w
    ok = np.arange(T) != bad_row
    w_ok = w.rows(np.arange(bad_n)) if isinstance(w, QuantWeight) else w[:bad_n]
    assert_close(out[ok][:, :bad_n], ref.linear(x[ok], w_ok), scale=error_scale(x[ok], w_ok))
    assert np.isnan(run(device, "logits", x, np.array([bad_row], np.int32), w)).all()


# ---------------------------------------------------------------- embedding

@device_params
@format_params
@FEW_EXAMPLES
@given(data=st.data())
def test_embedding(device, fmt, data):
    V, T = data.draw(st.integers(1, size(device, 50))), data.draw(st.integers(0, size(device, 40)))
    D = data.draw(inner_sizes(device, fmt, 70))
    table = data.draw(weights(fmt, V, D))
    ids = np.array(data.draw(st.lists(st.integers(0, V - 1), min_size=T, max_size=T)), np.int32)
    with serial_or_parallel(data.draw(parallel_flags(device))):
        out = check(device, "embedding", (table, ids), ref.embedding(table, ids), exactly)
    np.testing.assert_array_equal(out, float32_of(table)[ids])


@device_params
@format_params
@pytest.mark.parametrize("bad_id", [-1, 5])
def test_embedding_rejects_ids_outside_the_table(device, fmt, bad_id):
    table = as_format(np.ones((5, 32), np.float32), fmt)
    for parallel in ([False, True] if device == "cpu" else [False]):
        with serial_or_parallel(parallel), pytest.raises(ValueError, match=rf"ids\[1\] = {bad_id} is not a row"):
            run(device, "embedding", table, np.array([0, bad_id], np.int32))
    with pytest.raises(ValueError):
        ref.embedding(table, np.array([0, bad_id], np.int32))


# ---------------------------------------------------------------- CPU only: tiles, jobs, memory maps

@format_params
def test_linear_at_every_tile_and_block_boundary(fmt):
    # Tokens go in tiles of 4 and blocks of 64, weight rows in tiles of 3 and blocks of 48.
    rng = np.random.default_rng(0)
    for T in (0, 1, 2, 3, 4, 5, 63, 64, 65, 131):
        for N in (1, 2, 3, 4, 47, 48, 49, 97):
            for K in ((0, 1, 8, 48, 67) if fmt in ("f32", "f16") else (32, 96)):
                x = rng.standard_normal((T, K), dtype=np.float32)
                w = as_format(rng.standard_normal((N, K), dtype=np.float32), fmt)
                assert_close(cpu.linear(x, w), ref.linear(x, w), scale=error_scale(x, w))


@format_params
def test_a_token_gets_the_same_bits_in_any_gemm(fmt):
    """With many tokens, a token's outputs do not depend on the others: tiles of
    four tokens and the leftover tokens sum each output in the same order.
    (`cpu` is the exact path; the integer one is tested in test_ops_intmatmul.py.)"""
    ops = cpu
    rng = np.random.default_rng(6)
    for K in (64, 96):
        x = rng.standard_normal((11, K)).astype(np.float32)
        w = as_format(rng.standard_normal((50, K)).astype(np.float32), fmt)
        full = ops.linear(x, w)
        for t0, t1 in [(0, 2), (3, 6), (5, 11), (10, 11)]:
            if t1 - t0 > 1:                       # one token alone takes the GEMV
                np.testing.assert_array_equal(ops.linear(x[t0:t1], w), full[t0:t1])


def test_linear_many_rows_and_long_rows():
    # Bigger than the hypothesis shapes: several GEMM jobs, long rows (fewer rows per job).
    rng = np.random.default_rng(4)
    for fmt, N, K, T in [("q4_1", 257, 576, 1), ("q4_1", 257, 576, 7), ("q8_0", 130, 4096, 5),
                         ("q4_0", 101, 3072, 1), ("q4_0", 101, 3072, 66), ("f16", 130, 4096, 1),
                         ("f16", 130, 4096, 5)]:
        w = as_format(rng.standard_normal((N, K)).astype(np.float32), fmt)
        x = random_x(rng, T, K)
        assert_close(cpu.linear(x, w), ref.linear(x, w), scale=error_scale(x, w))


@format_params
def test_read_only_weights_are_accepted(fmt):
    """Weights may come straight from a read-only memory map."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    w = as_format(rng.standard_normal((7, 64)).astype(np.float32), fmt)
    arrays = list(w.to_arrays().values()) if isinstance(w, QuantWeight) else [w]
    for a in arrays:
        a.setflags(write=False)
    for T in (5, 1):
        assert_close(cpu.linear(x[:T], w), ref.linear(x[:T], w), scale=error_scale(x[:T], w))
    rows = np.array([4], np.int32)
    assert_close(cpu.logits(x, rows, w), ref.logits(x, rows, w), scale=error_scale(x, w))
    np.testing.assert_array_equal(cpu.embedding(w, np.array([6, 0], np.int32)), float32_of(w)[[6, 0]])
