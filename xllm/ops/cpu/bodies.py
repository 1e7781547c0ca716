"""The kernel bodies of `xllm/ops/kernels/`, compiled for the CPU.

    from .bodies import rows
    ...  rows.rmsnorm_scale(x, w, inv_rms, out, t, 0, 1)   # inside a prange driver

Each body is compiled with `numba.njit(inline="always")`: numba pastes it into
the driver that calls it before optimising, so it costs no call and takes on
the driver's fast-math flags; a learner reads one function, LLVM sees one loop.
With NUMBA_DISABLE_JIT=1 the bodies are the plain Python functions.

Numba's on-disk cache (`cache=True` on every driver) knows only the driver's
own source file, so an edited body would leave the drivers' cached machine
code stale. `_BodiesAwareLocator` adds the bodies' sources, and simd.py's
(its operations are pasted into the drivers too), to the stamp that the
cache compares, for the drivers of this package.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numba
from numba.core import caching

from ..kernels import compile_bodies

_bodies = compile_bodies(numba.njit(inline="always"))
attend, expf, f16, kv_format, qblock, qdot, rows = (
    _bodies.attend, _bodies.expf, _bodies.f16, _bodies.kv_format, _bodies.qblock, _bodies.qdot, _bodies.rows)


# ---------------------------------------------------------------- the cache sees the bodies

_KERNELS_DIR = Path(__file__).resolve().parents[1] / "kernels"


@functools.lru_cache(maxsize=None)
def _bodies_stamp() -> bytes:
    h = hashlib.sha256()
    for path in sorted(_KERNELS_DIR.glob("*.py")) + [Path(__file__).with_name("simd.py")]:
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.digest()


class _BodiesAwareLocator(caching._CacheLocator):
    """numba's usual cache location for a driver of xllm.ops.cpu, with a stamp
    that also changes when any kernel body changes."""

    def __init__(self, inner):
        self._inner = inner

    def ensure_cache_path(self):
        self._inner.ensure_cache_path()

    def get_cache_path(self):
        return self._inner.get_cache_path()

    def get_source_stamp(self):
        return self._inner.get_source_stamp(), _bodies_stamp()

    def get_disambiguator(self):
        return self._inner.get_disambiguator()

    @property
    def _py_file(self):         # numba's "cannot cache" warning names the file
        return self._inner._py_file

    @classmethod
    def from_function(cls, py_func, py_file):
        if not py_func.__module__.startswith(__package__ + "."):
            return None
        for locator in caching.CacheImpl._locator_classes:
            if locator is not cls:
                inner = locator.from_function(py_func, py_file)
                if inner is not None:
                    return cls(inner)
        return None


if _BodiesAwareLocator not in caching.CacheImpl._locator_classes:
    caching.CacheImpl._locator_classes.insert(0, _BodiesAwareLocator)
