"""Where an mmap row's record reads went, and what the time model says of them (offline, CPU, seconds).

For each part-B row of a validate_plan report with an mmap store (per-request `reads`): the reads split into
the prefill's misses, the decode steps' misses and the decode steps' prefetch copies (reads - misses: the
engine prefetches in decode steps only, and each prefetch copy reads its record on the host as a miss does;
tests/test_emulate.py checks that split on CPU), against the counts the run's plan predicted. Then:
  * decode: the run's emulated prediction re-made with the time model of now (time_model.read_ms: a prefetch
    copy pays its disk read in full), with the measured prefetch copies per token standing in for the
    replayed ones (the run's bench trace was not kept, so the planner's replay cannot be redone here);
  * the time this host's reads took beyond the profile's disk (a read slower here cannot be sped up:
    `reads_slower`), per request, and its prefill share (prefill reads / reads, the reads' times being
    alike): the TTFT without it, against the prediction.

    python eval/check_mmap_reads.py [--report PATH] [--out DIR]   (default: session 7's run with one input thread,
    eval/results/validate_plan_emulated/session7_threads, on main)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import REPO, write_report  # noqa: E402
from eval.check_time_model import bench_info  # noqa: E402

from vismmoe.deploy.model_info import model_info  # noqa: E402
from vismmoe.deploy.profiles import load_profile, parse_profile  # noqa: E402
from vismmoe.deploy.time_model import _times, read_ms  # noqa: E402

REPORT = REPO / "eval" / "results" / "validate_plan_emulated" / "session7_threads" / "validate_plan.json"
BUNDLED = REPO / "models" / "easyvqa-qwen3vlmoe"


def rows(report) -> list[dict]:
    out = []
    infos = {}
    for r in report["rows_b"]:
        m = r.get("measured") or {}
        reqs = [q for q in m.get("requests") or [] if "reads" in q]
        if r.get("engine", {}).get("store") != "mmap" or not sum(q["reads"] for q in reqs):
            continue  # (an mmap row with every expert resident reads nothing)
        if r["model"] not in infos:
            infos[r["model"]] = bench_info() if r["model"] == "bench" else model_info(BUNDLED)
        info, plan, p, e = infos[r["model"]], r["planned"], r["planned"]["predicted"], r["emulated_prediction"]
        profile = load_profile(r["profile"])
        disk = read_ms(profile, "mmap", info.expert_bytes("bfloat16"))
        steps = np.array([q["new_tokens"] - 1 for q in reqs], float)
        prefill = np.array([q["prefill_misses"] for q in reqs], float)
        decode = np.array([q["decode_misses_per_token"] for q in reqs]) * steps
        reads = np.array([q["reads"] for q in reqs], float)
        prefetch = reads - prefill - decode
        wall = np.array([(q["read_native_s"] + q["read_paced_s"]) * 1e3 for q in reqs])
        beyond = wall - reads * disk  # what this host's slow reads added to the request
        beyond_prefill = beyond * prefill / np.maximum(reads, 1)
        beyond_decode = (beyond - beyond_prefill) / steps
        here = parse_profile(dict(report["probe_by_model"].get(r["model"], report["probe"])), "the run's probe")
        complete = plan["expert_slots"] >= plan["expert_slots_total"]
        copies = float(np.median(prefetch / steps))
        new = _times(info, here, "bfloat16", plan["decode_path"], complete, p["miss_ms"], p["decode_misses_per_token"],
                     p["prefill_misses"], copies if r["engine"].get("prefetch") else 0.0, p["prompt_tokens"],
                     p.get("prefill_loop_experts", 0.0), disk,
                     # (a probe before session 8 measured generate's partial budget with prefetch on: in its figure)
                     prefetch=bool(r["engine"].get("prefetch")) and here.has("generate_prefetch_layer_ms") and not complete)
        ttft, dec = np.array([q["ttft_ms"] for q in reqs]), np.array([q["decode_ms_per_token"] for q in reqs])
        out.append(dict(
            model=r["model"], profile=r["profile"], budget=r["fraction"], prefetch=r["engine"].get("prefetch"),
            disk_ms=disk, reads=float(np.median(reads)), prefill_reads=float(np.median(prefill)),
            decode_miss_reads=float(np.median(decode)), prefetch_reads=float(np.median(prefetch)),
            prefetch_per_token=copies, prefetch_per_token_pred=p.get("decode_prefetch_copies", 0.0),
            prefill_misses_pred=p["prefill_misses"], decode_misses_per_token_pred=p["decode_misses_per_token"],
            ms_per_read_here=float(np.median(wall / reads)), slower_reads=int(sum(q["reads_slower"] for q in reqs)),
            beyond_ms=float(np.median(beyond)), ttft_meas=float(np.median(ttft)), ttft_pred=e["ttft_ms"],
            ttft_without_slow_reads=float(np.median(ttft - beyond_prefill)), decode_meas=float(np.median(dec)),
            decode_pred_old=e["decode_ms_per_token"], decode_pred_new=new["decode_ms_per_token"],
            decode_without_slow_reads=float(np.median(dec - beyond_decode))))
    return out


def markdown(found, source) -> str:
    r2 = lambda a, b: f"{a / b:.2f}" if b else "-"  # noqa: E731
    lines = [f"mmap rows of {source}: record reads per request (median of the timed requests) by what read them, "
             "and the times with the reads accounted for. 'pred' = the run's plan; 'decode pred (new)' = its "
             "emulated prediction with each prefetch copy's disk read charged (measured copies per token); "
             "'without slow reads' = measured minus what this host's reads took beyond the profile's disk "
             "(prefill share for TTFT, the rest per decode token).", "",
             "| model | profile | budget | prefetch | reads | prefill misses (pred) | decode misses | prefetch copies "
             "| per token (pred) | ms per read here | slower | beyond profile ms | TTFT meas | TTFT pred | ratio "
             "| TTFT without slow reads | ratio | decode meas | pred old | ratio | pred new | ratio "
             "| decode without slow reads | ratio (new) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in found:
        lines.append(
            f"| {r['model']} | {r['profile']} | {r['budget']} | {r['prefetch']} | {r['reads']:.0f} | "
            f"{r['prefill_reads']:.0f} ({r['prefill_misses_pred']:.1f}) | {r['decode_miss_reads']:.0f} | "
            f"{r['prefetch_reads']:.0f} | {r['prefetch_per_token']:.2f} ({r['prefetch_per_token_pred']:.3f}) | "
            f"{r['ms_per_read_here']:.2f} (profile {r['disk_ms']:.2f}) | {r['slower_reads']} | {r['beyond_ms']:.0f} | "
            f"{r['ttft_meas']:.1f} | {r['ttft_pred']:.1f} | {r2(r['ttft_meas'], r['ttft_pred'])} | "
            f"{r['ttft_without_slow_reads']:.1f} | {r2(r['ttft_without_slow_reads'], r['ttft_pred'])} | "
            f"{r['decode_meas']:.2f} | {r['decode_pred_old']:.2f} | {r2(r['decode_meas'], r['decode_pred_old'])} | "
            f"{r['decode_pred_new']:.2f} | {r2(r['decode_meas'], r['decode_pred_new'])} | "
            f"{r['decode_without_slow_reads']:.2f} | {r2(r['decode_without_slow_reads'], r['decode_pred_new'])} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--report", default=str(REPORT))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    found = rows(json.loads(Path(args.report).read_text()))
    path = Path(args.report).resolve()
    source = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    text = markdown(found, source)
    print(text)
    if args.out:
        write_report(Path(args.out), "check_mmap_reads", dict(report=str(source), rows=found), text)


if __name__ == "__main__":
    main()
