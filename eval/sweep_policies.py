"""Hit rate vs cache budget for every eviction policy, replayed from a routing trace.

    python eval/sweep_policies.py --trace runs/demo_trace.npz --out runs/policy_sweep
    python eval/sweep_policies.py --synthetic 10000 --out runs/policy_sweep_synthetic

Writes to --out: `policies.md` (hit rate, decode hit rate and link time per policy and budget, for
each prefetch mode; next-layer prediction recall/precision per layer when the trace has predictions),
`policies.png` (the curves), `results.json` (every SimResult). Prints how long the sweep took.
Budgets default to 10%, 20%, ..., 100% of all experts (in slots; one slot holds one expert).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vismmoe.offload.policies import POLICIES  # noqa: E402
from vismmoe.offload.simulate import default_budgets, results_table, sweep  # noqa: E402
from vismmoe.offload.trace import load_trace, synthetic_trace  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="routing trace (.npz) recorded by vismmoe")
    source.add_argument("--synthetic", type=int, metavar="REQUESTS", help="a synthetic trace of this many requests")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all)")
    ap.add_argument("--budgets", help="comma-separated slot counts (default: 10%%..100%% of all experts)")
    ap.add_argument("--prefetch", default=None,
                    help="comma-separated of none,trace,oracle,auto (default: all four; no trace or auto without "
                         "predictions)")
    ap.add_argument("--slot-plan", default="global", choices=["global", "uniform"])
    ap.add_argument("--prefetch-limit", type=int, default=0, help="copies per prefetch call, 0 = unlimited")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    trace = load_trace(args.trace) if args.trace else synthetic_trace(args.synthetic, decode_steps=80, seed=0)
    t_load = time.perf_counter() - t0
    meta = trace.meta
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else default_budgets(trace)
    if args.prefetch:
        modes = args.prefetch.split(",")
    else:
        modes = ["none", "trace", "oracle", "auto"] if trace.has_predictions else ["none", "oracle"]
    print(f"trace: {meta.model or args.trace}: {trace.num_requests} requests, {trace.num_groups} layer calls, "
          f"{meta.num_layers} layers x {meta.num_experts} experts, top-{meta.top_k} (loaded in {t_load:.1f} s)")

    results, timings = {}, {}
    for mode in modes:
        t = time.perf_counter()
        results[mode] = sweep(trace, policies, budgets, prefetch=mode, slot_plan=args.slot_plan,
                              threads=args.threads, prefetch_limit=args.prefetch_limit)
        timings[mode] = time.perf_counter() - t
        configs = len(results[mode])
        print(f"prefetch={mode}: {configs} configs ({len(policies)} policies x {len(budgets)} budgets) in "
              f"{timings[mode]:.2f} s = {configs * trace.num_requests / timings[mode]:,.0f} config-requests/s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quality = None
    if trace.has_predictions:
        quality = {phase: trace.prediction_quality(phase) for phase in ("prefill", "decode")}
    (out / "policies.md").write_text(_markdown(trace, args, results, timings, quality))
    (out / "results.json").write_text(json.dumps({m: [r.to_dict() for r in rs] for m, rs in results.items()}, indent=1))
    _plot(trace, results, quality, out / "policies.png")
    print(f"wrote {out / 'policies.md'}, {out / 'policies.png'}, {out / 'results.json'}")
    return 0


def _markdown(trace, args, results, timings, quality) -> str:
    meta = trace.meta
    total = meta.num_layers * meta.num_experts
    lines = [f"# Cache policies on {meta.model or args.trace}", "",
             f"{trace.num_requests} requests, {trace.num_groups} layer calls; {meta.num_layers} MoE layers x "
             f"{meta.num_experts} experts = {total} experts of {meta.expert_bytes / 2**20:.2f} MiB; top-{meta.top_k}; "
             f"slot plan: {args.slot_plan}. One slot holds one expert. Produced by `eval/sweep_policies.py`.", ""]
    for mode, rs in results.items():
        lines += [f"## Prefetch: {mode} ({len(rs)} configs replayed in {timings[mode]:.2f} s)", "",
                  "Hit rate (all layer calls):", "", results_table(rs, "hit_rate"), "",
                  "Hit rate in decode steps only:", "", results_table(rs, "decode_hit_rate"), "",
                  "Link time per request (ms, demand + prefetch copies at the configured bandwidth):", "",
                  _table(rs, lambda r: f"{r.predicted_link_time_s / max(trace.num_requests, 1) * 1e3:.2f}"), "",
                  "Decode overhead per request (ms; `SimResult.decode_overhead_s`: decode misses and unused prefetch "
                  "copies at one copy time each, plus one prediction per layer call predicted for; compares the "
                  "prefetch modes):", "",
                  _table(rs, lambda r: f"{r.decode_overhead_s / max(trace.num_requests, 1) * 1e3:.2f}"), ""]
        if mode != "none":
            lines += ["Prefetch copies used by a demand / issued:", "",
                      _table(rs, lambda r: f"{int(r.prefetch_used.sum())}/{int(r.prefetch_issued.sum())}"), ""]
    if quality is not None:
        lines += ["## Next-layer prediction quality (recorded predictions)", "",
                  "| layer | decode recall | decode precision | prefill recall | prefill precision |",
                  "|---:|---:|---:|---:|---:|"]
        d, p = quality["decode"], quality["prefill"]
        for layer in range(meta.num_layers):
            if d["groups"][layer] or p["groups"][layer]:
                lines.append(f"| {layer} | {d['recall'][layer]:.3f} | {d['precision'][layer]:.3f} | "
                             f"{p['recall'][layer]:.3f} | {p['precision'][layer]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def _table(rs, cell) -> str:
    """Markdown: one row per budget, one column per policy, `cell(result)` in each."""
    policies = list(dict.fromkeys(r.policy for r in rs))
    by = {(r.policy, r.budget_slots): r for r in rs}
    lines = ["| slots | " + " | ".join(policies) + " |", "|---:|" + "---:|" * len(policies)]
    for b in sorted({r.budget_slots for r in rs}):
        lines.append(f"| {b} | " + " | ".join(cell(by[(p, b)]) if (p, b) in by else "" for p in policies) + " |")
    return "\n".join(lines)


def _plot(trace, results, quality, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    total = trace.meta.num_layers * trace.meta.num_experts
    panels = len(results) + (quality is not None)
    cols = min(panels, 2)
    rows = -(-panels // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    axes = axes.ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    for ax, (mode, rs) in zip(axes, results.items()):
        for policy in dict.fromkeys(r.policy for r in rs):
            mine = sorted((r for r in rs if r.policy == policy), key=lambda r: r.budget_slots)
            x = [100 * r.budget_slots / total for r in mine]
            line, = ax.plot(x, [100 * r.hit_rate for r in mine], marker="o", ms=3, label=policy)
            ax.plot(x, [100 * r.decode_hit_rate for r in mine], ls="--", lw=1, color=line.get_color())
        ax.set(title=f"prefetch: {mode}", xlabel="budget (% of all experts)", ylabel="hit rate (%)", ylim=(0, 101))
        ax.grid(alpha=0.3)
        ax.legend(title="solid: all, dashed: decode", fontsize=8, title_fontsize=8)
    if quality is not None:
        ax = axes[panels - 1]
        layers = np.arange(trace.meta.num_layers)
        d = quality["decode"]
        ax.bar(layers - 0.2, 100 * d["recall"], 0.4, label="recall")
        ax.bar(layers + 0.2, 100 * d["precision"], 0.4, label="precision")
        ax.set(title="next-layer prediction (decode)", xlabel="layer", ylabel="%", ylim=(0, 101), xticks=layers)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
