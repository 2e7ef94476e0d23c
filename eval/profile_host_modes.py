"""Why two identical engines on one host time a request 50% apart (issue 13's remaining TTFT misses).

In the planner's validation (session 8) rows with the same plan, the same misses request by request and
the same emulated link ran 30-35 ms or 48-57 ms per TTFT, every request of a row in one mode. This script
loads the same configuration several times in a row (one engine alive at a time), alternating torch's
intra-op thread count between the default and one (a suspect: idle OpenMP workers spinning beside the main
thread), and for each request records beside its TTFT what the host did: the main thread's CPU time
(time.thread_time) against the wall clock, the CPU it ran on, its context switches, and the host's steal
time (/proc/stat, a virtual machine's CPU taken by its hypervisor), and the process's anonymous memory in
transparent huge pages (/proc/self/smaps_rollup AnonHugePages; session 9's suspect: a mode that holds for
an engine's life and once ended mid-engine, as khugepaged collapsing pages would).

    python eval/profile_host_modes.py --out $OUT --model models/easyvqa-qwen3vlmoe --instances 8
    python eval/profile_host_modes.py --out /tmp/hm --model models/easyvqa-qwen3vlmoe --instances 2 --requests 2  # CPU smoke run
    python eval/profile_host_modes.py --out $OUT --variants probe row row-plain row-25 --instances 12 --dtype bfloat16

--variants cycles the engines through configurations instead (session 9's question: the validation's
full-budget rows ran 1.17-1.21x the probe's prediction even at the probe's host speed): `probe`, loaded as
the probe loads its engine (engine_times._engine_times); `row`, as validate_plan.py loads a planned
full-budget row (its engine config, emulating --emulate, default the RTX 4090); `row-plain`, the same
without emulation; `row-25`, the row at a 25% budget (the row before each full-budget one). Each engine
then serves two request sets in turn, the probe's (a 256 px random image, "Describe the image.") and the
rows' (a 64 px shape), and each set's TTFT minus input building is recorded apart.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import output_dir, write_report  # noqa: E402

import vismmoe  # noqa: E402


def _steal_ticks() -> int:
    """The host's steal time so far, all CPUs (/proc/stat 'cpu' line, 8th value); 0 where unreadable."""
    try:
        with open("/proc/stat") as f:
            return int(f.readline().split()[8])
    except (OSError, IndexError, ValueError):
        return 0


def _thread_stat() -> tuple[int, int, int]:
    """(CPU the calling thread last ran on, voluntary, involuntary context switches); -1 where unreadable."""
    try:
        cpu = int(Path("/proc/thread-self/stat").read_text().rsplit(")", 1)[1].split()[36])
        status = dict(line.split(":\t", 1) for line in Path("/proc/thread-self/status").read_text().splitlines()
                      if ":\t" in line)
        return cpu, int(status["voluntary_ctxt_switches"]), int(status["nonvoluntary_ctxt_switches"])
    except (OSError, IndexError, ValueError, KeyError):
        return -1, -1, -1


def _anon_huge_kb() -> int:
    """The process's anonymous memory in transparent huge pages, kB; -1 where unreadable."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return -1


def _thp_settings() -> dict:
    """The kernel's transparent huge page settings ('[x]' marks the one in force)."""
    out = {}
    for name in ("enabled", "defrag", "khugepaged/defrag"):
        try:
            out[name] = Path(f"/sys/kernel/mm/transparent_hugepage/{name}").read_text().strip()
        except OSError:
            out[name] = "unreadable"
    return out


def _mb(pair) -> str:
    """AnonHugePages at the first and last request, MB ('-' where unreadable)."""
    return "-".join("-" if x is None else f"{x:.0f}" for x in pair)


def serve(engine, image, prompt, tokens: int) -> dict:
    cpu0, vol0, inv0 = _thread_stat()
    steal0, thread0, wall0 = _steal_ticks(), time.thread_time(), time.perf_counter()
    stats = engine.generate(image=image, prompt=prompt, max_new_tokens=tokens, min_new_tokens=tokens).stats
    wall, thread = time.perf_counter() - wall0, time.thread_time() - thread0
    cpu1, vol1, inv1 = _thread_stat()
    return dict(ttft_ms=stats.ttft_s * 1e3, inputs_ms=stats.inputs_s * 1e3,
                decode_ms_per_token=stats.decode_s / max(1, stats.new_tokens - 1) * 1e3,
                wall_ms=wall * 1e3, main_thread_cpu_ms=thread * 1e3, cpu_before=cpu0, cpu_after=cpu1,
                voluntary_switches=vol1 - vol0, involuntary_switches=inv1 - inv0, steal_ticks=_steal_ticks() - steal0,
                anon_huge_kb=_anon_huge_kb())


def variant_config(name: str, emulate: str | None, dtype: str) -> dict:
    """The engine settings of a --variants name (see the module docstring)."""
    row = dict(dtype=dtype, expert_budget=1.0, store="pinned", policy="lru", prefetch=True, prefetch_depth=1,
               decode="auto", max_new_tokens=16, slot_plan="global", emulate=emulate or "rtx4090-24gb")
    configs = {"probe": dict(dtype=dtype, expert_budget=1.0, store="pinned", prefetch=True), "row": row,
               "row-plain": {k: v for k, v in row.items() if k != "emulate"}, "row-25": dict(row, expert_budget=0.25)}
    if name not in configs:
        raise SystemExit(f"unknown variant {name!r}: choose from {', '.join(configs)}")
    return configs[name]


def _served(engine, sets: dict, warmup: int, requests: int, tokens: int) -> dict:
    """{set name: [serve() dicts]}: each request set's warm-ups, then its timed requests, one set after another."""
    out = {}
    for name, (image, prompt) in sets.items():
        for _ in range(warmup):
            serve(engine, image, prompt, tokens)
        out[name] = [serve(engine, image, prompt, tokens) for _ in range(requests)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="models/easyvqa-qwen3vlmoe")
    ap.add_argument("--instances", type=int, default=8, help="engines loaded one after another")
    ap.add_argument("--requests", type=int, default=8, help="timed requests per engine, after --warmup")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--expert-budget", type=float, default=0.25)
    ap.add_argument("--dtype", default="auto", help="the engine's dtype (the validation's rows run bfloat16 on CUDA)")
    ap.add_argument("--emulate", default=None, help="a device profile to emulate, as the validation's rows do")
    ap.add_argument("--variants", nargs="+", default=None, metavar="NAME",
                    help="cycle the engines through these configurations: probe, row, row-plain, row-25")
    args = ap.parse_args()
    if args.variants:
        for name in args.variants:
            variant_config(name, args.emulate, args.dtype)  # an unknown name stops here, before any load
    out = output_dir(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (64, 64), "white")  # an easy-VQA-like picture: one shape
    ImageDraw.Draw(image).ellipse((16, 16, 44, 44), fill=(200, 40, 40))
    prompt = "What shape is in the image?"
    default_threads = torch.get_num_threads()
    thp = _thp_settings()
    rows = []
    sets = {"rows": (image, prompt)}
    if args.variants:
        pixels = np.random.RandomState(0).rand(256, 256, 3) * 255  # the probe's request (engine_times._measure_engine)
        sets = {"probe": (Image.fromarray(pixels.astype("uint8")), "Describe the image."), **sets}
    for i in range(args.instances):
        variant = args.variants[i % len(args.variants)] if args.variants else None
        threads = default_threads if variant or i % 2 == 0 else 1
        torch.set_num_threads(threads)
        config = variant_config(variant, args.emulate, args.dtype) if variant else \
            dict(dtype=args.dtype, expert_budget=args.expert_budget, emulate=args.emulate)
        engine = vismmoe.load(args.model, device=device, **config)
        try:
            served = _served(engine, sets, args.warmup, args.requests, args.new_tokens)
        finally:
            engine.close()
            torch.set_num_threads(default_threads)
        reqs = served["rows"]
        rest = {name: statistics.median(r["ttft_ms"] - r["inputs_ms"] for r in got) for name, got in served.items()}
        med = lambda k: statistics.median(r[k] for r in reqs)  # noqa: E731
        row = dict(instance=i, variant=variant, config=config, ttft_minus_inputs_ms=rest,
                   intra_op_threads=threads, ttft_ms=med("ttft_ms"), inputs_ms=med("inputs_ms"),
                   decode_ms_per_token=med("decode_ms_per_token"), wall_ms=med("wall_ms"),
                   main_thread_cpu_ms=med("main_thread_cpu_ms"), involuntary_switches=med("involuntary_switches"),
                   steal_ticks=sum(r["steal_ticks"] for r in reqs), cpus=sorted({r["cpu_after"] for r in reqs}),
                   anon_huge_mb=tuple(None if r["anon_huge_kb"] < 0 else r["anon_huge_kb"] / 1024 for r in (reqs[0], reqs[-1])),
                   requests=reqs, requests_by_set=served)
        rows.append(row)
        print(f"instance {i} {variant or ''} threads {threads}: TTFT {row['ttft_ms']:.1f} ms (minus input building: "
              + ", ".join(f"{k} set {v:.1f}" for k, v in rest.items()) + f"), decode {row['decode_ms_per_token']:.2f} "
              f"ms/token, request wall {row['wall_ms']:.1f} ms of which main-thread CPU {row['main_thread_cpu_ms']:.1f}, "
              f"involuntary switches {row['involuntary_switches']}, steal ticks {row['steal_ticks']}, CPUs {row['cpus']}, "
              f"AnonHugePages {_mb(row['anon_huge_mb'])} MB",
              flush=True)
    lines = [f"Host modes: {args.model} ({args.dtype}) at budget {args.expert_budget} (emulate {args.emulate}) on {device}, "
             f"{args.instances} engines one after another, {args.requests} requests each after {args.warmup} "
             f"warm-ups (medians). Transparent huge pages: {thp}.", "",
             "| engine | variant | intra-op threads | TTFT ms | TTFT minus input building, by request set | inputs ms | "
             "decode ms/token | request wall ms | main-thread CPU ms | involuntary switches | steal ticks (all requests) | "
             "CPUs the main thread ran on | AnonHugePages MB (first-last request) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['instance']} | {r['variant'] or '-'} | {r['intra_op_threads']} | {r['ttft_ms']:.1f} | "
              + ", ".join(f"{k} {v:.1f}" for k, v in r["ttft_minus_inputs_ms"].items()) + f" | {r['inputs_ms']:.1f} | "
              f"{r['decode_ms_per_token']:.2f} | {r['wall_ms']:.1f} | {r['main_thread_cpu_ms']:.1f} | "
              f"{r['involuntary_switches']} | {r['steal_ticks']} | {r['cpus']} | "
              f"{_mb(r['anon_huge_mb'])} |" for r in rows]
    if args.variants:  # per variant, the median over its engines of each set's TTFT minus input building
        names = list(rows[0]["ttft_minus_inputs_ms"])
        lines += ["", "By variant (median over its engines, ms):", "",
                  "| variant | engines | " + " | ".join(f"{n} set: TTFT minus input building" for n in names)
                  + " | input building (rows set) |", "|---|---:|" + "---:|" * (len(names) + 1)]
        for variant in dict.fromkeys(args.variants):
            mine = [r for r in rows if r["variant"] == variant]
            if mine:
                lines.append(f"| {variant} | {len(mine)} | " + " | ".join(
                    f"{statistics.median(r['ttft_minus_inputs_ms'][n] for r in mine):.1f}" for n in names)
                    + f" | {statistics.median(r['inputs_ms'] for r in mine):.1f} |")
    write_report(out, "host_modes", dict(device=device, model=args.model, args=vars(args), thp=thp, rows=rows), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
