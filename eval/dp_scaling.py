"""Data-parallel evaluation against one process: same predictions, and how throughput scales.

Runs `vismmoe eval` once as a single process and once under `torchrun --nproc-per-node N` (one engine per
GPU, `cuda:LOCAL_RANK`), both over the same questions and sweep, then compares every prediction and
the evaluation loops' throughput (results.json's `throughput`: engine loading excluded, measured
between two barriers on rank 0).

    PYTHONPATH=. python3 eval/dp_scaling.py --out OUT [--nproc 2] [--limit 2000] [--sweep budget=0.25,1.0]
        [--config configs/deploy/gpu-demo-bf16.yaml]

Writes OUT/dp_scaling.{json,md} and keeps both runs' output directories under OUT/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def _run(cmd: list[str], log: Path) -> float:
    start = time.perf_counter()
    # torchrun gives each worker OMP_NUM_THREADS=1 unless it is set: the single process gets the same, so
    # that the comparison measures data parallelism, not CPU thread settings.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(log, "w") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}; see {log}")
    return time.perf_counter() - start


def _settings(root: Path) -> dict[str, Path]:
    dirs = {p.parent.name: p.parent for p in root.glob("*/results.json")}
    return dirs or {"default": root}


def _predictions(setting_dir: Path) -> dict[str, str]:
    rows = [json.loads(line) for line in (setting_dir / "samples.jsonl").read_text().splitlines() if line.strip()]
    return {str(r["question_id"]): r["prediction"] for r in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="models/easyvqa-qwen3vlmoe")
    ap.add_argument("--task", default="easyvqa")
    ap.add_argument("--config", default="configs/deploy/gpu-demo-bf16.yaml", help="engine config for both runs")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--limit", type=int, default=2000)
    ap.add_argument("--sweep", nargs="+", default=["budget=0.25,1.0"])
    ap.add_argument("--logs", help="directory for the two runs' logs (default: --out)")
    args = ap.parse_args()
    out = Path(args.out)
    logs = Path(args.logs or args.out)
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    common = ["eval", "--model", args.model, "--task", args.task, "--limit", str(args.limit), "--config", args.config,
              "--sweep", *args.sweep]
    single_dir, dp_dir = out / "single", out / f"dp{args.nproc}"
    for stale in (single_dir, dp_dir):  # a resumed eval would evaluate nothing and time nothing
        shutil.rmtree(stale, ignore_errors=True)
    single_s = _run([sys.executable, "-m", "vismmoe.evaluation", *common, "--output", str(single_dir)],
                    logs / "single.log")
    dp_s = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
                 "-m", "vismmoe.evaluation", *common, "--output", str(dp_dir)], logs / f"dp{args.nproc}.log")
    rows = []
    for name, single in sorted(_settings(single_dir).items()):
        dp = _settings(dp_dir)[name]
        a, b = _predictions(single), _predictions(dp)
        same = sum(a[q] == b.get(q) for q in a)
        ra, rb = (json.loads((d / "results.json").read_text()) for d in (single, dp))
        ta, tb = ra["throughput"], rb["throughput"]
        rows.append({"setting": name, "questions": len(a), "equal_predictions": same,
                     "accuracy_single": ra["metrics"].get("accuracy"), "accuracy_dp": rb["metrics"].get("accuracy"),
                     "single_samples_per_s": ta["samples_per_s"], "dp_samples_per_s": tb["samples_per_s"],
                     "speedup": round(tb["samples_per_s"] / ta["samples_per_s"], 3),
                     "single_wall_s": ta["wall_s"], "dp_wall_s": tb["wall_s"], "dp_device": rb["provenance"].get("device")})
    report = {"nproc": args.nproc, "limit": args.limit, "sweep": args.sweep, "model": args.model, "task": args.task,
              "command_wall_s": {"single": round(single_s, 1), "dp": round(dp_s, 1)}, "rows": rows}
    (out / "dp_scaling.json").write_text(json.dumps(report, indent=2) + "\n")
    cols = list(rows[0]) if rows else []
    md = [f"# Data-parallel evaluation: {args.nproc} processes vs 1 ({args.task}, {args.limit} questions)", "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    md += ["", f"Whole commands (start-up included): single {single_s:.1f} s, {args.nproc} processes {dp_s:.1f} s."]
    (out / "dp_scaling.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0 if all(r["equal_predictions"] == r["questions"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
