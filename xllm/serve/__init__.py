"""An OpenAI-compatible HTTP server over the engine loop: `python -m xllm.serve`.

    python -m xllm.serve                     # the default model on http://127.0.0.1:8000/v1
    python -m xllm.serve --replicas 2        # two engines behind one route, on Ray Serve

The pieces, each in its own module:
- `config`: `ServeConfig` (what the flags say) and loading the model;
- `engine_loop`: one thread that owns the `Engine` and steps it; HTTP
  handlers hand it requests and aborts through an inbox, and get each
  step's outputs back on their event loop;
- `protocol`: OpenAI request bodies -> prompts and `SamplingParams`, and
  the 400 errors naming the field;
- `app`: the Starlette routes and the answers (JSON or server-sent events);
- `metrics`: `/metrics` in Prometheus' text format;
- `ray_serve`: the same app as a Ray Serve deployment of N replicas.

Starlette and uvicorn come with the `serve` extra (`pip install "xllm[serve]"`),
Ray Serve with the `ray` extra; the core package needs neither.
"""

from .config import ServeConfig

__all__ = ["ServeConfig"]
