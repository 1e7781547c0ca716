"""Loading GGUF files (llama.cpp's format) with architecture "llama".

A GGUF file is: the magic "GGUF", a version, a table of key/value metadata
(model hyper-parameters, the tokenizer vocabulary, the chat template...), a
table of tensor descriptions (name, shape, type, offset), padding to the
alignment, then the tensor data.  Everything is little-endian.

We parse the two tables ourselves with `struct` rather than with
`gguf.GGUFReader`: the reader builds several numpy arrays per vocabulary
string and took 3.7 s on the 49152-token SmolLM2 vocabulary, while this parser
takes a fraction of that.  Parsing ourselves also lets us check every tensor's
extent against the file size, so a truncated download is reported as such.
The `gguf` package still provides the tensor type table and the reference
dequantizers (see dequant.py).

Every count and size in the header is checked against the bytes the file has
left *before* anything is built from it, so a damaged file is one
`ModelFormatError` however large the number it claims (a count of 2^63
entries cannot be in a 100 MB file).  The rules are llama.cpp's (gguf.cpp):
no repeated key or tensor name, no arrays of arrays, and the tensors lie one
after another in the data section in table order, each padded to the
alignment, so no two overlap.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..rope import scaling_problem
from .dequant import KEEPABLE, SUPPORTED, dequantize, keep_blocks
from .layout import Checkpoint, check_config, check_shapes, check_weights, rope_rows_to_halves

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: id -> (struct format, size) for the fixed-size ones.
_SCALARS = {
    0: ("<B", 1),   # UINT8
    1: ("<b", 1),   # INT8
    2: ("<H", 2),   # UINT16
    3: ("<h", 2),   # INT16
    4: ("<I", 4),   # UINT32
    5: ("<i", 4),   # INT32
    6: ("<f", 4),   # FLOAT32
    7: ("<?", 1),   # BOOL
    10: ("<Q", 8),  # UINT64
    11: ("<q", 8),  # INT64
    12: ("<d", 8),  # FLOAT64
}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4",
          7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6

# The fewest bytes an entry can take, to bound counts by the bytes left:
# a metadata entry is a key (u64 length, maybe empty), a u32 type and a value
# of at least one byte; a tensor entry is a name (u64 length), u32 n_dims,
# at least one u64 dimension, a u32 type and a u64 offset.
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8

# GGUF tensor name -> canonical name ("blk.N." becomes "layers.N.").
_LAYER_TENSORS = {
    "attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
    "attn_output": "wo", "ffn_norm": "ffn_norm", "ffn_gate": "w_gate",
    "ffn_up": "w_up", "ffn_down": "w_down",
}
_GLOBAL_TENSORS = {"token_embd": "tok_embeddings", "output_norm": "norm", "output": "output"}
ROPE_FREQS = "rope_freqs.weight"    # llama3 RoPE scaling: one divisor per frequency (not a weight)


class _Reader:
    """Sequential little-endian reads from a buffer, reporting overruns as truncation."""

    def __init__(self, buf, size: int, path):
        self.buf, self.size, self.path, self.pos = buf, size, path, 0

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ModelFormatError(
                self.path,
                f"truncated GGUF file: reading {what} needs {self.pos + n} bytes, found {self.size}")

    def scalar(self, fmt: str, n: int, what: str):
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.scalar("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", 8, what)

    def string(self, what: str) -> str:
        n = self.u64(what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(self.path, f"{what} is not valid UTF-8") from None

    def value(self, vtype: int, what: str):
        """One metadata value as a plain Python value."""
        if vtype in _SCALARS:
            value = self.scalar(*_SCALARS[vtype], what)
            if vtype == _FLOAT32:
                # Give the shortest decimal that reads back as the same float32, so a
                # file's 1e-5 comes back as 1e-05 rather than 9.999999747378752e-06.
                value = float(str(np.float32(value)))
            return value
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            itype = self.u32(what)
            count = self.u64(what)
            if itype == _ARRAY:
                raise ModelFormatError(self.path, f"{what}: arrays of arrays are not supported")
            if itype not in _SCALARS and itype != _STRING:
                raise ModelFormatError(self.path, f"{what}: unknown GGUF array element type {itype}")
            # Each element takes at least this many bytes: a huge count fails here,
            # before a list of that length is built.
            item_bytes = _SCALARS[itype][1] if itype in _SCALARS else 8
            left = self.size - self.pos
            if count * item_bytes > left:
                raise ModelFormatError(
                    self.path, f"{what}: array length: expected at most {left // item_bytes} "
                               f"(the bytes left in the file), found {count}")
            if itype in _NUMPY:
                # Numeric arrays in one go (float32 ones come back as the exact
                # float32 values, e.g. SentencePiece scores; only scalars get the
                # shortest-decimal treatment above).
                arr = np.frombuffer(self.buf, dtype=_NUMPY[itype], count=count, offset=self.pos)
                self.pos += count * item_bytes
                return arr.tolist()
            return [self.string(what) for _ in range(count)]
        raise ModelFormatError(self.path, f"{what} has unknown GGUF value type {vtype}")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table."""

    name: str                   # GGUF name, e.g. "blk.0.attn_q.weight"
    shape: tuple[int, ...]      # numpy order (slowest dimension first)
    qtype: GGMLQuantizationType
    offset: int                 # from the start of the tensor data section
    nbytes: int


def read_gguf(path, buf=None):
    """Parse a GGUF file's header.

    Returns (metadata dict, list of tensor infos, absolute offset of tensor data,
    format version).  Tensor types and extents are checked here; `buf` is the
    file's mmap (opened here if not given).
    """
    size = os.path.getsize(path)
    if buf is None:
        buf = _map(path, size)
    r = _Reader(buf, size, path)
    r.need(4, "the magic")
    if buf[0:4] != MAGIC:
        raise ModelFormatError(path, f"not a GGUF file (starts with {bytes(buf[0:4])!r}, expected b'GGUF')")
    r.pos = 4
    version = r.u32("the version")
    if version not in (2, 3):
        if version & 0xFFFF == 0:
            raise ModelFormatError(path, "big-endian GGUF files are not supported")
        raise ModelFormatError(path, f"unsupported GGUF version {version} (supported: 2, 3)")
    n_tensors = r.u64("the tensor count")
    n_kv = r.u64("the metadata count")
    left = size - r.pos
    if n_tensors * _MIN_TENSOR_BYTES > left:
        raise ModelFormatError(
            path, f"truncated or damaged GGUF file: field tensor count: expected at most "
                  f"{left // _MIN_TENSOR_BYTES} (the file has {size} bytes), found {n_tensors}")
    if n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_BYTES > left:
        raise ModelFormatError(
            path, f"truncated or damaged GGUF file: field metadata count: expected at most "
                  f"{(left - n_tensors * _MIN_TENSOR_BYTES) // _MIN_KV_BYTES} (the file has {size} bytes "
                  f"and {n_tensors} tensors), found {n_kv}")

    metadata: dict = {}
    for _ in range(n_kv):
        key = r.string("a metadata key")
        if key in metadata:
            raise ModelFormatError(path, f"metadata key '{key}' appears twice")
        vtype = r.u32(f"metadata '{key}'")
        metadata[key] = r.value(vtype, f"metadata '{key}'")

    infos = []
    seen = set()
    for _ in range(n_tensors):
        name = r.string("a tensor name")
        if name in seen:
            raise ModelFormatError(path, f"tensor '{name}' appears twice in the tensor table")
        seen.add(name)
        what = f"tensor info '{name}'"
        n_dims = r.u32(what)
        if not 1 <= n_dims <= 4:
            raise ModelFormatError(path, f"tensor '{name}': n_dims: expected 1 to 4, found {n_dims}")
        dims = [r.u64(what) for _ in range(n_dims)]
        raw_type = r.u32(what)
        offset = r.u64(what)
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFormatError(path, f"tensor '{name}' has unknown GGML type id {raw_type}") from None
        if qtype not in SUPPORTED:
            supported = ", ".join(t.name for t in SUPPORTED)
            raise ModelFormatError(
                path, f"tensor '{name}' has unsupported type {qtype.name} (supported: {supported})")
        block_values, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_values:
            raise ModelFormatError(
                path, f"tensor '{name}': row length {dims[0]} is not a multiple of the "
                      f"{qtype.name} block size {block_values}")
        n_values = math.prod(dims)      # a Python int: no overflow, and nothing is allocated from it yet
        # GGUF lists dimensions fastest-first; numpy wants them slowest-first.
        infos.append(TensorInfo(name, tuple(reversed(dims)), qtype, offset,
                                 n_values // block_values * block_bytes))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(path, f"metadata 'general.alignment': expected a power of two, found {alignment!r}")
    data_start = -(-r.pos // alignment) * alignment

    # llama.cpp's layout rule: tensor i starts where tensor i-1 ends, rounded up
    # to the alignment.  Tensors therefore never overlap, and the last one's end
    # is the data the file must hold: a cut-off download fails here.
    expected_offset = end = 0
    for t in infos:
        if t.offset != expected_offset:
            raise ModelFormatError(
                path, f"tensor '{t.name}': data offset: expected {expected_offset} (right after the previous "
                      f"tensor, aligned to {alignment}), found {t.offset}")
        end = t.offset + t.nbytes
        expected_offset = -(-end // alignment) * alignment
    if data_start + end > size:
        raise ModelFormatError(
            path, f"truncated GGUF file: expected at least {data_start + end} bytes (header and tensor data), "
                  f"found {size}")
    return metadata, infos, data_start, version


def _map(path, size):
    if size == 0:
        raise ModelFormatError(path, "file is empty")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _get(path, metadata, key, kind, default=None, required=True):
    value = metadata.get(key, default)
    if value is None:
        if required:
            raise ModelFormatError(path, f"missing metadata '{key}'")
        return None
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ModelFormatError(path, f"GGUF metadata: field {key}: expected an integer, found {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ModelFormatError(path, f"GGUF metadata: field {key}: expected a number, found {value!r}")
    if key.startswith("llama.") and kind is int and value <= 0:
        raise ModelFormatError(path, f"GGUF metadata: field {key}: expected a positive integer, found {value!r}")
    return kind(value)


# ModelConfig field -> the GGUF key it comes from, for error messages.
_KEYS = {
    "n_layers": "llama.block_count", "dim": "llama.embedding_length", "n_heads": "llama.attention.head_count",
    "n_kv_heads": "llama.attention.head_count_kv", "hidden_dim": "llama.feed_forward_length",
    "vocab_size": "llama.vocab_size", "head_dim": "llama.attention.key_length",
    "rope_theta": "llama.rope.freq_base", "rms_eps": "llama.attention.layer_norm_rms_epsilon",
    "context_length": "llama.context_length", "bos_id": "tokenizer.ggml.bos_token_id",
    "eos_ids": "tokenizer.ggml.eos_token_id",
}


def config_from_metadata(path, metadata, infos) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch != "llama":
        raise ModelFormatError(
            path, f"unsupported architecture: general.architecture is {arch!r}, supported: ['llama']")
    n_split = metadata.get("split.count", 1)
    if n_split != 1:
        raise ModelFormatError(
            path, f"split GGUF files are not supported (split.count={n_split}): merge the parts into one "
                  f"file first (llama.cpp's gguf-split --merge)")
    p = "llama."
    n_experts = metadata.get(p + "expert_count", 0)
    if n_experts:
        raise ModelFormatError(
            path, f"mixture-of-experts models are not supported ({p}expert_count={n_experts})")

    dim = _get(path, metadata, p + "embedding_length", int)
    n_heads = _get(path, metadata, p + "attention.head_count", int)
    n_kv_heads = _get(path, metadata, p + "attention.head_count_kv", int, default=n_heads)
    head_dim = _get(path, metadata, p + "attention.key_length", int, required=False) or 0
    value_dim = metadata.get(p + "attention.value_length")
    if head_dim and value_dim not in (None, head_dim):
        raise ModelFormatError(
            path, f"{p}attention.value_length={value_dim} differs from key_length={head_dim} (not supported)")
    if not head_dim:
        if dim % n_heads:
            raise ModelFormatError(
                path, f"GGUF metadata: field {p}attention.head_count: expected a divisor of "
                      f"{p}embedding_length={dim} (there is no {p}attention.key_length), found {n_heads}")
        head_dim = dim // n_heads
    rope_dims = metadata.get(p + "rope.dimension_count")
    if rope_dims is not None and rope_dims != head_dim:
        raise ModelFormatError(
            path, f"GGUF metadata: field {p}rope.dimension_count: expected the head dim {head_dim} (partial RoPE "
                  f"is not supported), found {rope_dims!r}")

    tensor_shapes = {t.name: t.shape for t in infos}
    vocab = _get(path, metadata, p + "vocab_size", int, required=False)
    if vocab is None:
        # Older files have no vocab_size: the embedding matrix has one row per token.
        if "token_embd.weight" in tensor_shapes:
            vocab = tensor_shapes["token_embd.weight"][0]
        else:
            vocab = len(metadata.get("tokenizer.ggml.tokens", ()))

    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        value = _get(path, metadata, key, int, required=False)
        if value is not None and value not in eos_ids:
            eos_ids.append(value)

    cfg = ModelConfig(
        n_layers=_get(path, metadata, p + "block_count", int),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        hidden_dim=_get(path, metadata, p + "feed_forward_length", int),
        vocab_size=vocab,
        head_dim=head_dim,
        rope_theta=_get(path, metadata, p + "rope.freq_base", float, default=10000.0),
        rms_eps=_get(path, metadata, p + "attention.layer_norm_rms_epsilon", float, default=1e-5),
        context_length=_get(path, metadata, p + "context_length", int, default=2048),
        tied_embeddings="output.weight" not in tensor_shapes,
        bos_id=_get(path, metadata, "tokenizer.ggml.bos_token_id", int, required=False),
        eos_ids=tuple(eos_ids),
        arch="llama",
        name=str(metadata.get("general.name", "")),
        rope_scaling=_rope_scaling(path, metadata),
    )
    check_config(path, cfg, "GGUF metadata", _KEYS)
    return cfg


def _rope_scaling(path, metadata) -> dict | None:
    """ModelConfig.rope_scaling from the metadata, read as llama.cpp reads it.

    llama.rope.scaling.type: "none" (no scaling, whatever the factor), "linear",
    or absent, which llama.cpp takes as "linear"; the factor is
    llama.rope.scaling.factor, or the older llama.rope.scale_linear (absent or 0:
    no scaling).  llama3 scaling is not in the metadata: llama.cpp's converter
    writes its per-frequency divisors as the tensor rope_freqs.weight (see
    `_with_freq_factors`).  "yarn", "longrope" and others are refused.
    """
    p = "llama."
    kind = metadata.get(p + "rope.scaling.type", "linear")
    if kind == "none":
        return None
    if kind != "linear":
        raise ModelFormatError(
            path, f"unsupported RoPE scaling: GGUF metadata: field {p}rope.scaling.type is {kind!r}, "
                  f"supported: ['none', 'linear']")
    key = p + "rope.scaling.factor" if p + "rope.scaling.factor" in metadata else p + "rope.scale_linear"
    factor = metadata.get(key, 0)
    if factor == 0 or factor == 1:     # llama.cpp: 0 means no factor
        return None
    scaling = {"type": "linear", "factor": factor}
    bad = scaling_problem(scaling, 0)
    if bad is not None:
        raise ModelFormatError(path, f"GGUF metadata: field {key}: expected {bad[1]}, found {bad[2]!r}")
    return {"type": "linear", "factor": float(factor)}


def _with_freq_factors(path, cfg: ModelConfig, values: np.ndarray) -> None:
    """Put the rope_freqs.weight tensor (llama3 scaling, as llama.cpp's converter writes it) into cfg.

    Its head_dim/2 values divide the frequencies: llama.cpp rotates pair i at
    position p by p * theta ** (-2i / head_dim) / rope_freqs[i] (1 for the high
    frequencies, the llama3 factor for the low ones).  A linear factor from the
    metadata divides them all too, as in llama.cpp.
    """
    if values.shape != (cfg.head_dim // 2,):
        raise ModelFormatError(path, f"tensor '{ROPE_FREQS}' has shape {list(values.shape)}, expected "
                                     f"[{cfg.head_dim // 2}] (head_dim/2)")
    factors = [float(v) for v in values]
    if cfg.rope_scaling is not None:                       # linear
        factors = [f * cfg.rope_scaling["factor"] for f in factors]
    scaling = {"type": "freq_factors", "factors": factors}
    bad = scaling_problem(scaling, cfg.head_dim)
    if bad is not None:
        raise ModelFormatError(path, f"tensor '{ROPE_FREQS}': expected {bad[1]}, found {bad[2]!r}")
    cfg.rope_scaling = scaling


def canonical_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'layers.3.wq'; None for names outside the llama layout."""
    if not gguf_name.endswith(".weight"):
        return None
    base = gguf_name[: -len(".weight")]
    if base in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[base]
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_TENSORS:
        return f"layers.{int(parts[1])}.{_LAYER_TENSORS[parts[2]]}"
    return None


def gguf_name(canon: str) -> str:
    """The inverse of `canonical_name`: 'layers.3.wq' -> 'blk.3.attn_q.weight'."""
    for g, c in _GLOBAL_TENSORS.items():
        if c == canon:
            return g + ".weight"
    _, i, kind = canon.split(".")
    g = next(g for g, c in _LAYER_TENSORS.items() if c == kind)
    return f"blk.{i}.{g}.weight"


def load_gguf(path, load_weights: bool = True, keep_quant: bool = False) -> Checkpoint:
    """Config, metadata and weights of a GGUF file; with `keep_quant`, Q8_0/Q4_0/Q4_1
    matrices are kept as QuantWeights (see keep_blocks) and F16 ones as float16,
    instead of float32."""
    size = os.path.getsize(path)
    buf = _map(path, size)
    metadata, infos, data_start, version = read_gguf(path, buf)
    cfg = config_from_metadata(path, metadata, infos)
    cfg.extra["gguf_version"] = version
    if "general.file_type" in metadata:
        cfg.extra["gguf_file_type"] = metadata["general.file_type"]

    names: dict[str, str] = {}     # canonical -> GGUF name, for error messages
    for t in infos:
        if t.name == ROPE_FREQS:
            raw = np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=data_start + t.offset)
            _with_freq_factors(path, cfg, dequantize(raw, t.qtype, t.shape))
            del raw
            continue
        canon = canonical_name(t.name)
        if canon is None:
            raise ModelFormatError(path, f"unexpected tensor '{t.name}'")
        names[canon] = t.name
    infos = [t for t in infos if t.name != ROPE_FREQS]
    # Check names and shapes before the (slower) dequantization.
    check_shapes(path, cfg, {canonical_name(t.name): t.shape for t in infos}, names, gguf_name)

    weights = {}
    if load_weights:
        for t in infos:
            raw = np.frombuffer(buf, dtype=np.uint8, count=t.nbytes, offset=data_start + t.offset)
            if keep_quant and t.qtype in KEEPABLE and len(t.shape) == 2:
                w = keep_blocks(raw, t.qtype, t.shape)
            elif keep_quant and t.qtype == GGMLQuantizationType.F16 and len(t.shape) == 2:
                w = raw.view("<f2").reshape(t.shape).copy()     # float16 matrices stay 2 bytes a weight
            else:
                w = dequantize(raw, t.qtype, t.shape)
            del raw  # the mmap closes once no array points into it
            canon = canonical_name(t.name)
            # GGUF keeps q/k rows in adjacent-pair RoPE order; xllm wants rotate-half.
            if canon.endswith(".wq"):
                w = rope_rows_to_halves(w, cfg.n_heads, cfg.head_dim)
            elif canon.endswith(".wk"):
                w = rope_rows_to_halves(w, cfg.n_kv_heads, cfg.head_dim)
            weights[canon] = w
        weights = check_weights(path, cfg, weights, names)
    return Checkpoint(config=cfg, weights=weights, kind="gguf", metadata=metadata, path=str(path))

