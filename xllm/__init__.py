"""xllm: a Numba-accelerated, pure-Python inference engine for Llama-architecture models.

    from xllm import LLM, SamplingParams
    llm = LLM()                                   # the default model, downloaded on first use
    print(llm.generate("The capital of France is", SamplingParams(max_tokens=8))[0].text)
"""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "Engine"]


def __getattr__(name: str):
    # Imported on first use, so `import xllm` (and `python -m xllm.main --help`)
    # stays quick and does not load numba.
    if name in ("LLM", "RequestOutput", "Engine"):
        from . import engine

        return getattr(engine, name)
    if name == "SamplingParams":
        from .sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'xllm' has no attribute {name!r}")
