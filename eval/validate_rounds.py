"""The planner's validation (eval/validate_plan.py) repeated in rounds, each a fresh process with its own
probe, and each row's ratio taken as its median over the rounds (issue 13).

Why: on the H200 host the same configuration's TTFT moved up to 1.8x between engines loaded seconds apart,
in modes lasting seconds, with the main thread never waiting (eval/profile_host_modes.py, session 8). One
run compares a probe taken in one mode with a row measured in another, so a single run's ratio measures
the host's mode as much as the planner. A round here is a whole validate_plan run (probe, traces, plans,
rows); each row's measured / predicted ratio is kept per round and summarised by its median, next to the
per-round counts within the acceptance band.

    python eval/validate_rounds.py --out $OUT --rounds 3 -- --parts B --models bundled
    python eval/validate_rounds.py --out $OUT --aggregate RUN1/validate_plan.json RUN2/validate_plan.json
    python eval/validate_rounds.py --out /tmp/vr --rounds 2 -- --tiny         # CPU smoke run

Arguments after `--` go to every round's validate_plan.py. --budget-s starts no round that the rounds so
far say would not finish in time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import REPO, output_dir, write_report  # noqa: E402

BAND = (0.75, 1.25)  # issue 13's acceptance: measured within +-25% of predicted


def host_speed(measured: dict, predicted: dict) -> float | None:
    """The row's host speed against the probe's, as input building shows it: the median of the row's
    requests' input building (RequestStats.inputs_s, the processor: pure CPU work on one thread, the same
    for every row) over the probe's (the prediction's ttft_inputs_ms). None where either is missing."""
    inputs = [q["inputs_ms"] for q in measured.get("requests", []) if "inputs_ms" in q]
    ratio = float(np.median(inputs)) / predicted["ttft_inputs_ms"] if inputs and predicted.get("ttft_inputs_ms") else 0.0
    return ratio if ratio > 0 else None


def ratios(report: dict) -> dict:
    """{(model, profile, fraction): (TTFT ratio, decode ratio, host speed ratio or None)}: measured /
    emulated prediction, for the part-B rows of one validate_plan report that were measured."""
    out = {}
    for r in report.get("rows_b", []):
        if "measured" not in r or "emulated_prediction" not in r:
            continue
        m, e = r["measured"], r["emulated_prediction"]
        out[(r["model"], r["profile"], r["fraction"])] = (m["ttft_ms"] / e["ttft_ms"],
                                                          m["decode_ms_per_token"] / e["decode_ms_per_token"],
                                                          host_speed(m, e))
    return out


def aggregate(reports: list[dict]) -> dict:
    """Per row: its ratios in each round (None where the round did not measure it) and their medians;
    per round and for the medians: rows within BAND, for TTFT and decode. A diagnostic beside them, not
    the acceptance: `ttft_at_probe_speed`, each round's TTFT ratio over the row's host speed ratio
    (host_speed), where the rows recorded their input building."""
    per_round = [ratios(r) for r in reports]
    keys = list(dict.fromkeys(k for rr in per_round for k in rr))  # first-seen order: the runs' row order
    inside = lambda x: BAND[0] <= x <= BAND[1]  # noqa: E731
    rows = []
    for key in keys:
        seen = [rr.get(key) for rr in per_round]
        got = [s for s in seen if s is not None]
        at_speed = [None if s is None or s[2] is None else s[0] / s[2] for s in seen]
        known = [x for x in at_speed if x is not None]
        rows.append(dict(model=key[0], profile=key[1], fraction=key[2],
                         ttft=[None if s is None else s[0] for s in seen], decode=[None if s is None else s[1] for s in seen],
                         ttft_median=float(np.median([s[0] for s in got])), decode_median=float(np.median([s[1] for s in got])),
                         host_speed=[None if s is None else s[2] for s in seen], ttft_at_probe_speed=at_speed,
                         ttft_at_probe_speed_median=float(np.median(known)) if known else None))
    counts = [dict(rows=len(rr), ttft=sum(inside(s[0]) for s in rr.values()), decode=sum(inside(s[1]) for s in rr.values()),
                   ttft_at_probe_speed=sum(s[2] is not None and inside(s[0] / s[2]) for s in rr.values()))
              for rr in per_round]
    medians = dict(rows=len(rows), ttft=sum(inside(r["ttft_median"]) for r in rows),
                   decode=sum(inside(r["decode_median"]) for r in rows),
                   ttft_at_probe_speed=sum(r["ttft_at_probe_speed_median"] is not None and inside(r["ttft_at_probe_speed_median"])
                                           for r in rows))
    return dict(band=BAND, rounds=len(reports), rows=rows, counts_per_round=counts, counts_of_medians=medians)


def markdown(agg: dict, sources: list[str]) -> str:
    fmt = lambda x: "-" if x is None else (f"{x:.2f}" if BAND[0] <= x <= BAND[1] else f"**{x:.2f}**")  # noqa: E731
    n = agg["rounds"]
    lines = [f"Planner validation in {n} rounds (each a fresh validate_plan.py process with its own probe): "
             "measured / predicted (emulated) per round, and the median over the rounds. Bold = outside "
             f"{BAND[0]}-{BAND[1]}.", "", "Rounds: " + ", ".join(sources), "",
             "| model | profile | budget | " + " | ".join(f"TTFT r{i + 1}" for i in range(n)) + " | TTFT median | "
             + " | ".join(f"decode r{i + 1}" for i in range(n)) + " | decode median |",
             "|---|---|---|" + "---:|" * (2 * n + 2)]
    for r in agg["rows"]:
        lines.append(f"| {r['model']} | {r['profile']} | {r['fraction']} | " + " | ".join(fmt(x) for x in r["ttft"])
                     + f" | {fmt(r['ttft_median'])} | " + " | ".join(fmt(x) for x in r["decode"])
                     + f" | {fmt(r['decode_median'])} |")
    lines += ["", "Within the band:", "", "| | rows | TTFT | decode |", "|---|---:|---:|---:|"]
    lines += [f"| round {i + 1} | {c['rows']} | {c['ttft']} | {c['decode']} |" for i, c in enumerate(agg["counts_per_round"])]
    m = agg["counts_of_medians"]
    lines.append(f"| median over rounds | {m['rows']} | {m['ttft']} | {m['decode']} |")
    if any(x is not None for r in agg["rows"] for x in r["host_speed"]):
        lines += ["", "Diagnostic, not the acceptance: the TTFT ratio at the probe's host speed, i.e. over the row's host "
                  "speed ratio (its requests' median input building, pure CPU work, over the probe's), per round "
                  "(host speed ratio in brackets) and the median:", "",
                  "| model | profile | budget | " + " | ".join(f"r{i + 1}" for i in range(n)) + " | median |",
                  "|---|---|---|" + "---:|" * (n + 1)]
        pair = lambda x, h: "-" if x is None else f"{fmt(x)} ({h:.2f})"  # noqa: E731
        for r in agg["rows"]:
            median = r["ttft_at_probe_speed_median"]
            lines.append(f"| {r['model']} | {r['profile']} | {r['fraction']} | "
                         + " | ".join(pair(x, h) for x, h in zip(r["ttft_at_probe_speed"], r["host_speed"]))
                         + f" | {'-' if median is None else fmt(median)} |")
        lines += ["", "Within the band at the probe's host speed: "
                  + ", ".join(f"round {i + 1}: {c['ttft_at_probe_speed']} of {c['rows']}" for i, c in enumerate(agg["counts_per_round"]))
                  + f"; medians: {m['ttft_at_probe_speed']} of {m['rows']}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    argv = sys.argv[1:]
    passed = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=None, help="start no round that would end after this")
    ap.add_argument("--aggregate", nargs="+", default=None, metavar="REPORT",
                    help="aggregate these validate_plan.json reports instead of running rounds")
    args = ap.parse_args(own)
    out = output_dir(args.out)

    def summarise(sources: list[str]) -> str:  # written after every round: a run cut short keeps its rounds
        agg = aggregate([json.loads(Path(p).read_text()) for p in sources])
        text = markdown(agg, sources)
        write_report(out, "validate_rounds", dict(agg, sources=sources), text)
        return text

    if args.aggregate:
        missing = [p for p in args.aggregate if not Path(p).is_file()]
        if missing:
            ap.error(f"no such report: {', '.join(missing)} (give validate_plan.json files written by eval/validate_plan.py)")
        print(summarise([str(Path(p)) for p in args.aggregate]))
        return
    if args.rounds < 1:
        ap.error(f"--rounds must be at least 1, got {args.rounds}")
    sources, t0, took = [], time.perf_counter(), []
    for k in range(1, args.rounds + 1):
        if args.budget_s is not None and took and time.perf_counter() - t0 + max(took) > args.budget_s:
            print(f"round {k}: not started, the longest round took {max(took):.0f} s and "
                  f"{args.budget_s - (time.perf_counter() - t0):.0f} s of --budget-s are left", flush=True)
            break
        t = time.perf_counter()
        report = out / f"round_{k}" / "validate_plan.json"
        rc = subprocess.run([sys.executable, str(REPO / "eval" / "validate_plan.py"), "--out", str(report.parent),
                             *passed], cwd=REPO).returncode
        took.append(time.perf_counter() - t)
        print(f"round {k} took {took[-1]:.0f} s (validate_plan.py exit status {rc})", flush=True)
        if report.is_file():  # (validate_plan rewrites its report after every row: a failed round keeps its rows)
            sources.append(str(report))
            summarise(sources)
    if not sources:
        sys.exit("no round wrote a report: see validate_plan.py's output above")
    print(summarise(sources))

if __name__ == "__main__":
    main()
