"""Pruning benchmark (issue 10): TTFT, decode ms/token, end-to-end time and bytes moved at visual_keep
1 / 0.5 / 0.25 for each pruning method, on the Qwen3-VL-30B-A3B-shaped random model of
eval/bench_offload.py (>= 12 layers) with one image of >= 784 visual tokens and a 25% expert budget.

    python eval/bench_pruning.py --out /tmp/out                  # GPU: 12 layers, 896x896 image (784 tokens)
    python eval/bench_pruning.py --out /tmp/out --tiny           # CPU smoke run: tiny model, small image

Each setting is measured after a warm-up request with a different image of the same size (so the
measured request does not replay the warm-up's routing); each of `--repeats` measured runs follows a short
warm-up request, and the run of median TTFT is reported (all TTFTs are in the JSON). Writes bench_pruning.json and .md into --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import device_name, output_dir, random_image, write_report  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.testing.tiny_models import TextShape, build_checkpoint, full_size_checkpoint  # noqa: E402


def checkpoint(layers: int, image_px: int, tiny: bool, root: Path) -> Path:
    if not tiny:  # the bench model of eval/profile_static.py and eval/bench_offload.py, built once for all three
        return full_size_checkpoint(layers, root, image_size=image_px)
    path = root / f"vismmoe-prune-tiny-{layers}-{image_px}"
    if not (path / "config.json").exists():
        build_checkpoint("qwen3_vl_moe", path, shape=TextShape(num_hidden_layers=layers), init_std=0.2,
                         image_size=image_px)
    return path


def measure(engine, image, prompt, warmup, new_tokens, repeats) -> dict:
    """Warm up once, run the measured request `repeats` times; report the run of median TTFT."""
    engine.generate(image=warmup[0], prompt=warmup[1], max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    runs = []
    for _ in range(repeats):
        engine.generate(image=warmup[0], prompt=warmup[1], max_new_tokens=2)  # the cache holds the warm-up's experts
        t0 = time.perf_counter()
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        runs.append((result.stats.ttft_s, time.perf_counter() - t0, result))
    runs.sort(key=lambda r: r[0])
    _, end_to_end, result = runs[len(runs) // 2]
    s = result.stats
    steps = max(s.new_tokens - 1, 1)
    return dict(
        decode_path=s.decode_path, visual_tokens_total=s.visual_tokens_total, visual_tokens_kept=s.visual_tokens_kept,
        prefill_tokens=s.prefill_tokens, pruning_ms=s.pruning_s * 1e3, ttft_ms=s.ttft_s * 1e3,
        decode_ms_per_token=s.decode_s * 1e3 / steps, end_to_end_ms=end_to_end * 1e3, new_tokens=s.new_tokens,
        hit_rate=s.hit_rate, bytes_h2d=s.bytes_h2d, prefill_bytes_h2d=s.prefill_bytes_h2d,
        decode_bytes_h2d=s.bytes_h2d - s.prefill_bytes_h2d, prefill_misses=s.prefill_misses,
        tokens=result.token_ids, ttft_ms_all=[r[0] * 1e3 for r in runs],
    )


def markdown(report: dict) -> str:
    lines = [f"# Pruning benchmark ({report['device']})", "",
             f"Model: Qwen3-VL-MoE, {report['layers']} layers, {report['shape']}; image {report['image_px']} px "
             f"({report['visual_tokens']} visual tokens); expert budget {report['budget']}; "
             f"{report['new_tokens']} new tokens; torch {report['torch']}, transformers {report['transformers']}.", "",
             "| keep | method | kept | pruning ms | TTFT ms | TTFT / keep 1 | decode ms/tok | end-to-end ms | "
             "prefill MiB moved | decode MiB moved | hit rate |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    base = report["rows"][0]["ttft_ms"]
    for r in report["rows"]:
        lines.append(
            f"| {r['keep']} | {r['method']} | {r['visual_tokens_kept']}/{r['visual_tokens_total']} | "
            f"{r['pruning_ms']:.1f} | {r['ttft_ms']:.1f} | {r['ttft_ms'] / base:.2f} | {r['decode_ms_per_token']:.2f} | "
            f"{r['end_to_end_ms']:.1f} | {r['prefill_bytes_h2d'] / 2**20:.1f} | {r['decode_bytes_h2d'] / 2**20:.1f} | "
            f"{r['hit_rate']:.1%} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--image-px", type=int, default=896, help="square image side (896 -> 784 visual tokens)")
    ap.add_argument("--budget", type=float, default=0.25)
    ap.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--methods", nargs="+", default=["affinity", "diversity", "random", "pool", "importance"])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--decode", default="auto", choices=["auto", "static", "generate"])
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per setting (the median TTFT one is reported)")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny random model")
    ap.add_argument("--root", default=tempfile.gettempdir(), help="where the random checkpoint is built (once)")
    args = ap.parse_args(argv)
    out = output_dir(args.out)
    import numpy as np
    import transformers

    ckpt = checkpoint(args.layers, args.image_px, args.tiny, Path(args.root))
    dtype = "float32" if args.tiny else "bfloat16"
    engine = vismmoe.load(ckpt, dtype=dtype, expert_budget=args.budget, decode=args.decode)
    rs = np.random.RandomState(0)
    side = args.image_px

    def image():
        return random_image(rs, side)

    prompt = "what is the color of the small shape on the left of the image?"
    measured, warmup = image(), (image(), prompt.upper())
    rows = []
    for keep in args.keeps:
        for method in (args.methods[:1] if keep == 1.0 else args.methods):
            engine.reconfigure(visual_keep=keep, visual_prune=method)
            row = dict(keep=keep, method=method if keep != 1.0 else "none",
                       **measure(engine, measured, prompt, warmup, args.new_tokens, args.repeats))
            rows.append(row)
            print({k: v for k, v in row.items() if k != "tokens"}, flush=True)
    report = dict(device=device_name(engine.info().device),
                  torch=torch.__version__, transformers=transformers.__version__, layers=args.layers,
                  shape="tiny" if args.tiny else "Qwen3-VL-30B-A3B text MoE shapes", image_px=side,
                  visual_tokens=rows[0]["visual_tokens_total"], budget=args.budget, new_tokens=args.new_tokens,
                  rows=rows)
    if 1.0 in args.keeps:
        base = rows[0]["ttft_ms"]
        report["ttft_ratio_keep_0.25"] = {r["method"]: r["ttft_ms"] / base for r in rows if r["keep"] == 0.25}
    write_report(out, "bench_pruning", report, markdown(report), indent=2)
    print(markdown(report))
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
