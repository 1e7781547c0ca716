"""Quantize a checkpoint and write it in a format other tools read.

    python -m convert.quantize SRC -o OUT --scheme w8a8 [--smooth 0.8 --calib FILE]
    python -m convert.quantize SRC.gguf -o OUT.gguf --scheme q8_0      (or fp16)

SRC is any checkpoint xllm loads; its float values are what gets quantized
(a GGUF's blocks dequantized first). The quantizer is `xllm.quantize`.

w8a8   OUT is a Hugging Face directory in the compressed-tensors layout
       (vLLM's W8A8 int8): config.json with a `quantization_config`, and
       model.safetensors where each linear layer, lm_head included, is
       `<name>.weight` (I8 [N, K]) plus `<name>.weight_scale` (F32 [N, 1]);
       the embeddings and the norms stay F32 (a tied model gets its own
       lm_head, `tie_word_embeddings: false`). Tokenizer files are copied
       from an HF source, or written as tokenizer.xllm.json from a GGUF one.
q8_0   OUT is a GGUF file llama.cpp loads: every matrix in Q8_0 blocks
fp16   (byte for byte what `gguf.quants.quantize` makes) or F16, the 1-D
       tensors F32, every metadata key of the source kept (general.file_type
       updated). Only a GGUF source is supported here: the llama.cpp
       metadata and tokenizer of an HF directory are not written by xllm.

It prints, per scheme, the largest per-channel error: max |w - w_q| over a
row divided by that row's max |w|, for the worst row of any matrix.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from xllm.errors import ModelFormatError, XllmError
from xllm.quantize import QuantizeOptions, max_channel_error, q8_0_blocks, quantize_checkpoint, quantize_matrix
from xllm.weights import QuantWeight

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                      "generation_config.json")
GGUF_FILE_TYPE = {"q8_0": 7, "fp16": 1}        # llama.cpp's LLAMA_FTYPE_MOSTLY_Q8_0 / _F16


# ---------------------------------------------------------------- W8A8 -> compressed-tensors directory

def write_w8a8(src: Path, out: Path, options: QuantizeOptions) -> tuple[float, str]:
    """Quantize `src` to W8A8 and write the directory `out`; -> (largest per-channel error, its matrix)."""
    from convert.export_hf import hf_config
    from xllm.load import load_tokenizer_for
    from xllm.loader import load_checkpoint
    from xllm.loader.compressed import SCALE_SUFFIX, quantization_config
    from xllm.loader.hf import hf_name
    from xllm.loader.safetensors_file import write_safetensors

    ck = load_checkpoint(src)
    # The tokenizer reads the calibration text, and a GGUF source's is written out; an HF
    # source's files are copied as they are.
    tok = load_tokenizer_for(src, ck.kind, ck.metadata) if options.smooth is not None or ck.kind != "hf" else None
    worst = [0.0, ""]
    with tqdm(total=len(ck.weights), desc="w8a8", unit="tensor") as bar:
        def report(name, err):
            if err >= worst[0]:
                worst[:] = [err, name]
            bar.update()
        weights = quantize_checkpoint(ck.config, ck.weights, options, tok, report)
        bar.update(bar.total - bar.n)
    tensors = {}
    for name, w in weights.items():
        if isinstance(w, QuantWeight):
            tensors[hf_name(name)] = w.qs
            tensors[hf_name(name) + SCALE_SUFFIX] = w.d
        else:
            tensors[hf_name(name)] = w
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(ck, "F32")
    # lm_head is quantized too, so a tied model's checkpoint gets its own lm_head (the int8
    # copy of the table) and is no longer tied.
    config["tie_word_embeddings"] = False
    config["quantization_config"] = quantization_config(ignore=[])
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_safetensors(out / "model.safetensors", tensors, "F32")
    _write_tokenizer(src, ck, tok, out)
    return worst[0], worst[1]


def _write_tokenizer(src: Path, ck, tok, out: Path) -> None:
    """Copy an HF source's tokenizer files; for a GGUF source write tokenizer.xllm.json and the
    chat template in tokenizer_config.json, where Hugging Face tools look for it."""
    from xllm.tokenizer.load import save_tokenizer

    if ck.kind == "hf":
        for name in HF_TOKENIZER_FILES:
            if (src / name).is_file() and not (out / name).exists():
                shutil.copyfile(src / name, out / name)
        return
    save_tokenizer(tok, out / "tokenizer.xllm.json")
    template = ck.metadata.get("tokenizer.chat_template")
    if template:
        (out / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}, indent=2) + "\n")


# ---------------------------------------------------------------- Q8_0 / F16 -> GGUF

def write_gguf(src: Path, out: Path, scheme: str) -> tuple[float, str]:
    """Requantize every matrix of the GGUF `src` to `scheme` and write `out` with the same metadata."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    from xllm.loader.dequant import dequantize

    if src.is_dir() or src.read_bytes()[:4] != b"GGUF":
        raise ModelFormatError(src, f"--scheme {scheme} writes GGUF and needs a GGUF source (llama.cpp's metadata "
                                    f"and tokenizer are not made from a Hugging Face directory here); convert it "
                                    f"with llama.cpp's convert_hf_to_gguf.py first, or use --scheme w8a8")
    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue            # written by GGUFWriter itself
        value = GGUF_FILE_TYPE[scheme] if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    if gguf.Keys.General.FILE_TYPE not in reader.fields:
        writer.add_file_type(GGUF_FILE_TYPE[scheme])
    worst = (0.0, "")
    for t in tqdm(reader.tensors, desc=scheme, unit="tensor"):
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))        # GGUF lists ne0 (the row) first
        w = dequantize(np.asarray(t.data).view(np.uint8).ravel(), Q(t.tensor_type), shape)
        if len(shape) != 2:
            writer.add_tensor(t.name, w.astype(np.float32))
            continue
        q = quantize_matrix(w, scheme)
        err = max_channel_error(w, q)
        if err >= worst[0]:
            worst = (err, t.name)
        if scheme == "q8_0":
            writer.add_tensor(t.name, q8_0_blocks(q), raw_dtype=Q.Q8_0)     # bytes [N, K/32 * 34]
        else:
            writer.add_tensor(t.name, q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return worst


# ---------------------------------------------------------------- command line

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.quantize", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="a GGUF file or Hugging Face directory (any checkpoint xllm loads)")
    ap.add_argument("-o", "--output", required=True, help="the directory (w8a8) or .gguf file (q8_0, fp16) to write")
    ap.add_argument("--scheme", choices=("w8a8", "q8_0", "fp16"), required=True)
    ap.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                    help="w8a8 only: SmoothQuant smoothing with this alpha (0.5 is usual; 0.8 kept SmolLM2-135M within 2%% of fp32 perplexity, bench/RESULTS.md)")
    ap.add_argument("--calib", default=None, help="the calibration text for --smooth "
                                                  "(default ../shared/data/shareGPT_sample.txt)")
    ap.add_argument("--calib-tokens", type=int, default=512, help="its first tokens to run (default 512)")
    args = ap.parse_args(argv)
    src, out = Path(args.src), Path(args.output)
    try:
        options = QuantizeOptions(args.scheme, args.smooth, args.calib, args.calib_tokens)
        if not src.exists():
            raise ModelFormatError(src, "no such file or directory")
        if args.scheme == "w8a8":
            err, where = write_w8a8(src, out, options)
        else:
            err, where = write_gguf(src, out, args.scheme)
    except (XllmError, ValueError, OSError) as e:
        print(f"convert.quantize: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.scheme}{f', smoothed alpha={args.smooth}' if args.smooth is not None else ''}); "
          f"largest per-channel error {err:.3%} of the row's max |w|, in {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
