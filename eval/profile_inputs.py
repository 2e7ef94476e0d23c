"""Where a request's input building goes (issue 13's TTFT term), stage by stage, between real requests.

The planner's validation (session 7, quiet host) measured RequestStats.inputs_s bimodal on the H200
machine: 3-5 ms or 19-34 ms, the slow mode in 0 to 7 of a row's 8 requests, for both models, while the
same processor call on a CPU box takes a steady 4.4 ms. This script serves requests from a loaded engine
and, before each, rebuilds that request's inputs stage by stage with the engine's own functions, timing
each: pending GPU work (a synchronize), image loading, the chat template, the processor call (under
cProfile: the slowest and fastest calls' top functions are kept), the device copy, and the pixels' dtype
cast. Then the same loop without requests between (input building alone), and again with one CPU thread.

    python eval/profile_inputs.py --out $OUT --model models/easyvqa-qwen3vlmoe --requests 30
    python eval/profile_inputs.py --out /tmp/pi --model models/easyvqa-qwen3vlmoe --requests 3   # CPU smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_PROMPT, output_dir, random_image  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.inputs import build_inputs, load_image  # noqa: E402

STAGES = ("pending_gpu", "load_image", "chat_template", "processor", "to_device", "dtype_cast")


def staged(engine, image, prompt, profiler: cProfile.Profile | None) -> dict:
    """One request's inputs built as Engine.generate builds them, each stage timed on its own (ms)."""
    cuda = engine.device.type == "cuda"
    t = {}
    t0 = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
    t["pending_gpu"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pil = load_image(image)
    t["load_image"] = time.perf_counter() - t0
    processor = engine.processor
    t0 = time.perf_counter()
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}],
                                         add_generation_prompt=True, tokenize=False)
    t["chat_template"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    inputs = processor(text=[text], images=[pil], return_tensors="pt")
    if profiler is not None:
        profiler.disable()
    t["processor"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inputs = inputs.to(engine.device)
    t["to_device"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
    t["dtype_cast"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    whole = build_inputs(processor, pil, prompt).to(engine.device)  # the engine's own call, for comparison
    t["build_inputs_whole"] = time.perf_counter() - t0
    del whole
    return {k: v * 1e3 for k, v in t.items()}


def top_functions(profiler: cProfile.Profile, n: int = 15) -> str:
    s = io.StringIO()
    pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(n)
    return s.getvalue()


def loop(engine, reqs, with_requests: bool, new_tokens: int) -> dict:
    rows, slowest, fastest = [], None, None
    start = time.perf_counter()
    for image, prompt in reqs:
        gc.collect()
        profiler = cProfile.Profile()
        row = dict(at_s=time.perf_counter() - start, **staged(engine, image, prompt, profiler))
        if slowest is None or row["processor"] > slowest[0]:
            slowest = (row["processor"], top_functions(profiler))
        if fastest is None or row["processor"] < fastest[0]:
            fastest = (row["processor"], top_functions(profiler))
        if with_requests:
            s = engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens).stats
            row.update(request_inputs=s.inputs_s * 1e3, request_ttft=s.ttft_s * 1e3)
        rows.append(row)
        print({k: round(v, 2) for k, v in row.items()}, flush=True)
    keys = [k for k in rows[0] if k != "at_s"]
    summary = {k: dict(median=statistics.median(r[k] for r in rows), max=max(r[k] for r in rows),
                       over_10ms=sum(r[k] > 10 for r in rows)) for k in keys}
    return dict(rows=rows, summary=summary, slowest_processor=slowest[1], fastest_processor=fastest[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", required=True, help="a checkpoint directory (the bundled model, or the bench model)")
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--emulate", default=None, help="a device profile to emulate, as the planner's validation rows do")
    args = ap.parse_args()
    out = output_dir(args.out)
    cuda = torch.cuda.is_available()
    config = dict(device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32", expert_budget=1.0)
    if args.emulate:
        config["emulate"] = args.emulate
    engine = vismmoe.load(args.model, **config)
    rs = np.random.RandomState(0)
    reqs = [(random_image(rs, 256), BENCH_PROMPT) for _ in range(args.requests)]
    for image, prompt in reqs[:2]:  # warm-up: JIT builds, the decode graph's capture
        engine.generate(image=image, prompt=prompt, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    report = dict(model=str(args.model), config=config, torch=torch.__version__, threads=torch.get_num_threads())
    report["between_requests"] = loop(engine, reqs, True, args.new_tokens)
    report["alone"] = loop(engine, reqs, False, args.new_tokens)
    torch.set_num_threads(1)
    report["between_requests_1_thread"] = loop(engine, reqs, True, args.new_tokens)
    engine.close()
    lines = [f"Input building stage by stage ({args.model}, {config}, torch {torch.__version__}, "
             f"{report['threads']} CPU threads): median / max ms, and requests over 10 ms", ""]
    for part in ("between_requests", "alone", "between_requests_1_thread"):
        lines += [f"## {part}", "", "| stage | median | max | over 10 ms |", "|---|---|---|---|"]
        lines += [f"| {k} | {v['median']:.2f} | {v['max']:.2f} | {v['over_10ms']} |" for k, v in report[part]["summary"].items()]
        lines += ["", "slowest processor call:", "```", report[part]["slowest_processor"], "```", ""]
    (out / "profile_inputs.json").write_text(json.dumps(report, indent=1))
    (out / "profile_inputs.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
