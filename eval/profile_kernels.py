"""Where a static decode step's GPU time goes, kernel by kernel (issue 12: decode <= 1.6 ms/token).

    python3 eval/profile_kernels.py --out OUT [--layers 12] [--checkpoint DIR] [--budget 1.0] [--tokens 16]
        [--compare-prefetch]

The captured step (CUDA graph) hides its kernels from the profiler, so the same step runs eagerly
(`cuda_graphs: false`) under torch.profiler, and each CUDA kernel's GPU time is summed by name: calls and
µs per decode token, and each kernel's share. Beside it, the captured step's ms/token from the same
engine: kernel time summed eagerly vs the captured step tells how much of the step is gaps between
kernels rather than work. Writes profile_kernels.{json,md} into --out. With --compare-prefetch, the same
at --budget with prefetch off and on, and the kernels whose time per token differs between the two
(what prefetching adds to a step, on both streams; eager, so without the overlap of the captured step).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_PROMPT, device_name, output_dir, random_image, write_report  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.testing.tiny_models import full_size_checkpoint  # noqa: E402


def kernel_table(prof, tokens: int) -> list[dict]:
    """Per kernel name: calls and GPU µs per decode token, from the profiler's device-side events."""
    calls, total = defaultdict(int), defaultdict(float)
    for event in prof.events():
        if getattr(event, "device_type", None) != torch.autograd.DeviceType.CUDA:
            continue
        calls[event.name] += 1
        total[event.name] += event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
    rows = [dict(kernel=name, calls_per_token=calls[name] / tokens, us_per_token=total[name] / tokens)
            for name in total]
    rows.sort(key=lambda r: -r["us_per_token"])
    return rows


def profile_decode(engine, image, prompt, tokens: int) -> tuple[list[dict], float]:
    """Kernel table of `tokens` eager decode steps (one warm-up generation first), and their wall ms/token."""
    from torch.profiler import ProfilerActivity, profile

    engine.generate(image=image, prompt=prompt, max_new_tokens=tokens, min_new_tokens=tokens)
    # Prefill is profiled too; a run of 1 new token measures it alone, to subtract.
    runs = {}
    for n in (1, tokens + 1):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            result = engine.generate(image=image, prompt=prompt, max_new_tokens=n, min_new_tokens=n)
            torch.cuda.synchronize()
        runs[n] = (prof, result)
    table_all = {r["kernel"]: r for r in kernel_table(runs[tokens + 1][0], 1)}
    table_prefill = {r["kernel"]: r for r in kernel_table(runs[1][0], 1)}
    rows = []
    for name, r in table_all.items():
        p = table_prefill.get(name, {"calls_per_token": 0, "us_per_token": 0.0})
        rows.append(dict(kernel=name, calls_per_token=(r["calls_per_token"] - p["calls_per_token"]) / tokens,
                         us_per_token=(r["us_per_token"] - p["us_per_token"]) / tokens))
    rows = [r for r in rows if r["calls_per_token"] > 0]
    rows.sort(key=lambda r: -r["us_per_token"])
    s = runs[tokens + 1][1].stats
    return rows, s.decode_s * 1e3 / max(1, s.new_tokens - 1)


def captured_ms_per_token(engine, image, prompt, tokens: int, trials: int = 3) -> float:
    engine.generate(image=image, prompt=prompt, max_new_tokens=tokens, min_new_tokens=tokens)
    results = [engine.generate(image=image, prompt=prompt, max_new_tokens=tokens, min_new_tokens=tokens)
               for _ in range(trials)]
    return min(r.stats.decode_s * 1e3 / (r.stats.new_tokens - 1) for r in results)


def markdown(report: dict) -> str:
    lines = [f"Kernels of one static decode step, eager under torch.profiler ({report['gpu']}, budget "
             f"{report['budget']}, {report['tokens']} tokens). Summed kernel time "
             f"{report['kernel_us_per_token']:.0f} µs/token over {report['kernels_per_token']:.0f} launches; the "
             f"captured step {report['captured_ms_per_token'] * 1e3:.0f} µs/token; eager "
             f"{report['eager_ms_per_token'] * 1e3:.0f} µs/token.", "",
             "| kernel | calls/token | µs/token | share |", "|---|---:|---:|---:|"]
    for r in report["kernels"][:40]:
        lines.append(f"| `{r['kernel'][:90]}` | {r['calls_per_token']:.1f} | {r['us_per_token']:.1f} | "
                     f"{100 * r['us_per_token'] / report['kernel_us_per_token']:.1f}% |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--checkpoint", help="this checkpoint instead of the full-size bench model")
    ap.add_argument("--budget", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--compare-prefetch", action="store_true")
    args = ap.parse_args()
    out = output_dir(args.out)
    if not torch.cuda.is_available():
        sys.exit("profile_kernels needs a CUDA GPU (it profiles CUDA kernels)")
    ckpt = Path(args.checkpoint) if args.checkpoint else full_size_checkpoint(args.layers)
    image, prompt = random_image(np.random.RandomState(0), 256), BENCH_PROMPT
    settings = [False, True] if args.compare_prefetch else [False]
    engine = vismmoe.load(ckpt, dtype="bfloat16", expert_budget=args.budget, prefetch=False, decode="static")
    runs = {}
    with torch.inference_mode():
        for prefetch in settings:
            engine.reconfigure(prefetch=prefetch, cuda_graphs=True)
            captured = captured_ms_per_token(engine, image, prompt, args.tokens)
            engine.reconfigure(cuda_graphs=False)
            rows, eager = profile_decode(engine, image, prompt, args.tokens)
            runs[prefetch] = dict(gpu=device_name(), checkpoint=str(ckpt), budget=args.budget, tokens=args.tokens,
                                  prefetch=prefetch, captured_ms_per_token=captured, eager_ms_per_token=eager,
                                  kernel_us_per_token=sum(r["us_per_token"] for r in rows),
                                  kernels_per_token=sum(r["calls_per_token"] for r in rows), kernels=rows)
    report = runs[False]
    text = markdown(report)
    if args.compare_prefetch:
        report = dict(off=runs[False], on=runs[True], difference=difference(runs[False]["kernels"], runs[True]["kernels"]))
        text = "## prefetch off\n\n" + markdown(runs[False]) + "\n## prefetch on\n\n" + markdown(runs[True]) + \
            "\n## on minus off (µs/token, calls/token)\n\n| kernel | calls | µs |\n|---|---:|---:|\n" + "".join(
                f"| `{r['kernel'][:90]}` | {r['calls_per_token']:+.1f} | {r['us_per_token']:+.1f} |\n"
                for r in report["difference"][:30])
    write_report(out, "profile_kernels", report, text)
    print(text)


def difference(off: list[dict], on: list[dict]) -> list[dict]:
    """Per kernel name, on minus off, largest |µs| first."""
    a, b = {r["kernel"]: r for r in off}, {r["kernel"]: r for r in on}
    zero = {"calls_per_token": 0.0, "us_per_token": 0.0}
    rows = [dict(kernel=k, calls_per_token=b.get(k, zero)["calls_per_token"] - a.get(k, zero)["calls_per_token"],
                 us_per_token=b.get(k, zero)["us_per_token"] - a.get(k, zero)["us_per_token"]) for k in set(a) | set(b)]
    return sorted(rows, key=lambda r: -abs(r["us_per_token"]))


if __name__ == "__main__":
    main()
