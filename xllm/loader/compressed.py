"""W8A8 checkpoints in the compressed-tensors layout (vLLM's and llm-compressor's int8 format).

A Hugging Face directory whose config.json carries

    "quantization_config": {
        "quant_method": "compressed-tensors", "format": "int-quantized",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "int", "symmetric": true, "strategy": "channel", ...},
            "input_activations": {"num_bits": 8, "type": "int", "symmetric": true,
                                  "dynamic": true, "strategy": "token", ...}}},
        "ignore": ["lm_head"], ...}

stores each quantized linear layer as two tensors:

    model.layers.0.self_attn.q_proj.weight        I8  [N, K]   the integers q
    model.layers.0.self_attn.q_proj.weight_scale  F32 [N, 1]   one scale d per output channel
                                                  (F16 / BF16 in some exports)

and the weight is d * q: exactly xllm's QuantWeight("w8a8"). Layers in
"ignore" keep a float `weight`. This module checks the config and builds
the QuantWeights; hf.py finds the tensors.

Not handled (refused with the field named): weights of other than 8 bits,
asymmetric weights (a zero point), per-tensor or per-group weight scales,
and static activation scales (an `input_scale` per layer): xllm quantizes
the activations of every token at run time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ModelFormatError
from ..weights import BLOCK, QuantWeight
from .safetensors_file import SafetensorsFile

METHOD = "compressed-tensors"
FORMAT = "int-quantized"
SCALE_SUFFIX = "_scale"           # "x.weight" -> "x.weight_scale"

# What xllm writes (convert/quantize.py) and reads: field -> value, for each part of a config group.
WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
INPUT_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}


def quantization_config(ignore: list[str]) -> dict:
    """The config.json "quantization_config" of a W8A8 checkpoint (one group: every Linear)."""
    return {
        "quant_method": METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {**WEIGHTS, "group_size": None, "observer": "minmax"},
                                      "input_activations": {**INPUT_ACTIVATIONS, "group_size": None,
                                                            "observer": None},
                                      "output_activations": None}},
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def is_w8a8(path: Path, raw: dict) -> bool:
    """True when config.json (`raw`, read from `path`) declares a compressed-tensors W8A8
    checkpoint xllm reads, False when it declares no quantization; anything else is refused."""
    qc = raw.get("quantization_config")
    if qc is None:
        return False
    where = "quantization_config"
    if not isinstance(qc, dict):
        raise ModelFormatError(path, f"field '{where}': expected an object, found {qc!r}")
    _expect(path, f"{where}.quant_method", qc.get("quant_method"), METHOD)
    _expect(path, f"{where}.format", qc.get("format"), FORMAT)
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise ModelFormatError(path, f"field '{where}.config_groups': expected an object of groups, found {groups!r}")
    for name, group in groups.items():
        g = f"{where}.config_groups.{name}"
        if not isinstance(group, dict):
            raise ModelFormatError(path, f"field '{g}': expected an object, found {group!r}")
        _expect_fields(path, f"{g}.weights", group.get("weights"), WEIGHTS)
        if group.get("input_activations") is not None:      # absent: weight-only; xllm quantizes them anyway
            _expect_fields(path, f"{g}.input_activations", group["input_activations"], INPUT_ACTIVATIONS)
    return True


def _expect(path: Path, field: str, found, expected) -> None:
    if found != expected or type(found) is not type(expected):
        raise ModelFormatError(path, f"field '{field}': expected {expected!r} (the int8 W8A8 layout xllm reads), "
                                     f"found {found!r}")


def _expect_fields(path: Path, where: str, part, expected: dict) -> None:
    if not isinstance(part, dict):
        raise ModelFormatError(path, f"field '{where}': expected an object, found {part!r}")
    for key, value in expected.items():
        if key == "dynamic" and key not in part and value is False:
            continue                                          # weights: absent means not dynamic
        _expect(path, f"{where}.{key}", part.get(key), value)


def read_w8a8(weight_file: SafetensorsFile, name: str, scale_file: SafetensorsFile | None,
              keep_quant: bool) -> QuantWeight | np.ndarray:
    """The weight `name` (I8 [N, K]) times its `name + "_scale"` ([N, 1]): a w8a8 QuantWeight,
    or its float32 values when `keep_quant` is False or K is not a multiple of 32 (the kernels' unit)."""
    scale_name = name + SCALE_SUFFIX
    if scale_file is None:
        raise ModelFormatError(weight_file.path, f"tensor '{name}' is int8 but its scales '{scale_name}' are missing")
    q = weight_file.get_int8(name)
    if q.ndim != 2:
        raise ModelFormatError(weight_file.path, f"tensor '{name}': expected a matrix, found shape {list(q.shape)}")
    dtype = scale_file.dtype(scale_name)
    if dtype not in ("F32", "F16", "BF16"):
        raise ModelFormatError(scale_file.path, f"tensor '{scale_name}': dtype: expected F32, F16 or BF16, "
                                                f"found {dtype}")
    shape = scale_file.shape(scale_name)
    if tuple(shape) != (q.shape[0], 1):
        raise ModelFormatError(scale_file.path, f"tensor '{scale_name}' has shape {list(shape)}, expected "
                                                f"{[q.shape[0], 1]} (one scale per output channel of '{name}')")
    d = np.ascontiguousarray(scale_file.get(scale_name), dtype=np.float32)
    if not np.isfinite(d).all():
        raise ModelFormatError(scale_file.path, f"tensor '{scale_name}': expected finite scales, found NaN or inf")
    w = QuantWeight("w8a8", q, d) if q.shape[1] % BLOCK == 0 else None
    if w is None or not keep_quant:
        return (d * q.astype(np.float32)).astype(np.float32)
    return w
