"""Issue 12's miss-path table: decode ms/token per miss path (copy, zerocopy, cpu, auto) and budget.

The random bench model (eval/bench_offload.py's: Qwen3-VL-30B-A3B expert shapes, bf16, `--layers` MoE
layers) answers one image + prompt with `--new-tokens` forced tokens, after a warm-up request of the same
length with other pixels and text (which also captures the decode graph and gives auto its first
observed miss rates), at each budget and miss path; once on this machine's link and once with the link
emulated at `--link-gbs` (`emulate:` a copy of the H200 profile whose pinned, pageable and copy-kernel
links are that figure: every expert copy and every zero-copy read is paced to it; the CPU path reads
the host store and is not paced; compute stays this GPU's). Prefetch is off unless `--prefetch` (the
bench model's random routers make lookahead mostly wrong; the table isolates the miss paths).

Each row: decode path, ms/token, hit rate, misses served by each path, the layers' paths, and whether
the tokens equal the copy path's (zerocopy reads the same bits; the CPU's float rounding may differ
from the GPU's). `--deadline-s` stops starting new cells after that many seconds (the report says what
ran). Writes miss_path_table.json / .md into --out.

    python3 eval/bench_miss_paths.py --engine --out $OUT           # H200: ~4 minutes with the model built
    python eval/miss_path_table.py --tiny --out /tmp/m             # CPU smoke run (tiny model, float32)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_PROMPT, device_name, free_memory, output_dir, random_image, write_report  # noqa: E402

import vismmoe  # noqa: E402

PATHS = ("copy", "zerocopy", "cpu", "auto")


def throttled_profile(out: Path, gbs: float) -> Path:
    """The H200 profile with every host link at `gbs` GB/s (memory as the H200's: only the link is slowed)."""
    import yaml

    from vismmoe.deploy.profiles import PROFILE_DIR

    data = yaml.safe_load((PROFILE_DIR / "h200-141gb.yaml").read_text())
    data["name"] = f"h200-link-{gbs:g}gbs"
    data["description"] = f"an H200 whose host link is throttled to {gbs:g} GB/s (a laptop's PCIe 4.0 x8)"
    for key in ("h2d_pinned_gbs", "h2d_pageable_gbs", "copy_kernel_gbs"):
        data["figures"][key] = {"value": gbs, "source": "estimate", "ref": "eval/miss_path_table.py --link-gbs"}
    path = out / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cell(engine, request, warmup, new_tokens: int) -> dict:
    for image, prompt in (warmup, request):
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    s = result.stats
    paths = s.miss_paths
    return dict(decode_path=s.decode_path, decode_ms_per_token=s.decode_s * 1e3 / max(s.new_tokens - 1, 1),
                ttft_ms=s.ttft_s * 1e3, hit_rate=s.hit_rate, misses=s.expert_misses,
                decode_misses=s.expert_misses - s.prefill_misses, misses_by_path=s.misses_by_path,
                layer_paths={p: paths.count(p) for p in sorted(set(paths))}, tokens=result.token_ids)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--budgets", nargs="+", default=["min", "0.1", "0.25"])
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--link-gbs", type=float, default=12.0, help="the throttled link (0: native only)")
    ap.add_argument("--prefetch", action="store_true")
    ap.add_argument("--throttled-only", action="store_true", help="only the --link-gbs rows")
    ap.add_argument("--deadline-s", type=float, default=230.0)
    ap.add_argument("--tiny", action="store_true", help="a tiny float32 model on this machine's device (smoke run)")
    args = ap.parse_args(argv)
    out = output_dir(args.out)
    start = time.perf_counter()
    if args.tiny:
        import tempfile

        from vismmoe.testing.tiny_models import build_checkpoint

        ckpt = Path(tempfile.mkdtemp(prefix="vismmoe-miss-")) / "tiny"
        build_checkpoint("qwen3_vl_moe", ckpt, seed=0, init_std=0.2)
        dtype, size = "float32", 64
    else:
        from vismmoe.testing.tiny_models import full_size_checkpoint

        ckpt, dtype, size = full_size_checkpoint(args.layers), "bfloat16", 256
    import numpy as np

    rs = np.random.RandomState(0)
    request = (random_image(rs, size), BENCH_PROMPT)
    warmup = (random_image(rs, size), BENCH_PROMPT.upper())  # same length, other pixels and text
    links = ([] if args.throttled_only else [("native", None)]) + (
        [(f"{args.link_gbs:g} GB/s", throttled_profile(out, args.link_gbs))] if args.link_gbs > 0 else [])
    budgets = [b if b == "min" else float(b) for b in args.budgets]
    report = dict(device=device_name(), torch=torch.__version__, model=str(ckpt), dtype=dtype,
                  new_tokens=args.new_tokens, prefetch=args.prefetch, build_s=time.perf_counter() - start, rows=[],
                  not_run=[])
    print(f"model ready in {report['build_s']:.0f} s", flush=True)
    for link, profile in links:
        engine = None
        for budget in budgets:
            copy_tokens = None
            for path in args.paths:
                cell = dict(link=link, budget=budget, miss_path=path)
                if time.perf_counter() - start > args.deadline_s:
                    report["not_run"].append(cell)
                    continue
                try:
                    if engine is None:
                        engine = vismmoe.load(ckpt, dtype=dtype, expert_budget=budget, miss_path=path,
                                              prefetch=args.prefetch, emulate=None if profile is None else str(profile))
                    else:
                        engine.reconfigure(expert_budget=budget, miss_path=path)
                    cell.update(run_cell(engine, request, warmup, args.new_tokens))
                    cell["auto_choice"] = engine.info().miss_paths if path == "auto" else None
                except Exception as exc:  # noqa: BLE001 - a cell that cannot run says why; the rest go on
                    cell["error"] = f"{type(exc).__name__}: {exc}"
                if path == "copy":
                    copy_tokens = cell.get("tokens")
                cell["same_tokens_as_copy"] = None if copy_tokens is None or "tokens" not in cell else \
                    cell["tokens"] == copy_tokens
                report["rows"].append(cell)
                print({k: v for k, v in cell.items() if k not in ("tokens", "auto_choice")}, flush=True)
                write_report(out, "miss_path_table", report, markdown(report, args), indent=1)
        if engine is not None:
            engine.close()
            del engine
            free_memory()
    report["seconds"] = time.perf_counter() - start
    text = markdown(report, args)
    write_report(out, "miss_path_table", report, text, indent=1)
    print(text)
    return report


def markdown(report: dict, args) -> str:
    lines = [f"# Decode ms/token by miss path ({report['device']}, {report['dtype']}, {report['new_tokens']} tokens, "
             f"prefetch {'on' if report['prefetch'] else 'off'})", "",
             "| link | budget | " + " | ".join(args.paths) + " | best fixed | auto / best | auto's layers |",
             "|---|---|" + "---:|" * len(args.paths) + "---|---:|---|"]
    cells = {(r["link"], r["budget"], r["miss_path"]): r for r in report["rows"]}
    for link in dict.fromkeys(r["link"] for r in report["rows"]):
        for budget in dict.fromkeys(r["budget"] for r in report["rows"] if r["link"] == link):
            row, fixed = [], {}
            for path in args.paths:
                r = cells.get((link, budget, path))
                if r is None or "decode_ms_per_token" not in r:
                    row.append("error" if r is not None else "not run")
                    continue
                ms = r["decode_ms_per_token"]
                flag = "" if r.get("same_tokens_as_copy") in (None, True) else " (tokens differ)"
                row.append(f"{ms:.2f} ({r['decode_path'].split('-')[0]}){flag}")
                if path != "auto":
                    fixed[path] = ms
            best = min(fixed, key=fixed.get) if fixed else None
            auto = cells.get((link, budget, "auto"), {})
            ratio = f"{auto['decode_ms_per_token'] / fixed[best]:.3f}" if best and "decode_ms_per_token" in auto else ""
            layers = ", ".join(f"{k} {v}" for k, v in auto.get("layer_paths", {}).items())
            lines.append(f"| {link} | {budget} | " + " | ".join(row) + f" | {best or ''} | {ratio} | {layers} |")
    if report["not_run"]:
        lines += ["", f"Not run (past --deadline-s): {len(report['not_run'])} cells."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
