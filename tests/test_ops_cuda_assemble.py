"""Every CUDA kernel compiles to PTX and assembles to sm_80 and sm_90 machine code, without a GPU.

The simulator (the other CUDA tests) runs kernels as Python, so it would not
notice code that numba's CUDA target cannot compile, nor PTX the assembler
rejects; `python -m xllm.ops.cuda.assemble` checks both (see its docstring).
It runs in its own process because this one may have loaded the simulator.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.ops_helpers import CUDA_DEVICE

pytestmark = pytest.mark.skipif(CUDA_DEVICE is None, reason="numba-cuda is not installed (CI installs it)")


def test_every_cuda_kernel_assembles_for_sm_80_and_sm_90():
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    r = subprocess.run([sys.executable, "-m", "xllm.ops.cuda.assemble", "--arch", "sm_80", "sm_90"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-3000:]
    ok = re.findall(r"^ok\s+(\S+)\s+(sm_\d+)\s+ptx\s+(\d+) B\s+cubin\s+(\d+) B", r.stdout, re.M)
    by_kernel = {}
    for name, arch, ptx, cubin in ok:
        assert int(ptx) > 0 and int(cubin) > 0
        by_kernel.setdefault(name, set()).add(arch)
    assert "FAIL" not in r.stdout and "MISSING" not in r.stdout
    assert len(by_kernel) >= 10, sorted(by_kernel)       # every operator's kernels, and the memory ones
    assert all(archs == {"sm_80", "sm_90"} for archs in by_kernel.values()), by_kernel
    assert re.search(r"0 failures, 0 kernels never launched", r.stdout)
