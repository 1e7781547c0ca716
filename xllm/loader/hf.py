"""Loading Hugging Face checkpoint directories (LlamaForCausalLM, safetensors weights).

A directory holds `config.json` (the hyper-parameters), optionally
`generation_config.json`, and the weights either in one `model.safetensors`
or in several shards listed by `model.safetensors.index.json`
({"weight_map": {tensor name: shard file}}).  HF weights are already in the
rotate-half RoPE order xllm uses, so they need only renaming and float32
(with keep_quant, float16 matrices stay float16: see SafetensorsFile.get).
A W8A8 checkpoint in the compressed-tensors layout (compressed.py) gives
w8a8 QuantWeights.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..errors import ModelFormatError
from ..rope import scaling_problem
from .compressed import SCALE_SUFFIX, is_w8a8, read_w8a8
from .layout import Checkpoint, check_config, check_shapes, check_weights
from .safetensors_file import SafetensorsFile

SUPPORTED_ARCHITECTURES = ["LlamaForCausalLM"]

_LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "wq", "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv", "self_attn.o_proj": "wo", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "w_gate", "mlp.up_proj": "w_up", "mlp.down_proj": "w_down",
}
_GLOBAL_TENSORS = {"model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output"}


def canonical_name(hf_name: str) -> str | None:
    """'model.layers.3.self_attn.q_proj.weight' -> 'layers.3.wq'; None if not part of the layout."""
    if not hf_name.endswith(".weight"):
        return None
    base = hf_name[: -len(".weight")]
    if base in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[base]
    parts = base.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and parts[3] in _LAYER_TENSORS:
        return f"layers.{int(parts[2])}.{_LAYER_TENSORS[parts[3]]}"
    return None


def hf_name(canon: str) -> str:
    """The inverse of `canonical_name`: 'layers.3.wq' -> 'model.layers.3.self_attn.q_proj.weight'."""
    for hf, c in _GLOBAL_TENSORS.items():
        if c == canon:
            return hf + ".weight"
    _, i, kind = canon.split(".")
    hf = next(h for h, c in _LAYER_TENSORS.items() if c == kind)
    return f"model.layers.{i}.{hf}.weight"


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise ModelFormatError(path, f"cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ModelFormatError(path, f"invalid JSON: {e}") from None
    except RecursionError:
        raise ModelFormatError(path, "invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ModelFormatError(path, "expected a JSON object")
    return data


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    raise ValueError(value)


def config_from_json(path: Path, raw: dict, generation: dict | None) -> ModelConfig:
    """ModelConfig from a parsed config.json (`path` is that file, for messages)."""
    archs = raw.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
            raise ModelFormatError(
                path, f"unsupported architecture: field 'architectures' is {archs!r}, "
                      f"supported: {SUPPORTED_ARCHITECTURES}")
    elif raw.get("model_type") != "llama":
        raise ModelFormatError(
            path, f"unsupported architecture: no 'architectures' field and field 'model_type' is "
                  f"{raw.get('model_type')!r}, supported: ['llama']")

    def get(key, kind, default=None, required=True):
        value = raw.get(key)
        if value is None:       # absent, or written as null
            value = default
        if value is None:
            if required:
                raise ModelFormatError(path, f"missing field '{key}'")
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int:         # 64 and 64.0 are both fine; 64.5, 1e400 and NaN are not
            ok = ok and (isinstance(value, int) or math.isfinite(value) and value.is_integer())
        else:                   # an integer of 400 digits has no float
            ok = ok and math.isfinite(_as_float(value))
        if not ok:
            expected = "an integer" if kind is int else "a finite number"
            raise ModelFormatError(path, f"field '{key}': expected {expected}, found {value!r}")
        if kind is int and value <= 0 and key != "head_dim":
            raise ModelFormatError(path, f"field '{key}': expected a positive integer, found {value!r}")
        return kind(value)

    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ModelFormatError(path, f"unsupported activation: field 'hidden_act' is {act!r}, supported: ['silu']")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            raise ModelFormatError(path, f"field '{key}' is true: bias terms are not supported")

    # rope_theta and rope_scaling live at the top level in older configs; newer
    # transformers versions nest both in "rope_parameters".
    rope = raw.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise ModelFormatError(path, f"field 'rope_parameters' should be an object, found {rope!r}")
    theta = raw.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling_key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    scaling = raw.get("rope_scaling") or rope
    if not isinstance(scaling, dict):
        raise ModelFormatError(path, f"field 'rope_scaling' should be an object, found {scaling!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not math.isfinite(_as_float(theta)):
        raise ModelFormatError(path, f"field 'rope_theta': expected a finite number, found {theta!r}")
    for where, fields in (("", raw), (f"{scaling_key}.", scaling)):
        partial = fields.get("partial_rotary_factor")
        if partial is not None and partial != 1.0:
            raise ModelFormatError(path, f"field '{where}partial_rotary_factor': expected 1.0 (partial RoPE is "
                                         f"not supported), found {partial!r}")

    n_heads = get("num_attention_heads", int)
    dim = get("hidden_size", int)
    head_dim = get("head_dim", int, required=False) or 0
    if not head_dim and dim % n_heads:
        raise ModelFormatError(
            path, f"field 'num_attention_heads': expected a divisor of hidden_size={dim} (there is no "
                  f"head_dim), found {n_heads}")
    try:
        eos_ids = _ids(raw.get("eos_token_id"))
        if generation:
            eos_ids += [i for i in _ids(generation.get("eos_token_id")) if i not in eos_ids]
        bos = _ids(raw.get("bos_token_id"))
        if not bos and generation:
            bos = _ids(generation.get("bos_token_id"))
    except ValueError as e:
        raise ModelFormatError(path, f"token ids should be integers or lists of integers, found {e.args[0]!r}") from None
    tied = raw.get("tie_word_embeddings", False)
    if not isinstance(tied, bool):
        raise ModelFormatError(path, f"field 'tie_word_embeddings' should be true or false, found {tied!r}")

    context = get("max_position_embeddings", int, default=2048)
    rope_scaling, context = _rope_scaling(path, scaling_key, scaling, raw, context, head_dim or dim // n_heads)

    cfg = ModelConfig(
        n_layers=get("num_hidden_layers", int),
        dim=dim,
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads", int, default=n_heads),
        hidden_dim=get("intermediate_size", int),
        vocab_size=get("vocab_size", int),
        head_dim=head_dim,
        rope_theta=float(theta),
        rms_eps=get("rms_norm_eps", float, default=1e-6),
        context_length=context,
        tied_embeddings=tied,
        bos_id=bos[0] if bos else None,
        eos_ids=tuple(eos_ids),
        arch="llama",
        name=str(raw.get("_name_or_path", "") or ""),
        rope_scaling=rope_scaling,
    )
    check_config(path, cfg, None, _KEYS)
    return cfg


SUPPORTED_ROPE_TYPES = ["default", "linear", "dynamic", "llama3"]


def _rope_scaling(path: Path, key: str, scaling: dict, raw: dict, context: int,
                  head_dim: int) -> tuple[dict | None, int]:
    """(ModelConfig.rope_scaling, context length) from config.json's rope scaling object.

    `key` is where the object was found ("rope_scaling", or "rope_parameters"
    in newer files), `context` is max_position_embeddings.  Which fields each
    type reads, and their defaults, are transformers' (modeling_rope_utils.py):

      linear   factor
      llama3   factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
               (a top-level original_max_position_embeddings wins; default max_position_embeddings)
      dynamic  factor; transformers' reference length is max_position_embeddings (an
               original_max_position_embeddings here is ignored, as transformers does).
               Positions past it are what dynamic scaling is for, so xllm's context
               becomes max_position_embeddings * factor.
    """
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return None, context
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelFormatError(
            path, f"unsupported RoPE scaling: field '{key}.rope_type' is {rope_type!r}, "
                  f"supported: {SUPPORTED_ROPE_TYPES}")
    out: dict = {"type": rope_type, "factor": scaling.get("factor")}
    names = {"factor": f"{key}.factor", "head_dim": "head_dim"}     # our key -> the file's, for messages
    if rope_type == "llama3":
        out["low_freq_factor"] = scaling.get("low_freq_factor")
        out["high_freq_factor"] = scaling.get("high_freq_factor")
        names.update(low_freq_factor=f"{key}.low_freq_factor", high_freq_factor=f"{key}.high_freq_factor")
        if raw.get("original_max_position_embeddings") is not None:
            out["original_context"] = raw["original_max_position_embeddings"]
            names["original_context"] = "original_max_position_embeddings"
        else:
            out["original_context"] = scaling.get("original_max_position_embeddings", context)
            names["original_context"] = f"{key}.original_max_position_embeddings"
    elif rope_type == "dynamic":
        out["original_context"] = context
        names["original_context"] = "max_position_embeddings"
    bad = scaling_problem(out, head_dim)
    if bad is not None:
        field, expected, found = bad
        raise ModelFormatError(path, f"field '{names[field]}': expected {expected} for RoPE scaling {rope_type!r}, "
                                     f"found {found!r}")
    for k in ("factor", "low_freq_factor", "high_freq_factor"):
        if k in out:
            out[k] = float(out[k])
    if rope_type == "dynamic":
        context = int(context * out["factor"])
    return out, context


# ModelConfig field -> the config.json field it comes from, for error messages.
_KEYS = {
    "n_layers": "'num_hidden_layers'", "dim": "'hidden_size'", "n_heads": "'num_attention_heads'",
    "n_kv_heads": "'num_key_value_heads'", "hidden_dim": "'intermediate_size'", "vocab_size": "'vocab_size'",
    "head_dim": "'head_dim'", "rope_theta": "'rope_theta'", "rms_eps": "'rms_norm_eps'",
    "context_length": "'max_position_embeddings'", "bos_id": "'bos_token_id'", "eos_ids": "'eos_token_id'",
}


def _as_float(value) -> float:
    """float(value), or inf for an integer too large for a float."""
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _weight_files(directory: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file holding it (empty dict: read the single file's header)."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        return {}
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFormatError(index, "missing or empty 'weight_map'")
        for name, file in weight_map.items():
            # Shards sit beside the index: a path elsewhere would read files the user never gave.
            if not isinstance(file, str) or not file or Path(file).name != file:
                raise ModelFormatError(
                    index, f"field weight_map['{name}']: expected a file name in this directory, found {file!r}")
        return {name: directory / file for name, file in weight_map.items()}
    if (directory / "pytorch_model.bin").exists() or (directory / "pytorch_model.bin.index.json").exists():
        raise ModelFormatError(
            directory, "weights are in PyTorch pickle format (pytorch_model.bin), which xllm does not read: "
                       "convert them to model.safetensors")
    raise ModelFormatError(directory, "no weights: expected model.safetensors or model.safetensors.index.json")


def load_hf(directory: Path, load_weights: bool = True, keep_quant: bool = False) -> Checkpoint:
    """Config, metadata and weights of an HF directory. keep_quant: float16 (and bfloat16 that
    float16 holds exactly) matrices stay float16, int8 ones w8a8 QuantWeights; else all float32."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelFormatError(directory, "not a model: a directory must contain config.json "
                                          "(a Hugging Face checkpoint)")
    raw = _read_json(config_path)
    generation = None
    if (directory / "generation_config.json").is_file():
        generation = _read_json(directory / "generation_config.json")
    cfg = config_from_json(config_path, raw, generation)
    quantized = is_w8a8(config_path, raw)
    metadata = dict(raw)
    if generation is not None:
        metadata["generation_config"] = generation

    # Open each weight file once and note where every tensor lives.
    files: dict[Path, SafetensorsFile] = {}
    index = _weight_files(directory)
    if not index:
        st = SafetensorsFile(directory / "model.safetensors")
        files[st.path] = st
        located = {name: st for name in st.tensors}
    else:
        located = {}
        for name, file in index.items():
            if file not in files:
                if not file.is_file():
                    raise ModelFormatError(file, f"missing weight file (listed for tensor '{name}' in "
                                                 f"model.safetensors.index.json)")
                files[file] = SafetensorsFile(file)
            if name not in files[file].tensors:
                raise ModelFormatError(file, f"tensor '{name}' listed in the index is not in this file")
            located[name] = files[file]

    names: dict[str, str] = {}     # canonical -> HF name
    for name in located:
        if quantized and name.endswith(".weight" + SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in located:
            continue                                    # read with its weight
        canon = canonical_name(name)
        if canon is None:
            if name.endswith("rotary_emb.inv_freq"):   # a buffer some old exports kept; recomputed at run time
                continue
            raise ModelFormatError(located[name].path, f"unexpected tensor '{name}'")
        if canon == "output" and cfg.tied_embeddings:
            continue                                    # tied: the output matrix is tok_embeddings
        names[canon] = name

    def where(canon):
        return located[names[canon]].path if canon in names else directory

    try:
        check_shapes(directory, cfg, {c: located[n].shape(n) for c, n in names.items()}, names, hf_name)
    except ModelFormatError as e:
        # Name the file that holds the offending tensor, not just the directory.
        bad = next((c for c, n in names.items() if f"'{n}'" in e.problem), None)
        raise ModelFormatError(where(bad) if bad else directory, e.problem) from None

    weights = {}
    if load_weights:
        for c, n in names.items():
            st = located[n]
            if st.dtype(n) == "I8" and quantized:
                weights[c] = read_w8a8(st, n, located.get(n + SCALE_SUFFIX), keep_quant)
            elif st.dtype(n) == "I8":
                raise ModelFormatError(st.path, f"tensor '{n}' is int8 but config.json has no quantization_config "
                                                f"(its scales are unknown)")
            else:
                weights[c] = st.get(n, keep_16=keep_quant)
        if keep_quant:
            _notice_wide_bf16(directory, names, located, weights)
        weights = check_weights(directory, cfg, weights, names)
    return Checkpoint(config=cfg, weights=weights, kind="hf", metadata=metadata, path=str(directory))


def _notice_wide_bf16(directory: Path, names: dict[str, str], located: dict, weights: dict) -> None:
    """One line on stderr when bfloat16 matrices had to become float32 (values float16 cannot hold)."""
    wide = [n for c, n in names.items() if located[n].dtype(n) == "BF16" and weights[c].ndim == 2
            and weights[c].dtype == np.float32]
    if wide:
        print(f"xllm: {directory}: {len(wide)} bfloat16 matrices (e.g. '{wide[0]}') hold values float16 cannot "
              f"represent exactly; they are kept as float32", file=sys.stderr)
