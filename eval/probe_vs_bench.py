"""Does `vismmoe probe` measure the link as eval/bench_offload.py does? (issue 13: within 10%)

One process, one GPU: the probe's figures (vismmoe.deploy.probe.probe, what `vismmoe probe` prints and
the planner reads) beside bench_offload's own measurements of the same two links, back to back:
pinned host->GPU DMA copies (`pinned_bandwidth_gbps`) and the device-decided record copy kernel
reading the page-locked slab (`device_copy_gbps`, on the bench model's real slab). Each figure is
measured `--rounds` times alternately, so a drift of the machine shows up in both columns; the table
gives the medians and their ratio. Writes probe_vs_bench.json / .md into --out.

    python3 eval/probe_vs_bench.py --out $OUT --layers 12      # GPU (reuses the built bench model)
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.bench_offload import device_copy_gbps, pinned_bandwidth_gbps  # noqa: E402
from eval.common import device_name, output_dir, write_report  # noqa: E402

from vismmoe.deploy.probe import probe  # noqa: E402
from vismmoe.testing.tiny_models import full_size_checkpoint  # noqa: E402

PAIRS = (  # (what, probe figure, bench_offload function)
    ("pinned host->GPU DMA", "h2d_pinned_gbs", lambda ckpt: pinned_bandwidth_gbps()),
    ("device-decided record copies", "copy_kernel_gbs", lambda ckpt: device_copy_gbps(ckpt)),
)
TOLERANCE = 0.10


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12, help="the bench model (built once, reused)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("probe_vs_bench needs a GPU: both scripts measure host->GPU links", file=sys.stderr)
        return 2
    out = output_dir(args.out)
    ckpt = full_size_checkpoint(args.layers)
    probed = {name: [] for _, name, _ in PAIRS}
    bench = {name: [] for _, name, _ in PAIRS}
    for _ in range(args.rounds):
        figures = probe(model_dir=ckpt)["figures"]
        for _, name, measure in PAIRS:
            probed[name].append(figures.get(name, {}).get("value"))
            bench[name].append(measure(ckpt))
    rows = []
    for what, name, _ in PAIRS:
        p = statistics.median(v for v in probed[name] if v is not None) if any(probed[name]) else None
        b = statistics.median(bench[name])
        ratio = p / b if p else None
        rows.append(dict(link=what, probe_figure=name, probe_gbs=p, bench_gbs=b, ratio=ratio,
                         within_10pct=ratio is not None and abs(ratio - 1) <= TOLERANCE,
                         probe_rounds=probed[name], bench_rounds=bench[name]))
    report = {"gpu": device_name(), "checkpoint": str(ckpt), "rounds": args.rounds, "rows": rows,
              "all_within_10pct": all(r["within_10pct"] for r in rows)}
    lines = [f"# vismmoe probe vs eval/bench_offload.py ({report['gpu']})", "",
             "| link | probe GB/s | bench_offload GB/s | probe / bench | within 10% |", "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['link']} | {r['probe_gbs'] or float('nan'):.1f} | {r['bench_gbs']:.1f} | "
                     f"{r['ratio'] or float('nan'):.3f} | {r['within_10pct']} |")
    write_report(out, "probe_vs_bench", report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if report["all_within_10pct"] else 1


if __name__ == "__main__":
    sys.exit(main())
