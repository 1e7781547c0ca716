"""embedding and take_rows on the GPU: copying (and converting) whole rows.

A thread block takes one output row at a time (grid-stride), its threads
share the row: elements for float rows (`qblock.widen_row`), blocks of 32
for quantized ones (`qblock.dequant_q8`, `dequant_q4`), the bodies the CPU
runs too, so the rows equal `QuantWeight.dequantize()` bit for bit. A bad
index is skipped and reported (errors.py): BAD_ID for embedding, BAD_ROW for
take_rows, which the next download raises as the CPU would have at the call.
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from .. import checks
from .bodies import qblock
from .errors import report


# ---------------------------------------------------------------- embedding

@cuda.jit(device=True)
def _table_row(ids, t, V, err):
    """ids[t] when it is a row of the V-row table; else -1, reported as BAD_ID (by thread 0)."""
    row = ids[t]
    if row < 0 or row >= V:
        if cuda.threadIdx.x == 0:
            report(err, checks.BAD_ID, t, row, V)
        return -1
    return row


@cuda.jit
def _embedding_float(table, ids, out, err):
    """out[t] = table[ids[t]]; table float32 or float16 bits [V, D], out float32 [T, D]."""
    for t in range(cuda.blockIdx.x, ids.shape[0], cuda.gridDim.x):
        row = _table_row(ids, t, table.shape[0], err)
        if row >= 0:
            qblock.widen_row(table, row, out, t, cuda.threadIdx.x, cuda.blockDim.x)


@cuda.jit
def _embedding_q8(qs, d, ids, out, err):
    """out[t] = row ids[t] of a q8_0 table, dequantized; qs [V, D/32, 32], out [T, D/32, 32]."""
    for t in range(cuda.blockIdx.x, ids.shape[0], cuda.gridDim.x):
        row = _table_row(ids, t, qs.shape[0], err)
        if row >= 0:
            qblock.dequant_q8(qs, d, row, out, t, cuda.threadIdx.x, cuda.blockDim.x)


@cuda.jit
def _embedding_q4(qs, d, o, c, ids, out, err):
    """out[t] = row ids[t] of a q4_0/q4_1 table, dequantized; qs [V, D/32, 16], out [T, D/32, 32]."""
    for t in range(cuda.blockIdx.x, ids.shape[0], cuda.gridDim.x):
        row = _table_row(ids, t, qs.shape[0], err)
        if row >= 0:
            qblock.dequant_q4(qs, d, o, c, row, out, t, cuda.threadIdx.x, cuda.blockDim.x)


def embedding_float(ops, table, ids):
    """table float32 or float16 [V, D], ids [T] int32 -> new float32 [T, D]."""
    out = ops.empty((ids.shape[0], table.shape[1]), np.float32)
    ops.launch(_embedding_float, ops.blocks(ids.shape[0]), ops.threads,
               *checks.weight_arrays(table), ids, out, ops.err)
    return out


def embedding_quant(ops, table, ids):
    """table a QuantWeight [V, D], ids [T] int32 -> new float32 [T, D], the dequantized rows."""
    T, D = ids.shape[0], table.shape[1]
    out = ops.empty((T, D), np.float32)
    arrays = checks.weight_arrays(table)
    nb = arrays[0].shape[1]
    kernel = _embedding_q8 if len(arrays) == 2 else _embedding_q4
    ops.launch(kernel, ops.blocks(T), ops.threads, *arrays, ids, out.reshape(T, nb, D // nb), ops.err)
    return out


EMBEDDING = {"f32": embedding_float, "f16": embedding_float,     # weight format -> fn(ops, table, ids)
             "q8_0": embedding_quant, "q4_0": embedding_quant, "q4_1": embedding_quant, "w8a8": embedding_quant}


# ---------------------------------------------------------------- take_rows

@cuda.jit
def _take_rows(x, rows, out, err):
    """out[r] = x[rows[r]], with numpy's meaning of a negative index (from the end)."""
    T = x.shape[0]
    for r in range(cuda.blockIdx.x, rows.shape[0], cuda.gridDim.x):
        row = rows[r]
        if row < 0:
            row += T
        if row < 0 or row >= T:
            if cuda.threadIdx.x == 0:
                report(err, checks.BAD_ROW, r, rows[r], T)
        else:
            qblock.widen_row(x, row, out, r, cuda.threadIdx.x, cuda.blockDim.x)


def take_rows(ops, x, rows):
    """x[rows] as a new array: x [T, D] float32, rows [R] int32 -> [R, D]."""
    out = ops.empty((rows.shape[0], x.shape[1]), np.float32)
    ops.launch(_take_rows, ops.blocks(rows.shape[0]), ops.threads, x, rows, out, ops.err)
    return out
