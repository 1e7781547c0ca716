"""Stepping through a kernel, as README.md's "Step through a kernel" section shows it.

  * With NUMBA_DISABLE_JIT=1 every CPU driver and kernel body is plain Python:
    the operator tests pass that way too (a few operators, to keep it quick).
  * A pdb breakpoint in a shared kernel body stops there while the tiny
    model runs on the CPU (NUMBA_DISABLE_JIT=1).
  * Under the CUDA simulator, a `breakpoint()` put in the same body stops
    inside one simulated GPU thread.
"""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.ops_helpers import CUDA_DEVICE
from xllm.ops.kernels import rows

BODY = REPO / "xllm" / "ops" / "kernels" / "rows.py"


def run(args, env_extra, stdin="", cwd=REPO, timeout=600):
    """python *args in a fresh process whose numba settings are `env_extra` only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(env_extra)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                          timeout=timeout)


def first_loop_line(fn) -> int:
    """The line of the first `for` of a function: where a breakpoint shows the body at work."""
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if line.strip().startswith("for "))


def test_operator_tests_pass_with_the_jit_disabled():
    r = run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_ops_pointwise.py", "-k",
             "cpu and (rmsnorm or rope or silu_mul)"], {"NUMBA_DISABLE_JIT": "1"}, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_pdb_stops_in_a_kernel_body_on_the_cpu():
    line = first_loop_line(rows.rmsnorm_scale)
    assert f"rows.py:{line}" in (REPO / "README.md").read_text(), "README's pdb command names another line"
    commands = "p t, lane, lanes, x.shape\nwhere\ncontinue\nquit\n"
    r = run(["-m", "pdb", "-c", f"break {BODY}:{line}", "-c", "continue", "-m", "xllm.testing", "--device", "cpu",
             "-n", "1"], {"NUMBA_DISABLE_JIT": "1"}, stdin=commands)
    out = r.stdout
    assert f"rows.py({line})rmsnorm_scale()" in out, out[-3000:]
    assert "(0, 0, 1, (4, 64))" in out            # row 0 of the 4-token prompt, one lane: the CPU's whole row
    assert "pointwise.py" in out and "_rmsnorm" in out   # `where` shows the CPU driver that called the body


@pytest.mark.skipif(CUDA_DEVICE != "cuda-sim", reason="the simulator is what CI runs (numba-cuda installed, no GPU)")
def test_breakpoint_in_a_kernel_body_stops_in_one_simulated_gpu_thread(tmp_path):
    # The README's recipe on a copy of the package: a breakpoint() for one thread of one row.
    shutil.copytree(REPO / "xllm", tmp_path / "xllm", ignore=shutil.ignore_patterns("__pycache__"))
    body = tmp_path / "xllm" / "ops" / "kernels" / "rows.py"
    line = first_loop_line(rows.rmsnorm_scale)
    src = body.read_text().splitlines(keepends=True)
    indent = src[line - 1][: len(src[line - 1]) - len(src[line - 1].lstrip())]
    src.insert(line - 1, f"{indent}if t == 1 and lane == 2:\n{indent}    breakpoint()\n")
    body.write_text("".join(src))
    commands = "p t, lane, lanes\np x.shape\n" + "continue\n" * 10   # it stops once per rmsnorm call
    r = run(["-m", "xllm.testing", "--device", "cuda-sim", "-n", "1"], {"NUMBA_ENABLE_CUDASIM": "1"},
            stdin=commands, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "rmsnorm_scale()" in r.stdout and "(1, 2, 4)" in r.stdout, r.stdout[-3000:]   # row 1, lane 2 of 4
    assert "tiny llama on cuda-sim" in r.stdout
