"""The whole model on every device: the tiny random Llama (`xllm.testing`) runs
unchanged on cpu, reference and the CUDA device (the simulator in CI), and
gives the same greedy tokens and, to rounding, the same logits everywhere.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.ops_helpers import CUDA_DEVICE
from xllm.engine import LLM
from xllm.kv_cache import KVCache
from xllm.model import Batch
from xllm.ops import available_devices, get_ops
from xllm.sampling import SamplingParams
from xllm.testing import greedy, tiny_llama

PROMPT = [1, 17, 4, 63, 29, 8]
needs_cuda = pytest.mark.skipif(CUDA_DEVICE is None, reason="numba-cuda is not installed (CI installs it)")


def prompt_logits(model, kv_dtype="fp32") -> np.ndarray:
    """Logits after every prefix of PROMPT, from one prefill step on a fresh cache."""
    cache = KVCache(model.config, num_blocks=4, block_size=4, kv_dtype=kv_dtype, device=model.device)
    batch = Batch.build(cache, [(0, PROMPT)])
    return model.forward(batch, cache, np.arange(len(PROMPT)))


# How far two devices' logits may be apart, relative to the largest. In a
# narrow KV cache, a key or value whose float32 value differs in the last bits
# between the devices (their sums run in different orders) can round to the
# neighbouring float16 or int8 step: a whole step of difference (2^-11
# relative for float16, 1/254 of the head's largest for int8), which the
# later layers carry on.
LOGIT_ATOL = {"fp32": 2e-5, "fp16": 1e-3, "int8": 1e-2}


def assert_same_model_output(a, b, kv_dtype="fp32", n=6):
    """The same logits to rounding for every prefix of PROMPT, and (n > 0) the same n greedy tokens."""
    la, lb = prompt_logits(a, kv_dtype), prompt_logits(b, kv_dtype)
    np.testing.assert_allclose(lb, la, rtol=0, atol=LOGIT_ATOL[kv_dtype] * float(np.abs(la).max()))
    if n:
        assert greedy(b, PROMPT, n, kv_dtype) == greedy(a, PROMPT, n, kv_dtype)


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("weight_format", ["f32", "f16", "q8_0", "q4_0", "q4_1", "w8a8"])
def test_tiny_model_agrees_between_cpu_and_the_cuda_device(weight_format):
    # The GPU multiplies every format in float32 (its integer kernels are still
    # to come), so it is compared with the CPU's exact path.
    assert_same_model_output(tiny_llama(get_ops("cpu", exact=True), weight_format=weight_format),
                             tiny_llama(CUDA_DEVICE, weight_format=weight_format))


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", ["fp16", "int8"])
def test_tiny_model_agrees_between_cpu_and_the_cuda_device_with_a_narrow_kv_cache(kv_dtype):
    assert_same_model_output(tiny_llama("cpu"), tiny_llama(CUDA_DEVICE), kv_dtype)


@needs_cuda
@pytest.mark.gpu
def test_float32_weights_go_to_the_gpu_as_float16_unless_f32():
    narrow, wide = tiny_llama(CUDA_DEVICE, f32=False), tiny_llama(CUDA_DEVICE, f32=True)
    assert narrow.w["layers.0.wqkv"].dtype == np.float16 and wide.w["layers.0.wqkv"].dtype == np.float32
    assert narrow.w["norm"].dtype == np.float32
    # the tiny model's weights are exact in float16, so storing them narrower changes nothing
    assert_same_model_output(wide, narrow, n=0)


@needs_cuda
@pytest.mark.gpu
def test_the_engine_runs_unchanged_on_the_cuda_device():
    """Continuous batching with a chunked prompt: three requests, tokens equal to the CPU's."""
    prompts = [PROMPT, [1, 3], [1, 90, 44, 12, 7, 19, 21, 5, 66]]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = {}
    for device in ("cpu", CUDA_DEVICE):
        llm = LLM(tiny_llama(device), block_size=4, kv_cache_bytes=1 << 20, max_num_seqs=4, max_num_batched_tokens=8)
        assert llm.cache.ops is llm.model.ops
        outs[device] = [o.token_ids for o in llm.generate(prompts, params)]
        assert llm.scheduler_stats.steps >= 5               # the 9-token prompt took two chunks of <= 8 rows
    assert outs[CUDA_DEVICE] == outs["cpu"]


def test_the_reference_device_runs_the_model_too():
    # Exact paths on both: the CPU's integer kernels take only a few tokens at a
    # time (cpu/intmatmul.py), while the reference's linear_int takes every call.
    assert_same_model_output(tiny_llama(get_ops("cpu", exact=True), weight_format="q4_1"),
                             tiny_llama(get_ops("reference", exact=True), weight_format="q4_1"), "int8")


def test_the_kv_cache_lives_on_the_model_device():
    for device in ["cpu"] + ([CUDA_DEVICE] if CUDA_DEVICE else []):
        ops = get_ops(device)
        cache = KVCache(tiny_llama(device).config, num_blocks=3, block_size=4, kv_dtype="int8", device=device)
        assert cache.ops is ops and type(cache.k[1]) is type(ops.zeros(1, np.int8))
        assert cache.pool_bytes == 2 * 2 * 12 * 2 * 16 * 1 + 2 * 2 * 12 * 2 * 4   # L=2, S=12, Hkv=2, hd=16
        assert ops.download(cache.k_scale[1]).shape == (12, 2)


@pytest.mark.skipif("cuda" in available_devices(), reason="a GPU works here: --device cuda is not an error")
def test_asking_for_a_missing_gpu_is_a_one_line_error():
    run = subprocess.run([sys.executable, "-m", "xllm.main", "--device", "cuda", "-p", "hi"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xllm: error: device cuda: "), run.stderr
