"""`python -m xllm.tokenize SOURCE`: text in, token ids out (like llama.cpp's llama-tokenize).

    $ echo "Hello world" | python -m xllm.tokenize SmolLM2-135M-Instruct.Q4_1.gguf
    19556 905
    $ echo "19556 905" | python -m xllm.tokenize SmolLM2-135M-Instruct.Q4_1.gguf --decode
    Hello world

SOURCE is a model file (.gguf), a checkpoint directory (with tokenizer.json
or tokenizer.model) or a tokenizer file. Each input line (without its line
end) gives one output line of ids separated by spaces. Options:

    --bos            put BOS first (by default no BOS is added)
    --eos            put EOS last
    --allow-special  recognise special-token text such as <|im_start|>
    --decode         the reverse: each line of ids becomes its text
    --skip-special   with --decode, leave out control tokens (BOS, EOS, ...)
    --pieces         print the vocabulary pieces instead of ids
"""

from __future__ import annotations

import argparse
import io
import sys

from .errors import XllmError


def main(argv=None, stdin=None, stdout=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xllm.tokenize",
                                 description="Tokenize stdin line by line (or --decode ids).")
    ap.add_argument("source", help="a .gguf model, a checkpoint directory or a tokenizer file")
    ap.add_argument("--bos", action="store_true", help="put BOS first")
    ap.add_argument("--eos", action="store_true", help="put EOS last")
    ap.add_argument("--allow-special", action="store_true", help="recognise special-token text")
    ap.add_argument("--decode", action="store_true", help="read ids, print text")
    ap.add_argument("--skip-special", action="store_true", help="with --decode: leave out control tokens")
    ap.add_argument("--pieces", action="store_true", help="print pieces instead of ids")
    args = ap.parse_args(argv)
    stdin = stdin if stdin is not None else io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8",
                                                             errors="replace", newline="\n")
    stdout = stdout if stdout is not None else io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8",
                                                                errors="replace", newline="\n",
                                                                line_buffering=True)
    try:
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(args.source)
        for n, line in enumerate(stdin, 1):
            line = line[:-1] if line.endswith("\n") else line
            line = line[:-1] if line.endswith("\r") else line
            if args.decode:
                try:
                    ids = [int(x) for x in line.split()]
                    text = tok.decode(ids, skip_special=args.skip_special)
                except ValueError as e:
                    raise XllmError(f"line {n}: {e}") from None
                stdout.write(text + "\n")
            else:
                ids = tok.encode(line, add_bos=args.bos, allow_special=args.allow_special, add_eos=args.eos)
                out = (tok.id_to_piece(i) for i in ids) if args.pieces else map(str, ids)
                stdout.write(" ".join(out) + "\n")
        stdout.flush()
    except XllmError as e:
        print(f"xllm.tokenize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
