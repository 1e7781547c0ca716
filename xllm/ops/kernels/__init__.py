"""The kernel bodies: each operator's math, written once, compiled for every device.

The modules of this package hold plain, undecorated Python functions that do
one piece of an operator: one row of rmsnorm, one key's score, one block of
a quantized row. They never say which device they run on. Each device
compiles the whole package its own way and calls the result from its
drivers, the loops that hand the work out:

    cpu/bodies.py    compile_bodies(numba.njit(inline="always"))   inside prange loops
    cuda/bodies.py   compile_bodies(cuda.jit(device=True))         inside grid kernels

so `rows.rmsnorm_scale(...)` in a CPU driver and in a CUDA kernel is the same
source line, compiled twice. A body that must split its work between threads
takes `lane, lanes`: it handles elements lane, lane + lanes, lane + 2 lanes, ...
A CPU thread calls it with (0, 1) and does the whole row; the threads of a
GPU block call it with (threadIdx.x, blockDim.x) and share the row.

Stepping through a body: with NUMBA_DISABLE_JIT=1 the CPU "compiler" returns
the function unchanged, and under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)
each GPU thread runs it as Python; either way a debugger stops in these files.

Rules for a body (both compilers must accept it):
  * numbers and arrays only: no lists, dicts, exceptions or allocation
    (scratch comes from the caller);
  * call only other bodies of this package, `math`, and numpy scalar types
    and functions that numba.cuda also supports (np.float32, np.floor, ...);
  * per-dtype work is an explicit function (`f16.f16_bits_to_f32`),
    chosen by the caller, not by overloading on the argument's type.

    compile_bodies(compile) -> every module of this package, its bodies compiled

How it works (`twin`): it copies each function of `module` with a fresh globals
dictionary in which every other body (of this module or an imported one) is
replaced by its compiled twin, then compiles the copy. The copy shares the
original's code object, so tracebacks and debuggers show the original file.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import types

_PACKAGE = __name__


def _is_body(value) -> bool:
    return isinstance(value, types.FunctionType) and value.__module__.startswith(_PACKAGE + ".")


def twin(module: types.ModuleType, compile, _done: dict | None = None) -> types.ModuleType:
    """A new module with the bodies of `module` compiled by `compile` (see the module docstring).

    `compile` is a decorator such as `numba.njit(inline="always")`. Bodies
    that `module` imports from other modules of this package are compiled
    the same way (once each), so a compiled body only ever calls compiled
    bodies. Non-function attributes (constants) are shared as they are.
    """
    done = {} if _done is None else _done
    key = (module.__name__, id(compile))
    if key in done:
        return done[key]
    out = types.ModuleType(module.__name__, module.__doc__)
    done[key] = out
    namespace = out.__dict__                # the globals of every compiled copy of this module
    for name, value in vars(module).items():
        if name in ("__name__", "__doc__"):
            continue
        if _is_body(value) and value.__module__ == module.__name__:
            copy = types.FunctionType(value.__code__, namespace, value.__name__, value.__defaults__,
                                      value.__closure__)
            copy.__qualname__, copy.__doc__ = value.__qualname__, value.__doc__
            copy.__module__ = value.__module__
            namespace[name] = compile(copy)
        elif _is_body(value):
            namespace[name] = getattr(twin(sys.modules[value.__module__], compile, done), value.__name__)
        else:
            namespace[name] = value
    return out


def compile_bodies(compile) -> types.SimpleNamespace:
    """Every module of this package, twinned with `compile`: `.rows`, `.attend`, ...

    Each body is compiled once, however many modules import it.
    """
    done: dict = {}
    modules = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{_PACKAGE}.{info.name}")
        modules[info.name] = twin(module, compile, done)
    return types.SimpleNamespace(**modules)
