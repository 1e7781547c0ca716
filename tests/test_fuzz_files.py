"""Damaged model and tokenizer files give XllmErrors, never crashes, hangs or huge allocations.

Hypothesis drives the mutators of bench/fuzz_files.py (the one copy of them)
over a small real file of each format: a GGUF written by gguf's GGUFWriter, a
Hugging Face directory whose model.safetensors the `safetensors` library
wrote, its config.json, a llama2.c .bin, and Llama 2's SentencePiece
tokenizer.model cut to 300 pieces. Bits flipped, bytes overwritten, inserted
or deleted, length and count fields set to 2^31, 2^63-1 and the like, files
truncated: each damaged file must load or fail with an XllmError whose
message is one line. `python -m bench.fuzz_files` runs thousands more.

Each load runs under two bounds:
* memory: the address-space limit (RLIMIT_AS) is lowered to what this process
  uses plus 1 GiB, so an allocation sized from a damaged field fails the test
  as a MemoryError instead of passing slowly;
* time: hypothesis's deadline per example, and an alarm that turns a hang
  into a failure.

For safetensors, xllm's reader must also agree with the `safetensors` library
on every file: it accepts exactly the files the library accepts.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import struct
import time
from contextlib import contextmanager
from datetime import timedelta

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from bench.fuzz_files import (
    FORMATS,
    build_seeds,
    load,
    mutate,
    safetensors_verdicts,
    vm_size,
)
from xllm.errors import ModelFormatError, XllmError
from xllm.loader import load_checkpoint

from .conftest import shared_file

EXAMPLES = int(os.environ.get("XLLM_FUZZ_EXAMPLES", "200"))
HEADROOM = 1 << 30          # bytes of address space a load may add
HANG_SECONDS = 30


class HypothesisDraw:
    """The mutators' `draw.int(lo, hi)`, answered by hypothesis (so failures shrink)."""

    def __init__(self, data):
        self.data = data

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(st.integers(lo, hi))


@contextmanager
def bounded(headroom: int, seconds: int):
    """Address space limited to the current size + `headroom`; SIGALRM after `seconds`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_size() + headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)

    def hang(signum, frame):
        raise TimeoutError(f"a load took more than {seconds} s: a hang")

    previous = signal.signal(signal.SIGALRM, hang)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    """The seed file of every format but tokenizer.model (see `spm_seed`), loaded once each
    so that kernels are compiled and threads started before the memory limit."""
    built = build_seeds(tmp_path_factory.mktemp("fuzz"), [f for f in FORMATS if f != "tokenizer.model"])
    for seed in built.values():
        load(seed.load)
    return built


@pytest.fixture(scope="module")
def spm_seed(tmp_path_factory):
    shared_file("llama2-tokenizer.model")       # a skip naming the file when ../shared is absent
    seed = build_seeds(tmp_path_factory.mktemp("fuzz_spm"), ["tokenizer.model"])["tokenizer.model"]
    load(seed.load)
    return seed


@pytest.mark.parametrize("fmt", FORMATS)
def test_damaged_files_give_xllm_errors_only(fmt, request):
    seed = request.getfixturevalue("spm_seed") if fmt == "tokenizer.model" else request.getfixturevalue("seeds")[fmt]
    outcomes = {"accepted": 0, "XllmError": 0}

    @settings(max_examples=EXAMPLES, deadline=timedelta(seconds=5), database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def check(data):
        mutated, why = mutate(seed, HypothesisDraw(data))
        note(f"mutation: {why}")
        seed.path.write_bytes(mutated)
        signal.alarm(HANG_SECONDS)
        try:
            with np.errstate(all="ignore"):     # NaN scales in damaged weights are fine
                load(seed.load)
            outcomes["accepted"] += 1
        except XllmError as e:
            assert "\n" not in str(e), f"a multi-line message: {e}"
            outcomes["XllmError"] += 1
        finally:
            signal.alarm(0)
        if fmt == "safetensors":
            ours, theirs = safetensors_verdicts(seed.path)
            assert ours == theirs, f"xllm's reader accepts: {ours}, the safetensors library accepts: {theirs}"

    try:
        with bounded(HEADROOM, HANG_SECONDS):
            check()
    finally:
        seed.path.write_bytes(seed.data)
    # The mutations must do damage that is caught, not only damage that loads.
    assert outcomes["XllmError"] >= EXAMPLES // 2, outcomes


def test_the_seeds_load_and_the_limit_bites(seeds):
    """The undamaged seeds load under the limit, and the limit stops a 2 GiB allocation."""
    import numpy as np

    with bounded(HEADROOM, HANG_SECONDS):
        for seed in seeds.values():
            load(seed.load)
        with pytest.raises(MemoryError):
            np.ones(2 << 30, np.uint8)


# --------------------------------------------------------------------------------------------
# Each problem the probe of issue 11 found, reproduced


def _safetensors(tmp_path, header: str, data: bytes, length: int | None = None):
    raw = header.encode("utf-8", "surrogatepass")
    path = tmp_path / "t.safetensors"
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


T8 = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
WITH_X = T8[:-1] + ',"x":'  # tensor a with an unknown field "x" (ignored), whose value follows
TWO = '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}}'

# (case, header, data bytes, whether the safetensors library accepts it)
SAFETENSORS_CASES = [
    ("plain", T8 + "}", 8, True),
    ("padded header", T8 + "}      ", 8, True),
    ("header length 2 short", (T8 + "}  ", -2), 8, False),    # what left every tensor shifted
    ("header length 2 long", (T8 + "}", 2), 10, False),
    ("trailing bytes", T8 + "}", 12, False),
    ("overlapping", TWO % (4, 8), 8, False),
    ("gap", TWO % (12, 16), 16, False),
    ("tensors listed out of order", TWO.replace('"a"', '"z"') % (8, 12), 12, True),
    ("offsets not starting at 0", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', 8, False),
    ("end before begin", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}}', 8, False),
    ("wrong byte count", '{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', 8, False),
    ("shape product overflows", '{"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', 0,
     False),
    ("F4 half a byte", '{"a":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', 2, False),
    ("dtype xllm does not read", '{"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}', 8, True),
    ("unknown dtype", '{"a":{"dtype":"F24","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("negative zero offset", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[-0,8]}}', 8, False),
    ("float shape", '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', 8, False),
    ("three offsets", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', 8, False),
    ("list entry", '{"a":["F32",[2],[0,8]]}', 8, True),
    ("unknown field", WITH_X + '[-5,1.5,{}]}}', 8, True),
    ("repeated field", '{"a":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("repeated __metadata__", '{"__metadata__":{},"__metadata__":{}}', 0, False),
    ("__metadata__ not strings", '{"__metadata__":{"k":1}}', 0, False),
    ("__metadata__ null", '{"__metadata__":null}', 0, True),
    ("NaN", WITH_X + "NaN}}", 8, False),
    ("number beyond float", WITH_X + "1e999}}", 8, False),
    ("lone surrogate", '{"a\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', 8, False),
    ("127 levels", WITH_X + "[" * 125 + "]" * 125 + "}}", 8, True),
    ("128 levels", WITH_X + "[" * 126 + "]" * 126 + "}}", 8, False),
    ("5000 levels", "[" * 5000 + "]" * 5000, 0, False),
    ("not an object", "[]", 0, False),
    ("empty", "{}", 0, True),
]


@pytest.mark.parametrize("case, header, size, accepted", SAFETENSORS_CASES, ids=[c[0] for c in SAFETENSORS_CASES])
def test_safetensors_reader_follows_the_library(tmp_path, case, header, size, accepted):
    if isinstance(header, tuple):           # (header, error in the length prefix)
        header, delta = header
        path = _safetensors(tmp_path, header, bytes(size), len(header.encode()) + delta)
    else:
        path = _safetensors(tmp_path, header, bytes(size))
    ours, theirs = safetensors_verdicts(path)
    assert (ours, theirs) == (accepted, accepted)


def test_safetensors_header_a_few_bytes_short_is_refused_not_shifted(tmp_path):
    from .test_loaders import random_weights, tiny_config, write_hf

    cfg = tiny_config()
    write_hf(tmp_path / "hf", cfg, random_weights(cfg))
    st = tmp_path / "hf" / "model.safetensors"
    data = st.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert data[8 + n - 1:8 + n] == b" "     # padded: a header 1 byte short is still valid JSON
    st.write_bytes((n - 1).to_bytes(8, "little") + data[8:])
    with pytest.raises(ModelFormatError, match=f"expected {len(data) - 1} bytes, found {len(data)}"):
        load_checkpoint(tmp_path / "hf")


def _gguf_with(tmp_path, **patch):
    """The tiny GGUF of test_loaders with integer fields replaced: metadata keys
    by name, or "tensor_count" / "kv_count"."""
    from .test_loaders import random_weights, tiny_config, write_gguf

    cfg = tiny_config()
    path = tmp_path / "m.gguf"
    write_gguf(path, cfg, random_weights(cfg))
    data = bytearray(path.read_bytes())
    for key, value in patch.items():
        if key in ("tensor_count", "kv_count"):
            struct.pack_into("<Q", data, 8 if key == "tensor_count" else 16, value)
            continue
        raw = key.encode()
        at = data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw)
        (vtype,) = struct.unpack_from("<I", data, at)
        fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[vtype]
        struct.pack_into(fmt, data, at + 4, value)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("patch, fragments", [
    ({"llama.block_count": 2**31}, ["GGUF metadata: field llama.block_count", "1024", "found 2147483648"]),
    ({"llama.context_length": 2**32 - 1}, ["field llama.context_length", "found 4294967295"]),
    ({"llama.feed_forward_length": 2**31}, ["field llama.feed_forward_length", "found 2147483648"]),
    ({"tensor_count": 2**63 - 1}, ["field tensor count", f"found {2**63 - 1}"]),
    ({"kv_count": 2**64 - 1}, ["field metadata count", f"found {2**64 - 1}"]),
])
def test_gguf_huge_counts_fail_before_any_allocation(tmp_path, patch, fragments):
    import tracemalloc

    path = _gguf_with(tmp_path, **patch)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(ModelFormatError) as info:
        load_checkpoint(path)
    seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert seconds < 2 and peak < 50 << 20, (seconds, peak)


def test_gguf_huge_string_and_array_lengths(tmp_path):
    from .test_loaders import random_weights, tiny_config, write_gguf

    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg))
    data = (tmp_path / "m.gguf").read_bytes()
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key)           # then: u32 type ARRAY, u32 item type, u64 count, items
    for offset, value, fragment in [(8, 2**62, "array length"), (16, 2**64 - 1, "truncated GGUF file")]:
        damaged = bytearray(data)
        struct.pack_into("<Q", damaged, at + offset, value)   # the count, then the first string's length
        (tmp_path / "bad.gguf").write_bytes(bytes(damaged))
        with pytest.raises(ModelFormatError, match=fragment):
            load_checkpoint(tmp_path / "bad.gguf")


def test_gguf_overlapping_tensors_are_refused(tmp_path):
    from xllm.loader.gguf_file import read_gguf

    path = _gguf_with(tmp_path)
    _, infos, _, _ = read_gguf(path)
    data = bytearray(path.read_bytes())
    second = infos[1]
    name = second.name.encode()
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4 + 8 * len(second.shape) + 4
    assert struct.unpack_from("<Q", data, at)[0] == second.offset
    struct.pack_into("<Q", data, at, 0)       # the second tensor now lies on the first
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=f"tensor '{second.name}': data offset: expected {second.offset}"):
        load_checkpoint(path)


@pytest.mark.parametrize("field, value, fragment", [
    ("max_position_embeddings", 2**40, "field 'max_position_embeddings': expected an integer from 1 to 1048576"),
    ("num_hidden_layers", 2**31, "field 'num_hidden_layers': expected an integer from 1 to 1024"),
    ("rope_theta", 10**400, "field 'rope_theta': expected a finite number"),
    ("rms_norm_eps", 10**400, "field 'rms_norm_eps': expected a finite number"),
    ("num_attention_heads", 3, "expected a divisor of hidden_size=64"),
    ("num_key_value_heads", 3, "field 'num_key_value_heads': expected a divisor of n_heads=4, found 3"),
    ("vocab_size", 2**30, "field 'vocab_size': expected an integer from 1 to 16777216"),
    ("bos_token_id", 96, "field 'bos_token_id': expected token ids from 0 to vocab_size-1=95, found 96"),
])
def test_config_json_fields_are_checked_before_allocation(tmp_path, field, value, fragment):
    from .test_loaders import random_weights, tiny_config, write_hf

    cfg = tiny_config()
    write_hf(tmp_path / "hf", cfg, random_weights(cfg), config_overrides={field: value})
    with pytest.raises(ModelFormatError) as info:
        load_checkpoint(tmp_path / "hf")
    assert fragment in str(info.value) and "config.json" in str(info.value), str(info.value)


def test_weight_map_cannot_point_outside_the_directory(tmp_path):
    from .test_loaders import random_weights, tiny_config, write_hf

    cfg = tiny_config()
    d = write_hf(tmp_path / "hf", cfg, random_weights(cfg), shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../../etc/passwd"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelFormatError, match=r"weight_map\['lm_head.weight'\]: expected a file name"):
        load_checkpoint(d)


def test_llama2c_huge_seq_len(tmp_path):
    from convert.export_llama2c import export_llama2c

    from .test_loaders import random_weights, tiny_config, write_hf

    cfg = tiny_config()
    write_hf(tmp_path / "hf", cfg, random_weights(cfg))
    export_llama2c(load_checkpoint(tmp_path / "hf"), tmp_path / "m.bin")
    data = bytearray((tmp_path / "m.bin").read_bytes())
    struct.pack_into("<i", data, 24, 2**31 - 1)
    (tmp_path / "m.bin").write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="llama2.c header: field seq_len: expected an integer from 1 to "
                                               "1048576, found 2147483647"):
        load_checkpoint(tmp_path / "m.bin")


# --------------------------------------------------------------------------------------------
# A damaged prepared-weights cache is rebuilt, with one line on stderr


def _cut(path, keep):
    path.write_bytes(path.read_bytes()[:keep])


def _flip(path, at):
    data = bytearray(path.read_bytes())
    data[at] ^= 0x10
    path.write_bytes(bytes(data))


CACHE_DAMAGE = {
    "weights.bin cut short": lambda e: _cut(e / "weights.bin", 1000),
    "a bit of weights.bin flipped": lambda e: _flip(e / "weights.bin", 5000),
    "weights.bin missing": lambda e: (e / "weights.bin").unlink(),
    "model.json not JSON": lambda e: _cut(e / "model.json", 100),
    "model.json edited": lambda e: (e / "model.json").write_text(
        (e / "model.json").read_text().replace('"dim": 64', '"dim": 32')),
    "metadata.json edited": lambda e: _flip(e / "metadata.json", 50),
    "metadata.json missing": lambda e: (e / "metadata.json").unlink(),
    "an empty entry": lambda e: [f.unlink() for f in e.iterdir()],
}


@pytest.mark.parametrize("damage", CACHE_DAMAGE)
def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch, capsys, damage):
    from xllm.load import load_prepared
    from xllm.weights import is_quant

    from .test_loaders import random_weights, tiny_config, write_gguf

    def arrays(weights):
        return {(n, k): a for n, w in weights.items()
                for k, a in (w.to_arrays().items() if is_quant(w) else [("", w)])}

    monkeypatch.setenv("XLLM_CACHE", str(tmp_path / "cache"))
    cfg = tiny_config()
    write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), {"layers.0.wq": Q.Q8_0})
    config, weights, metadata, _ = load_prepared(tmp_path / "m.gguf")
    (entry,) = (tmp_path / "cache" / "prepared").iterdir()
    CACHE_DAMAGE[damage](entry)
    capsys.readouterr()

    config2, weights2, metadata2, kind = load_prepared(tmp_path / "m.gguf")
    err = capsys.readouterr().err
    assert err.startswith(f"xllm: the prepared-weights cache {entry} is damaged (") and \
        err.endswith("); rebuilding it\n") and err.count("\n") == 1, err
    assert (config2, metadata2, kind) == (config, metadata, "gguf")
    a, b = arrays(weights), arrays(weights2)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    load_prepared(tmp_path / "m.gguf")                  # the rebuilt entry is whole again
    assert capsys.readouterr().err == ""
    assert sorted(p.name for p in (tmp_path / "cache" / "prepared").iterdir()) == [entry.name]
