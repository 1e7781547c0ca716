"""Load on `python -m xllm.serve`: N streaming clients, then the same requests through `LLM.generate`.

    python -m bench.serve_load --clients 32 --requests 64 --max-tokens 64        # starts its own server
    python -m bench.serve_load --url http://127.0.0.1:8000 --no-in-process       # an existing server
    python -m bench.serve_load --requests 200 --disconnect 0.2 --no-in-process   # 20% of clients leave mid-stream

Each client streams one /v1/completions request at a time (greedy,
exactly `max_tokens` tokens: `ignore_eos`, so that both sides do the same
work; prompts taken in turn from the prompt file) until the
requests are used up. Per request it records the time to the first token
(TTFT) and the mean time per later token (TPOT); the run prints requests/s,
generated tokens/s, TTFT and TPOT p50/p90 and errors. With `--disconnect p`
a client closes a stream with probability p after a random number of
tokens; afterwards the server's /metrics must show no request left and no
KV block held, and every other request must have finished.

Then, unless `--no-in-process`, the same requests go to `LLM.generate` in
this process (all at once, the engine running `--max-num-seqs` of them
together, as the server does): the cost of HTTP is the gap between the two
tokens/s. `--rounds R` alternates the two R times, so that both see the
same machine load (a 2-core machine shared with other work is noisy).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """What one load run measured."""

    name: str
    requests: int
    seconds: float
    generated: int = 0
    errors: int = 0
    disconnected: int = 0
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)

    def line(self) -> str:
        def p(xs: list[float], q: float) -> str:
            return f"{statistics.quantiles(xs, n=10)[int(q * 10) - 1]:.3f}" if len(xs) > 1 else "-"
        return (f"{self.name:10s} {self.requests} requests in {self.seconds:.1f} s: "
                f"{self.requests / self.seconds:.2f} req/s, {self.generated / self.seconds:.1f} generated tok/s, "
                f"TTFT p50 {p(self.ttft, .5)} p90 {p(self.ttft, .9)} s, TPOT p50 {p(self.tpot, .5)} "
                f"p90 {p(self.tpot, .9)} s, errors {self.errors}, disconnected {self.disconnected}")


# ------------------------------------------------------------ the HTTP clients

async def one_request(http: httpx.AsyncClient, body: dict, leave_after: int | None, run: Run) -> None:
    """Stream one completion; leave after `leave_after` tokens (None: read to the end)."""
    t0 = time.perf_counter()
    first = last = None
    tokens, finished = 0, False
    try:
        async with http.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                run.errors += 1
                print(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}", file=sys.stderr)
                return
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    finished = True
                    break
                if not line.startswith("data: "):
                    continue
                if '"usage"' in line or '"error"' in line:    # parse only these: the client shares the CPUs
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    tokens = chunk["usage"]["completion_tokens"]
                elif '"text":""' not in line:
                    last = time.perf_counter()
                    first = first or last
                    if leave_after is not None and (leave_after := leave_after - 1) <= 0:
                        run.disconnected += 1
                        return                      # leaving the `async with` closes the connection
    except (httpx.HTTPError, RuntimeError) as e:
        run.errors += 1
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return
    if not finished:
        run.errors += 1
        return
    run.generated += tokens
    if first is not None:
        run.ttft.append(first - t0)
        if tokens > 1:
            run.tpot.append((last - first) / (tokens - 1))


async def http_load(url: str, bodies: list[dict], clients: int, disconnect: float, seed: int) -> Run:
    rng = random.Random(seed)
    leave = [rng.randint(1, max(1, b["max_tokens"] - 1)) if rng.random() < disconnect else None for b in bodies]
    todo = iter(range(len(bodies)))
    run = Run("serve", len(bodies), 0.0)

    async def client(http: httpx.AsyncClient) -> None:
        for i in todo:                  # each client takes the next request when its last one is done
            await one_request(http, bodies[i], leave[i], run)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=None, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        run.seconds = time.perf_counter() - t0
    return run


def check_nothing_left(url: str) -> str:
    """After a run: no request in the engine and no KV block held, from the server's /metrics."""
    deadline = time.monotonic() + 30
    while True:
        samples = {}
        for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                name = key.split("{", 1)[0] + ("{abort}" if 'finish_reason="abort"' in key else "")
                samples[name] = samples.get(name, 0.0) + float(value)
        left = {k: samples[k] for k in ("xllm_requests_running", "xllm_requests_waiting", "xllm_kv_blocks_used")}
        if not any(left.values()) or time.monotonic() > deadline:
            return ", ".join(f"{k.removeprefix('xllm_')} {v:g}" for k, v in left.items()) + \
                f" (requests aborted since the server started: {samples.get('xllm_requests_total{abort}', 0):g})"
        time.sleep(0.5)


# ------------------------------------------------------------ in process

def in_process_load(llm, bodies: list[dict]) -> Run:
    from xllm.sampling import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=b["max_tokens"], ignore_eos=True) for b in bodies]
    t0 = time.perf_counter()
    outs = llm.generate([b["prompt"] for b in bodies], params)
    run = Run("in-process", len(bodies), time.perf_counter() - t0)
    run.generated = sum(len(o.token_ids) for o in outs)
    run.errors = sum(o.finish_reason == "error" for o in outs)
    run.ttft = [o.ttft for o in outs if o.ttft is not None]
    run.tpot = [o.tpot for o in outs if o.tpot is not None]
    return run


# ------------------------------------------------------------ main

def start_server(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:               # a free port of 127.0.0.1
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "xllm.serve", "--port", str(port), "--max-num-seqs", str(args.max_num_seqs),
           "--max-queue", str(args.requests)] + (["--model", args.model] if args.model else [])
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(1)
    raise SystemExit("the server did not start")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running server (default: start one with --model)")
    p.add_argument("--model", help="checkpoint for the server started here and for LLM.generate (default model)")
    p.add_argument("--prompts", default=str(REPO.parent / "shared" / "data" / "prompts.txt"))
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32, help="the batch of the server started here and of LLM")
    p.add_argument("--disconnect", type=float, default=0.0, help="share of requests whose client leaves mid-stream")
    p.add_argument("--rounds", type=int, default=1, help="alternate server and in-process runs this many times")
    p.add_argument("--no-in-process", action="store_true", help="skip the LLM.generate comparison")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    prompts = [line for line in Path(args.prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    proc, url = (None, args.url) if args.url else start_server(args)
    try:
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        bodies = [{"model": name, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens,
                   "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
                  for i in range(args.requests)]
        llm = None
        if not args.no_in_process:
            from xllm import LLM

            llm = LLM(args.model, max_num_seqs=args.max_num_seqs)
            in_process_load(llm, bodies[:2])                   # warm-up
        asyncio.run(http_load(url, bodies[:2], 2, 0.0, args.seed))   # warm-up
        print(f"{args.requests} requests of {args.max_tokens} tokens at most, {args.clients} clients, "
              f"prompts from {args.prompts}", flush=True)
        ratios = []
        for r in range(args.rounds):
            served = asyncio.run(http_load(url, bodies, args.clients, args.disconnect, args.seed + r))
            print(served.line(), flush=True)
            print(f"           left in the server afterwards: {check_nothing_left(url)}", flush=True)
            if llm is not None:
                local = in_process_load(llm, bodies)
                print(local.line(), flush=True)
                ratios.append(served.generated / served.seconds / (local.generated / local.seconds))
                print(f"           serve / in-process generated tok/s: {ratios[-1]:.3f}", flush=True)
        if len(ratios) > 1:
            print(f"median serve / in-process generated tok/s over {len(ratios)} rounds: {statistics.median(ratios):.3f}")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
