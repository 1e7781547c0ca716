"""Prefill and decode tokens/s at long contexts, xllm beside llama.cpp, interleaved.

    python -m bench.long_context [--model M.gguf] [--tokens 128,512,2048,4000,8000]
                                 [--decode-tokens 64] [--runs 3] [--threads 2] [--no-peer]

For each prompt length N, one run is: a fresh random prompt of N tokens computed
in one step (prefill tok/s = N / time to the first token), then --decode-tokens
greedy tokens one step each (decode tok/s after a prompt of N). xllm runs
through its engine (prefix cache off, so every run computes its whole prompt);
llama.cpp runs the same GGUF through llama-cpp-python's low-level API (flash
attention as its default picks, n_ubatch 512), in a worker process of the
peers' virtual environment (`/tmp/peers/venv`, built by ../shared/peers/setup.sh)
when it has llama_cpp. The two take turns, run by run, so that other load on
the machine falls on both alike; each figure is the median of --runs runs after
a warm-up, and the ratio column is xllm / llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

PEER_PYTHON = Path("/tmp/peers/venv/bin/python")
PEER_MODELS = [Path(f"/tmp/peers/models/SmolLM2-135M-Instruct.{q}.gguf") for q in ("Q8_0", "Q4_1")]
PEERS_DIR = Path(__file__).resolve().parents[2] / "shared" / "peers"

# The llama.cpp worker: reads "N D seed" lines, answers one JSON line each.
_PEER_WORKER = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
import llama_cpp as L
from bench_llamacpp import Model, Ctx
L.llama_backend_init()
m = Model(sys.argv[2])
c = Ctx(m, int(sys.argv[3]), 1, int(sys.argv[4]), "auto", n_batch=int(sys.argv[3]))
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    n, d, seed = map(int, line.split())
    prompt = np.random.default_rng(seed).integers(3, m.n_vocab, n).tolist()
    c.clear()
    t0 = time.perf_counter()
    tok = c.decode([(t, i, 0, i == n - 1) for i, t in enumerate(prompt)])[0]
    t1 = time.perf_counter()
    for pos in range(n, n + d):
        tok = c.decode([(tok, pos, 0, True)])[0]
    t2 = time.perf_counter()
    print(json.dumps({"prefill": n / (t1 - t0), "decode": d / (t2 - t1)}), flush=True)
"""


class PeerFailed(RuntimeError):
    """The llama.cpp worker died (a crash of llama.cpp itself, such as an illegal instruction)."""


class Peer:
    """llama.cpp in a worker process of the peers' environment."""

    def __init__(self, model: Path, n_ctx: int, threads: int):
        self.proc = subprocess.Popen([str(PEER_PYTHON), "-c", _PEER_WORKER, str(PEERS_DIR), str(model), str(n_ctx),
                                      str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            raise RuntimeError("the llama.cpp worker did not start")

    def run(self, n: int, d: int, seed: int) -> tuple[float, float]:
        self.proc.stdin.write(f"{n} {d} {seed}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise PeerFailed(f"the llama.cpp worker exited with status {self.proc.wait()} at {n} tokens")
        r = json.loads(line)
        return r["prefill"], r["decode"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def peer_available() -> str | None:
    """Why llama.cpp cannot run here, or None."""
    if not PEER_PYTHON.exists():
        return f"{PEER_PYTHON} is absent"
    r = subprocess.run([str(PEER_PYTHON), "-c", "import llama_cpp"], capture_output=True, check=False)
    return None if r.returncode == 0 else f"{PEER_PYTHON} has no llama_cpp"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.long_context", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default=None, help="a GGUF (default: the peers' Q8_0, else their Q4_1, "
                                                        "else the default model)")
    ap.add_argument("--tokens", default="128,512,2048,4000,8000", help="prompt lengths, comma-separated")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--no-peer", action="store_true", help="xllm only")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numba

    from xllm.download import default_model_path
    from xllm.engine import Engine
    from xllm.kv_cache import blocks_for
    from xllm.load import load_model
    from xllm.sampling import SamplingParams

    numba.set_num_threads(args.threads)
    lengths = [int(n) for n in args.tokens.split(",")]
    present = [p for p in PEER_MODELS if p.exists()]
    path = Path(args.model) if args.model else (present[0] if present else default_model_path())
    longest = max(lengths) + args.decode_tokens + 1
    model, tok, _ = load_model(str(path), device="cpu")
    if model.config.context_length < longest:
        ap.error(f"{max(lengths)} + {args.decode_tokens} tokens is past the model's context of "
                 f"{model.config.context_length}")
    engine = Engine(model, tok, kv_dtype=args.kv_dtype, num_blocks=blocks_for(longest, 128),
                    max_num_batched_tokens=max(lengths), prefix_caching=False)
    params = SamplingParams(max_tokens=args.decode_tokens + 1, ignore_eos=True)

    def xllm_run(n: int, seed: int) -> tuple[float, float]:
        prompt = [int(i) for i in np.random.default_rng(seed).integers(3, model.config.vocab_size, n)]
        t0 = time.perf_counter()
        out = engine.run(prompt, params)
        return n / (out.first_token_time - t0), args.decode_tokens / (out.finish_time - out.first_token_time)

    why_not = "--no-peer" if args.no_peer else peer_available()
    peer = None if why_not else Peer(path, longest + 64, args.threads)
    engines = {"xllm": xllm_run}
    if peer:
        engines["llama.cpp"] = lambda n, seed: peer.run(n, args.decode_tokens, seed)
    results = {}
    try:
        for n in lengths:
            runs: dict[str, list] = {name: [] for name in engines}
            try:
                for name, run in engines.items():
                    run(n, 0)                                # warm-up (compiles, pages in)
                for r in range(args.runs):
                    for name, run in engines.items():         # interleaved, run by run
                        runs[name].append(run(n, r + 1))
            except PeerFailed as e:                          # go on with xllm alone
                why_not, peer = str(e), None
                del engines["llama.cpp"], runs["llama.cpp"]
                runs["xllm"] = [xllm_run(n, r + 1) for r in range(args.runs)]
            results[n] = {name: (statistics.median(p for p, _ in rs), statistics.median(d for _, d in rs))
                          for name, rs in runs.items()}
            if not args.json:
                line = f"{n:6d} tokens  xllm prefill {results[n]['xllm'][0]:7.1f}  decode {results[n]['xllm'][1]:6.1f}"
                if peer:
                    (pp, dd), (xp, xd) = results[n]["llama.cpp"], results[n]["xllm"]
                    line += f"   llama.cpp prefill {pp:7.1f}  decode {dd:6.1f}   ratio {xp / pp:.2f}x  {xd / dd:.2f}x"
                print(line, flush=True)
    finally:
        if peer:
            peer.close()
    if args.json:
        print(json.dumps({"model": str(path), "threads": args.threads, "kv_dtype": args.kv_dtype,
                          "peer": why_not or "llama.cpp", "results": results}))
    elif why_not:
        print(f"(llama.cpp not run: {why_not})")
    return 0


if __name__ == "__main__":
    from bench import run_main

    sys.exit(run_main(main))
