"""N engine replicas behind one OpenAI-compatible route: a Ray Serve deployment.

    python -m xllm.serve --replicas 2 --threads 1                  # a local Ray, this machine
    python -m xllm.serve --replicas 8 --ray-address auto           # a Ray cluster started with `ray start`

Each replica is a Ray actor holding a whole `Server` (xllm/serve/app.py): its
own model, engine thread, KV cache and `/metrics`. Ray Serve's HTTP proxy
takes every request on one port and routes it to a replica (the one with
fewer requests in flight of two drawn at random); Ray places the replicas
on the cluster's nodes, `threads` CPUs each, and restarts one that dies.
Nothing here balances load or tracks replicas: that is Ray's job.

A replica labels its metrics with its Ray replica tag, so that `/metrics`
(answered by whichever replica the proxy picks) says which one it is.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace

from ray import serve

from ..errors import XllmError
from .config import ServeConfig


@serve.ingress()       # the ASGI app comes from `__serve_build_asgi_app__`, once the replica is built
class XllmReplica:
    """One engine replica: a `Server` built inside the Ray actor, on the node Ray chose."""

    def __init__(self, config: ServeConfig):
        from .app import Server

        self.server = Server(replace(config, replica=serve.get_replica_context().replica_tag))

    def __serve_build_asgi_app__(self):
        return self.server.app


def run_replicas(config: ServeConfig, replicas: int, host: str, port: int, address: str | None) -> None:
    """Start (or join) Ray, deploy `replicas` engines on `host:port`, serve until Ctrl-C."""
    import ray

    ray.init(address=address, include_dashboard=False, log_to_driver=True)
    try:
        serve.start(http_options={"host": host, "port": port})
        deployment = serve.deployment(
            XllmReplica, name="xllm", num_replicas=replicas,
            ray_actor_options={"num_cpus": config.threads or 1},
            # Ray Serve queues requests past this in its proxy; the engine itself
            # takes max_num_seqs + max_queue (503 past that).
            max_ongoing_requests=config.max_num_seqs + config.max_queue,
            health_check_period_s=10, graceful_shutdown_timeout_s=5)
        serve.run(deployment.bind(config), name="xllm", route_prefix="/")
        print(f"xllm: serving with {replicas} replicas on Ray Serve at http://{host}:{port}/v1 "
              "(OpenAI API; /health, /metrics of the replica that answers)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    except RuntimeError as e:        # e.g. the port is taken, or a replica failed to start
        raise XllmError(f"Ray Serve: {e}") from None
    finally:
        serve.shutdown()
        ray.shutdown()
