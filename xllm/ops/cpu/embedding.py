"""embedding: row lookup out[t] = table[ids[t]] (being restructured onto the shared bodies)."""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from ...weights import QuantWeight
from . import common
from .common import first_out_of_range as _first_out_of_range


# ---------------------------------------------------------------- embedding

@numba.njit(cache=True)
def _embedding_row(table, ids, out, t):
    row = ids[t]
    for i in range(table.shape[1]):
        out[t, i] = table[row, i]


@numba.njit(cache=True)
def _embedding_serial(table, ids, out):
    bad = _first_out_of_range(ids, table.shape[0])
    if bad < 0:
        for t in range(ids.shape[0]):
            _embedding_row(table, ids, out, t)
    return bad


@numba.njit(parallel=True, cache=True)
def _embedding_parallel(table, ids, out):
    bad = _first_out_of_range(ids, table.shape[0])
    if bad < 0:
        for t in prange(ids.shape[0]):
            _embedding_row(table, ids, out, t)
    return bad


def embedding(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """out[t] = table[ids[t]].  table [V, D], ids [T] int32 -> new [T, D].

    table may also be a QuantWeight: its selected rows are dequantized (qmatmul.py).
    """
    if isinstance(table, QuantWeight):
        return qmatmul.qembedding(table, ids, parallel=ids.shape[0] * table.shape[1] >= common.PARALLEL_MIN_ELEMENTS)
    if table.ndim != 2 or ids.ndim != 1:
        raise ValueError(f"embedding: need table [V, D] and ids [T], got {table.shape} and {ids.shape}")
    out = np.empty((ids.shape[0], table.shape[1]), np.float32)
    run = _embedding_parallel if out.size >= common.PARALLEL_MIN_ELEMENTS else _embedding_serial
    bad = run(table, ids, out)
    if bad >= 0:
        raise ValueError(f"embedding: ids[{bad}] = {ids[bad]} is not a row of the {table.shape[0]}-row table")
    return out


from . import qmatmul  # noqa: E402

EMBEDDING = {fmt: embedding for fmt in ("f32", "q8_0", "q4_0", "q4_1")}    # weight format -> kernel
