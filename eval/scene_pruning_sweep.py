"""Accuracy retention under visual-token pruning on the scene-VQA test split (issue 10's acceptance table).

One unpruned run (visual_keep 1.0), then every keep < 1 x pruning method x merge off/on, all through
vismmoe.evaluation.run_eval (the path of `vismmoe eval --task scenevqa`); retention = accuracy / the
unpruned accuracy on the same questions. The pruning settings reach the engine only as config keys
(`visual_keep`, `visual_prune`, `visual_merge`, as overrides / sweep keys): an engine that does not know
them stops the script with a message saying so, before any model is loaded.

GPU (the scene model, full test split: 1 + 4 keeps x 5 methods x 2 merge = 41 settings x 1,500 questions;
resumable: a re-run of the same command skips every finished question, so it can run in several pieces):

    PYTHONPATH=. python3 eval/scene_pruning_sweep.py --model models/scenevqa-qwen3vlmoe --out $OUT/scene_pruning

or data-parallel over two GPUs (run_eval's torchrun support; rank 0 writes the summary):

    PYTHONPATH=. torchrun --nproc-per-node 2 eval/scene_pruning_sweep.py --model models/scenevqa-qwen3vlmoe \
        --out $OUT/scene_pruning

CPU quick check (a few questions per setting):

    PYTHONPATH=. .venv/bin/python eval/scene_pruning_sweep.py --model models/scenevqa-qwen3vlmoe \\
        --out /tmp/scene_pruning --limit 14

Writes into --out: scene_pruning.json (every setting: accuracy, retention, per question type, visual
tokens kept, latency), scene_pruning.md (retention table keep x method, merge off / on) and
scene_pruning.png (retention vs keep per method), plus the eval runs themselves (unpruned/, pruned/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import eval.common  # noqa: E402,F401 - the scripts' shared settings (offline, quiet transformers)

from vismmoe.errors import ConfigError  # noqa: E402
from vismmoe.evaluation import run_eval  # noqa: E402
from vismmoe.evaluation.sweep import setting_name  # noqa: E402
from vismmoe.evaluation.tasks import get_task  # noqa: E402

PRUNING_KEYS = ("visual_keep", "visual_prune", "visual_merge")
KEEPS = (1.0, 0.75, 0.5, 0.25, 0.125)
METHODS = ("affinity", "diversity", "importance", "pool", "random")


def check_engine_knows_pruning(known_keys=None) -> None:
    """ConfigError unless the engine's configuration has every pruning key (default: EngineConfig's fields)."""
    if known_keys is None:
        from vismmoe.config import EngineConfig

        known_keys = {f.name for f in fields(EngineConfig)}
    missing = [k for k in PRUNING_KEYS if k not in known_keys]
    if missing:
        raise no_pruning_error(missing)


def no_pruning_error(missing) -> ConfigError:
    return ConfigError(
        f"this vismmoe engine has no visual-token pruning: its configuration lacks {', '.join(missing)}. "
        "The sweep passes visual_keep / visual_prune / visual_merge to the engine as config keys; run it "
        "with a vismmoe that has the pruning stage (issue 10, branch pruning).")


def parse_keep(text: str):
    """'0.5' -> 0.5 (a ratio), '98' -> 98 (a token count), as the engine's visual_keep reads them."""
    text = text.strip()
    try:
        return int(text) if text.isdigit() else float(text)
    except ValueError:
        raise ConfigError(f"--keep takes ratios in (0, 1] or token counts, got {text!r}") from None


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="models/scenevqa-qwen3vlmoe")
    ap.add_argument("--out", required=True, help="output directory (JSON, markdown, plot, eval runs)")
    ap.add_argument("--task", default="scenevqa", help="eval task (scenevqa; easyvqa for the demo model's check)")
    ap.add_argument("--limit", type=int, default=0, help="first N test questions (0 = the whole split)")
    ap.add_argument("--keep", default=",".join(map(str, KEEPS)), help="visual_keep values; 1.0 is the unpruned run")
    ap.add_argument("--methods", default=",".join(METHODS), help="visual_prune methods")
    ap.add_argument("--merge", default="off,on", help="visual_merge settings: off, on or both")
    ap.add_argument("--budget", default=1.0, type=float, help="expert_budget (fraction of all expert bytes)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    args.keep = [parse_keep(k) for k in _csv(args.keep)]
    args.methods = _csv(args.methods)
    bad = [m for m in _csv(args.merge) if m not in ("off", "on")]
    if bad:
        raise ConfigError(f"--merge takes off, on or off,on; got {args.merge!r}")
    args.merge = [m == "on" for m in _csv(args.merge)]
    return args


def sweep(args, engine_factory=None, progress: bool = True) -> dict:
    """Run the unpruned setting and the pruned grid; returns the summary written to scene_pruning.json."""
    out = Path(args.out)
    headline = get_task(args.task).headline
    overrides = {"expert_budget": args.budget, **({"device": args.device} if args.device != "auto" else {})}
    common = dict(limit=args.limit or None, engine_factory=engine_factory, progress=progress)
    pruned_keeps = [k for k in args.keep if k != 1.0]
    grid = {"visual_keep": pruned_keeps, "visual_prune": args.methods, "visual_merge": args.merge}
    try:
        base = run_eval(args.model, args.task, output=out / "unpruned", overrides={**overrides, "visual_keep": 1.0},
                        **common)
        pruned = run_eval(args.model, args.task, output=out / "pruned", overrides=overrides, sweep=grid,
                          **common)["rows"] if pruned_keeps else []
    except ConfigError as error:  # an engine factory that does not know the keys (vismmoe.load's message)
        if "unknown config key" in str(error):
            missing = [k for k in PRUNING_KEYS if k in str(error)]
            if missing:
                raise no_pruning_error(missing) from error
        raise
    base_acc = base["metrics"][headline]
    rows = [_row(out / "unpruned", {"visual_keep": 1.0, "visual_prune": None, "visual_merge": False}, headline,
                 base_acc)]
    for r in pruned:
        setting = {k: r[k] for k in PRUNING_KEYS}
        rows.append(_row(out / "pruned" / setting_name(setting), setting, headline, base_acc))
    summary = {"task": args.task, "model": str(args.model), "headline": headline, "n_samples": base["n_samples"],
               "expert_budget": args.budget, "unpruned_accuracy": base_acc, "rows": rows,
               "checks": _checks(rows), "provenance": base.get("provenance")}
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank has the results; one writes
        (out / "scene_pruning.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        (out / "scene_pruning.md").write_text(markdown(summary))
        plot(summary, out / "scene_pruning.png")
    return summary


def _row(run_dir: Path, setting: dict, headline: str, base_acc: float) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    metrics, eff = results["metrics"], results.get("efficiency") or {}
    acc = metrics[headline]
    per_type = metrics.get("per_question_type") or metrics.get("per_answer_type")
    return {**setting, headline: acc, "retention": acc / base_acc if base_acc else None,
            "per_type": per_type, "n_samples": results["n_samples"],
            **{k: eff.get(k) for k in ("visual_tokens_kept_mean", "latency_s_mean", "ttft_s_mean")}}


def _lookup(rows, keep, method, merge):
    return next((r for r in rows if r["visual_keep"] == keep and r["visual_prune"] == method
                 and r["visual_merge"] == merge), None)


def _checks(rows) -> list[dict]:
    """Issue 10's acceptance conditions, evaluated on these rows (None where a setting was not run)."""
    pruned = [r for r in rows if r["visual_prune"] is not None]
    checks = []
    for merge in sorted({r["visual_merge"] for r in pruned}):
        for keep, floor in ((0.5, 0.97), (0.25, 0.90)):
            r = _lookup(rows, keep, "affinity", merge)
            value = None if r is None else r["retention"]
            checks.append({"check": f"affinity retention >= {floor:.0%} at keep {keep}, merge {merge}",
                           "value": value, "pass": None if value is None else value >= floor})
        for baseline in ("random", "pool"):
            pairs = [(_lookup(rows, r["visual_keep"], "affinity", merge), r) for r in pruned
                     if r["visual_prune"] == baseline and r["visual_merge"] == merge]
            pairs = [(a, b) for a, b in pairs if a is not None and None not in (a["retention"], b["retention"])]
            if pairs:
                checks.append({"check": f"affinity not below {baseline} at any keep, merge {merge}",
                               "value": [(a["visual_keep"], a["retention"], b["retention"]) for a, b in pairs],
                               "pass": all(a["retention"] >= b["retention"] for a, b in pairs)})
    return checks


def markdown(summary: dict) -> str:
    rows, headline = summary["rows"], summary["headline"]
    methods = list(dict.fromkeys(r["visual_prune"] for r in rows if r["visual_prune"] is not None))
    keeps = list(dict.fromkeys(r["visual_keep"] for r in rows if r["visual_prune"] is not None))
    lines = [f"# Pruning retention: {summary['task']}, model `{summary['model']}`", "",
             f"Unpruned {headline}: **{summary['unpruned_accuracy']:.4f}** on {summary['n_samples']} test questions "
             f"(expert budget {summary['expert_budget']}). Cells: retention (accuracy / unpruned; n/a when the "
             "unpruned accuracy is 0), accuracy in brackets; kept visual tokens per image in the last column.", ""]
    for merge in sorted({r["visual_merge"] for r in rows if r["visual_prune"] is not None}):
        lines += [f"## merge {'on' if merge else 'off'}", "",
                  "| keep | " + " | ".join(methods) + " | tokens kept |", "|---" * (len(methods) + 2) + "|"]
        for keep in keeps:
            cells, kept = [], None
            for m in methods:
                r = _lookup(rows, keep, m, merge)
                if r is not None:
                    retention = "n/a" if r["retention"] is None else f"{r['retention']:.1%}"
                    cells.append(f"{retention} ({r[headline]:.3f})")
                else:
                    cells.append("")
                kept = kept if r is None or r["visual_tokens_kept_mean"] is None else r["visual_tokens_kept_mean"]
            lines.append(f"| {keep} | " + " | ".join(cells) + f" | {'' if kept is None else f'{kept:.1f}'} |")
        lines.append("")
    lines += ["## Acceptance conditions (issue 10)", ""]
    for c in summary["checks"]:
        verdict = {True: "pass", False: "FAIL", None: "n/a (not run, or no unpruned accuracy)"}[c["pass"]]
        lines.append(f"- {c['check']}: **{verdict}**")
    return "\n".join(lines) + "\n\n![retention vs keep](scene_pruning.png)\n"


def plot(summary: dict, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    rows = summary["rows"]
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    methods = list(dict.fromkeys(r["visual_prune"] for r in rows if r["visual_prune"] is not None))
    for i, method in enumerate(methods):
        for merge, style in ((False, "-"), (True, "--")):
            pts = sorted((r["visual_keep"], r["retention"]) for r in rows
                         if r["visual_prune"] == method and r["visual_merge"] == merge and r["retention"] is not None)
            if pts:
                pts = [(1.0, 1.0)] + pts if all(k != 1.0 for k, _ in pts) else pts
                ax.plot(*zip(*pts), style, marker="o", color=f"C{i}",
                        label=f"{method}{' + merge' if merge else ''}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("visual_keep (ratio of visual tokens kept)")
    ax.set_ylabel("accuracy retention vs unpruned")
    ax.set_title(f"{summary['task']}: {summary['n_samples']} test questions", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None, engine_factory=None, progress: bool = True) -> int:
    try:
        args = parse_args(argv)
        if engine_factory is None:
            check_engine_knows_pruning()  # before loading the model or generating any data
        summary = sweep(args, engine_factory, progress)
    except ConfigError as error:
        print(f"scene_pruning_sweep: error: {error}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(markdown(summary))
    failed = [c["check"] for c in summary["checks"] if c["pass"] is False]
    print(f"wrote {args.out}/scene_pruning.{{json,md,png}}; acceptance conditions failed: {failed or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
