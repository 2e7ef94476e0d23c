"""`prefetch: auto` against `false` and `true` (issue 12 item 3): live decode and simulated replays.

Live: the random bench model of eval/profile_static.py (Qwen3-VL-30B-A3B expert shapes, random routers,
so lookahead predictions are mostly wrong), static decode at 25% and 50% budgets, for prefetch false,
true and auto: decode ms/token of a first ("cold") generation on a fresh runtime, then the fastest and
the mean of --trials more after --warmup generations (auto's decisions carry over between requests, as
on a server); tokens, prefetched MB per token, and what auto decided per layer (share of decode steps
on) and the costs it weighed (measured at load on a GPU). Target: auto never more than 3% slower than
false.

Simulated: the bundled models' recorded traces (eval/results/*_test_traces.npz) replayed under LRU at
25% and 50% of all experts for prefetch none / trace (= true) / auto, by the simulator's time model
(`SimResult.decode_overhead_s`: decode misses and wrong prefetch copies at one record's copy time, plus
one prediction per layer call predicted for), with the traces' own record sizes and, with the record
size and the costs measured on the GPU's bench model, as if a full-size model routed that way. Two
evaluations of each cell: "cold" (the whole trace from an empty cache and a fresh controller, as one
new engine) and "held-out" (the second half of the requests, measured after the first half warmed up the
cache and auto's counts, as on a running server; the rule's constants were chosen on the first halves).
Target: auto at least as good as the best fixed setting. And a proxy of the random bench model (its
shape, top-8 of 128, uniform routing, predictions keeping 0 / 30 / 60% of the routed experts, its record
size and costs): what auto adds over false per decode token, against 3% of false's measured ms/token.

Writes profile_autoprefetch.json and profile_autoprefetch.md into --out; with --simulate-only (CPU, no
model) simulated_autoprefetch.json / .md, taking the record size, the costs and false's ms/token from
--costs-from (a profile_autoprefetch.json of a GPU run).

    python eval/profile_autoprefetch.py --out $OUT --layers 12           # GPU (H200)
    python eval/profile_autoprefetch.py --out /tmp/a --checkpoint models/easyvqa-qwen3vlmoe --tokens 12  # CPU
    python eval/profile_autoprefetch.py --simulate-only --out eval/results/autoprefetch \
        --costs-from eval/results/autoprefetch/profile_autoprefetch.json   # CPU, the tables of BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_PROMPT, device_name, output_dir, random_image, write_report  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.offload.autoprefetch import PREDICT_S_PRIOR  # noqa: E402
from vismmoe.offload.simulate import simulate  # noqa: E402
from vismmoe.offload.trace import load_trace, synthetic_trace  # noqa: E402
from vismmoe.testing.tiny_models import full_size_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRACES = [ROOT / "eval/results/easyvqa_test_traces.npz", ROOT / "eval/results/scenevqa_test_traces.npz"]
MODES = (False, True, "auto")


def live(engine, args) -> dict:
    image, prompt = random_image(np.random.RandomState(0), 256), BENCH_PROMPT
    n = args.tokens
    runs = {}
    for budget in args.budgets:
        for prefetch in MODES:
            # Each run on a fresh runtime: a switch into or out of auto builds a new one (and a new controller).
            engine.reconfigure(expert_budget=budget, prefetch=prefetch, decode="static", policy=args.policy)

            def generate():
                return engine.generate(image=image, prompt=prompt, max_new_tokens=n, min_new_tokens=n)

            per_token = lambda r: r.stats.decode_s * 1e3 / (r.stats.new_tokens - 1)  # noqa: E731
            cold = generate()  # captures the graphs; auto starts with every layer off (its first periods measure)
            for _ in range(args.warmup):
                generate()
            trials = [generate() for _ in range(max(1, args.trials))]
            best = min(trials, key=per_token)
            s = best.stats
            info = engine.info()
            runs[f"{budget}/prefetch={prefetch}"] = dict(
                budget=budget, prefetch=prefetch, path=s.decode_path, cold_ms_per_token=per_token(cold),
                decode_ms_per_token=per_token(best), mean_ms_per_token=float(np.mean([per_token(r) for r in trials])),
                trials_ms_per_token=[per_token(r) for r in trials],
                prefetch_mb_per_token=s.prefetch_issued_bytes / 1e6 / (s.new_tokens - 1),
                prefetch_used_mb_per_token=s.prefetch_used_bytes / 1e6 / (s.new_tokens - 1),
                decode_misses_per_token=(s.expert_misses - s.prefill_misses) / (s.new_tokens - 1),
                prefetch_on=s.prefetch_on, auto=info.prefetch_auto, recall=s.prefetch_recall[:1] if s.prefetch_recall else [],
                # Under auto: decode steps replayed as the full captured step and as the one without the lookahead.
                step_variants=s.step_variants, cold_step_variants=cold.stats.step_variants,
                token_ids=best.token_ids)
            print(f"{budget}/prefetch={prefetch}", {k: v for k, v in runs[f"{budget}/prefetch={prefetch}"].items()
                                                    if k != "token_ids"}, flush=True)
    return runs


def _cell(trace, policy, slots, measure_from=0, **options) -> dict:
    results = {mode: simulate(trace, policy, slots, mode, measure_from=measure_from, **options)
               for mode in ("none", "trace", "auto")}
    best_fixed = min(results["none"].decode_overhead_s, results["trace"].decode_overhead_s)
    auto = results["auto"]
    return dict(copy_us=auto.copy_seconds * 1e6, **{f"{m}_ms": r.decode_overhead_s * 1e3 for m, r in results.items()},
                auto_vs_best_fixed=auto.decode_overhead_s / best_fixed - 1 if best_fixed else 0.0,
                auto_on=auto.prefetch_on)


def simulated(args, record_bytes: int | None, costs: dict | None) -> list[dict]:
    """The recorded traces' cells, cold (whole trace) and held-out (second half after the first)."""
    rows = []
    for path in args.traces:
        trace = load_trace(path)
        meta = trace.meta
        total = meta.num_layers * meta.num_experts
        scenarios = [("trace's records", {}, PREDICT_S_PRIOR)]
        if record_bytes:
            predict_s = costs["predict_us"] * 1e-6 if costs else PREDICT_S_PRIOR
            options = dict(expert_bytes=record_bytes)
            if costs and costs.get("costs_from") == "measured":
                # One record at the measured copy time: the link rate that gives it (no fixed overhead).
                options.update(link_gbps=record_bytes / (costs["copy_us"] * 1e-6) / 1e9, copy_overhead_s=0.0)
            scenarios.append(("bench model's records", options, predict_s))
        for scenario, options, predict_s in scenarios:
            for fraction in (0.25, 0.5):
                slots = max(meta.num_layers, meta.top_k, int(round(total * fraction)))
                for evaluation, measure_from in (("cold", 0), ("held-out", trace.num_requests // 2)):
                    cell = _cell(trace, args.policy, slots, measure_from, predict_s=predict_s, **options)
                    rows.append(dict(trace=Path(path).stem, scenario=scenario, budget=fraction, slots=slots,
                                     evaluation=evaluation, predict_us=predict_s * 1e6, **cell))
                    print(rows[-1], flush=True)
    return rows


def _decode_predictions_only(trace):
    """Drop the prefill's predictions: the engine predicts in decode steps only (prefetch_prefill: false)."""
    return trace.decode_predictions_only()


def bench_proxy(record_bytes: int, costs: dict | None, false_ms: dict, layers: int) -> list[dict]:
    """The random bench model in the simulator: its shape, uniform routing (no locality: harsher than the
    live model, whose random routers repeat experts from token to token), decode-step predictions that keep
    a share of the routed experts, its record size and measured costs. What auto adds over false per decode
    token, cold (24 requests from a fresh engine) and warm (the last 12, after the first 12), against
    false's measured ms/token (where a live run gave it)."""
    rows = []
    predict_s = costs["predict_us"] * 1e-6 if costs else PREDICT_S_PRIOR
    options = dict(expert_bytes=record_bytes, predict_s=predict_s)
    if costs and costs.get("costs_from") == "measured":
        options.update(link_gbps=record_bytes / (costs["copy_us"] * 1e-6) / 1e9, copy_overhead_s=0.0)
    for accuracy in (0.0, 0.3, 0.6):
        trace = _decode_predictions_only(synthetic_trace(
            24, num_layers=layers, num_experts=128, top_k=8, visual_tokens=64, text_tokens=16, decode_steps=32,
            zipf=0.0, request_focus=0.0, reuse=0.0, predict_accuracy=accuracy, expert_bytes=record_bytes, seed=0))
        decode = (trace.group_step > 0) & (trace.group_layer == 0)
        for fraction in (0.25, 0.5):
            slots = int(round(layers * 128 * fraction))
            for evaluation, measure_from in (("cold", 0), ("warm", 12)):
                steps = int((decode & (trace.group_request >= measure_from)).sum())
                cell = _cell(trace, "lru", slots, measure_from, **options)
                added_ms = (cell["auto_ms"] - cell["none_ms"]) / steps
                base = false_ms.get(fraction)
                rows.append(dict(accuracy=accuracy, budget=fraction, slots=slots, evaluation=evaluation,
                                 decode_steps=steps, **cell, auto_added_ms_per_token=added_ms,
                                 false_ms_per_token=base, auto_vs_false=added_ms / base if base else None))
                print(rows[-1], flush=True)
    return rows


def markdown(report: dict) -> str:
    lines = [f"# prefetch: auto vs false / true ({report['gpu']})", ""]
    if report.get("live"):
        lines += [f"Checkpoint `{report['checkpoint']}`, {report['tokens']} forced tokens, policy {report['policy']}; "
                  f"fastest (and mean) of {report['trials']} generations after a cold one and {report['warmup']} "
                  f"warm-up; auto's costs: {report.get('auto_costs')}.", "",
                  "| budget | prefetch | cold ms/token | ms/token (best) | mean | vs false | prefetched MB/token | "
                  "used MB/token | auto: share of steps on, per layer | auto: steps full / no lookahead (cold; best) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
        live_runs = report["live"]
        for name, r in live_runs.items():
            off = live_runs[f"{r['budget']}/prefetch=False"]["decode_ms_per_token"]
            on = " ".join(f"{v:.0%}" for v in (r["prefetch_on"] or [])[1:] if v is not None) or "-"
            kinds = "; ".join(f"{k['full']} / {k['no_lookahead']}" for k in (r.get("cold_step_variants"),
                                                                          r.get("step_variants")) if k) or "-"
            lines.append(f"| {r['budget']:.0%} | {r['prefetch']} | {r['cold_ms_per_token']:.2f} | "
                         f"{r['decode_ms_per_token']:.2f} | {r['mean_ms_per_token']:.2f} | "
                         f"{r['decode_ms_per_token'] / off - 1:+.1%} | {r['prefetch_mb_per_token']:.1f} | "
                         f"{r['prefetch_used_mb_per_token']:.1f} | {on} | {kinds} |")
        t = report["targets"]
        lines += ["", f"Target (auto never more than 3% slower than false): worst {t['auto_worst_vs_false']:+.1%} — "
                  f"**{'met' if t['auto_within_3pct'] else 'not met'}**; same tokens in every run: {t['same_tokens']}.",
                  ""]
    else:
        lines += [f"Simulation only; record size, costs and false's ms/token from `{report.get('costs_from_file')}`: "
                  f"{report.get('record_bytes')} bytes per record, {report.get('auto_costs')}, "
                  f"{report.get('false_ms_per_token')}.", ""]
    if report.get("simulated"):
        lines += ["## Simulated (recorded traces, LRU; ms of decode overhead per the simulator's time model)", "",
                  "cold: the whole trace, empty cache, fresh controller. held-out: the second half of the requests, "
                  "measured after the first half warmed up the cache and the controller (all three settings alike).",
                  "", "| trace | records | budget | evaluation | copy µs | predict µs | none | trace (true) | auto | "
                  "auto vs best fixed | auto on |", "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in report["simulated"]:
            on = " ".join(f"{v:.0%}" for v in (r["auto_on"] or [])[1:])
            lines.append(f"| {r['trace']} | {r['scenario']} | {r['budget']:.0%} | {r['evaluation']} | "
                         f"{r['copy_us']:.1f} | {r['predict_us']:.1f} | {r['none_ms']:.1f} | {r['trace_ms']:.1f} | {r['auto_ms']:.1f} | "
                         f"{r['auto_vs_best_fixed']:+.3%} | {on} |")
        worst = {e: max(r["auto_vs_best_fixed"] for r in report["simulated"] if r["evaluation"] == e)
                 for e in ("cold", "held-out")}
        lines += ["", "Target (auto at least as good as the best fixed setting), worst cell: " +
                  ", ".join(f"{e} {w:+.3%} ({'met' if w <= 0 else 'not met'})" for e, w in worst.items()) + ".", ""]
    if report.get("bench_proxy"):
        lines += ["## Random bench model in the simulator (the 3% bound's proxy)", "",
                  "Simulated decode overhead (ms, whole run) of none / true / auto; what auto adds over none per "
                  "decode token, and that against false's live ms/token.", "",
                  "| predictions keep | budget | evaluation | none ms | true ms | auto ms | auto adds ms/token | "
                  "false ms/token (live) | auto vs false | auto on |", "|---:|---:|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in report["bench_proxy"]:
            on = " ".join(f"{v:.0%}" for v in (r["auto_on"] or [])[1:])
            vs = f"{r['auto_vs_false']:+.2%}" if r["auto_vs_false"] is not None else "-"
            base = f"{r['false_ms_per_token']:.2f}" if r["false_ms_per_token"] else "-"
            lines.append(f"| {r['accuracy']:.0%} | {r['budget']:.0%} | {r['evaluation']} | {r['none_ms']:.1f} | "
                         f"{r['trace_ms']:.1f} | "
                         f"{r['auto_ms']:.1f} | {r['auto_added_ms_per_token']:.4f} | {base} | {vs} | {on} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--checkpoint", help="this checkpoint instead of the full-size random bench model")
    ap.add_argument("--policy", default="lru")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="generations after the cold one, before the trials")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--traces", nargs="*", default=[str(p) for p in TRACES], help="recorded traces to replay")
    ap.add_argument("--simulate-only", action="store_true", help="no model, no GPU: the simulated tables only")
    ap.add_argument("--costs-from", help="with --simulate-only: a GPU run's profile_autoprefetch.json (record size, "
                                         "auto's measured costs, false's ms/token)")
    args = ap.parse_args()
    out = output_dir(args.out)
    if args.simulate_only:
        report = dict(gpu="simulation only", policy=args.policy, costs_from_file=args.costs_from, record_bytes=None,
                      auto_costs=None, false_ms_per_token={})
        if args.costs_from:
            gpu_run = json.loads(Path(args.costs_from).read_text())
            report.update(record_bytes=gpu_run["record_bytes"], auto_costs=gpu_run["auto_costs"],
                          source_gpu=gpu_run["gpu"], false_ms_per_token={
                              r["budget"]: r["decode_ms_per_token"] for r in gpu_run["live"].values()
                              if r["prefetch"] is False})
        report["simulated"] = simulated(args, report["record_bytes"], report["auto_costs"])
        if report["record_bytes"]:
            report["bench_proxy"] = bench_proxy(report["record_bytes"], report["auto_costs"],
                                                report["false_ms_per_token"], args.layers)
        text = markdown(report)
        write_report(out, "simulated_autoprefetch", report, text)
        print(text)
        return
    ckpt = Path(args.checkpoint) if args.checkpoint else full_size_checkpoint(args.layers)
    dtype = "bfloat16" if torch.cuda.is_available() else "float32"
    engine = vismmoe.load(ckpt, dtype=dtype, expert_budget=args.budgets[0], prefetch="auto", policy=args.policy)
    report = dict(gpu=device_name(), checkpoint=str(ckpt), policy=args.policy, tokens=args.tokens, trials=args.trials,
                  warmup=args.warmup, record_bytes=engine.info().record_bytes)
    report["auto_costs"] = engine.info().prefetch_auto and {k: v for k, v in engine.info().prefetch_auto.items()
                                                             if k in ("copy_us", "predict_us", "costs_from")}
    with torch.inference_mode():
        report["live"] = live(engine, args)
    worst = max(r["decode_ms_per_token"] / report["live"][f"{r['budget']}/prefetch=False"]["decode_ms_per_token"] - 1
                for r in report["live"].values() if r["prefetch"] == "auto")
    tokens = {json.dumps(r["token_ids"]) for r in report["live"].values()}
    report["targets"] = dict(auto_worst_vs_false=worst, auto_within_3pct=worst <= 0.03, same_tokens=len(tokens) == 1)
    report["simulated"] = simulated(args, report["record_bytes"], report["auto_costs"])
    false_ms = {r["budget"]: r["decode_ms_per_token"] for r in report["live"].values() if r["prefetch"] is False}
    report["bench_proxy"] = bench_proxy(report["record_bytes"], report["auto_costs"], false_ms, args.layers)
    text = markdown(report)
    write_report(out, "profile_autoprefetch", report, text)
    print(text)


if __name__ == "__main__":
    main()
