"""The planner's GPU memory by part (vismmoe/deploy/memory.py) against what the engine really holds, on a GPU.

For each model (the 12-layer full-size bench model of eval/bench_offload.py, the bundled easy-VQA model)
and each target profile (a Jetson, the RTX 4060 Laptop, 3060, 4090), at the planner's own budget (and,
with --fractions 1.0 0.25, at about a quarter of the experts too): the planner writes its config, the config is loaded under `emulate:
PROFILE` (the allocator capped at the profile's usable memory, as in eval/validate_plan.py), and torch's
allocator is read around each phase:

  before load   memory_allocated() left by earlier settings (their cuBLAS workspaces: one per stream,
                and every engine draws a capture stream), then cleared; after clearing it must be 0 (a
                leak would make the cap fail for reasons that are not the config's)
  load          allocated after load; by part what the engine holds (Engine.held_bytes)
  prefill       a request of 1 new token (no decode step, no capture): its transient peak over what
                it leaves (activations), and what it leaves allocated: the KV cache it reserved, and
                the compute stream's cuBLAS workspace (persistent: torch keeps one per stream)
  decode        a request of --new-tokens (captures the decode step as a CUDA graph on the static
                path): what it adds beyond its KV cache (the graph pool and the capture's workspaces),
                and its peak
  long          a request whose answer runs to the planned context (the static cache grows)
  reserved      memory_reserved() at the end: the allocator's segments (the emulated cap counts these)

Writes measure_memory.json and measure_memory.md (planned vs measured bytes per part) to --out.

    python eval/measure_memory.py --out $OUT --deadline-s 200  # GPU: both models, four profiles (~4 min)
    python eval/measure_memory.py --out /tmp/m --tiny          # CPU smoke run (tiny model, held parts only)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_PROMPT, REPO, device_name, output_dir, random_image, write_report  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.deploy.memory import PARTS  # noqa: E402
from vismmoe.deploy.model_info import model_info  # noqa: E402
from vismmoe.deploy.planner import make_plan, memory_cap_for  # noqa: E402
from vismmoe.deploy.profiles import load_profile  # noqa: E402

BUNDLED = REPO / "models" / "easyvqa-qwen3vlmoe"
BUNDLED_TRACE = REPO / "eval" / "results" / "easyvqa_test_traces.npz"
TARGETS = ["jetson-orin-nano-8gb", "rtx4060-laptop-8gb", "rtx3060-12gb", "rtx4090-24gb"]
MiB = 2**20


def _cuda() -> bool:
    return torch.cuda.is_available()


def _clean() -> int:
    """Free what earlier settings left (no engine is alive here): garbage, cached blocks, and the cuBLAS
    workspaces torch keeps per stream (each graph capture draws new streams; the emulated cap counts the
    whole process). Returns the bytes that were still allocated before the workspaces were cleared."""
    gc.collect()
    if not _cuda():
        return 0
    left = torch.cuda.memory_allocated()
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    return left


def _alloc() -> int:
    return torch.cuda.memory_allocated() if _cuda() else 0


def _peak() -> int:
    return torch.cuda.max_memory_allocated() if _cuda() else 0


def measure(model_dir, config: dict, image, prompt, new_tokens: int, context: int) -> dict:
    """Load `config` under its emulated profile and read the allocator around each phase; the long request's
    answer runs to `context` tokens with the prompt (the plan's envelope)."""
    out = dict(left_by_earlier_settings=_clean())  # cuBLAS workspaces of earlier streams, if any
    out["leftover_before_load"] = _alloc()
    engine = None
    try:
        engine = vismmoe.load(model_dir, config=config)
        out["load_allocated"] = _alloc() - out["leftover_before_load"]
        out["held"] = engine.held_bytes()
        before = _alloc()
        s = engine.generate(image=image, prompt=prompt, max_new_tokens=1).stats
        out["prompt_tokens"] = s.prefill_tokens
        out["prefill_peak_over_start"] = (s.peak_gpu_bytes or 0) - before if _cuda() else None
        after_prefill = _alloc()
        kv_prefill = engine.decoders.kv_bytes()
        out["prefill_left"] = after_prefill - before
        out["prefill_transient"] = (s.peak_gpu_bytes or 0) - after_prefill if _cuda() else None
        s = engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens).stats
        out["decode_path"] = s.decode_path
        kv_decode = engine.decoders.kv_bytes()
        out["decode_left_beyond_kv"] = _alloc() - after_prefill - (kv_decode - kv_prefill)
        out["decode_peak"] = s.peak_gpu_bytes
        long_tokens = context - out["prompt_tokens"]
        if long_tokens > new_tokens:
            s = engine.generate(image=image, prompt=prompt, max_new_tokens=long_tokens, min_new_tokens=long_tokens).stats
            out["long_new_tokens"] = s.new_tokens
            out["long_peak"] = s.peak_gpu_bytes
        out["kv_cache"] = engine.decoders.kv_bytes()
        out["stats_memory"] = s.memory
        out["emulation_parts"] = s.emulation.get("parts") if s.emulation else None
        out["final_allocated"] = _alloc() - out["leftover_before_load"]
        out["final_reserved"] = torch.cuda.memory_reserved() if _cuda() else None
        out["max_reserved"] = torch.cuda.max_memory_reserved() if _cuda() else None
        out["num_slots"] = engine.num_slots
    except torch.cuda.OutOfMemoryError as exc:
        out["error"] = f"OUT OF MEMORY under the emulated cap: {exc}"
        out["memory_summary"] = torch.cuda.memory_summary(abbreviated=True)
    except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not hide the others
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    finally:
        if engine is not None:
            engine.close()
        del engine
        _clean()
        out["leftover_after_close"] = _alloc()
    return out


def measured_parts(m: dict) -> dict:
    """The measurement in the planner's part names (None where this run cannot tell)."""
    if "held" not in m:
        return {}
    held = m["held"]
    parts = dict(held, kv_cache=m.get("kv_cache"), activations=m.get("prefill_transient"))
    if _cuda() and "prefill_left" in m:
        # what the prefill left beyond its KV cache: the compute stream's cuBLAS workspace (and small
        # buffers); what the first decode left beyond its KV cache: graph pool + capture workspaces
        parts["cublas_workspace+small (prefill)"] = m["prefill_left"] - (m.get("kv_cache") or 0)
        parts["graph_pool+capture workspaces (decode)"] = m.get("decode_left_beyond_kv")
        parts["allocator slack (reserved - allocated)"] = (m["final_reserved"] or 0) - (m["final_allocated"] or 0)
    return parts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--models", nargs="+", default=["bundled", "bench"], choices=("bench", "bundled"))
    ap.add_argument("--profiles", nargs="+", default=TARGETS)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0],
                    help="1.0: the planner's own budget; below: the planner capped to about that share of the experts")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--deadline-s", type=float, default=200)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny random model, one profile")
    args = ap.parse_args()
    out = output_dir(args.out)
    t0 = time.perf_counter()
    device = "cuda" if _cuda() else "cpu"
    rows = []
    report = dict(device=device_name(device), torch=torch.__version__, rows=rows)
    models = ["tiny"] if args.tiny else args.models
    for name in models:
        if name == "tiny":
            from vismmoe.testing.tiny_models import build_checkpoint

            model_dir, trace, image_size = Path(out) / "tiny", None, 64
            if not (model_dir / "config.json").is_file():
                build_checkpoint("qwen3_vl_moe", model_dir, image_size=64)
        elif name == "bundled":
            from vismmoe.offload.trace import load_trace

            model_dir, trace, image_size = BUNDLED, load_trace(BUNDLED_TRACE), 64
        else:
            from vismmoe.testing.tiny_models import full_size_checkpoint

            model_dir, trace, image_size = full_size_checkpoint(args.layers), None, 256  # prior routing: memory only
        info = model_info(model_dir)
        rs = np.random.RandomState(0)
        image = random_image(rs, image_size)
        prompt = BENCH_PROMPT
        for profile_name in (args.profiles[:1] if args.tiny else args.profiles):
            for fraction in args.fractions:
                row = dict(model=name, profile=profile_name, fraction=fraction)
                rows.append(row)
                if time.perf_counter() - t0 > args.deadline_s:
                    row["error"] = f"skipped: past --deadline-s {args.deadline_s:g}"
                    continue
                profile = load_profile(profile_name)
                plan = make_plan(info, profile, trace, image_size=image_size, max_new_tokens=args.new_tokens)
                total = info.num_moe_layers * info.num_experts
                if fraction < 1.0:
                    if plan.chosen.budget_slots <= fraction * total:
                        row["error"] = "skipped: the profile's own plan is already below this share"
                        continue
                    cap = memory_cap_for(plan, int(fraction * total))
                    plan = make_plan(info, profile, trace, max_gpu_memory=cap, image_size=image_size,
                                     max_new_tokens=args.new_tokens)
                config = dict(plan.engine_config(), device=device, emulate=profile_name)
                row.update(planned=plan.chosen.memory, usable=plan.usable_gpu_bytes, decode_path_planned=plan.chosen.decode_path,
                           slots=plan.chosen.budget_slots, store=plan.chosen.store, context=plan.context_tokens)
                row["measured"] = measure(model_dir, config, image, prompt, args.new_tokens, plan.context_tokens)
                row["measured_parts"] = measured_parts(row["measured"])
                report["seconds"] = time.perf_counter() - t0
                write_report(out, "measure_memory", report, markdown(report))
                print(name, profile_name, fraction, row["measured"].get("error", "ok"), flush=True)
    report["seconds"] = time.perf_counter() - t0
    write_report(out, "measure_memory", report, markdown(report))
    print(markdown(report))


def _mib(v) -> str:
    return "-" if v is None else f"{v / MiB:.1f}"


def markdown(report) -> str:
    lines = [f"GPU memory by part, planned vs measured, on {report['device']} (torch {report['torch']}), each config "
             "under `emulate: PROFILE`. MiB.", "",
             "| model | profile | budget | slots | store | path | usable | planned total (no reserve) | measured max reserved "
             "| left by earlier settings / after clearing | error |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        m = r.get("measured", {})
        if "planned" not in r:
            lines.append(f"| {r['model']} | {r['profile']} | {r['fraction']} | | | | | | | | {r.get('error', '')[:100]} |")
            continue
        p = r["planned"]
        lines.append(f"| {r['model']} | {r['profile']} | {r['fraction']} | {r['slots']} | {r['store']} | "
                     f"{m.get('decode_path', r['decode_path_planned'])} | {_mib(r['usable'] - p['reserved'])} | "
                     f"{_mib(p['gpu_total'] - p['reserved'])} | {_mib(m.get('max_reserved'))} | "
                     f"{_mib(m.get('left_by_earlier_settings'))} / {_mib(m.get('leftover_before_load'))} | "
                     f"{m.get('error', '')[:160]} |")
    lines += ["", "By part (planned / measured). Measured: held parts from Engine.held_bytes; KV from the decoders "
              "held; activations = the 1-token request's peak over what it left; 'cublas+small' = what that request "
              "left beyond its KV; 'graph+capture' = what the first decoding request left beyond its KV (graph pool and "
              "the capture's cuBLAS workspaces); slack = reserved - allocated at the end (planned: the margin).", ""]
    names = [n for n in PARTS]
    lines.append("| model | profile | budget | " + " | ".join(names) + " | cublas+small | graph+capture | slack |")
    lines.append("|---|---|---|" + "---|" * (len(names) + 3))
    for r in report["rows"]:
        if "planned" not in r:
            continue
        p, mp = r["planned"], r.get("measured_parts", {})
        cells = [f"{_mib(p.get(n))} / {_mib(mp.get(n))}" for n in names]
        lines.append(f"| {r['model']} | {r['profile']} | {r['fraction']} | " + " | ".join(cells) + " | "
                     f"{_mib(mp.get('cublas_workspace+small (prefill)'))} | "
                     f"{_mib(mp.get('graph_pool+capture workspaces (decode)'))} | "
                     f"{_mib(mp.get('allocator slack (reserved - allocated)'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
