"""Fuzz the model and tokenizer readers: a damaged file must be one XllmError, never a crash.

    python -m bench.fuzz_files                      # 2000 mutated files per format
    python -m bench.fuzz_files -n 200 --formats gguf safetensors --timeout 20

Each format starts from a small real file, written into a temporary directory:

    gguf             a tiny random Llama (xllm.testing's config) written by gguf's GGUFWriter,
                     matrices F32, Q8_0 and Q4_1, a 96-token gpt2 tokenizer in its metadata
    safetensors      the same model as a Hugging Face directory, its model.safetensors
                     written by the `safetensors` library
    config.json      that directory's config.json
    llama2c          the same model in llama2.c's legacy .bin layout
    tokenizer.model  ../shared/data/llama2-tokenizer.model cut to its first 300 pieces
                     (trainer and normalizer specs kept), so that a load takes milliseconds

Each example mutates the file 1 to 3 times (`mutate`): a bit flipped or a byte
overwritten, mostly in the header; a length, count, dimension or offset field
set to a huge or off-by-one value (2^31, 2^32-1, 2^63-1, 2^64-1, ...); bytes
inserted or deleted; the file truncated; a number of a JSON text (config.json,
the safetensors header) replaced, the safetensors length prefix kept
consistent so that the edit reaches the offset checks. The file is then
loaded (`xllm.load.load_model(..., use_cache=False)`, or
`xllm.tokenizer.load_tokenizer`) in a worker process whose address space is
limited to what it used after a warm-up load plus 1 GiB (RLIMIT_AS): an
allocation sized from a damaged field fails there as a MemoryError. Outcomes:

    accepted    the load succeeded (the damage hit a weight, a score or a name)
    XllmError   refused with one message naming the problem: the goal
    other       any other exception, MemoryError included: a bug (first tracebacks printed)
    hang        no answer within --timeout seconds: a bug
    crash       the worker died: a bug

For safetensors the `safetensors` library reads each file too, and `disagree`
counts the files one of the two accepts and the other refuses (xllm's reader
follows the library's rules, so it should be 0). tests/test_fuzz_files.py
runs the same mutators under hypothesis.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import re
import resource
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LLAMA2_TOKENIZER = REPO.parent / "shared" / "data" / "llama2-tokenizer.model"
FORMATS = ("gguf", "safetensors", "config.json", "llama2c", "tokenizer.model")

# Values a damaged length or count field takes: limits of the integer types and near misses.
HUGE = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


# --------------------------------------------------------------------------------------------
# The seed files


@dataclass
class Seed:
    """One format's original file and what the mutators need to know about it."""

    name: str
    path: Path                # where each mutated version is written (and loaded from)
    data: bytes               # the original bytes
    header: int               # bytes [0, header) are the header: most mutations land there
    fields: list = field(default_factory=list)   # (offset, width, kind) of numeric fields
    load: tuple = ()          # ("model", path, tokenizer_path) or ("tokenizer", path)


def _tiny_gguf(path: Path, config, weights) -> None:
    import gguf
    import numpy as np

    from xllm.loader.gguf_file import gguf_name
    from xllm.loader.layout import rope_rows_to_pairs

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("fuzz seed")
    w.add_block_count(config.n_layers)
    w.add_context_length(config.context_length)
    w.add_embedding_length(config.dim)
    w.add_feed_forward_length(config.hidden_dim)
    w.add_head_count(config.n_heads)
    w.add_head_count_kv(config.n_kv_heads)
    w.add_rope_freq_base(config.rope_theta)
    w.add_layer_norm_rms_eps(config.rms_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"tok{i}" for i in range(config.vocab_size)])
    w.add_token_types([1] * config.vocab_size)
    w.add_token_merges(["t o", "to k"])
    w.add_bos_token_id(config.bos_id)
    w.add_eos_token_id(config.eos_ids[0])
    types = {"wq": gguf.GGMLQuantizationType.Q8_0, "w_up": gguf.GGMLQuantizationType.Q4_1}
    for name, value in weights.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("wq", "wk"):       # llama.cpp stores q/k rows in adjacent-pair RoPE order
            heads = config.n_heads if kind == "wq" else config.n_kv_heads
            value = rope_rows_to_pairs(value, heads, config.head_dim)
        if kind in types:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(value, types[kind]), raw_dtype=types[kind])
        else:
            w.add_tensor(gguf_name(name), value.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_fields(data: bytes) -> tuple[list, int]:
    """(offset, width, kind) of every integer field of a GGUF header, and where its data starts.

    kind: "version", "count", "length", "type", "dim", "offset", "value", or
    "config" for the integer values of llama.* and general.* keys (layer count,
    widths, context length...), so that mutations reach them as often as counts."""
    fields, pos = [], 4
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def take(width: int, kind: str) -> int:
        nonlocal pos
        fields.append((pos, width, kind))
        pos += width
        return int.from_bytes(data[pos - width:pos], "little")

    def value(vtype: int, kind: str) -> None:
        nonlocal pos
        if vtype in sizes:
            take(sizes[vtype], kind)
        elif vtype == 8:
            n = take(8, "length")       # (not `pos += take(...)`: that adds to the old pos)
            pos += n
        else:
            itype, count = take(4, "type"), take(8, "count")
            for _ in range(count):
                value(itype, "value")

    take(4, "version")
    n_tensors, n_kv = take(8, "count"), take(8, "count")
    for _ in range(n_kv):
        n = take(8, "length")
        key = data[pos:pos + n]
        pos += n
        value(take(4, "type"), "config" if key.startswith((b"llama.", b"general.")) else "value")
    for _ in range(n_tensors):
        n = take(8, "length")
        pos += n
        for _ in range(take(4, "count")):
            take(8, "dim")
        take(4, "type")
        take(8, "offset")
    return fields, -(-pos // 32) * 32


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append(value & 0x7F | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _proto_fields(data: bytes, start: int = 0, end: int | None = None, fields=None) -> list:
    """(offset, width, "varint") of every key, length and varint value of a protobuf message,
    nested messages included (a length-delimited field is tried as a message)."""
    from xllm.tokenizer.spm_model import _varint as read_varint

    fields = [] if fields is None else fields
    pos, end = start, len(data) if end is None else end
    while pos < end:
        key_at = pos
        key, pos = read_varint(data, pos)
        fields.append((key_at, pos - key_at, "varint"))
        wire = key & 7
        if wire in (0, 2):
            at = pos
            value, pos = read_varint(data, pos)
            fields.append((at, pos - at, "varint"))
            if wire == 2:
                try:
                    _proto_fields(data, pos, pos + value, nested := [])
                    fields += nested
                except ValueError:
                    pass        # a string, not a message
                pos += value
        else:
            pos += 4 if wire == 5 else 8
    return fields


def _small_spm_model(source: Path, pieces: int = 300) -> bytes:
    """A real tokenizer.model with only its first `pieces` pieces."""
    from xllm.tokenizer.spm_model import iter_fields

    out, kept = bytearray(), 0
    for number, wire, value in iter_fields(source.read_bytes()):
        if number == 1 and wire == 2:
            kept += 1
            if kept > pieces:
                continue
        assert wire == 2, "ModelProto's top-level fields are all messages"
        out += _varint(number << 3 | wire) + _varint(len(value)) + value
    return bytes(out)


def build_seeds(directory: Path, formats=FORMATS) -> dict[str, Seed]:
    """The seed file of each format, written under `directory`."""
    import numpy as np
    import safetensors.numpy

    from convert.export_llama2c import export_llama2c
    from xllm.loader import load_checkpoint
    from xllm.loader.hf import hf_name
    from xllm.testing import tiny_config, tiny_weights

    directory.mkdir(parents=True, exist_ok=True)
    config = tiny_config()
    weights = tiny_weights(config)
    tokenizer = directory / "tokenizer.gguf"              # pristine: the tokenizer of the other formats
    _tiny_gguf(tokenizer, config, weights)
    seeds = {}

    data = tokenizer.read_bytes()
    fields, data_start = _gguf_fields(data)
    seeds["gguf"] = Seed("gguf", directory / "model.gguf", data, data_start, fields,
                         ("model", str(directory / "model.gguf"), None))

    def hf_dir(name: str) -> Path:
        d = directory / name
        d.mkdir(exist_ok=True)
        raw = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
               "num_hidden_layers": config.n_layers, "hidden_size": config.dim,
               "intermediate_size": config.hidden_dim, "num_attention_heads": config.n_heads,
               "num_key_value_heads": config.n_kv_heads, "vocab_size": config.vocab_size,
               "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_eps,
               "max_position_embeddings": config.context_length, "tie_word_embeddings": False,
               "bos_token_id": config.bos_id, "eos_token_id": config.eos_ids[0]}
        (d / "config.json").write_text(json.dumps(raw, indent=2))
        safetensors.numpy.save_file({hf_name(n): np.ascontiguousarray(w) for n, w in weights.items()},
                                    str(d / "model.safetensors"), metadata={"format": "pt"})
        return d

    d = hf_dir("hf_safetensors")
    data = (d / "model.safetensors").read_bytes()
    seeds["safetensors"] = Seed("safetensors", d / "model.safetensors", data,
                                8 + int.from_bytes(data[:8], "little"), [(0, 8, "length")],
                                ("model", str(d), str(tokenizer)))
    d = hf_dir("hf_config")
    data = (d / "config.json").read_bytes()
    seeds["config.json"] = Seed("config.json", d / "config.json", data, len(data), [],
                                ("model", str(d), str(tokenizer)))
    export_llama2c(load_checkpoint(d), directory / "model.bin")
    data = (directory / "model.bin").read_bytes()
    seeds["llama2c"] = Seed("llama2c", directory / "model.bin", data, 28, [(4 * i, 4, "dim") for i in range(7)],
                            ("model", str(directory / "model.bin"), str(tokenizer)))
    if "tokenizer.model" in formats:
        if not LLAMA2_TOKENIZER.exists():
            raise FileNotFoundError(f"{LLAMA2_TOKENIZER} is absent (it comes with ../shared)")
        data = _small_spm_model(LLAMA2_TOKENIZER)
        seeds["tokenizer.model"] = Seed("tokenizer.model", directory / "tokenizer.model", data, len(data),
                                        _proto_fields(data), ("tokenizer", str(directory / "tokenizer.model")))
    for seed in seeds.values():
        seed.path.write_bytes(seed.data)
    return {name: seeds[name] for name in formats}


# --------------------------------------------------------------------------------------------
# Mutators: `draw.int(lo, hi)` picks every choice (random.Random here, hypothesis in the test)


class RandomDraw:
    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.rng.randint(lo, hi)


def _position(draw, data: bytes, header: int) -> int:
    """A byte position: in the header 7 times in 8, anywhere otherwise."""
    limit = min(header, len(data)) if draw.int(0, 7) else len(data)
    return draw.int(0, max(limit - 1, 0))


_NUMBER = re.compile(rb"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_TEXT_VALUES = (b"-1", b"0", b"1.5", b"1e400", b"NaN", b"null", b'"x"', b"true", b"[]",
                b"18446744073709551616", b"-0", b"1e-400", b"9" * 400)


def _set_number(draw, text: bytes) -> tuple[bytes, str]:
    """Replace one number of a JSON text by an interesting value."""
    numbers = list(_NUMBER.finditer(text))
    if not numbers:
        return text, "no number"
    m = numbers[draw.int(0, len(numbers) - 1)]
    old = int(float(m.group())) if abs(float(m.group())) < 1e18 else 0
    choices = [str(v).encode() for v in HUGE + (old + 1, old - 1, old * 2, old + 8)] + list(_TEXT_VALUES)
    new = choices[draw.int(0, len(choices) - 1)]
    return text[:m.start()] + new + text[m.end():], f"number {m.group()[:20]!r} at {m.start()} -> {new[:20]!r}"


def _edit(draw, data: bytes, header: int) -> tuple[bytes, str]:
    """One byte-level edit of `data` (positions biased to [0, header))."""
    kind = draw.int(0, 5)
    pos = _position(draw, data, header)
    if kind == 0 and pos < len(data):
        bit = draw.int(0, 7)
        return data[:pos] + bytes([data[pos] ^ (1 << bit)]) + data[pos + 1:], f"bit {bit} of byte {pos} flipped"
    if kind == 1 and pos < len(data):
        value = draw.int(0, 255)
        return data[:pos] + bytes([value]) + data[pos + 1:], f"byte {pos} set to {value}"
    if kind == 2:
        n = draw.int(1, 16)
        value = draw.int(0, 255)
        return data[:pos] + bytes([value]) * n + data[pos:], f"{n} bytes {value} inserted at {pos}"
    if kind == 3:
        n = draw.int(1, 16)
        return data[:pos] + data[pos + n:], f"{n} bytes deleted at {pos}"
    if kind == 4:
        return data[:pos], f"truncated to {pos} bytes"
    return _set_number(draw, data)


def _set_field(draw, seed: Seed, data: bytes) -> tuple[bytes, str]:
    """Set one integer field of the header to a huge or off-by-one value."""
    kinds = sorted({k for _, _, k in seed.fields})
    kind = kinds[draw.int(0, len(kinds) - 1)]
    candidates = [f for f in seed.fields if f[2] == kind]
    offset, width, kind = candidates[draw.int(0, len(candidates) - 1)]
    if offset + width > len(data):
        return data, "field beyond the end"
    if kind == "varint":
        from xllm.tokenizer.spm_model import _varint as read_varint
        try:
            old, _ = read_varint(data, offset)
        except ValueError:
            return data, "damaged varint"
    else:
        old = int.from_bytes(data[offset:offset + width], "little")
    values = HUGE + (old + 1, old - 1, old * 2, len(data), len(data) - offset)
    new = values[draw.int(0, len(values) - 1)] % (1 << 64)
    if kind == "varint":
        raw = _varint(new)
    else:
        raw = (new % (1 << 8 * width)).to_bytes(width, "little")
    return data[:offset] + raw + data[offset + width:], f"{kind} field at {offset} ({old}) set to {new}"


def _safetensors_text(draw, seed: Seed, data: bytes) -> tuple[bytes, str]:
    """Edit the JSON header of a safetensors file as text and fix its length prefix."""
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 or 8 + n > len(data):
        return data, "no header to edit"
    text, why = _edit(draw, data[8:8 + n], n) if draw.int(0, 2) == 0 else _set_number(draw, data[8:8 + n])
    return len(text).to_bytes(8, "little") + text + data[8 + n:], f"header text: {why}"


def _byte_edit(draw, seed: Seed, data: bytes) -> tuple[bytes, str]:
    return _edit(draw, data, seed.header)


def _number_edit(draw, seed: Seed, data: bytes) -> tuple[bytes, str]:
    return _set_number(draw, data)


# Per format, the mutators to choose from (a repeat makes one likelier): field edits for
# binary headers, number edits for JSON, so that damage reaches the checks after parsing.
_MUTATORS = {
    "gguf": (_set_field, _set_field, _byte_edit),
    "safetensors": (_set_field, _safetensors_text, _safetensors_text, _safetensors_text, _byte_edit),
    "config.json": (_number_edit, _number_edit, _byte_edit),
    "llama2c": (_set_field, _byte_edit),
    "tokenizer.model": (_set_field, _byte_edit),
}


def mutate(seed: Seed, draw) -> tuple[bytes, str]:
    """The seed's bytes with 1 to 3 mutations, and a description of them."""
    data, done = seed.data, []
    choices = _MUTATORS[seed.name]
    for _ in range(draw.int(1, 3)):
        data, why = choices[draw.int(0, len(choices) - 1)](draw, seed, data)
        done.append(why)
    return data, "; ".join(done)


# --------------------------------------------------------------------------------------------
# Loading a mutated file


def load(spec: tuple) -> None:
    """Load what `Seed.load` describes (raises whatever the loader raises)."""
    if spec[0] == "model":
        from xllm.load import load_model
        load_model(spec[1], spec[2], use_cache=False)
    else:
        from xllm.tokenizer import load_tokenizer
        load_tokenizer(spec[1])


def safetensors_verdicts(path) -> tuple[bool, bool]:
    """(xllm's reader accepts `path`, the safetensors library accepts it)."""
    from safetensors import safe_open

    from xllm.errors import ModelFormatError
    from xllm.loader.safetensors_file import SafetensorsFile

    try:
        SafetensorsFile(path)
        ours = True
    except ModelFormatError:
        ours = False
    try:
        with safe_open(str(path), "np") as f:
            f.keys()
        theirs = True
    except Exception:       # noqa: BLE001 - the library raises SafetensorError, or others on odd input
        theirs = False
    return ours, theirs


def vm_size() -> int:
    """This process's virtual memory size in bytes (what RLIMIT_AS limits)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def _worker(conn, warm_up: list, headroom: int) -> None:
    """Load files on request: ("spec", compare_with_safetensors) -> (outcome, detail, peak RSS in KiB)."""
    import warnings

    from xllm.errors import XllmError

    warnings.simplefilter("ignore")             # NaN scales in damaged weights: numpy's warnings are noise here
    for spec in warm_up:                        # compile the kernels, start the threads
        load(spec)
    base = vm_size()
    if headroom:
        resource.setrlimit(resource.RLIMIT_AS, (base + headroom, resource.getrlimit(resource.RLIMIT_AS)[1]))
    conn.send(("ready", base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    while True:
        spec, compare = conn.recv()
        verdicts = safetensors_verdicts(spec[1] + "/model.safetensors") if compare else None
        try:
            load(spec)
            outcome, detail = "accepted", ""
        except XllmError as e:
            outcome, detail = "XllmError", str(e)
        except Exception:           # noqa: BLE001 - a bug we count and show
            outcome, detail = "other", traceback.format_exc()
        conn.send((outcome, detail, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, verdicts))


class Worker:
    """A worker process, restarted after a hang or a crash."""

    def __init__(self, warm_up: list, headroom: int):
        self.warm_up, self.headroom, self.proc = warm_up, headroom, None

    def start(self) -> tuple[int, int]:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.warm_up, self.headroom), daemon=True)
        self.proc.start()
        if not self.conn.poll(300):
            raise RuntimeError("the fuzz worker did not start within 300 s")
        _, vm, rss = self.conn.recv()
        return vm, rss

    def run(self, spec, compare: bool, timeout: float):
        self.conn.send((spec, compare))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            outcome = "crash"
        else:
            outcome = "hang"
        exitcode = self.stop()
        return outcome, f"worker exit code {exitcode}", 0, None

    def stop(self):
        self.proc.kill()
        self.proc.join()
        return self.proc.exitcode


def fuzz(seed: Seed, n: int, timeout: float, headroom: int, warm_up: list, first_seed: int = 0) -> dict:
    """Load `n` mutations of `seed` in a worker; return the counts and the first examples of each bug."""
    worker = Worker(warm_up, headroom)
    vm, rss0 = worker.start()
    counts = dict.fromkeys(("accepted", "XllmError", "other", "hang", "crash"), 0)
    counts["disagree"] = 0
    shown: list[str] = []
    peak, start = rss0, time.perf_counter()
    compare = seed.name == "safetensors"
    for i in range(n):
        data, why = mutate(seed, RandomDraw(first_seed + i))
        seed.path.write_bytes(data)
        outcome, detail, rss, verdicts = worker.run(seed.load, compare, timeout)
        counts[outcome] += 1
        peak = max(peak, rss)
        if outcome in ("other", "hang", "crash") and len(shown) < 3:
            shown.append(f"[{seed.name} example {first_seed + i}: {why}]\n{outcome}: {detail}")
        if verdicts is not None and verdicts[0] != verdicts[1]:
            counts["disagree"] += 1
            if len(shown) < 6:
                shown.append(f"[{seed.name} example {first_seed + i}: {why}] xllm accepts: {verdicts[0]}, "
                             f"safetensors accepts: {verdicts[1]}")
        if outcome in ("hang", "crash"):
            worker.start()
    worker.stop()
    seed.path.write_bytes(seed.data)
    return dict(counts, examples=n, vm_mib=vm >> 20, rss0_mib=rss0 >> 10, peak_mib=peak >> 10,
                seconds=time.perf_counter() - start, shown=shown)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fuzz_files", description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=2000, help="mutated files per format (default 2000)")
    ap.add_argument("--formats", nargs="+", choices=FORMATS, default=list(FORMATS))
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds one load may take before it is a hang")
    ap.add_argument("--headroom-mib", type=int, default=1024,
                    help="address space a worker may add after its warm-up (RLIMIT_AS; 0: no limit)")
    ap.add_argument("--seed", type=int, default=0, help="the first example's random seed")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="xllm-fuzz-") as tmp:
        seeds = build_seeds(Path(tmp), args.formats)
        warm_up = [s.load for s in seeds.values()]
        print(f"{args.n} mutated files per format; a load past {args.timeout:g} s is a hang; each worker may "
              f"grow its address space by {args.headroom_mib} MiB after the warm-up (RLIMIT_AS)")
        header = (f"{'format':16} {'examples':>8} {'accepted':>8} {'XllmError':>9} {'other':>5} {'hang':>4} "
                  f"{'crash':>5} {'disagree':>8} {'VM MiB':>7} {'RSS MiB':>12} {'s':>6}")
        rows, shown, bugs = [], [], 0
        for name, seed in seeds.items():
            r = fuzz(seed, args.n, args.timeout, args.headroom_mib << 20, warm_up, args.seed)
            disagree = r["disagree"] if name == "safetensors" else "-"
            rows.append(f"{name:16} {r['examples']:8} {r['accepted']:8} {r['XllmError']:9} {r['other']:5} "
                        f"{r['hang']:4} {r['crash']:5} {disagree:>8} {r['vm_mib']:7} "
                        f"{r['rss0_mib']:5} -> {r['peak_mib']:4} {r['seconds']:6.0f}")
            print(rows[-1] if len(rows) > 1 else header + "\n" + rows[-1], flush=True)
            shown += r["shown"]
            bugs += r["other"] + r["hang"] + r["crash"] + r["disagree"]
        print("VM MiB: the worker's address space after its warm-up (the limit is that plus the headroom); "
              "RSS MiB: its peak resident memory after the warm-up -> after all the examples")
        for text in shown:
            print("\n" + text.rstrip())
    return 1 if bugs else 0


if __name__ == "__main__":
    sys.exit(main())
