"""`python -m xllm.serve`: the OpenAI-compatible server, in one process or as Ray Serve replicas.

    python -m xllm.serve [--model M] [--host 127.0.0.1] [--port 8000] [--device auto] [--kv-dtype fp32]
    python -m xllm.serve --replicas 2 --threads 1      # two engines on Ray Serve, one CPU thread each
"""

from __future__ import annotations

import argparse
import sys

from ..errors import XllmError
from .config import DEVICES, KV_DTYPES, ServeConfig


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m xllm.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", "-m", help="a .gguf file, a Hugging Face directory or a llama2.c .bin "
                                         "(default: SmolLM2-135M-Instruct, downloaded on first use)")
    p.add_argument("--tokenizer", help="tokenizer file or directory (needed for llama2.c checkpoints)")
    p.add_argument("--served-model-name", help="the name clients pass as \"model\" (default: the file's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where the model runs (default auto: a GPU when one works, else the CPU)")
    p.add_argument("--kv-dtype", choices=KV_DTYPES, default="fp32", help="how the KV cache stores keys and values")
    p.add_argument("--exact", action="store_true",
                   help="multiply quantized weights in float32 (default: integer activations for few tokens)")
    p.add_argument("-t", "--threads", type=int, default=None, help="CPU threads per engine (default: all cores)")
    p.add_argument("--max-num-seqs", type=int, default=32, help="requests in the running batch (default 32)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="tokens per step (default 512)")
    p.add_argument("--kv-cache-mb", type=int, default=1024, help="KV cache size per engine in MiB (default 1024)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests that may wait for a place in the batch; past that, HTTP 503 (default 256)")
    p.add_argument("--replicas", type=int, default=0,
                   help="run N engine replicas as a Ray Serve deployment (needs xllm[ray]); 0: one process, no Ray")
    p.add_argument("--ray-address", default=None,
                   help="with --replicas: the Ray cluster to join (e.g. auto, or head-node:6379); default: a local one")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = ServeConfig(model=args.model, tokenizer=args.tokenizer, served_name=args.served_model_name,
                             device=args.device, kv_dtype=args.kv_dtype, exact=args.exact, threads=args.threads,
                             max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                             kv_cache_bytes=args.kv_cache_mb << 20, max_queue=args.max_queue)
        if args.replicas < 0:
            raise XllmError(f"--replicas must be >= 0, got {args.replicas}")
        if args.replicas:
            try:
                from .ray_serve import run_replicas
            except ImportError:
                raise XllmError('--replicas needs Ray Serve: pip install "xllm[ray]"') from None
            run_replicas(config, args.replicas, args.host, args.port, args.ray_address)
        else:
            serve(config, args.host, args.port)
    except XllmError as e:
        print(f"xllm: error: {e}", file=sys.stderr)
        return 2
    return 0


def serve(config: ServeConfig, host: str, port: int) -> None:
    """One engine in this process, served by uvicorn until Ctrl-C."""
    try:
        import starlette  # noqa: F401  (the app's framework; imported here for the message below)
        import uvicorn
    except ImportError:
        raise XllmError('the server needs starlette and uvicorn: pip install "xllm[serve]"') from None
    from .app import Server

    server = Server(config)
    print(f"xllm: serving {server.served.name} at http://{host}:{port}/v1 (OpenAI API; /health, /metrics)",
          file=sys.stderr)
    uvicorn.run(server.app, host=host, port=port, log_level="warning", access_log=False)


if __name__ == "__main__":
    sys.exit(main())
