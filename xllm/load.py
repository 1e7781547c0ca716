"""Open a model for inference: checkpoint -> prepared weights -> `Llama`.

Reading a checkpoint is slow compared to running the model: gguf's reader
parses every vocabulary string one by one and quantized tensors must be
dequantized. So the first load of a file writes the *prepared* weights (the
layout `xllm.model.prepare_weights` makes) to one flat file in the cache
directory, with the config and metadata beside it as JSON; later loads read
that back in one sequential read. The cache entry is keyed on the checkpoint's
path, size and modification time, so an edited checkpoint is read afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import ModelFormatError
from .model import Llama, prepare_weights
from .weights import QuantWeight, is_quant

CACHE_FORMAT = 2


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
    info = {"config": dataclasses.asdict(config), "kind": kind, "index": index}
    (tmp / "model.json").write_text(json.dumps(info))
    (tmp / "metadata.json").write_text(json.dumps(metadata, default=_jsonable))
    tmp.rename(entry)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in the model cache")


def _load(entry: Path):
    info = json.loads((entry / "model.json").read_text())
    cfg = info["config"]
    cfg["eos_ids"] = tuple(cfg["eos_ids"])
    config = ModelConfig(**cfg)
    flat = np.fromfile(entry / "weights.bin", dtype=np.uint8)

    def get(spec: dict) -> np.ndarray:
        dtype = np.dtype(spec["dtype"])
        n = int(np.prod(spec["shape"])) * dtype.itemsize
        return flat[spec["offset"] : spec["offset"] + n].view(dtype).reshape(spec["shape"])

    weights = {}
    for name, spec in info["index"].items():
        if "quant" in spec:
            arrays = {k: get(a) for k, a in spec["arrays"].items()}
            weights[name] = QuantWeight.from_arrays(spec["quant"], tuple(spec["shape"]), arrays)
        else:
            weights[name] = get(spec)
    metadata = json.loads((entry / "metadata.json").read_text())
    return config, weights, metadata, info["kind"]


def load_prepared(path, use_cache: bool = True, keep_quant: bool = True):
    """(config, prepared weights, metadata, kind) for the checkpoint at `path`.

    keep_quant: matrices stored in a block-quantized format the kernels read
    directly (GGUF Q8_0, Q4_0, Q4_1) stay in it: the same values as their
    float32 dequantization, in a quarter to an eighth of the bytes. With
    keep_quant=False every weight is float32.
    """
    from .loader import load_checkpoint

    path = Path(path)
    if not path.exists():
        raise ModelFormatError(path, "no such file or directory")
    entry = cache_root() / "prepared" / (_fingerprint(path) + ("-q" if keep_quant else "-f32"))
    if use_cache and (entry / "model.json").exists():
        return _load(entry)
    ck = load_checkpoint(path, keep_quant=keep_quant)
    weights = prepare_weights(ck.config, ck.weights)
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


def load_model(path, tokenizer_path=None, device: str = "cpu", use_cache: bool = True, keep_quant: bool = True):
    """(Llama, tokenizer, metadata) for the checkpoint at `path`, its weights on `device`.

    keep_quant=False (the CLIs' --f32) makes every weight float32, on the GPU too.
    """
    from .ops import get_ops, resolve_device

    get_ops(resolve_device(device))          # an unusable device fails before the slow part
    config, weights, metadata, kind = load_prepared(path, use_cache, keep_quant)
    tokenizer = load_tokenizer_for(path, kind, metadata, tokenizer_path)
    return Llama(config, weights, device, f32=not keep_quant), tokenizer, metadata
