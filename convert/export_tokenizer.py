"""Write a tokenizer file from any tokenizer source xllm reads.

    python -m convert.export_tokenizer SOURCE [-o OUT] [--format xllm|llama2c]

SOURCE is anything `xllm.tokenizer.load_tokenizer` accepts: a .gguf model, a
Hugging Face directory, a tokenizer.json, a SentencePiece tokenizer.model or
a llama2.c tokenizer.bin.

--format xllm (default, OUT defaults to tokenizer.xllm.json): one JSON file
holding everything the tokenizer needs (pieces, token types, scores or
merges, pre-tokenizer, normalizer options, BOS/EOS). `load_tokenizer(OUT)`
gives a tokenizer with identical behaviour, for both families, without the
model file it came from.

--format llama2c (OUT defaults to tokenizer.bin): llama2.c's tokenizer.bin,
which the original llama2.c `export_tokenizer` wrote: a uint32 max piece
length, then per id a float32 score, a uint32 length and the piece bytes,
with "▁" written as a space and BOS/EOS as "\\n<s>\\n" / "\\n</s>\\n". Only a
SentencePiece-family tokenizer with scores fits this layout (it has no
merges, token types or options), and only the Llama-2 defaults survive it.
"""

from __future__ import annotations

import argparse
import struct
import sys
from pathlib import Path

from xllm.errors import XllmError
from xllm.tokenizer import load_tokenizer
from xllm.tokenizer.base import Tokenizer
from xllm.tokenizer.load import save_tokenizer


def write_llama2c(tok: Tokenizer, out: Path) -> None:
    """Write `tok` as a llama2.c tokenizer.bin (see module doc)."""
    scores = getattr(tok, "scores", None)
    if tok.family != "sentencepiece" or scores is None:
        raise ValueError("the llama2c format holds only SentencePiece tokenizers with scores "
                         "(a tokenizer.model, a llama GGUF or a tokenizer.bin); use --format xllm")
    pieces = []
    for i, p in enumerate(tok.pieces):
        if i == tok.bos_id:
            p = "\n<s>\n"
        elif i == tok.eos_id:
            p = "\n</s>\n"
        pieces.append(p.replace("\u2581", " ").encode("utf-8"))
    with open(out, "wb") as f:
        f.write(struct.pack("<I", max(len(b) for b in pieces)))
        for b, s in zip(pieces, scores):
            f.write(struct.pack("<fI", s, len(b)))
            f.write(b)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.export_tokenizer",
                                 description="Write a tokenizer file that xllm loads back with identical behaviour.")
    ap.add_argument("source", help="a .gguf, a Hugging Face directory, tokenizer.json, tokenizer.model or tokenizer.bin")
    ap.add_argument("-o", "--output", help="output file (default: tokenizer.xllm.json or tokenizer.bin)")
    ap.add_argument("--format", choices=("xllm", "llama2c"), default="xllm")
    args = ap.parse_args(argv)
    out = Path(args.output or ("tokenizer.xllm.json" if args.format == "xllm" else "tokenizer.bin"))
    try:
        tok = load_tokenizer(args.source)
        if args.format == "xllm":
            save_tokenizer(tok, out)
        else:
            write_llama2c(tok, out)
    except (XllmError, ValueError, OSError) as e:
        print(f"export_tokenizer: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({tok.family}, {tok.vocab_size} tokens)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
