"""embedding: row lookup out[t] = table[ids[t]], for a table in any weight format.

Float rows (f32, f16) are copied and widened to float32 (`qblock.widen_row`),
quantized rows dequantized (`qblock.dequant_q8`, `dequant_q4`): the same
bodies the GPU runs, and the same numbers as `QuantWeight.dequantize()`, bit
for bit. Each driver checks every id before it reads a row and returns the
first bad one (or -1); the wrapper raises it (checks.BAD_ID). Decode looks up
one row, so the threaded twin runs only for large outputs
(`common.PARALLEL_MIN_ELEMENTS`).
"""

from __future__ import annotations

import numpy as np
from numba import prange

from .. import checks
from . import common
from .bodies import qblock
from .common import first_out_of_range, serial_and_parallel


# ---------------------------------------------------------------- drivers

def _embedding_float(table, ids, out):
    """table float32 or float16 bits [V, D]; out [T, D]."""
    bad = first_out_of_range(ids, table.shape[0])
    if bad < 0:
        for t in prange(ids.shape[0]):
            qblock.widen_row(table, ids[t], out, t, 0, 1)
    return bad


def _embedding_q8(qs, d, ids, out):
    """qs int8 [V, D/32, 32]; out [T, D/32, 32]."""
    bad = first_out_of_range(ids, qs.shape[0])
    if bad < 0:
        for t in prange(ids.shape[0]):
            qblock.dequant_q8(qs, d, ids[t], out, t, 0, 1)
    return bad


def _embedding_q4(qs, d, o, c, ids, out):
    """qs uint8 [V, D/32, 16]; out [T, D/32, 32]."""
    bad = first_out_of_range(ids, qs.shape[0])
    if bad < 0:
        for t in prange(ids.shape[0]):
            qblock.dequant_q4(qs, d, o, c, ids[t], out, t, 0, 1)
    return bad


# No fastmath: the rows must be exactly the table's numbers.
_FLOAT = serial_and_parallel(_embedding_float)
_Q8 = serial_and_parallel(_embedding_q8)
_Q4 = serial_and_parallel(_embedding_q4)


# ---------------------------------------------------------------- wrappers (shapes checked by Ops.embedding)

def _lookup(drivers, table, ids, out, rows) -> np.ndarray:
    """Run the serial or threaded driver on rows (out, or out as blocks); raise a bad id."""
    serial, parallel = drivers
    run = parallel if out.size >= common.PARALLEL_MIN_ELEMENTS else serial
    bad = run(*checks.weight_arrays(table), ids, rows)
    if bad >= 0:
        raise checks.index_error(checks.BAD_ID, bad, ids[bad], table.shape[0])
    return out


def embedding_float(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """out[t] = table[ids[t]].  table float32 or float16 [V, D], ids [T] int32 -> new float32 [T, D]."""
    out = common.empty((ids.shape[0], table.shape[1]), np.float32)
    return _lookup(_FLOAT, table, ids, out, out)


def embedding_quant(table, ids: np.ndarray) -> np.ndarray:
    """out[t] = table.dequantize()[ids[t]], dequantizing only those rows.  -> new float32 [T, D]."""
    out = common.empty((ids.shape[0], table.shape[1]), np.float32)
    nb = table.d.shape[1]                                  # blocks per row (1 for w8a8)
    blocks = out.reshape(ids.shape[0], nb, table.shape[1] // nb)
    return _lookup(_Q8 if table.format in ("q8_0", "w8a8") else _Q4, table, ids, out, blocks)


EMBEDDING = {"f32": embedding_float, "f16": embedding_float,               # weight format -> kernel
             "q8_0": embedding_quant, "q4_0": embedding_quant, "q4_1": embedding_quant, "w8a8": embedding_quant}
