"""The original xLLM README's two tables, for any model, batch, lengths and device.

    python -m bench.plan                       # the original's setting: Llama-2-7B on a 4090
    python -m bench.plan --model smollm2-135m -b 8 -s 128 -n 256 --device cpu --weight-dtype fp32
    python -m bench.plan --model path/to/model.gguf --device h100-sxm --png roofline.png

Table 1 is memory by component (weights, KV cache, activations of a prefill
step and of a decode step) with the formula of each; table 2 is, for a
prefill step and for the last decode step, each operator's FLOPs and bytes,
its time bound on the device and its bottleneck. Both come from
`xllm.planner`, the module the engine sizes its KV pool with.

The defaults are the original's setting (b=48, s=68, n=512, fp16 weights, a
separate fp32 embedding, fp32 KV cache in 128-token blocks, RTX 4090), so the
bare command reprints its memory table: 0.5 / 12.3 / 30 G. Its operator
table assumed fp16 everywhere and 73 TFLOP/s, and used b=64, s=n=512:
    python -m bench.plan -b 64 -s 512 -n 512 --kv-dtype fp16 --act-dtype fp16 --tflops 73
where its "Get k" (an h1 x h1 linear: 2.1 GFLOP, 0.03 GB, 0.03 ms) is the
decode row "o linear" (xllm fuses q, k, v into one linear three times as
big), and its "attention score" and "attention output" (0.5 GB, 0.5 ms each)
are together xllm's one attention row (1.07 GB, 1.07 ms).
--png draws the roofline with every operator on it (needs matplotlib:
pip install -e ".[plot]").
"""

from __future__ import annotations

import argparse
import math

from xllm import planner as P

WIDE = 112


def rate(flops: float) -> str:
    return f"{flops / 1e12:.4g} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.4g} GFLOP/s"


def memory_table(config, args) -> P.MemoryPlan:
    plan = P.plan_memory(config, args.batch, args.input_len, args.output_len, weight_dtype=args.weight_dtype,
                         kv_dtype=args.kv_dtype, block_size=args.block_size,
                         embedding_dtype=args.embedding_dtype, act_dtype=args.act_dtype)
    polys, w = P.weight_polys(config), args.weight_dtype
    emb = args.embedding_dtype or ("fp32" if w == "int8" else w)
    wdt = w + (" +row scales" if w == "int8" else "")

    def params(*groups):
        per_layer = P._sum(polys[g][i] for g in groups if g in P.PER_LAYER for i in (0, 1))
        once = P._sum(polys[g][i] for g in groups if g not in P.PER_LAYER for i in (0, 1))
        text = [f"({P.formula(config, per_layer)})L" if per_layer else "", P.formula(config, once)]
        return " + ".join(t for t in text if t)

    def acts(peak, T):
        poly = P._sum([P._times(peak.per_row, "T"), P._times(peak.per_logit_row, "R")])
        return P.formula(config, poly, T=T, R="b")

    kv = f"2bhkvL*ceil((s+n)/{args.block_size})*{args.block_size}".replace(
        "hkv", "h1" if config.kv_dim == config.dim else "hkv")
    kv_dt = args.kv_dtype + (" +4B/token/head" if args.kv_dtype == "int8" else "")
    rows = [
        ("Embedding", "", "0 (tied: the head's matrix)" if config.tied_embeddings else "vh1",
         emb, plan.weights.embedding),
        ("Weights", "", params("attention", "mlp", "head"), wdt,
         plan.weights.attention + plan.weights.mlp + plan.weights.head),
        ("", "self-attention", params("attention"), wdt, plan.weights.attention),
        ("", "MLP", params("mlp"), wdt, plan.weights.mlp),
        ("", "head", params("head"), wdt, plan.weights.head),
        ("KV cache", "", kv, kv_dt, plan.kv_cache),
        ("Activations", "prefill", acts(plan.prefill, "bs"), args.act_dtype, plan.prefill.bytes),
        ("", "decode", acts(plan.decode, "b"), args.act_dtype, plan.decode.bytes),
        ("Total", "", "embedding + weights + KV + max(activations)", "", plan.total),
    ]
    print(f"\nMemory (G = GiB = 2^30 bytes)\n{'':<12} {'':<15} {'formula':<44} {'dtype':<19} {'G':>8}")
    for name, part, text, dtype, n in rows:
        print(f"{name:<12} {part:<15} {text:<44} {dtype:<19} {n / P.GiB:8.3f}")
    for phase, peak in (("prefill", plan.prefill), ("decode", plan.decode)):
        print(f"  {phase} peak at `{peak.step}`, alive: {', '.join(peak.live)}")
    return plan


def budget_lines(config, args, device) -> None:
    budget = int(args.budget_gib * P.GiB) if args.budget_gib else device.memory
    keys = dict(weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype, block_size=args.block_size,
                embedding_dtype=args.embedding_dtype, act_dtype=args.act_dtype)
    b = P.max_batch(config, budget, args.input_len, args.output_len, **keys)
    print(f"\nIn {budget / P.GiB:.1f} GiB ({device.name if not args.budget_gib else 'budget'}): "
          f"at most b = {b} sequences of s={args.input_len} + n={args.output_len} tokens.")
    try:
        blocks = P.blocks_for_budget(config, budget, max_step_tokens=args.batch * args.input_len,
                                     max_logit_rows=args.batch, **keys)
        per_seq = P.blocks_per_sequence(args.input_len + args.output_len, args.block_size)
        print(f"An engine whose largest step is {args.batch * args.input_len} rows sizes its KV pool to {blocks} "
              f"blocks of {args.block_size} tokens ({blocks // per_seq} such sequences at once).")
    except P.BudgetTooSmall as e:
        print(f"An engine could not start: {e}")


def operator_table(config, args, device, phase) -> list[P.Bound]:
    costs = P.step_costs(config, phase, weight_dtype=args.weight_dtype, kv_dtype=args.kv_dtype,
                         act_dtype=args.act_dtype, embedding_dtype=args.embedding_dtype)
    bounds = P.roofline(costs, device, args.weight_dtype)
    print(f"\n{phase.name}: T = {phase.names['T']} = {phase.T} rows, per layer ('once' = once per step)")
    print(f"{'operator':<21} {'FLOPs':<16} {'bytes':<32} {'GFLOP':>8} {'GB':>8} {'compute ms':>10} "
          f"{'memory ms':>9}  bottleneck")
    for b in bounds:
        c = b.cost
        name = c.name + ("" if c.per_layer else " (once)")
        print(f"{name:<21} {c.flops_formula:<16} {c.bytes_formula:<32} {c.flops / 1e9:8.3f} {c.bytes / 1e9:8.4f} "
              f"{b.compute_s * 1e3:10.4f} {b.memory_s * 1e3:9.4f}  {b.bottleneck}")
    step = P.step_seconds(bounds, config.n_layers)
    tokens = phase.T if phase.name == "prefill" else phase.R
    print(f"whole step ({config.n_layers} layers): at least {step * 1e3:.3f} ms, "
          f"so at most {tokens / step:,.0f} tokens/s")
    return bounds


def _clusters(bounds: list[P.Bound]) -> list[list[P.Bound]]:
    """Operators whose points nearly coincide (within 30% on both log axes), so one label names them all."""
    groups: list[list[P.Bound]] = []
    for b in sorted(bounds, key=lambda b: b.intensity):
        g = groups[-1] if groups else None
        y = b.cost.flops / b.seconds
        if g and b.intensity < 1.3 * g[0].intensity and abs(math.log(y * g[0].seconds / g[0].cost.flops)) < 0.27:
            g.append(b)
        else:
            groups.append([b])
    return groups


def draw(path: str, device: P.Device, weight_dtype: str, title: str, panels: list) -> None:
    """Roofline, log-log: attainable FLOP/s = min(peak, bandwidth x FLOPs/byte), one panel per phase.

    `panels` holds (title, bounds, measured): every operator with FLOPs sits on
    the roof at its intensity; with `measured` (seconds per bound, or None) a
    hollow marker below shows the FLOP/s the kernel reached, joined to its roof point.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install -e '.[plot]'") from None
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 6), sharey=True)
    peaks = {"matrix " + weight_dtype: device.peak(weight_dtype)}
    if device.peak("fp32") != device.peak(weight_dtype):
        peaks["fp32 (other ops)"] = device.peak("fp32")
    for ax, (panel_title, bounds, measured) in zip(axes, panels):
        placed = [i for i, b in enumerate(bounds) if b.cost.flops and b.cost.bytes]
        xs = [bounds[i].intensity for i in placed]
        lo, hi = min(xs + [0.1]) / 4, max(xs + [max(peaks.values()) / device.bandwidth]) * 8
        grid = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        for (label, peak), style in zip(peaks.items(), ("-", "--")):
            ax.plot(grid, [min(peak, device.bandwidth * x) for x in grid], style, color="k", lw=1.5 if style == "-"
                    else 1, label=f"roof: {label} {rate(peak)}, {device.bandwidth / 1e9:.4g} GB/s")
        for i in placed:
            b = bounds[i]
            color = "tab:red" if b.bottleneck == "memory" else "tab:blue"
            ax.plot([b.intensity], [b.cost.flops / b.seconds], "o", ms=7, color=color)
            if measured and measured[i]:
                got = b.cost.flops / measured[i]
                ax.plot([b.intensity] * 2, [got, b.cost.flops / b.seconds], ":", color=color, lw=1)
                ax.plot([b.intensity], [got], "o", ms=7, mfc="none", color=color)
        for k, group in enumerate(_clusters([bounds[i] for i in placed])):
            names = [b.cost.name for b in group]
            label = "\n".join(dict.fromkeys(f"{n} x{names.count(n)}" if names.count(n) > 1 else n for n in names))
            ax.annotate(label, (group[0].intensity, group[0].cost.flops / group[0].seconds), fontsize=8,
                        textcoords="offset points", va="top" if k % 2 else "bottom",
                        xytext=(8, -6) if k % 2 else (-10, 8), ha="left" if k % 2 else "right")
        skipped = sorted({b.cost.name for b in bounds if not b.cost.flops})
        ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)",
               title=f"{panel_title}\n(no FLOPs, not placed: {', '.join(skipped)})")
        ax.set_ylim(top=max(peaks.values()) * 8)
        ax.grid(True, which="both", alpha=0.3)
        ax.plot([], [], "o", color="tab:red", label="memory bound (at its bound)")
        ax.plot([], [], "o", color="tab:blue", label="compute bound (at its bound)")
        if measured:
            ax.plot([], [], "o", mfc="none", color="gray", label="measured")
        ax.legend(loc="lower right", fontsize=8)
    axes[0].set_ylabel("FLOP/s")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"\nroofline written to {path}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama2-7b", help=f"a preset ({', '.join(P.MODELS)}) or a checkpoint path")
    ap.add_argument("-b", "--batch", type=int, default=48)
    ap.add_argument("-s", "--input-len", type=int, default=68)
    ap.add_argument("-n", "--output-len", type=int, default=512)
    ap.add_argument("--device", default="4090", choices=[*P.DEVICES, "cpu"], help="cpu: measured now (~1 s)")
    ap.add_argument("--weight-dtype", default="fp16", choices=list(P.DTYPE_BYTES))
    ap.add_argument("--embedding-dtype", default="fp32", choices=list(P.DTYPE_BYTES),
                    help="the original keeps fp32 (default); xllm's own default is the weight dtype")
    ap.add_argument("--kv-dtype", default="fp32", choices=["fp32", "fp16", "int8"])
    ap.add_argument("--act-dtype", default="fp32", choices=["fp32", "fp16"], help="xllm computes in fp32")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--budget-gib", type=float, help="memory budget (default: the device's memory)")
    ap.add_argument("--tflops", type=float, help="override the device's matrix peak for the weight dtype")
    ap.add_argument("--bandwidth-gbs", type=float, help="override the device's bandwidth")
    ap.add_argument("--png", help="draw the roofline to this file")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = P.model_config(args.model)
    device = P.measure_cpu() if args.device == "cpu" else P.DEVICES[args.device]
    if args.tflops or args.bandwidth_gbs:
        flops = {**device.flops, **({args.weight_dtype: args.tflops * 1e12} if args.tflops else {})}
        device = P.Device(device.name + " (overridden)", flops,
                          args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else device.bandwidth, device.memory,
                          device.source + "; overridden on the command line")
    c = config
    print(f"{c.name or args.model}: L={c.n_layers} h1={c.dim} hq={c.q_dim} hkv={c.kv_dim} h2={c.hidden_dim} "
          f"v={c.vocab_size} ({c.n_heads} heads, {c.n_kv_heads} kv heads of {c.head_dim}"
          f"{', tied embeddings' if c.tied_embeddings else ''})")
    print(f"b={args.batch} s={args.input_len} n={args.output_len}; weights {args.weight_dtype}, KV {args.kv_dtype} "
          f"in {args.block_size}-token blocks, activations {args.act_dtype}")
    memory_table(config, args)
    budget_lines(config, args, device)
    print(f"\nOperators on {device.name}: matrix peak {rate(device.peak(args.weight_dtype))} ({args.weight_dtype}), "
          f"fp32 {rate(device.peak('fp32'))}, {device.bandwidth / 1e9:.4g} GB/s; "
          f"ridge at {device.peak(args.weight_dtype) / device.bandwidth:.1f} FLOP/byte\n  ({device.source})")
    print("Bytes: each input read once, each output written once (the least any kernel moves); "
          "N*x = x elements of N bytes.")
    phases = [P.prefill_phase(args.batch, args.input_len),
              P.decode_phase(args.batch, args.input_len, args.output_len)]
    panels = [(f"{ph.name} (T={ph.T})", operator_table(config, args, device, ph), None) for ph in phases]
    if args.png:
        draw(args.png, device, args.weight_dtype,
             f"{args.model}: b={args.batch} s={args.input_len} n={args.output_len}, weights {args.weight_dtype}, "
             f"KV {args.kv_dtype}, activations {args.act_dtype}, on {device.name}", panels)


if __name__ == "__main__":
    main()
