"""xllm: a Numba-accelerated, pure-Python inference engine for Llama-architecture models."""

__version__ = "0.1.0"
