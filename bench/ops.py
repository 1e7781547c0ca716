"""Each operator of a forward step, measured, beside the time bound the planner gives it.

    python -m bench.ops [--model smollm2-135m] [-b 4] [-s 128] [-n 128] [--threads N] [--quick]

For a prefill step (b prompts of s tokens) and the last decode step (b rows
at s+n tokens of context), every operator of `Llama.forward` runs once at
that step's shapes on the current device; the row shows its FLOPs and bytes
(from `xllm.planner.step_costs`, fp32 as the CPU engine stores everything),
the bound max(FLOPs / peak, bytes / bandwidth) on this machine (measured on
the spot by `planner.measure_cpu`: numpy copy bandwidth, numpy fp32 matmul),
the fastest measured call, and measured / bound: 1.0 is at the limit, 3.0
means the kernel takes three times the least time the hardware allows.

Weights and KV caches are "cold": each call reads a different copy, cycling
through enough copies to overflow the last-level cache, as in a real step
where the 30 layers' weights are each read once. Activations are hot, as the
previous operator just wrote them.

The numpy rates of `measure_cpu` are not hard limits (a kernel that keeps
data in cache can beat a copy bandwidth): a ratio below 1 says the bound's
assumption of DRAM traffic did not hold at that shape.
"""

from __future__ import annotations

import argparse
import os

import numba
import numpy as np

from bench.ops_cpu import COLD_POOL_BYTES, best_time
from xllm import planner as P
from xllm.ops import get_ops


def cold(*arrays: np.ndarray) -> list[tuple[np.ndarray, ...]]:
    """Copies of `arrays`, enough (at most 64) for their total to exceed COLD_POOL_BYTES."""
    n = sum(a.nbytes for a in arrays)
    copies = max(2, min(64, -(-COLD_POOL_BYTES // max(n, 1)) + 1))
    return [arrays] + [tuple(a.copy() for a in arrays) for _ in range(copies - 1)]


def cycling(fn, pool):
    """A no-argument call of fn(*pool[i]) that moves to the next copy each time."""
    turn = [0]

    def call():
        turn[0] = (turn[0] + 1) % len(pool)
        return fn(*pool[turn[0]])
    return call


def paged_batch(config, phase: P.Phase, rng, block_size: int = 128):
    """Cache, block table, cu_q and positions of `phase`: b sequences, each with its
    P/b cached tokens, the last T/b of them being this step's rows."""
    b = phase.R
    ctx, rows = phase.P // b, phase.T // b
    per_seq = P.blocks_per_sequence(ctx, block_size)
    table = rng.permutation(b * per_seq).astype(np.int32).reshape(b, per_seq)
    shape = (b * per_seq * block_size, config.n_kv_heads, config.head_dim)
    k_cache = rng.standard_normal(shape, dtype=np.float32)
    v_cache = rng.standard_normal(shape, dtype=np.float32)
    cu_q = (np.arange(b + 1) * rows).astype(np.int32)
    positions = np.tile(np.arange(ctx - rows, ctx), b).astype(np.int32)
    slots = (table[np.repeat(np.arange(b), rows), positions // block_size] * block_size
             + positions % block_size).astype(np.int32)
    return k_cache, v_cache, table, block_size, cu_q, positions, slots


def calls(config, phase: P.Phase, ops, rng) -> dict:
    """For each planner operator name, a no-argument function running it at `phase`'s shapes."""
    T, R, d, f, V = phase.T, phase.R, config.dim, config.hidden_dim, config.vocab_size
    H, KV, hd = config.n_heads, config.n_kv_heads, config.head_dim
    r = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    x, norm_w = r(T, d), r(d)
    qkv = r(T, (H + 2 * KV) * hd)
    q, k, v = r(T, H, hd), r(T, KV, hd), r(T, KV, hd)
    cos, sin = ops.rope_tables(config.rope_theta, hd, config.context_length)
    k_cache, v_cache, table, bs, cu_q, positions, slots = paged_batch(config, phase, rng)
    scale = hd ** -0.5

    inputs = {d: x, H * hd: r(T, H * hd), f: r(T, f)}     # a linear's input by its width

    def linear(n, k_in):
        """linear(x [T, k_in], W [n, k_in]), W cycling through cold copies."""
        return cycling(lambda w: ops.linear(inputs[k_in], w), cold(r(n, k_in)))

    def split():
        return (np.ascontiguousarray(qkv[:, :H * hd]), np.ascontiguousarray(qkv[:, H * hd:(H + KV) * hd]),
                np.ascontiguousarray(qkv[:, (H + KV) * hd:]))

    def rope_qk():
        ops.rope(q, positions, cos, sin)
        ops.rope(k, positions, cos, sin)

    ids = rng.integers(0, V, T).astype(np.int32)
    table_e = r(V, d)
    rows = (np.arange(R) * (T // R) + T // R - 1).astype(np.int32)
    gate_up = r(T, 2 * f)
    return {
        "embedding": lambda: ops.embedding(table_e, ids),
        "attn rmsnorm": lambda: ops.rmsnorm(x, norm_w, config.rms_eps),
        "qkv linear": linear((H + 2 * KV) * hd, d),
        "split q,k,v (copies)": split,
        "rope q,k": rope_qk,
        "store_kv": lambda: ops.store_kv(k, v, k_cache, v_cache, slots),
        "attention": cycling(lambda kc, vc: ops.attention(q, kc, vc, table, bs, cu_q, positions, scale),
                             cold(k_cache, v_cache)),
        "o linear": linear(d, H * hd),
        "residual add": lambda: ops.add(x, x),
        "ffn rmsnorm": lambda: ops.rmsnorm(x, norm_w, config.rms_eps),
        "gate_up linear": linear(2 * f, d),
        "silu_mul": lambda: ops.silu_mul(gate_up),
        "down linear": linear(d, f),
        "final rmsnorm": lambda: ops.rmsnorm(x, norm_w, config.rms_eps),
        "logits": cycling(lambda w: ops.logits(x, rows, w), cold(r(V, d))),
    }


def measure(config, phase: P.Phase, ops, rng, budget_s: float) -> list[float]:
    """Seconds of the fastest call of each operator of `step_costs(config, phase)`, in its order."""
    todo = calls(config, phase, ops, rng)
    return [best_time(todo[c.name], budget_s) for c in P.step_costs(config, phase)]


def report(config, phase: P.Phase, device: P.Device, measured: list[float]) -> list[P.Bound]:
    """Print the phase's table: each operator's bound on `device` beside its measured time."""
    bounds = P.roofline(P.step_costs(config, phase), device, "fp32")
    print(f"\n{phase.name}: T = {phase.names['T']} = {phase.T} rows, {phase.R} sequences, "
          f"{phase.P // phase.R} tokens of context each")
    print(f"{'operator':<21} {'MFLOP':>9} {'MB':>8} {'bound us':>9} {'measured us':>11} {'x bound':>8}  "
          f"{'achieved':>14}  bottleneck")
    for b, took in zip(bounds, measured):
        c = b.cost
        rate = (f"{c.flops / took / 1e9:7.1f} GFLOP/s" if b.bottleneck == "compute"
                else f"{c.bytes / took / 1e9:8.1f} GB/s")
        name = c.name + ("" if c.per_layer else " (once)")
        print(f"{name:<21} {c.flops / 1e6:9.2f} {c.bytes / 1e6:8.3f} {b.seconds * 1e6:9.1f} {took * 1e6:11.1f} "
              f"{took / b.seconds:8.2f}  {rate:>14}  {b.bottleneck}")
    times = [config.n_layers if b.cost.per_layer else 1 for b in bounds]
    bound = sum(n * b.seconds for n, b in zip(times, bounds))
    took = sum(n * t for n, t in zip(times, measured))
    print(f"step ({config.n_layers} layers, operators alone): bound {bound * 1e3:.2f} ms, "
          f"measured {took * 1e3:.2f} ms (x{took / bound:.2f})")
    return bounds


def best_of(a: P.Device, b: P.Device) -> P.Device:
    """The higher of two measurements of each figure: load on a shared machine only lowers them."""
    return P.Device(a.name, {k: max(a.flops[k], b.flops[k]) for k in a.flops}, max(a.bandwidth, b.bandwidth),
                    a.memory, f"best of two measurements, before and after the timings: [{a.source}] [{b.source}]")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help=f"a preset ({', '.join(P.MODELS)}) or a checkpoint")
    ap.add_argument("-b", "--batch", type=int, default=4)
    ap.add_argument("-s", "--input-len", type=int, default=128)
    ap.add_argument("-n", "--output-len", type=int, default=128)
    ap.add_argument("--device", default="cpu", help="operator device (the CUDA operators are not there yet)")
    ap.add_argument("--threads", type=int, default=numba.config.NUMBA_NUM_THREADS)
    ap.add_argument("--quick", action="store_true", help="time each operator briefly (a smoke run)")
    ap.add_argument("--png", help="draw the roofline with the measured points (needs matplotlib)")
    args = ap.parse_args(argv)
    config = P.model_config(args.model)
    ops = get_ops(args.device)
    if args.device != "cpu":
        raise SystemExit("bench.ops builds numpy inputs and measures this CPU's roof; a device other than the "
                         "cpu needs its own input placement and roof preset")
    numba.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    print(f"{config.name or args.model}: {numba.get_num_threads()} numba threads, load average {load:.2f}")
    if load + numba.get_num_threads() > (os.cpu_count() or 1) + 0.5:
        print("  (a busy machine: a parallel kernel waits for every thread's time slice, which shows as "
              "calls of several ms; --threads 1 gives cleaner figures)")
    first = P.measure_cpu(0.5 if args.quick else 1.5)
    rng = np.random.default_rng(0)
    phases = [P.prefill_phase(args.batch, args.input_len),
              P.decode_phase(args.batch, args.input_len, args.output_len)]
    measured = [measure(config, ph, ops, rng, 0.02 if args.quick else 0.3) for ph in phases]
    device = best_of(first, P.measure_cpu(0.5 if args.quick else 1.5))
    print(f"roof of {device.name}: {device.flops['fp32'] / 1e9:.1f} GFLOP/s, {device.bandwidth / 1e9:.1f} GB/s\n"
          f"  ({device.source})")
    panels = [(f"{ph.name} (T={ph.T})", report(config, ph, device, m), m) for ph, m in zip(phases, measured)]
    if args.png:
        from bench.plan import draw
        draw(args.png, device, "fp32", f"{config.name or args.model}: b={args.batch} s={args.input_len} "
             f"n={args.output_len}, xllm's {args.device} operators measured ({numba.get_num_threads()} threads)",
             panels)


if __name__ == "__main__":
    main()
