"""How `prefetch: auto`'s constants (period, decay, wrong-copy factor) were chosen: on the first halves of
the bundled models' recorded traces only, so that their second halves stay held out (BENCHMARKS.md).

Each variant replays each first half cold (fresh engine) under LRU at 25% and 50%, with the traces' own
records (prior costs) and with the bench model's records and the costs measured on the H200
(--costs-from, a GPU run's profile_autoprefetch.json); the cells give auto against the best fixed setting.
Writes variants_first_half.md and .json into --out.

    python eval/select_autoprefetch.py --out eval/results/autoprefetch \\
        --costs-from eval/results/autoprefetch/profile_autoprefetch.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import write_report  # noqa: E402
from eval.profile_autoprefetch import TRACES  # noqa: E402

from vismmoe.offload import autoprefetch  # noqa: E402
from vismmoe.offload.simulate import simulate  # noqa: E402
from vismmoe.offload.trace import load_trace  # noqa: E402

VARIANTS = [(8, 0.5, 2.0), (8, 0.75, 2.0), (8, 0.5, 1.0), (16, 0.5, 2.0), (16, 0.75, 2.0), (16, 0.5, 1.0),
            (32, 0.5, 2.0), (16, 0.75, 1.0)]  # (period, decay, wrong-copy factor)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--costs-from", required=True)
    args = ap.parse_args()
    gpu_run = json.loads(Path(args.costs_from).read_text())
    record, costs = gpu_run["record_bytes"], gpu_run["auto_costs"]
    bench = dict(expert_bytes=record, predict_s=costs["predict_us"] * 1e-6, copy_overhead_s=0.0,
                 link_gbps=record / (costs["copy_us"] * 1e-6) / 1e9)
    chosen = (autoprefetch.PERIOD, autoprefetch.DECAY, autoprefetch.WRONG_COPY_COST)
    rows = []
    try:
        for path in TRACES:
            full = load_trace(path)
            trace = full.requests(0, full.num_requests // 2)
            total = trace.meta.num_layers * trace.meta.num_experts
            for records, options in (("own", {}), ("bench model's", bench)):
                for fraction in (0.25, 0.5):
                    slots = max(trace.meta.num_layers, trace.meta.top_k, int(round(total * fraction)))
                    best = min(simulate(trace, "lru", slots, m, **options).decode_overhead_s for m in ("none", "trace"))
                    cells = []
                    for variant in VARIANTS:
                        autoprefetch.PERIOD, autoprefetch.DECAY, autoprefetch.WRONG_COPY_COST = variant
                        cells.append(simulate(trace, "lru", slots, "auto", **options).decode_overhead_s / best - 1)
                    rows.append(dict(trace=Path(path).stem, records=records, budget=fraction, auto_vs_best=cells))
                    print(rows[-1], flush=True)
    finally:
        autoprefetch.PERIOD, autoprefetch.DECAY, autoprefetch.WRONG_COPY_COST = chosen
    head = " | ".join(f"{p}, {d}, {w}" for p, d, w in VARIANTS)
    lines = ["# prefetch: auto's constants on the first halves of the recorded traces", "",
             f"auto vs the best fixed setting, cold; columns: (period, decay, wrong-copy factor); the engine's: "
             f"{chosen}.", "", f"| trace | records | budget | {head} |", "|---|---|---:|" + "---:|" * len(VARIANTS)]
    for r in rows:
        lines.append(f"| {r['trace']} | {r['records']} | {r['budget']:.0%} | "
                     + " | ".join(f"{c:+.2%}" for c in r["auto_vs_best"]) + " |")
    text = "\n".join(lines) + "\n"
    write_report(Path(args.out), "variants_first_half", dict(variants=VARIANTS, chosen=chosen, rows=rows), text)
    print(text)


if __name__ == "__main__":
    main()
