"""Streaming chat with a Llama-architecture model.

    python -m xllm.main                      # chat with the default model (SmolLM2-135M-Instruct)
    python -m xllm.main -p "Hello" -n 64     # one answer, then exit
    python -m xllm.main --model model.gguf   # a GGUF file, a Hugging Face directory,
    python -m xllm.main --model m.bin --tokenizer tokenizer.model   # or a llama2.c checkpoint

In the chat, /reset starts a new conversation, /exit (or Ctrl-D) leaves, and
Ctrl-C stops the answer being written while keeping the conversation.
"""

from __future__ import annotations

import argparse
import os
import sys

from .errors import XllmError


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m xllm.main", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", help="a .gguf file, a Hugging Face directory or a llama2.c .bin (default: SmolLM2-135M-Instruct, downloaded on first use)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (needed for llama2.c checkpoints)")
    p.add_argument("-p", "--prompt", help="answer this one message and exit")
    p.add_argument("-n", "--max-tokens", type=int, default=256, help="most tokens per answer (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1.0 = off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalise tokens already seen (1.0 = off)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the answer before this text (may be given more than once)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "cuda-sim"], default="auto",
                   help="where the model runs (default auto: a GPU when one works, else the CPU)")
    p.add_argument("--system", default=None, help="system prompt (default: the model's own, if any)")
    p.add_argument("--chat-format", choices=["auto", "chatml", "llama2", "raw"], default="auto",
                   help="how turns become tokens (default: from the model's files); raw = plain completion")
    p.add_argument("--f32", action="store_true",
                   help="every weight float32 (the default keeps GGUF Q8_0/Q4_0/Q4_1 blocks, same values, "
                        "and stores float matrices as float16 on a GPU)")
    p.add_argument("--exact", action="store_true",
                   help="multiply quantized weights in float32 (default: integer activations and "
                        "dot products on the CPU, as llama.cpp does)")
    add_quantize_args(p)
    p.add_argument("--kv-dtype", choices=["fp32", "fp16", "int8"], default="fp32",
                   help="how the KV cache stores keys and values (int8: one scale per token per head)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the prepared-weights cache")
    p.add_argument("--stats", action="store_true", help="print token counts and speed after each answer")
    return p.parse_args(argv)


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    """--quantize, --smooth, --calib: quantize the float weights at load (the benchmarks share them)."""
    p.add_argument("--quantize", choices=["w8a8", "q8_0", "fp16"], default=None,
                   help="quantize the weights at load: w8a8 = int8 per output channel with int8 activations "
                        "(a GGUF's blocks are dequantized first); see xllm/quantize.py")
    p.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="with --quantize w8a8: SmoothQuant smoothing with this alpha (0.5 is usual; 0.8 kept SmolLM2-135M within 2%% of fp32 perplexity, bench/RESULTS.md)")
    p.add_argument("--calib", default=None, help="the calibration text for --smooth "
                                                 "(default ../shared/data/shareGPT_sample.txt)")


def quantize_options(args):
    """The `QuantizeOptions` of parsed --quantize/--smooth/--calib, or None; a bad mix is an XllmError."""
    from .quantize import QuantizeOptions

    if args.quantize is None:
        if args.smooth is not None:
            raise XllmError("--smooth needs --quantize w8a8")
        return None
    try:
        return QuantizeOptions(args.quantize, args.smooth, args.calib)
    except ValueError as e:
        raise XllmError(str(e)) from None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except XllmError as e:
        print(f"xllm: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    import numba

    from .chat import FORMATS, ChatSession, detect_format
    from .download import default_model_path
    from .engine import Engine
    from .kv_cache import blocks_for
    from .planner import kv_pool_blocks
    from .load import load_model
    from .sampling import SamplingParams

    if args.threads is not None:
        if not 1 <= args.threads <= numba.config.NUMBA_NUM_THREADS:
            raise XllmError(f"--threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {args.threads}")
        numba.set_num_threads(args.threads)
    try:
        params = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed, max_tokens=args.max_tokens,
                                repetition_penalty=args.repeat_penalty, stop=tuple(args.stop))
    except ValueError as e:
        raise XllmError(str(e)) from None

    from .ops import get_ops, resolve_device

    get_ops(resolve_device(args.device))     # a device that cannot run fails before the download
    path = args.model or default_model_path(log=lambda m: print(m, file=sys.stderr))
    model, tok, metadata = load_model(path, args.tokenizer, device=args.device, use_cache=not args.no_cache,
                                      keep_quant=not args.f32, exact=args.exact, quantize=quantize_options(args))
    fmt, default_system = detect_format(tok, metadata)
    if args.chat_format != "auto":
        fmt = FORMATS[args.chat_format]()
    # The pool holds one whole context (the longest conversation the model can
    # see), or what 1 GiB pays for when a context is longer than that.
    ctx = model.config.context_length
    blocks = min(blocks_for(ctx, 128), max(1, kv_pool_blocks(model.config, args.kv_dtype, 128, 1 << 30)))
    engine = Engine(model, tok, kv_dtype=args.kv_dtype, num_blocks=blocks)
    chat = ChatSession(engine, tok, fmt, args.system if args.system is not None else default_system,
                       notice=lambda message: print(f"xllm: {message}", file=sys.stderr))

    def answer(text: str) -> None:
        try:
            for piece in chat.send(text, params):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [stopped]")
        sys.stdout.write("\n")
        sys.stdout.flush()
        out, t = chat.last_output, chat.last_turn
        if out is not None and out.finish_reason == "error":
            raise XllmError(out.error)
        if out is not None and out.cut_by_context:
            print(f"xllm: the answer was cut: the model's context of {ctx} tokens is full", file=sys.stderr)
        if args.stats:
            rate = (t["answer_tokens"] - 1) / t["decode_s"] if t["decode_s"] > 0 else 0.0
            print(f"[prompt {t['prompt_tokens']} tokens, {t['computed_tokens']} computed, first token "
                  f"{t['first_token_s']:.3f} s; {t['answer_tokens']} tokens, {rate:.1f} tok/s decode]", file=sys.stderr)

    if args.prompt is not None:
        answer(args.prompt)
        return 0

    name = metadata.get("general.name") or os.path.basename(str(path))
    print(f"xllm: chatting with {name} ({fmt.name} format, on {model.device}). /reset starts over, /exit leaves, "
          "Ctrl-C stops an answer.",
          file=sys.stderr)
    while True:
        try:
            text = input("> ")
        except EOFError:
            print()
            return 0
        except KeyboardInterrupt:
            print("\n(/exit or Ctrl-D to leave)")
            continue
        if text.strip() == "/exit":
            return 0
        if text.strip() == "/reset":
            chat.reset()
            print("(new conversation)")
            continue
        if text.strip():
            try:
                answer(text)
            except XllmError as e:      # one bad message does not end the chat
                print(f"xllm: error: {e}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
