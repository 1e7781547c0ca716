"""Attention decode and store_kv speed for each KV cache storage dtype, beside fp32.

    python -m bench.kv_dtypes [--threads N]

SmolLM2-135M attention shapes (9 query heads, 3 kv heads of 64), 128-token
blocks handed out in shuffled order. Decode rows: B sequences of ctx tokens
each, one query row each (B=8 uses lengths ctx .. ctx + 7 * 97, as
bench.ops_cpu does). Times are the fastest of many calls (`best_time`);
"KV GB/s" is the bytes of cache the call reads (values and scales) over its
time, and "vs fp32" the time over the fp32 time of the same case.
"""

from __future__ import annotations

import argparse
import os

import numba
import numpy as np

from bench.ops_cpu import best_time
from xllm.ops import get_ops

cpu = get_ops("cpu")

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 9, 3, 64, 128
DTYPES = {"fp32": np.float32, "fp16": np.float16, "int8": np.int8}


def caches(kv_dtype: str, S: int):
    """Empty (k, v, k_scale, v_scale) of S slots in kv_dtype."""
    shape = (S, KV_HEADS, HEAD_DIM)
    k, v = np.zeros(shape, DTYPES[kv_dtype]), np.zeros(shape, DTYPES[kv_dtype])
    if kv_dtype != "int8":
        return k, v, None, None
    return k, v, np.zeros(shape[:2], np.float32), np.zeros(shape[:2], np.float32)


def decode_case(rng, lengths: list[int]):
    """Keys and values of every sequence written into caches of each dtype with
    store_kv, and the decode step's arguments (one query row per sequence)."""
    need = [-(-L // BLOCK) for L in lengths]
    order = rng.permutation(sum(need)).astype(np.int32)
    table = np.zeros((len(lengths), max(need)), np.int32)
    slots, at = [], 0
    for b, L in enumerate(lengths):
        table[b, : need[b]] = order[at: at + need[b]]
        at += need[b]
        p = np.arange(L)
        slots.append(table[b, p // BLOCK] * BLOCK + p % BLOCK)
    slots = np.concatenate(slots).astype(np.int32)
    k = rng.standard_normal((len(slots), KV_HEADS, HEAD_DIM), dtype=np.float32)
    v = rng.standard_normal((len(slots), KV_HEADS, HEAD_DIM), dtype=np.float32)
    stored = {}
    for name in DTYPES:
        stored[name] = caches(name, sum(need) * BLOCK)
        cpu.store_kv(k, v, *stored[name][:2], slots, *stored[name][2:])
    q = rng.standard_normal((len(lengths), HEADS, HEAD_DIM), dtype=np.float32)
    cu_q = np.arange(len(lengths) + 1, dtype=np.int32)
    positions = np.array(lengths, np.int32) - 1
    return stored, (q, table, cu_q, positions)


def kv_bytes_read(kv_dtype: str, keys: int) -> int:
    per_head = HEAD_DIM * np.dtype(DTYPES[kv_dtype]).itemsize + (4 if kv_dtype == "int8" else 0)
    return 2 * keys * KV_HEADS * per_head


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {numba.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, numba {numba.__version__}")
    print(f"{'case':<26} {'dtype':<6} {'time':>10} {'KV GB/s':>9} {'vs fp32':>8}")
    for ctx in (512, 2048):
        for B in (1, 8):
            lengths = [ctx + 97 * i for i in range(B)]
            stored, (q, table, cu_q, positions) = decode_case(rng, lengths)
            keys = int(sum(lengths))
            base = None
            for name in DTYPES:
                kc, vc, ks, vs = stored[name]
                t = best_time(lambda: cpu.attention(q, kc, vc, table, BLOCK, cu_q, positions,
                                                    HEAD_DIM ** -0.5, ks, vs))
                base = base or t
                case = f"attention decode B={B} ctx {ctx}" if B == 1 else f"attention decode B={B} ctx {ctx}+"
                print(f"{case:<26} {name:<6} {t * 1e6:8.1f}us {kv_bytes_read(name, keys) / t / 1e9:9.2f} "
                      f"{t / base:7.2f}x", flush=True)
    for T in (8, 512):
        k = rng.standard_normal((T, KV_HEADS, HEAD_DIM), dtype=np.float32)
        slots = rng.permutation(8192)[:T].astype(np.int32)
        base = None
        for name in DTYPES:
            kc, vc, ks, vs = caches(name, 8192)
            t = best_time(lambda: cpu.store_kv(k, k, kc, vc, slots, ks, vs))
            base = base or t
            print(f"{'store_kv T=' + str(T):<26} {name:<6} {t * 1e6:8.1f}us {'':>9} {t / base:7.2f}x", flush=True)
    print(f"threading layer {numba.threading_layer()}, load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
