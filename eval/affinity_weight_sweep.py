"""Choose the affinity method's weights by measurement (issue 10): accuracy retention of `visual_prune:
affinity` on the scene-VQA test questions for a grid of `visual_affinity_weights`, at each keep.

Every setting goes through vismmoe.evaluation.run_eval (the path of `vismmoe eval`); retention = accuracy /
the unpruned accuracy on the same questions (one unpruned run first, or `--unpruned DIR`: a finished
`vismmoe eval` run on the same questions, e.g. eval/scene_pruning_sweep.py's `unpruned/`).

    PYTHONPATH=. python eval/affinity_weight_sweep.py --out /tmp/aw --limit 140 --device cpu

Writes affinity_weights.json and affinity_weights.md into --out (plus the eval runs).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import write_report  # noqa: E402 - the scripts' shared settings (offline, quiet transformers)
from vismmoe.evaluation import run_eval  # noqa: E402

# Absolute weights (importance, concentration, diversity, routing), so a table stays readable when the
# defaults change. "first_defaults" were the provisional defaults; the measured choice is "quadruple_diversity".
def _w(importance, concentration, diversity, routing):
    return {"importance": importance, "concentration": concentration, "diversity": diversity, "routing": routing}


GRID = {
    "first_defaults": _w(1, 1, 1, 0.5),
    "no_concentration": _w(1, 0, 1, 0.5),
    "half_concentration": _w(1, 0.5, 1, 0.5),
    "double_diversity": _w(1, 1, 2, 0.5),
    "no_importance": _w(0, 1, 1, 0.5),
    "embedding_distance_only": _w(1, 1, 1, 0),
    "routing_distance_only": _w(1, 1, 1, 1),
    "double_diversity_embedding_only": _w(1, 1, 2, 0),
    "quadruple_diversity": _w(1, 1, 4, 0.5),
    "quadruple_concentration": _w(1, 4, 1, 0.5),
}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/scenevqa-qwen3vlmoe")
    ap.add_argument("--task", default="scenevqa")
    ap.add_argument("--out", required=True)
    ap.add_argument("--limit", type=int, default=0, help="first N test questions (0 = all)")
    ap.add_argument("--keep", default="0.5,0.25")
    ap.add_argument("--settings", default=",".join(GRID), help=f"names from {', '.join(GRID)}")
    ap.add_argument("--unpruned", help="a finished unpruned run on the same questions (skips running it)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    out = Path(args.out)
    unknown = [s for s in args.settings.split(",") if s not in GRID]
    if unknown:
        ap.error(f"unknown --settings {unknown}; valid: {', '.join(GRID)}")
    overrides = {"device": args.device} if args.device != "auto" else {}
    common = dict(limit=args.limit or None, progress=False)
    if args.unpruned:
        base = json.loads((Path(args.unpruned) / "results.json").read_text())
    else:
        base = run_eval(args.model, args.task, output=out / "unpruned", overrides={**overrides, "visual_keep": 1.0},
                        **common)
    headline = "accuracy"
    base_acc = base["metrics"][headline]
    rows = []
    for name in args.settings.split(","):
        weights = GRID[name]
        for keep in (float(k) for k in args.keep.split(",")):
            result = run_eval(args.model, args.task, output=out / f"{name}_keep{keep}", overrides={
                **overrides, "visual_keep": keep, "visual_prune": "affinity", "visual_affinity_weights": weights},
                **common)
            acc = result["metrics"][headline]
            rows.append({"setting": name, "weights": weights, "visual_keep": keep, headline: acc,
                         "retention": acc / base_acc if base_acc else None, "n_samples": result["n_samples"]})
            print(json.dumps(rows[-1]), flush=True)
    summary = {"model": args.model, "task": args.task, "unpruned_accuracy": base_acc,
               "n_samples": base["n_samples"], "rows": rows}
    keeps = sorted({r["visual_keep"] for r in rows}, reverse=True)
    lines = [f"# Affinity weights on {args.task} ({base['n_samples']} questions, unpruned {base_acc:.4f})", "",
             "| setting | weights | " + " | ".join(f"keep {k}" for k in keeps) + " |",
             "|---|---|" + "---|" * len(keeps)]
    for name in dict.fromkeys(r["setting"] for r in rows):
        mine = {r["visual_keep"]: r for r in rows if r["setting"] == name}
        cells = [f"{mine[k]['retention']:.1%} ({mine[k][headline]:.3f})" if k in mine else "" for k in keeps]
        lines.append(f"| {name} | {json.dumps(mine[keeps[0]]['weights'])} | " + " | ".join(cells) + " |")
    write_report(out, "affinity_weights", summary, "\n".join(lines) + "\n", indent=2)
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
