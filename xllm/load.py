"""Open a model for inference: checkpoint -> prepared weights -> `Llama`.

Reading a checkpoint is slow compared to running the model: gguf's reader
parses every vocabulary string one by one and quantized tensors must be
dequantized. So the first load of a file writes the *prepared* weights (the
layout `xllm.model.prepare_weights` makes) to one flat file in the cache
directory, with the config and metadata beside it as JSON; later loads read
that back in one sequential read. The cache entry is keyed on the checkpoint's
path, size and modification time, so an edited checkpoint is read afresh.

A cache entry can be damaged (a full disk, a killed process, a stray edit).
Every load checks it before using it: the three files are there, the JSON
parses, a blake2b digest of model.json's content and of metadata.json
matches, weights.bin has the size written and the same 64-bit sum of its
8-byte words, the config is valid and every array lies inside weights.bin
with the shape the config implies. The sum is not a hash, but it changes with
any flipped bit or zeroed page, and it costs 0.014 s on the default model's
143 MB where blake2b costs 0.26 s, half of a whole load. A damaged entry is
rebuilt from the checkpoint, with one line on stderr, instead of failing
every run until someone deletes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError
from .model import Llama, prepare_weights
from .quantize import QuantizeOptions, quantize_checkpoint
from .weights import QuantWeight, is_quant

CACHE_FORMAT = 6     # 3: model.json carries digests and the size and sum of weights.bin
                     # 4: the config carries rope_scaling (a GGUF's linear factor was ignored before)
                     # 5: float16 matrices and w8a8 QuantWeights; entries of weights quantized at load
                     # 6: w8a8 quantizes the output projection too


def cache_root() -> Path:
    """Where xllm keeps downloaded and prepared models ($XLLM_CACHE overrides)."""
    return Path(os.environ.get("XLLM_CACHE") or Path.home() / ".cache" / "xllm")


def _fingerprint(path: Path) -> str:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256(f"{CACHE_FORMAT}:{path.resolve()}".encode())
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:24]


ALIGN = 64   # byte alignment of every array in weights.bin


# --------------------------------------------------------------------------------------------
# Writing and reading a cache entry


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _word_sum(flat: np.ndarray) -> int:
    """The sum mod 2^64 of `flat` (uint8) read as little-endian 8-byte words, the tail zero-padded."""
    n = flat.size // 8 * 8
    tail = int.from_bytes(flat[n:].tobytes().ljust(8, b"\0"), "little") if n < flat.size else 0
    return (int(flat[:n].view("<u8").sum(dtype=np.uint64)) + tail) % (1 << 64)


def _save(entry: Path, config: ModelConfig, metadata: dict, kind: str, weights: dict) -> None:
    """Write `weights` (arrays, or QuantWeights as their component arrays) to
    one flat file, with an index of dtype, shape and byte offset per array."""
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    index, offset = {}, 0
    with open(tmp / "weights.bin", "wb") as f:

        def put(a: np.ndarray) -> dict:
            nonlocal offset
            pad = -offset % ALIGN
            f.write(b"\0" * pad)
            offset += pad
            spec = {"dtype": a.dtype.str, "shape": list(a.shape), "offset": offset}
            f.write(np.ascontiguousarray(a).tobytes())
            offset += a.nbytes
            return spec

        for name, w in weights.items():
            if is_quant(w):
                index[name] = {"quant": w.format, "shape": list(w.shape),
                               "arrays": {k: put(a) for k, a in w.to_arrays().items()}}
            else:
                index[name] = put(w)
    meta_text = json.dumps(metadata, default=_jsonable).encode()
    info = {"format": CACHE_FORMAT, "config": dataclasses.asdict(config), "kind": kind, "index": index,
            "weights_bytes": offset, "weights_sum": _word_sum(np.fromfile(tmp / "weights.bin", np.uint8)),
            "metadata_blake2b": _digest(meta_text)}
    info["blake2b"] = _digest(json.dumps(info, sort_keys=True).encode())
    (tmp / "model.json").write_text(json.dumps(info))
    (tmp / "metadata.json").write_bytes(meta_text)
    tmp.rename(entry)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the model cache")


class _Damaged(Exception):
    """A cache entry that cannot be used; the message says what is wrong."""


def prepared_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of what `prepare_weights` makes, in its order."""
    d, v, h = config.dim, config.vocab_size, config.hidden_dim
    shapes = {"tok_embeddings": (v, d), "norm": (d,), "output": (v, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attn_norm": (d,), p + "ffn_norm": (d,), p + "wqkv": (config.q_dim + 2 * config.kv_dim, d),
                       p + "wo": (d, config.q_dim), p + "w_gate_up": (2 * h, d), p + "w_down": (d, h)})
    return shapes


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _Damaged(f"{path.name} is missing") from None
    except OSError as e:
        raise _Damaged(f"{path.name}: {e.strerror or e}") from None


def _read_json(path: Path):
    try:
        return json.loads(_read_bytes(path))
    except (ValueError, RecursionError) as e:      # JSON and UTF-8 errors are ValueErrors
        raise _Damaged(f"{path.name} is not valid JSON: {str(e)[:80]}") from None


def _load(entry: Path):
    """(config, weights, metadata, kind) from a cache entry; raises _Damaged if it is not intact."""
    info = _read_json(entry / "model.json")
    if not isinstance(info, dict) or info.get("format") != CACHE_FORMAT:
        raise _Damaged(f"model.json is not a format {CACHE_FORMAT} index")
    check = info.pop("blake2b", None)
    if check != _digest(json.dumps(info, sort_keys=True).encode()):
        raise _Damaged("model.json does not match its digest")
    meta_bytes = _read_bytes(entry / "metadata.json")
    if _digest(meta_bytes) != info["metadata_blake2b"]:
        raise _Damaged("metadata.json does not match its digest")
    try:
        flat = np.fromfile(entry / "weights.bin", dtype=np.uint8)    # writable, unlike a view of bytes
    except FileNotFoundError:
        raise _Damaged("weights.bin is missing") from None
    except OSError as e:
        raise _Damaged(f"weights.bin: {e.strerror or e}") from None
    if flat.size != info["weights_bytes"]:
        raise _Damaged(f"weights.bin has {flat.size} bytes, expected {info['weights_bytes']}")
    if _word_sum(flat) != info["weights_sum"]:
        raise _Damaged("weights.bin does not match its checksum")

    # The digest vouches for what the index says; these checks are for an index
    # written by a different xllm with the same format number.
    cfg = dict(info["config"])
    cfg["eos_ids"] = tuple(cfg["eos_ids"])
    config = ModelConfig(**cfg)
    bad = config.invalid_field()
    if bad is not None:
        raise _Damaged(f"config field {bad[0]}: expected {bad[1]}, found {bad[2]!r}")
    shapes = prepared_shapes(config)
    if set(info["index"]) != set(shapes):
        raise _Damaged("the index does not list the weights the config implies")

    def get(spec: dict) -> np.ndarray:
        dtype = np.dtype(spec["dtype"])
        n = int(np.prod(spec["shape"], dtype=np.int64)) * dtype.itemsize
        if dtype.kind not in "fiu" or not 0 <= spec["offset"] <= flat.size - n:
            raise _Damaged(f"array {spec} does not fit in weights.bin")
        return flat[spec["offset"]: spec["offset"] + n].view(dtype).reshape(spec["shape"])

    weights = {}
    for name, spec in info["index"].items():
        if tuple(spec["shape"]) != shapes[name]:
            raise _Damaged(f"weight {name} has shape {spec['shape']}, expected {list(shapes[name])}")
        if "quant" in spec:
            arrays = {k: get(a) for k, a in spec["arrays"].items()}
            weights[name] = QuantWeight.from_arrays(spec["quant"], tuple(spec["shape"]), arrays)
        else:
            weights[name] = get(spec)
    return config, weights, json.loads(meta_bytes), info["kind"]


def _discard(entry: Path) -> None:
    """Remove a damaged entry (renamed first, so another process never reads it half deleted)."""
    trash = entry.with_name(entry.name + f".damaged{os.getpid()}")
    try:
        entry.rename(trash)
    except OSError:
        trash = entry
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Loading a model


def load_prepared(path, use_cache: bool = True, keep_quant: bool = True, quantize: QuantizeOptions | None = None,
                  tokenizer_path=None):
    """(config, prepared weights, metadata, kind) for the checkpoint at `path`.

    keep_quant: matrices stored in a format the kernels read directly (GGUF
    Q8_0, Q4_0, Q4_1, W8A8 int8, float16) stay in it: the same values as
    their float32 conversion, in a half to an eighth of the bytes. With
    keep_quant=False every weight is float32.
    quantize: instead, quantize the float values of the checkpoint (a GGUF's
    blocks dequantized first) as `xllm.quantize` says; smoothing reads the
    calibration text with the model's tokenizer (or `tokenizer_path`).
    """
    from .loader import load_checkpoint

    path = Path(path)
    if not path.exists():
        raise ModelFormatError(path, "no such file or directory")
    suffix = "-" + quantize.key() if quantize else ("-q" if keep_quant else "-f32")
    entry = cache_root() / "prepared" / (_fingerprint(path) + suffix)
    if use_cache and entry.exists():
        try:
            return _load(entry)
        except (_Damaged, KeyError, TypeError, ValueError) as e:
            # KeyError, TypeError, ValueError: an index of the right format number whose
            # fields are missing or of the wrong type (np.dtype, reshape, ModelConfig).
            what = str(e) if isinstance(e, _Damaged) else f"model.json: {type(e).__name__}: {str(e)[:80]}"
            print(f"xllm: the prepared-weights cache {entry} is damaged ({what}); rebuilding it", file=sys.stderr)
            _discard(entry)
    ck = load_checkpoint(path, keep_quant=keep_quant and quantize is None)
    weights = ck.weights
    if quantize:
        tokenizer = None
        if quantize.smooth is not None:
            tokenizer = load_tokenizer_for(path, ck.kind, ck.metadata, tokenizer_path)
        weights = quantize_checkpoint(ck.config, weights, quantize, tokenizer)
    weights = prepare_weights(ck.config, weights)
    if use_cache:
        try:
            _save(entry, ck.config, ck.metadata, ck.kind, weights)
        except OSError:
            pass  # a read-only or full cache directory only costs speed
    return ck.config, weights, ck.metadata, ck.kind


def load_tokenizer_for(path, kind: str, metadata: dict, tokenizer_path=None):
    """The tokenizer that goes with a checkpoint: `tokenizer_path` when given,
    else the GGUF's own metadata, else the tokenizer files of an HF directory."""
    from .tokenizer import load_tokenizer, tokenizer_from_gguf_metadata

    if tokenizer_path is not None:
        return load_tokenizer(tokenizer_path)
    if kind == "gguf":
        return tokenizer_from_gguf_metadata(metadata, path=path)
    if kind == "hf":
        return load_tokenizer(path)
    raise ModelFormatError(path, "a llama2.c checkpoint has no tokenizer inside: give one with --tokenizer")


def check_tokenizer_fits(tokenizer, config: ModelConfig, tokenizer_file) -> None:
    """Refuse a tokenizer that can produce token ids the model has no embedding row for.

    Every id a tokenizer produces, special ids included (BOS, EOS, ...), is
    below its `vocab_size`: so it fits when `tokenizer.vocab_size <=
    config.vocab_size`.  A tokenizer with *more* tokens than the model (another
    model's tokenizer, say) would index past the embedding table in the middle
    of an answer, so it is refused here.  One with *fewer* is allowed: many
    models pad their embedding table beyond the tokenizer (Qwen2.5 151665 tokens,
    151936 rows; Phi-3 32011 and 32064; DeepSeek-LLM 100015 and 102400) so that
    its size is a multiple of 64 or 128; those extra rows are never an input.
    """
    if tokenizer.vocab_size > config.vocab_size:
        raise ModelFormatError(
            tokenizer_file, f"tokenizer vocabulary: expected at most {config.vocab_size} tokens (the rows of the "
                            f"model's embedding table), found {tokenizer.vocab_size}: token ids "
                            f"{config.vocab_size}..{tokenizer.vocab_size - 1} have no embedding; this tokenizer "
                            f"is not the model's")


def load_model(path, tokenizer_path=None, device: str = "cpu", use_cache: bool = True, keep_quant: bool = True,
               exact: bool = False, quantize: str | QuantizeOptions | None = None):
    """(Llama, tokenizer, metadata) for the checkpoint at `path`, its weights on `device`.

    keep_quant=False (the CLIs' --f32) makes every weight float32, on the GPU too.
    exact=True (the CLIs' --exact) multiplies quantized weights in float32 (see `Llama`).
    quantize (the CLIs' --quantize): a scheme name ("w8a8", "q8_0", "fp16") or
    `QuantizeOptions`: quantize the float weights at load (see `load_prepared`).
    """
    from .ops import get_ops, resolve_device

    get_ops(resolve_device(device))          # an unusable device fails before the slow part
    if isinstance(quantize, str):
        quantize = QuantizeOptions(quantize)
    config, weights, metadata, kind = load_prepared(path, use_cache, keep_quant, quantize, tokenizer_path)
    tokenizer = load_tokenizer_for(path, kind, metadata, tokenizer_path)
    check_tokenizer_fits(tokenizer, config, tokenizer_path if tokenizer_path is not None else path)
    return Llama(config, weights, device, f32=not keep_quant, exact=exact), tokenizer, metadata
