"""The row-wise operators (rmsnorm, rope, silu_mul, add) and split_qkv on every device.

Each test runs on every device of DEVICES against the numpy reference and, on
a CUDA device, against the CPU's output for the same inputs (`check_on`). The
CPU runs both its serial and its parallel drivers (`parallel_flags`,
`device_and_driver`). Last, the bound that kernels/expf.py states for
exp_nonpositive, with the body compiled for the CPU and for the GPU.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tests.ops_helpers import (DEVICES, EXAMPLES, FEW_EXAMPLES, assert_close, check_on, device_params, f32_arrays, on,
                               gpu_elementwise, parallel_flags, ref, serial_or_parallel, size)
from xllm.ops import get_ops
from xllm.ops.cpu.bodies import expf
from xllm.ops.cpu.common import FAST

pytestmark = pytest.mark.gpu       # `pytest -m gpu` runs these on a GPU (README)

# The CPU's serial and parallel drivers, and each other device once.
device_and_driver = pytest.mark.parametrize(
    "device, parallel", [(d, p) for d in DEVICES for p in ((False, True) if d == "cpu" else (False,))])

# expf.py's error bounds for exp_nonpositive: under the CPU kernels' fast-math
# flags LLVM merges the two parts of ln2 (3e-7 relative near -87, 1.3e-7 above
# -10); computed as written, as the simulator and a GPU do, it is under 1e-7.
EXP_BOUNDS = {"cpu": (3.2e-7, 1.3e-7)}           # (overall, x > -10); elsewhere (1e-7, 1e-7)


def exp_bounds(device):
    return EXP_BOUNDS.get(device, (1e-7, 1e-7))


def silu_close(actual, expected):
    assert_close(actual, expected, rtol=1e-6, scale=0.0)


# ---------------------------------------------------------------- rmsnorm

def rmsnorm_close(actual, expected):
    # Each output element is a few roundings away from the exact value.
    assert actual.dtype == np.float32
    np.testing.assert_allclose(actual, expected, rtol=2e-6, atol=1e-30)


@device_params
@EXAMPLES
@given(data=st.data(), eps=st.sampled_from([1e-6, 1e-5, 1e-2]))
def test_rmsnorm(device, data, eps):
    T, D = data.draw(st.integers(0, size(device, 30))), data.draw(st.integers(1, size(device, 300)))
    x = data.draw(f32_arrays((T, D)))
    w = data.draw(f32_arrays((D,)))
    with serial_or_parallel(data.draw(parallel_flags(device))):
        check_on(device, "rmsnorm", (x, w, eps), ref.rmsnorm(x, w, eps), rmsnorm_close)


@device_params
def test_rmsnorm_accepts_a_read_only_weight(device):
    """Weights may come straight from a read-only memory map."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    norm = rng.standard_normal(16).astype(np.float32)
    norm.setflags(write=False)
    np.testing.assert_allclose(on(device, "rmsnorm", x, norm, 1e-5), ref.rmsnorm(x, norm, 1e-5), rtol=2e-6)


# ---------------------------------------------------------------- rope

@device_params
@EXAMPLES
@given(data=st.data(), theta=st.sampled_from([10000.0, 100000.0, 500000.0]), P=st.integers(1, 4096))
def test_rope(device, data, theta, P):
    T, H = data.draw(st.integers(0, size(device, 12))), data.draw(st.integers(1, 5))
    hd = 2 * data.draw(st.integers(1, size(device, 64)))
    x = data.draw(f32_arrays((T, H, hd)))
    positions = np.array(data.draw(st.lists(st.integers(0, P - 1), min_size=T, max_size=T)), np.int32)
    cos, sin = ref.rope_tables(theta, hd, P)
    # |out| <= sqrt(2) * max|x|: two products and a sum, a few roundings each.
    scale = 4 * float(np.abs(x).max(initial=0))
    with serial_or_parallel(data.draw(parallel_flags(device))):
        check_on(device, "rope", (x, positions, cos, sin), ref.rope(x, positions, cos, sin),
                 lambda a, e: assert_close(a, e, rtol=1e-6, scale=scale))


@device_params
def test_rope_matches_hf_rotate_half(device):
    """The reference (and the device) against HF's formula: x * cos + rotate_half(x) * sin, full-width tables."""
    rng = np.random.default_rng(1)
    T, H, hd, theta = 7, 3, 16, 10000.0
    x = rng.standard_normal((T, H, hd)).astype(np.float32)
    positions = np.array([0, 1, 2, 100, 1000, 4095, 17], np.int32)
    inv_freq = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    emb = np.concatenate([np.outer(positions, inv_freq)] * 2, axis=-1)[:, None, :]   # [T, 1, hd]
    rotate_half = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], axis=-1)
    expected = x * np.cos(emb) + rotate_half * np.sin(emb)
    cos, sin = ref.rope_tables(theta, hd, 4096)
    assert cos.dtype == sin.dtype == np.float32 and cos.shape == (4096, hd // 2)
    np.testing.assert_allclose(ref.rope(x, positions, cos, sin), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ref.rope(x, np.zeros(T, np.int32), cos, sin), x)   # position 0: identity
    np.testing.assert_allclose(on(device, "rope", x, positions, cos, sin), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(on(device, "rope", x, np.zeros(T, np.int32), cos, sin), x)


@device_and_driver
@pytest.mark.parametrize("bad", [8, -1])
def test_rope_rejects_positions_past_the_tables(device, parallel, bad):
    cos, sin = ref.rope_tables(10000.0, 4, 8)
    x = np.ones((2, 1, 4), np.float32)
    with serial_or_parallel(parallel), pytest.raises(ValueError, match=rf"positions\[1\] = {bad} is outside the 8-"):
        on(device, "rope", x, np.array([0, bad], np.int32), cos, sin)
    np.testing.assert_array_equal(on(device, "rope", x, np.array([0, 7], np.int32), cos, sin),
                                  ref.rope(x, np.array([0, 7], np.int32), cos, sin))   # the error was cleared


# ---------------------------------------------------------------- silu_mul

@device_params
@EXAMPLES
@given(data=st.data())
def test_silu_mul(device, data):
    T, F = data.draw(st.integers(0, size(device, 20))), data.draw(st.integers(1, size(device, 200)))
    gate_up = data.draw(f32_arrays((T, 2 * F), bound=20.0))
    with serial_or_parallel(data.draw(parallel_flags(device))):
        check_on(device, "silu_mul", (gate_up,), ref.silu_mul(gate_up), silu_close)


@device_and_driver
def test_silu_mul_is_finite_for_extreme_gates(device, parallel):
    g = np.array([-3e38, -1e30, -1e4, -104.0, -88.8, -20.0, -1e-30, 0.0, 1e-30, 20.0, 88.8, 104.0,
                  1e4, 1e30, 3e38], np.float32)
    gate_up = np.concatenate([g, np.ones_like(g)])[None, :]
    with serial_or_parallel(parallel):
        out = on(device, "silu_mul", gate_up)
    assert np.isfinite(out).all()
    silu_close(out, ref.silu_mul(gate_up))


@device_and_driver
def test_nan_in_rmsnorm_and_silu_mul(device, parallel):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 10)).astype(np.float32)
    x[2, 3] = np.nan
    with serial_or_parallel(parallel):
        y = on(device, "rmsnorm", x, np.ones(10, np.float32), 1e-5)
        s = on(device, "silu_mul", x)                 # g = x[:, :5], u = x[:, 5:]
    assert np.isnan(y[2]).all() and np.isfinite(np.delete(y, 2, axis=0)).all()
    assert np.isnan(s[2, 3]) and np.isfinite(np.delete(s.ravel(), 2 * 5 + 3)).all()
    x[2, 3] = 1.0
    x[1, 7] = np.nan                                  # in u this time
    with serial_or_parallel(parallel):
        s = on(device, "silu_mul", x)
    assert np.isnan(s[1, 2]) and np.isfinite(np.delete(s.ravel(), 1 * 5 + 2)).all()


# ---------------------------------------------------------------- add

@device_params
@EXAMPLES
@given(data=st.data())
def test_add(device, data):
    shape = data.draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=size(device, 12)))
    x = data.draw(f32_arrays(shape))
    y = data.draw(f32_arrays(shape))
    with serial_or_parallel(data.draw(parallel_flags(device))):
        out = check_on(device, "add", (x, y), ref.add(x, y), np.testing.assert_array_equal)
    assert out.dtype == np.float32 and not np.shares_memory(out, x) and not np.shares_memory(out, y)


# ---------------------------------------------------------------- split_qkv

@device_params
@FEW_EXAMPLES
@given(data=st.data())
def test_split_qkv(device, data):
    T, hd = data.draw(st.integers(0, size(device, 10))), data.draw(st.integers(1, size(device, 16)))
    Hkv = data.draw(st.integers(1, 3))
    H = Hkv * data.draw(st.integers(1, 3))
    qkv = data.draw(f32_arrays((T, (H + 2 * Hkv) * hd)))
    ops = get_ops(device)
    q, k, v = (ops.download(a) for a in ops.split_qkv(ops.upload(qkv), H, Hkv, hd))
    n_q, n_k = H * hd, (H + Hkv) * hd
    for out, want in ((q, qkv[:, :n_q].reshape(T, H, hd)), (k, qkv[:, n_q:n_k].reshape(T, Hkv, hd)),
                      (v, qkv[:, n_k:].reshape(T, Hkv, hd))):
        assert out.dtype == np.float32 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, want)


# ---------------------------------------------------------------- shapes are checked alike

@device_params
def test_bad_shapes_are_rejected_with_the_same_message(device):
    cos, sin = ref.rope_tables(10000.0, 4, 8)
    bad_calls = [
        ("add", (np.ones((2, 3), np.float32), np.ones((3, 2), np.float32)), "add: shapes differ"),
        ("silu_mul", (np.ones((2, 3), np.float32),), r"silu_mul: need gate_up \[T, 2F\], got \(2, 3\)"),
        ("rope", (np.ones((2, 1, 6), np.float32), np.zeros(2, np.int32), cos, sin), r"rope: need x \[T, H, hd\]"),
        ("rope", (np.ones((2, 1, 4), np.float32), np.zeros(3, np.int32), cos, sin), r"rope: need x \[T, H, hd\]"),
        ("split_qkv", (np.ones((2, 11), np.float32), 1, 1, 4), r"split_qkv: need qkv .* = \[T, 12\], got \(2, 11\)"),
    ]
    for op, args, message in bad_calls:
        with pytest.raises(ValueError, match=message):
            on(device, op, *args)


# ---------------------------------------------------------------- exp for softmax and SiLU

@numba.njit(fastmath=FAST)
def _exp_loop(x, out):
    """exp_nonpositive over an array, compiled as the CPU kernels use it (fast-math, SIMD)."""
    for i in range(x.shape[0]):
        out[i] = expf.exp_nonpositive(x[i])


def exp_on(device, x):
    """exp_nonpositive of every element of x (float32 [n]), computed on `device`."""
    if device == "cpu":
        out = np.empty_like(x)
        _exp_loop(x, out)
        return out
    return gpu_elementwise(device, "expf", "exp_nonpositive", x, np.float32)


@device_params
def test_exp_nonpositive_is_within_its_stated_error(device):
    n = 400_001 if device == "cpu" else 20_001         # the simulator runs each exp as Python
    x = np.concatenate([np.linspace(-87.0, 0.0, n, dtype=np.float32),
                        -np.abs(np.random.default_rng(0).standard_normal(n // 4).astype(np.float32)),
                        np.array([0.0, -0.0, -1e-30, -1e-45], np.float32)])
    out = exp_on(device, x)
    exact = np.exp(x.astype(np.float64))
    rel = np.abs(out - exact) / exact
    overall, above_minus_10 = exp_bounds(device)
    assert rel.max() < overall                       # the bound expf.py states near -87 (3.2e-7)
    assert rel[x > -10].max() < above_minus_10       # and about 1 ulp for x > -10 (1.3e-7)
    assert (out[x == 0] == 1.0).all()


@device_params
def test_exp_nonpositive_underflows_to_zero_and_keeps_nan(device):
    x = np.array([-87.01, -100.0, -1e30, -np.inf, np.nan], np.float32)
    with warnings.catch_warnings():                  # the simulator's numpy scalars warn about inf - inf
        warnings.simplefilter("ignore", RuntimeWarning)
        out = exp_on(device, x)
    assert out[:4].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert np.isnan(out[4])
