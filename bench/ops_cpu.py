"""Speed of the CPU operators at SmolLM2-135M shapes, beside numpy in the same run.

    python -m bench.ops_cpu [--threads N] [--quick] [--only quant ...]

Each row times one operator call (the fastest of many calls, so a busy machine
shows as noise, not as a slower kernel) and gives its rate: GB/s for
memory-bound work (bytes read + written), GFLOP/s for products. The numpy
column is BLAS (`x @ w.T`, float32) for `linear` and the reference operator
(`xllm.ops.reference`) for the rest; "stream read" is the speed at which this
machine can read memory at all, the ceiling for decode's GEMV.

"cold" GEMV rows cycle through enough copies of the weight to overflow the
last-level cache, as in a real decode step where each weight is read once per
token; "hot" rows reuse one weight that stays in cache.

"q4_1"/"q8_0" rows time the same operators with a quantized weight
(`QuantWeight`, the format the default GGUF stores), beside the float32
kernel on the same (dequantized) matrix in the second column. Their rate is
float32-equivalent (4 bytes per weight, or the same flops), so the two
columns compare directly; the note gives the GB/s of the quantized bytes
actually read and the time ratio float32 / quantized.
"""

from __future__ import annotations

import argparse
import os
import time

import numba
import numpy as np

from xllm.ops import get_ops
from xllm.weights import QuantWeight

cpu = get_ops("cpu")
ref = get_ops("reference")

DIM, HIDDEN, VOCAB = 576, 1536, 49152
HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
GEMV_SHAPES = [(1536, 576), (3072, 576), (576, 1536), (960, 576), (49152, 576)]
# The default model's formats: every layer matrix Q4_1, the (tied) embedding/output Q8_0.
QUANT_SHAPES = [("q4_1", 1536, 576), ("q4_1", 3072, 576), ("q4_1", 576, 1536), ("q4_1", 960, 576),
                ("q8_0", 49152, 576)]
COLD_POOL_BYTES = 128 << 20          # 4x this machine's 32 MiB L3
SECTIONS = ("stream", "gemv", "gemm", "quant", "attention", "pointwise")


def best_time(fn, budget_s: float = 0.3, max_calls: int = 2000) -> float:
    """Seconds of the fastest of many timed calls of fn() (at least 5, about budget_s in all).

    The fastest call, not the mean: on a shared machine a thread that loses
    its core for a time slice makes a parallel call miss by milliseconds, and
    the minimum is what the kernel does when it has the machine.
    """
    fn()                                             # compile / warm caches
    best, spent, calls = float("inf"), 0.0, 0
    while calls < 5 or (spent < budget_s and calls < max_calls):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


class Table:
    def __init__(self):
        print(f"{'op':<22} {'shape':<28} {'xllm':>10} {'rate':>12}   {'numpy':>10} {'rate':>12}")

    def row(self, op, shape, ours, amount, unit, theirs=None, note=""):
        """`amount` is bytes (unit GB/s) or flops (unit GFLOP/s) per call."""
        def cell(t):
            if t is None:
                return f"{'-':>10} {'':>12}"
            return f"{t * 1e6:8.1f}us {amount / t / 1e9:7.1f} {unit:<4}"
        print(f"{op:<22} {shape:<28} {cell(ours)}   {cell(theirs)}{note}", flush=True)


@numba.njit(parallel=True, fastmath={"reassoc"})
def stream_total(x):
    """The sum of a float32 array, on every thread: a streaming read of x (bench.vs_llamacpp uses it too)."""
    s = np.float32(0.0)
    for i in numba.prange(x.shape[0]):
        s += x[i]
    return s


def bench_stream_read(table):
    a = np.ones(VOCAB * DIM, np.float32)
    table.row("stream read", f"{a.nbytes >> 20} MiB", best_time(lambda: stream_total(a)), a.nbytes, "GB/s",
              best_time(lambda: a.sum()))


def bench_gemv(table, rng):
    for N, K in GEMV_SHAPES:
        w = rng.standard_normal((N, K), dtype=np.float32)
        xk = rng.standard_normal((1, K), dtype=np.float32)
        pool = [w] + [w.copy() for _ in range(max(1, COLD_POOL_BYTES // w.nbytes))]
        turn = [0]

        def cycle(fn):
            def call():
                turn[0] += 1
                return fn(xk, pool[turn[0] % len(pool)])
            return call

        table.row("linear T=1 cold", f"{N}x{K}", best_time(cycle(cpu.linear)), w.nbytes, "GB/s",
                  best_time(cycle(lambda a, b: a @ b.T)))
        if w.nbytes < (8 << 20):
            table.row("linear T=1 hot", f"{N}x{K}", best_time(lambda: cpu.linear(xk, w)), w.nbytes, "GB/s",
                      best_time(lambda: xk @ w.T))


def bench_gemm(table, rng, token_counts):
    for T in token_counts:
        for N, K in GEMV_SHAPES[:4]:
            x = rng.standard_normal((T, K), dtype=np.float32)
            w = rng.standard_normal((N, K), dtype=np.float32)
            table.row(f"linear T={T}", f"{N}x{K}", best_time(lambda: cpu.linear(x, w)), 2 * T * N * K,
                      "GF/s", best_time(lambda: x @ w.T))


def random_quant(rng, fmt, N, K):
    """A QuantWeight with random blocks (any integers, float16-valued scales)."""
    nb = K // 32
    d = rng.uniform(0.001, 0.01, (N, nb)).astype(np.float16).astype(np.float32)
    if fmt == "q8_0":
        return QuantWeight(fmt, rng.integers(-127, 128, (N, K), dtype=np.int8), d)
    m = -8 * d if fmt == "q4_1" else None
    return QuantWeight(fmt, rng.integers(0, 256, (N, K // 2), dtype=np.uint8), d, m)


def bench_quant(table, rng, token_counts):
    """Quantized weights: GEMV cold (decode), GEMM at several token counts, embedding."""
    print("-- quantized weights; second column: the float32 kernel on the same matrix; "
          "rates float32-equivalent")
    for fmt, N, K in QUANT_SHAPES:
        w = random_quant(rng, fmt, N, K)
        wf = w.dequantize()
        xk = rng.standard_normal((1, K), dtype=np.float32)
        pool = [w] + [QuantWeight(w.format, w.qs.copy(), w.d.copy(), None if w.m is None else w.m.copy())
                      for _ in range(max(1, COLD_POOL_BYTES // w.nbytes))]
        fpool = [wf] + [wf.copy() for _ in range(max(1, COLD_POOL_BYTES // wf.nbytes))]
        turn = [0]

        def cycle(weights):
            def call():
                turn[0] += 1
                return cpu.linear(xk, weights[turn[0] % len(weights)])
            return call

        tq, tf = best_time(cycle(pool)), best_time(cycle(fpool))
        table.row(f"{fmt} linear T=1 cold", f"{N}x{K}", tq, wf.nbytes, "GB/s", tf,
                  f"   quantized bytes {w.nbytes / tq / 1e9:5.1f} GB/s, {tf / tq:4.2f}x faster")
        del pool, fpool
    for T in token_counts:
        for fmt, N, K in QUANT_SHAPES[:4]:
            w = random_quant(rng, fmt, N, K)
            wf = w.dequantize()
            x = rng.standard_normal((T, K), dtype=np.float32)
            tq, tf = best_time(lambda: cpu.linear(x, w)), best_time(lambda: cpu.linear(x, wf))
            table.row(f"{fmt} linear T={T}", f"{N}x{K}", tq, 2 * T * N * K, "GF/s", tf,
                      f"   time {tq / tf:4.2f}x the float32 GEMM")
    emb = random_quant(rng, "q8_0", VOCAB, DIM)
    embf = emb.dequantize()
    for T in (1, 512):
        ids = rng.integers(0, VOCAB, T).astype(np.int32)
        table.row(f"q8_0 embedding T={T}", f"{VOCAB}x{DIM}", best_time(lambda: cpu.embedding(emb, ids)),
                  T * DIM * 4 * 2, "GB/s", best_time(lambda: cpu.embedding(embf, ids)))


def paged(rng, lengths, n_rows, block_size=128):
    """A paged batch: sequence b has lengths[b] cached tokens, the last n_rows[b] are queries."""
    need = [-(-L // block_size) for L in lengths]
    order = rng.permutation(sum(need)).astype(np.int32)
    table = np.zeros((len(lengths), max(need)), np.int32)
    at = 0
    for b, n in enumerate(need):
        table[b, :n] = order[at: at + n]
        at += n
    S = sum(need) * block_size
    k_cache = rng.standard_normal((S, KV_HEADS, HEAD_DIM), dtype=np.float32)
    v_cache = rng.standard_normal((S, KV_HEADS, HEAD_DIM), dtype=np.float32)
    cu_q = np.concatenate([[0], np.cumsum(n_rows)]).astype(np.int32)
    positions = np.concatenate([np.arange(L - n, L) for L, n in zip(lengths, n_rows)]).astype(np.int32)
    q = rng.standard_normal((int(cu_q[-1]), HEADS, HEAD_DIM), dtype=np.float32)
    return q, k_cache, v_cache, table, block_size, cu_q, positions, HEAD_DIM ** -0.5


def bench_attention(table, rng, quick):
    cases = [("decode B=1", [128], [1]), ("decode B=1", [512], [1]), ("decode B=1", [2048], [1]),
             ("decode B=8", [512 + 97 * i for i in range(8)], [1] * 8), ("prefill T=128", [128], [128])]
    if not quick:
        cases.append(("prefill T=512", [512], [512]))
    for name, lengths, n_rows in cases:
        args = paged(rng, lengths, n_rows)
        keys = int((args[6] + 1).sum())              # (row, key) pairs
        flops = 4 * HEADS * HEAD_DIM * keys          # q.k and p*v, 2 flops per multiply-add
        shape = f"ctx {lengths[0]}" + ("..." + str(lengths[-1]) if len(lengths) > 1 else "")
        table.row(f"attention {name}", shape, best_time(lambda: cpu.attention(*args)), flops, "GF/s",
                  best_time(lambda: ref.attention(*args)))


def bench_pointwise(table, rng, T):
    """The row-wise operators at T tokens (T=1: decode, where call overhead is the cost)."""
    f32 = np.float32
    x = rng.standard_normal((T, DIM), dtype=f32)
    w = rng.standard_normal(DIM, dtype=f32)
    ids = rng.integers(0, VOCAB, T).astype(np.int32)
    emb = rng.standard_normal((VOCAB, DIM), dtype=f32)
    q = rng.standard_normal((T, HEADS, HEAD_DIM), dtype=f32)
    pos = np.arange(T, dtype=np.int32)
    cos, sin = ref.rope_tables(100000.0, HEAD_DIM, 8192)
    gate_up = rng.standard_normal((T, 2 * HIDDEN), dtype=f32)
    k = rng.standard_normal((T, KV_HEADS, HEAD_DIM), dtype=f32)
    k_cache = np.zeros((8192, KV_HEADS, HEAD_DIM), f32)
    v_cache = np.zeros_like(k_cache)
    slots = rng.permutation(8192)[:T].astype(np.int32)
    rows = np.array([T - 1], np.int32)
    out_w = rng.standard_normal((VOCAB, DIM), dtype=f32)
    for name, args, nbytes in [
        ("embedding", (emb, ids), 2 * x.nbytes),
        ("rmsnorm", (x, w, 1e-5), 2 * x.nbytes),
        ("rope", (q, pos, cos, sin), 3 * q.nbytes),
        ("silu_mul", (gate_up,), 1.5 * gate_up.nbytes),
        ("add", (x, x), 3 * x.nbytes),
        ("store_kv", (k, k, k_cache, v_cache, slots), 4 * k.nbytes),
        ("logits (1 row)", (x, rows, out_w), out_w.nbytes),
    ]:
        shape = "x".join(str(s) for s in args[0].shape) if name != "logits (1 row)" else f"{T}x{DIM} -> 1x{VOCAB}"
        ours = best_time(lambda: getattr(cpu, name.split()[0])(*args))
        theirs = best_time(lambda: getattr(ref, name.split()[0])(*args))
        table.row(f"{name} T={T}", shape, ours, nbytes, "GB/s", theirs)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    parser.add_argument("--quick", action="store_true", help="fewer shapes (a smoke run)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=SECTIONS, help="sections to run")
    args = parser.parse_args()
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"threads {numba.get_num_threads()}, load average {os.getloadavg()[0]:.2f}, "
          f"numpy {np.__version__}, numba {numba.__version__}")
    table = Table()
    if "stream" in args.only:
        bench_stream_read(table)
    if "gemv" in args.only:
        bench_gemv(table, rng)
    if "gemm" in args.only:
        bench_gemm(table, rng, [16, 128] if args.quick else [16, 128, 512])
    if "quant" in args.only:
        bench_quant(table, rng, [4, 128] if args.quick else [2, 4, 16, 128, 512])
    if "attention" in args.only:
        bench_attention(table, rng, args.quick)
    if "pointwise" in args.only:
        for T in (1, 512):
            bench_pointwise(table, rng, T)
    print(f"threading layer {numba.threading_layer()}, load average at the end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
