"""Batch-1 decode beside llama.cpp, on the same GGUF files, rounds interleaved.

    python -m bench.vs_llamacpp [--formats Q8_0,Q4_1,F16,F32,W8A8] [--rounds 3]

For each round and format: llama.cpp decodes 128 tokens after its chat
prompt (`../shared/peers/bench_llamacpp.py`, the peers' own Python), then
xllm decodes 128 tokens after a prompt of the same length (`bench.speed`),
so that both read the same KV cache lengths; then this process reads an
array as large as the weights one xllm decode step reads (its streaming
bandwidth, in the same minute). W8A8 is xllm's `--quantize w8a8` of the F32
file beside llama.cpp's Q8_0. Each run is a new process. The VM's speed
drifts within minutes, so compare figures of one round; the last lines are
the medians of the ratios over the rounds.

Needs the peers' setup (`../shared/peers/setup.sh`: llama-cpp-python in
/tmp/peers/venv and the model files in /tmp/peers/models).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numba
import numpy as np

from bench.ops_cpu import stream_total

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct.{}.gguf"
LLAMA_FILE = {"W8A8": "Q8_0"}           # what llama.cpp runs beside each xllm format
XLLM_FILE = {"W8A8": "F32"}
XLLM_ARGS = {"W8A8": ["--quantize", "w8a8"]}


def _last_json(command: list[str], cwd: Path) -> dict:
    out = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_cpp(args, fmt: str) -> tuple[float, int]:
    """llama.cpp's decode tok/s for the file of `fmt`, and its chat prompt's length."""
    quant = LLAMA_FILE.get(fmt, fmt)
    r = _last_json([args.peers_python, "bench_llamacpp.py", "--model-dir", args.models, "--quants", quant,
                    "--batches", "", "--batched-quants", "", "--highlevel-quants", "", "--runs", "3",
                    "--new-tokens", "128"], Path(args.peers))["results"][quant]
    return r["tg128_tok_s"], len(r["chat_prompt_ids"])


def xllm(args, fmt: str, prompt_tokens: int) -> dict:
    model = Path(args.models) / MODEL.format(XLLM_FILE.get(fmt, fmt))
    return _last_json([sys.executable, "-m", "bench.speed", "-m", str(model), "--prompt-tokens", str(prompt_tokens),
                       "--decode-tokens", "128", "--runs", "3", "--json", *XLLM_ARGS.get(fmt, [])], ROOT)


def stream_read(n_bytes: int) -> float:
    """GB/s of a parallel read of a float32 array of n_bytes (median of 5 reads after one)."""
    a = np.ones(n_bytes // 4, np.float32)
    stream_total(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        stream_total(a)
        times.append(time.perf_counter() - t0)
    return a.nbytes / statistics.median(times) / 1e9


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.vs_llamacpp", description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="Q8_0,Q4_1,F16,F32,W8A8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peers", default=str(ROOT.parent / "shared" / "peers"))
    ap.add_argument("--peers-python", default="/tmp/peers/venv/bin/python")
    ap.add_argument("--models", default="/tmp/peers/models")
    ap.add_argument("-t", "--threads", type=int, default=2, help="threads of this process's stream read")
    args = ap.parse_args(argv)
    numba.set_num_threads(args.threads)
    formats = args.formats.split(",")
    ratios: dict[str, list[float]] = {f: [] for f in formats}
    print("time  format  llama.cpp tok/s  xllm tok/s  ratio  prompt  xllm weights/token  xllm GB/s  stream GB/s")
    for _ in range(args.rounds):
        for fmt in formats:
            theirs, prompt = llama_cpp(args, fmt)
            ours = xllm(args, fmt, prompt)
            stream = stream_read(int(ours["weight_MB_per_token"] * 1e6))
            ratio = ours["decode_tok_s"] / theirs
            ratios[fmt].append(ratio)
            print(f"{time.strftime('%H:%M')}  {fmt:<6}  {theirs:15.1f}  {ours['decode_tok_s']:10.1f}  {ratio:5.2f}x"
                  f"  {prompt:6d}  {ours['weight_MB_per_token']:15.1f} MB  {ours['decode_weight_GB_s']:9.1f}"
                  f"  {stream:11.1f}", flush=True)
    for fmt in formats:
        print(f"{fmt}: median ratio {statistics.median(ratios[fmt]):.2f}x over {args.rounds} rounds "
              f"({', '.join(f'{r:.2f}' for r in ratios[fmt])})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
