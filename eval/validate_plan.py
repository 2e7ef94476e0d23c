"""Check the planner's predictions (issue 13) against measurements, on the GPU this runs on.

Two comparisons, kept apart because they answer different questions:

  A. Time model on this GPU. `vismmoe probe` measures this machine; the planner plans for that
     profile at several GPU-memory caps (so the expert budget is 100%, ~50%, ~25% of all experts),
     replaying the model's routing trace; the planned config is loaded and timed. Predicted vs
     measured TTFT and decode ms/token, and predicted vs measured GPU memory by part.
  B. Target profiles (one Jetson, the RTX 4060 Laptop, 3060, 4090) under emulation (`emulate: PROFILE`,
     vismmoe/deploy/emulate.py): the planned config runs with the profile's usable memory as the cap
     (the engine's own accounting, plus the allocator fraction as a backstop: it must load and serve
     without an out-of-budget error or OOM) and every expert copy paced to the profile's link. Compute
     is this GPU's, so the measured times are compared with the planner's prediction for a hybrid: the
     profile's link (miss time) and cache decisions, this machine's probed compute figures
     ("pred (emulated)", ratio = the acceptance check). Then the measured times are corrected to the
     profile: measured - this machine's predicted compute + overhead + the profile's ("corrected"), and
     compared with the profile's own prediction. Engine times (the probe's decode_layer_ms,
     prefill_fixed_ms, ... measured here with the model; time_model.ENGINE_PRIOR for the profile) are this
     machine's in the emulated prediction: the profile's CPU and launch speed are not emulated.

Models: the 12-layer full-size-expert bench model of eval/bench_offload.py (random weights; its routing
trace is recorded here on warm-up requests, then other requests are measured) and the bundled
easyvqa model (its recorded test-split trace). Writes validate_plan.json and validate_plan.md to --out.

    python eval/validate_plan.py --out $OUT                  # GPU (both models; --models bench|bundled for one)
    python eval/validate_plan.py --out $OUT --parts B --models bundled bench --new-tokens 16 --trace-requests 16
                                                             # only the emulated profiles (issue 13's table)
    python eval/validate_plan.py --out /tmp/v --tiny         # CPU smoke run (tiny random bench model, part B)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_PROMPT, REPO, device_name, free_memory, output_dir, random_image, write_report  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.deploy.engine_times import with_engine_times  # noqa: E402
from vismmoe.deploy.model_info import model_info  # noqa: E402
from vismmoe.deploy.planner import WARMUP_REQUESTS, _times, make_plan, memory_cap_for  # noqa: E402
from vismmoe.deploy.probe import probe  # noqa: E402
from vismmoe.deploy.profiles import load_profile, parse_profile  # noqa: E402
from vismmoe.offload.trace import load_trace  # noqa: E402

BUNDLED = REPO / "models" / "easyvqa-qwen3vlmoe"
BUNDLED_TRACE = REPO / "eval" / "results" / "easyvqa_test_traces.npz"
TARGETS = ["jetson-orin-nano-8gb", "rtx4060-laptop-8gb", "rtx3060-12gb", "rtx4090-24gb"]


def requests(kind: str, n: int, seed: int):
    """(image, prompt) pairs: random 256x256 images for the bench model, easy-VQA-like shapes for the
    bundled one (the easy_vqa test images when the package is installed)."""
    from PIL import Image, ImageDraw

    rs = np.random.RandomState(seed)
    if kind == "bench":
        return [(random_image(rs, 256), BENCH_PROMPT) for _ in range(n)]
    try:
        import easy_vqa

        questions, _, image_ids = easy_vqa.get_test_questions()
        paths = easy_vqa.get_test_image_paths()
        picks = rs.choice(len(questions), n, replace=False)
        return [(paths[image_ids[i]], questions[i]) for i in picks]
    except ImportError:
        out = []
        for _ in range(n):
            img = Image.new("RGB", (64, 64), "white")
            color = tuple(int(c) for c in rs.randint(0, 255, 3))
            x, y, r = rs.randint(16, 48), rs.randint(16, 48), rs.randint(8, 15)
            draw = ImageDraw.Draw(img)
            [draw.ellipse, draw.rectangle][rs.randint(2)]((x - r, y - r, x + r, y + r), fill=color)
            out.append((img, ["what shape is in the image?", "what color is the shape?"][rs.randint(2)]))
        return out


def bench_model(args, out, t0) -> Path:
    """The bench model: a tiny random one (--tiny), else the 12-layer full-size one (built once, minutes)."""
    if args.tiny:
        from vismmoe.testing.tiny_models import build_checkpoint

        bench_dir = Path(out) / "tiny-bench"
        if not (bench_dir / "config.json").is_file():
            build_checkpoint("qwen3_vl_moe", bench_dir, init_std=0.2, image_size=256)
        return bench_dir
    from vismmoe.testing.tiny_models import full_size_checkpoint

    bench_dir = full_size_checkpoint(args.layers)
    print(f"bench model ready after {time.perf_counter() - t0:.0f} s: {bench_dir}", flush=True)
    return bench_dir


def record_trace(model_dir, reqs, new_tokens, device, path, then=None) -> Path:
    """Record `reqs` as the model's routing trace at a full budget (pinned store); then `then(engine)` on the
    same engine (the bench model's engine times: one load of its 14.5 GB store instead of two)."""
    engine = vismmoe.load(model_dir, expert_budget=1.0, device=device, dtype=_dtype(device), store="pinned")
    try:
        engine.start_trace(Path(model_dir).name)
        for i, (image, prompt) in enumerate(reqs):
            engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            request_id=f"trace-{i}")
        engine.stop_trace(path)
        if then is not None:
            then(engine)
    finally:
        engine.close()
        del engine
        free_memory()
    return Path(path)


class _GcClock:
    """Time the garbage collector spends during a request (gc.callbacks): one suspect of the spread of
    TTFT between rows of equal configs (a gen-2 collection of a process holding transformers and torch
    objects takes tens of ms)."""

    def __init__(self):
        self.seconds, self.collections, self._start = 0.0, [0, 0, 0], None

    def __call__(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        elif self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.collections[info["generation"]] += 1
            self._start = None

    def reset(self):
        self.seconds, self.collections = 0.0, [0, 0, 0]


def _spread(values) -> dict:
    """Median and spread of per-request values: min, max, (max - min) / median, interquartile range."""
    v = np.asarray(values, dtype=float)
    med = float(np.median(v))
    q1, q3 = np.percentile(v, [25, 75])
    return dict(median=med, min=float(v.min()), max=float(v.max()), n=int(v.size),
                rel_spread=float((v.max() - v.min()) / med) if med else 0.0, iqr=float(q3 - q1))


def read_through(model_dir, chunk: int = 64 * 2**20) -> int:
    """Read the checkpoint's safetensors files once (into the page cache); returns the bytes read. Before an
    mmap row: emulation holds each record read to the profile's disk time, but cannot speed up a read that
    is slower here. Session 7's first mmap rows read cold (bench Jetson row: 5.6 ms per 9.4 MB record here
    against the profile's 3.15 ms, 18 of 41 reads a request slower; the last mmap row, warm: 0.37 ms), which
    put ~60 ms on the TTFT that no device setting explains."""
    done, buf = 0, bytearray(chunk)
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(buf):
                done += n
    return done


def measure(model_dir, engine_config: dict, reqs, new_tokens, device, warmup: int = WARMUP_REQUESTS,
            collect_before: bool = True) -> dict:
    """Load the planned config, `warmup` requests (JIT builds, the decode graph's capture, the allocator's
    first segments, the miss path's first copies), then each of the other `reqs` timed on its own: the
    per-request times, GC pauses inside each, and their median and spread. `collect_before`: a
    gc.collect() before each timed request (outside its time), so that a collection of garbage from
    earlier requests does not land inside one. Whatever happens, the engine is closed and its memory
    freed before the next setting (a failed request's traceback holds the engine: without this a next
    setting ran next to it, under its own emulated cap)."""
    import gc

    config = dict(engine_config, device=device)
    phases = {}
    if config.get("store") == "mmap" and config.get("emulate"):
        t = time.perf_counter()
        phases["page_cache_bytes"] = read_through(model_dir)
        phases["page_cache_s"] = time.perf_counter() - t
    t = time.perf_counter()
    free_memory()
    leftover = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:  # no engine is alive here: the earlier settings' per-stream cuBLAS workspaces go
        clear()
        torch.cuda.empty_cache()
    phases["free_s"] = time.perf_counter() - t
    engine, clock = None, _GcClock()
    gc.callbacks.append(clock)
    try:
        t = time.perf_counter()
        engine = vismmoe.load(model_dir, config=config)
        phases["load_s"] = time.perf_counter() - t
        emulation = engine.info().emulation
        t = time.perf_counter()
        warm = [engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens).stats
                for image, prompt in reqs[:warmup]]
        phases["warmup_s"] = time.perf_counter() - t
        t = time.perf_counter()
        per_request = []
        for image, prompt in reqs[warmup:]:
            if collect_before:
                gc.collect()
            clock.reset()
            s = engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens).stats
            per_request.append(dict(
                ttft_ms=s.ttft_s * 1e3, inputs_ms=s.inputs_s * 1e3,
                decode_ms_per_token=s.decode_s * 1e3 / max(1, s.new_tokens - 1),
                gc_ms=clock.seconds * 1e3, gc_collections=list(clock.collections), prompt_tokens=s.prefill_tokens,
                new_tokens=s.new_tokens, hit_rate=s.hit_rate, prefill_misses=s.prefill_misses,
                decode_misses_per_token=(s.expert_misses - s.prefill_misses) / max(1, s.new_tokens - 1),
                # prefetch copies (the engine's default prefetches in decode steps only): with an mmap store
                # each reads its record on the host as a miss does (reads = misses + these)
                decode_prefetch_per_token=s.prefetch_issued_bytes / engine.store.record_bytes / max(1, s.new_tokens - 1),
                peak_gpu_bytes=s.peak_gpu_bytes or 0, decode_path=s.decode_path,
                host_paced_ms=(s.emulation or {}).get("host_paced_s", 0.0) * 1e3, waves=s.waves,
                accounted_bytes=(s.emulation or {}).get("accounted_bytes"),
                # mmap stores: record reads, this host's time for them, the time added to reach the profile's
                # disk, the reads slower here than there, and how late the held ones returned (deploy/emulate.py
                # pace_read)
                **{k: (s.emulation or {})[k] for k in ("reads", "read_native_s", "read_paced_s", "reads_slower",
                                                       "read_late_s") if k in (s.emulation or {})}))
        phases["requests_s"] = time.perf_counter() - t
        ttft = _spread([r["ttft_ms"] for r in per_request])
        decode = _spread([r["decode_ms_per_token"] for r in per_request])
        last = per_request[-1]
        return dict(ttft_ms=ttft["median"], decode_ms_per_token=decode["median"], ttft_spread=ttft,
                    decode_spread=decode, statistic=f"median of {len(per_request)} requests after {warmup} warm-ups",
                    hit_rate=float(np.median([r["hit_rate"] for r in per_request])),
                    peak_gpu_bytes=int(max(r["peak_gpu_bytes"] for r in per_request)), memory=s.memory,
                    decode_path=last["decode_path"], num_slots=engine.info().num_slots, emulation=emulation,
                    leftover_before_load=leftover,
                    prefill_misses=float(np.median([r["prefill_misses"] for r in per_request])),
                    decode_misses_per_token=float(np.median([r["decode_misses_per_token"] for r in per_request])),
                    decode_prefetch_per_token=float(np.median([r["decode_prefetch_per_token"] for r in per_request])),
                    prompt_tokens=last["prompt_tokens"], accounted_bytes=max((r["accounted_bytes"] or 0) for r in per_request) or None,
                    warmup=[dict(ttft_ms=w.ttft_s * 1e3, decode_ms_per_token=w.decode_s * 1e3 / max(1, w.new_tokens - 1))
                            for w in warm],
                    requests=per_request, phases=phases)
    finally:
        gc.callbacks.remove(clock)
        t = time.perf_counter()
        if engine is not None:
            engine.close()  # (also lifts an emulated allocator cap)
        del engine
        free_memory()
        phases["close_s"] = time.perf_counter() - t


def _dtype(device):
    return "bfloat16" if device.startswith("cuda") else "float32"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--requests", type=int, default=8, help="timed requests per setting (after the warm-ups); "
                    "the rows report their median and spread")
    ap.add_argument("--warmup", type=int, default=WARMUP_REQUESTS, help="warm-up requests per setting before the "
                    "timed ones (the planner's replays leave out as many of the trace's first requests)")
    ap.add_argument("--trace-requests", type=int, default=16, help="bench model: requests recorded as its trace "
                    "(the planner's replay counts from the third, WARMUP_REQUESTS; with 8, most counted requests still warmed a "
                    "large cache: 28 prefill misses predicted per request where the engine settled at 5-14, session 8)")
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25])
    ap.add_argument("--profiles", nargs="+", default=TARGETS)
    ap.add_argument("--b-fractions", type=float, nargs="+", default=[1.0, 0.25],
                    help="part B budgets: 1.0 = the planner's own choice for the profile; below 1, the planner is "
                    "capped to about that share of all experts (so the emulated link is exercised on models the "
                    "profile holds entirely)")
    ap.add_argument("--models", nargs="+", default=["bench", "bundled"], choices=("bench", "bundled"))
    ap.add_argument("--deadline-s", type=float, default=450,
                    help="start no new setting after this many seconds (the rest are listed as skipped); the "
                    "report is rewritten after every setting, so a run cut short keeps what it measured")
    ap.add_argument("--parts", nargs="+", default=["A", "B"], choices=("A", "B"),
                    help="A: the time model on this GPU; B: the target profiles under emulation")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run: a tiny random bench model, part B, "
                    "2 profiles, 4 new tokens, 1 measured request (unless given)")
    args = ap.parse_args()
    if args.tiny:  # small unless asked otherwise
        given = set(sys.argv)
        args.models = args.models if "--models" in given else ["bench"]
        args.parts = args.parts if "--parts" in given else ["B"]
        args.profiles = args.profiles if "--profiles" in given else ["jetson-orin-nano-8gb", "rtx4090-24gb"]
        args.new_tokens = args.new_tokens if "--new-tokens" in given else 4
        args.requests = args.requests if "--requests" in given else 2
        args.warmup = args.warmup if "--warmup" in given else 1
        args.trace_requests = args.trace_requests if "--trace-requests" in given else 2
        args.b_fractions = args.b_fractions if "--b-fractions" in given else [0.5]
    out = output_dir(args.out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    budget = lambda what: print(f"[time budget] {time.perf_counter() - t0:6.1f} s of --deadline-s {args.deadline_s:g} "  # noqa: E731
                                f"(no new setting after it): {what}", flush=True)

    # The probe's compute figures (this machine's) are the same for any model: probe the first one.
    bundled_ok = (BUNDLED / "model.safetensors").is_file() and BUNDLED_TRACE.is_file()
    # (the bundled model whenever it is here, as the quick one; each other model's engine times are probed
    # on it below, after its trace has been recorded)
    first = BUNDLED if bundled_ok and "bundled" in args.models else bench_model(args, out, t0)
    machine = probe(first)
    budget(f"probed this machine and {Path(first).name}'s engine times")
    report = dict(device=device_name(device), torch=torch.__version__,
                  probe=machine, probe_by_model={}, new_tokens=args.new_tokens, requests=args.requests,
                  warmup=args.warmup, rows_a=[], rows_b=[], phases={"probe_s": time.perf_counter() - t0})
    for name in args.models:  # in the order given: `--models bundled bench` measures the quick one first
        if name == "bundled" and not bundled_ok:
            continue
        if name == "bench":
            if time.perf_counter() - t0 > args.deadline_s:
                report["rows_b"].append(dict(model="bench", profile="-", fraction="-",
                                             error=f"skipped: past --deadline-s {args.deadline_s:g}"))
                continue
            t = time.perf_counter()
            model_dir, image_size = bench_model(args, out, t0), 256
            report["phases"]["bench_model_s"] = time.perf_counter() - t
            t = time.perf_counter()
            timed = {}

            def engine_times(engine, model_dir=model_dir):  # on the trace's engine: one load of the store
                t_times = time.perf_counter()
                timed["here"] = machine if Path(model_dir) == Path(first) else \
                    with_engine_times(machine, model_dir, args.new_tokens, engine=engine)
                timed["s"] = time.perf_counter() - t_times

            trace_path = record_trace(model_dir, requests("bench", args.trace_requests, 1), args.new_tokens, device,
                                      out / "bench_trace.npz", then=engine_times)
            here = timed["here"]
            report["phases"]["bench_trace_s"] = time.perf_counter() - t - timed["s"]
            report["phases"]["bench_engine_times_s"] = timed["s"]
            budget(f"recorded the bench trace ({args.trace_requests} requests) and probed its engine times")
        else:
            model_dir, trace_path, image_size = BUNDLED, BUNDLED_TRACE, 64
            # The engine's times are the model's (layers, shapes, processor): probed on each model, not
            # carried from the first one to the next.
            t = time.perf_counter()
            here = machine if Path(model_dir) == Path(first) else with_engine_times(machine, model_dir, args.new_tokens)
            report["phases"][f"{name}_engine_times_s"] = time.perf_counter() - t
        info, trace = model_info(model_dir), load_trace(trace_path)
        report["probe_by_model"][name] = here
        gpu_profile = parse_profile(here, f"probe with {name}'s engine times")
        reqs = requests(name, args.warmup + args.requests, 2)
        context = None
        # A: the time model on this GPU, at several budgets (the cap makes the planner choose them)
        full = make_plan(info, gpu_profile, trace, image_size=image_size, max_new_tokens=args.new_tokens) \
            if "A" in args.parts else None
        for fraction in args.fractions if "A" in args.parts else []:
            cap = memory_cap_for(full, int(fraction * info.num_moe_layers * info.num_experts))
            row = dict(model=name, profile=gpu_profile.name, fraction=fraction)
            if time.perf_counter() - t0 > args.deadline_s:
                row["error"] = f"skipped: past --deadline-s {args.deadline_s:g}"
                report["rows_a"].append(row)
                continue
            try:
                plan = make_plan(info, gpu_profile, trace, max_gpu_memory=cap, context=context, image_size=image_size,
                                 max_new_tokens=args.new_tokens, trace_path=str(trace_path))
                row.update(planned=plan.to_dict()["plan"], engine=plan.engine_config())
                row["measured"] = measure(model_dir, plan.engine_config(), reqs, args.new_tokens, device, args.warmup)
            except Exception as exc:  # noqa: BLE001 - record and go on: one failure must not hide the others
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
            report["rows_a"].append(row)
            _save(out, report, t0)
            print(json.dumps({k: v for k, v in row.items() if k not in ("planned", "traceback")}, default=str), flush=True)
        # B: target profiles under emulation (memory cap and paced expert copies)
        for profile_name, fraction in [(p, f) for p in args.profiles for f in args.b_fractions] if "B" in args.parts else []:
            profile = load_profile(profile_name)
            row = dict(model=name, profile=profile_name, fraction=fraction)
            t_row = time.perf_counter()
            if time.perf_counter() - t0 > args.deadline_s:
                row["error"] = f"skipped: past --deadline-s {args.deadline_s:g}"
                report["rows_b"].append(row)
                continue
            try:
                plan = make_plan(info, profile, trace, image_size=image_size, max_new_tokens=args.new_tokens,
                                 trace_path=str(trace_path))
                total = info.num_moe_layers * info.num_experts
                if fraction < 1.0 and plan.chosen.budget_slots > fraction * total:
                    cap = memory_cap_for(plan, int(fraction * total))
                    plan = make_plan(info, profile, trace, max_gpu_memory=cap, image_size=image_size,
                                     max_new_tokens=args.new_tokens, trace_path=str(trace_path))
                elif fraction < 1.0:
                    continue  # the profile's own plan is already below this share: measured at 1.0
                row.update(planned=plan.to_dict()["plan"], engine=dict(plan.engine_config(), emulate=profile_name))
                row["emulated_prediction"] = emulated_prediction(plan, info, gpu_profile)
                row["plan_s"] = time.perf_counter() - t_row
                row["measured"] = measure(model_dir, row["engine"], reqs, args.new_tokens, device, args.warmup)
            except torch.cuda.OutOfMemoryError as exc:
                row["error"] = f"OUT OF MEMORY under the emulated cap: {exc}"
                row["memory_summary"] = torch.cuda.memory_summary(abbreviated=True)
            except Exception as exc:  # noqa: BLE001
                row["error"] = f"{type(exc).__name__}: {exc}"
                row["traceback"] = traceback.format_exc()
            row["row_s"] = time.perf_counter() - t_row
            report["rows_b"].append(row)
            _save(out, report, t0)
            budget(f"{name} / {profile_name} / {fraction}: {row['row_s']:.1f} s")
            print(json.dumps({k: v for k, v in row.items() if k not in ("planned", "traceback")}, default=str), flush=True)
    _save(out, report, t0)
    print(markdown(report))


def _save(out, report, t0) -> None:
    report["seconds"] = time.perf_counter() - t0
    write_report(out, "validate_plan", report, markdown(report))


def emulated_prediction(plan, info, here) -> dict:
    """The planner's times for what emulation runs: the profile's cache decisions and miss time (its link),
    with this machine's compute figures (`here`, the probe). `correction` turns a measurement under
    emulation into the profile's: add (profile - here) of compute + engine overhead."""
    c, p = plan.chosen, plan.chosen.predicted
    complete = c.budget_slots >= info.num_moe_layers * info.num_experts
    # An mmap read here takes at least this host's floor (the probe's mmap_read_ms): emulation holds a read
    # to the profile's disk time, never shortens it, so the emulated miss is the profile's with that floor.
    read = p.get("read_ms", 0.0)
    floor = here.get("mmap_read_ms", 0.0) if c.store == "mmap" else 0.0
    miss_ms = c.miss_ms + max(0.0, floor - read)
    h = _times(info, here, plan.dtype, c.decode_path, complete, miss_ms, p["decode_misses_per_token"],
               p["prefill_misses"], p.get("decode_prefetch_copies", 0.0), p["prompt_tokens"],
               p.get("prefill_loop_experts", 0.0), max(read, floor),
               prefetch=c.prefetch and not complete)
    return dict(h, decode_correction_ms=(p["decode_compute_ms"] + p["decode_overhead_ms"])
                - (h["decode_compute_ms"] + h["decode_overhead_ms"]),
                ttft_correction_ms=(p["ttft_compute_ms"] + p["ttft_overhead_ms"])
                - (h["ttft_compute_ms"] + h["ttft_overhead_ms"]))


def _range(m, key, digits) -> str:
    s = m.get(key)
    return f"[{s['min']:.{digits}f}-{s['max']:.{digits}f}]" if s else ""


def _gc(m) -> str:
    reqs = m.get("requests") or []
    return f"{max(r['gc_ms'] for r in reqs):.1f}" if reqs else "-"


def _reads(m, p) -> str:
    """mmap rows: record reads per request (median) and the planner's (prefill misses + decode steps x (misses +
    prefetch copies), each read charged its disk time), this host's ms per read, the reads slower here than
    on the profile's disk (all timed requests: each adds what it took beyond the profile's time), and the
    held reads' mean lateness past the profile's time (the pacing's own error)."""
    reqs = [r for r in m.get("requests") or [] if "reads" in r]
    if not reqs:
        return "-"
    n = sum(r["reads"] for r in reqs)
    here = sum(r["read_native_s"] for r in reqs) * 1e3 / n if n else 0.0
    steps = max(1, reqs[-1]["new_tokens"] - 1)
    pred = p["prefill_misses"] + steps * (p["decode_misses_per_token"] + p.get("decode_prefetch_copies", 0.0))
    held = n - sum(r["reads_slower"] for r in reqs)  # (a read slower here than the profile's is not held)
    late = (f", {sum(r['read_late_s'] for r in reqs) * 1e3 / held:.3f} ms late"
            if held and all("read_late_s" in r for r in reqs) else "")  # (not in reports before session 11)
    return (f"{np.median([r['reads'] for r in reqs]):.0f} (pred {pred:.0f}), {here:.2f} ms, "
            f"{sum(r['reads_slower'] for r in reqs)} slower{late}")


def _looped(m, p) -> str:
    """Prefill layers that computed their experts one at a time (RequestStats.waves: layer calls run in
    several waves; decode steps never do), the mean per request, and the planner's (its trace's requests'
    mean). Above ops.MAX_GROUPS slots every layer loops, which the planner counts and `waves` does not
    (its layers fit one wave); no validation row has that many slots with a partial cache."""
    reqs = [r for r in m.get("requests") or [] if "waves" in r]
    if not reqs:
        return "-"
    pred = p.get("prefill_looped_layers")
    return f"{np.mean([r['waves'] for r in reqs]):.1f} ({'-' if pred is None else f'{pred:.1f}'})"


def _ratio(measured, predicted):
    return f"{measured / predicted:.2f}" if predicted else "-"


def markdown(report) -> str:
    lines = [f"Planner validation on {report['device']} (torch {report['torch']}), {report['new_tokens']} new tokens; "
             f"measured = the median of {report['requests']} requests after {report.get('warmup', 1)} warm-ups, "
             "[min-max] the spread; run took {:.0f} s.".format(report.get("seconds", 0)), "",
             "A. Time model on this GPU (probed profile; budget set by a GPU-memory cap). Ratio = measured / predicted "
             "(within 0.75-1.25 is the issue's acceptance band).", "",
             "| model | budget | slots | store | decode path | TTFT pred | TTFT meas | ratio | decode pred ms/tok | decode meas | ratio "
             "| hit rate pred (global) | hit rate meas | GPU bytes pred (no reserve) | peak meas |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows_a"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['fraction']} | error: {r['error'][:300]} |")
            continue
        p, m = r["planned"], r["measured"]
        pr, mem = p["predicted"], p["memory"]
        lines.append(
            f"| {r['model']} | {r['fraction']} | {m['num_slots']} | {r['engine']['store']} | {m['decode_path']} | "
            f"{pr['ttft_ms']:.1f} | {m['ttft_ms']:.1f} | {_ratio(m['ttft_ms'], pr['ttft_ms'])} | "
            f"{pr['decode_ms_per_token']:.2f} | {m['decode_ms_per_token']:.2f} | "
            f"{_ratio(m['decode_ms_per_token'], pr['decode_ms_per_token'])} | "
            f"{p['hit_rates'].get('global_pool', p['hit_rates'].get('global_pool_prior', 1.0)):.3f} | {m['hit_rate']:.3f} | "
            f"{(mem['gpu_total'] - mem['reserved']) / 2**20:.0f} MiB | {m['peak_gpu_bytes'] / 2**20:.0f} MiB |")
    lines += ["", "Memory by part, predicted / measured (MiB): non-expert weights, expert cache, KV cache, activations "
              "(predicted: prefill activations + graph pool + cuBLAS workspaces; measured: peak minus the other parts).", "",
              "| model | budget | non-expert | expert cache | KV | activations |", "|---|---|---|---|---|---|"]
    for r in report["rows_a"]:
        if "error" in r or not r["measured"].get("memory"):
            continue
        p, m = r["planned"]["memory"], r["measured"]["memory"]
        cell = lambda a, b: f"{a / 2**20:.0f} / {b / 2**20:.0f}" if b is not None else f"{a / 2**20:.0f} / n/a"  # noqa: E731
        transient = sum(p.get(k, 0) for k in ("activations", "graph_pool", "cublas_workspace"))
        lines.append(f"| {r['model']} | {r['fraction']} | {cell(p['non_expert_weights'], m['non_expert_weights'])} | "
                     f"{cell(p['expert_cache'], m['expert_cache'])} | {cell(p['kv_cache'], m['kv_cache'])} | "
                     f"{cell(transient, m['activations_peak'])} |")
    lines += ["", "B. Target profiles under emulation (memory cap + link pacing; compute is this machine's). "
              "'pred (emulated)': the planner's prediction with the profile's link and this machine's compute; "
              "ratio = measured / pred (emulated), the acceptance check. 'corrected': measured with this machine's "
              "predicted compute + overhead replaced by the profile's, against the profile's own prediction.", "",
              "| model | profile | budget | slots | slot plan | store | decode path | usable MiB | accounted MiB | peak here MiB "
              "| link ms/expert | TTFT pred (emulated) | TTFT meas | ratio | decode pred (emulated) | decode meas | ratio "
              "| GC ms in timed requests (max) | mmap reads per request (pred), here per read, slower than the profile, late per held read "
              "| layers looped per request (pred) "
              "| TTFT pred (profile) | TTFT corrected | ratio | decode pred (profile) | decode corrected | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows_b"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['profile']} | {r['fraction']} | error: {r['error'][:300]} |")
            continue
        p, m, e = r["planned"]["predicted"], r["measured"], r["emulated_prediction"]
        emu = m.get("emulation") or {}
        link = emu.get("link_ms_per_expert", {}).get("static" if m["decode_path"].startswith("static") else "host")
        ttft_c = m["ttft_ms"] + e["ttft_correction_ms"]
        dec_c = m["decode_ms_per_token"] + e["decode_correction_ms"]
        plan = r["planned"].get("slot_plan")
        lines.append(
            f"| {r['model']} | {r['profile']} | {r['fraction']} | {m['num_slots']} | {'per-layer' if plan else 'global'} | "
            f"{r['engine']['store']} | {m['decode_path']} | {emu.get('usable_bytes', 0) / 2**20:.0f} | "
            f"{(m.get('accounted_bytes') or 0) / 2**20:.0f} | {m['peak_gpu_bytes'] / 2**20:.0f} | {link} | "
            f"{e['ttft_ms']:.1f} | {m['ttft_ms']:.1f} {_range(m, 'ttft_spread', 1)} | {_ratio(m['ttft_ms'], e['ttft_ms'])} | "
            f"{e['decode_ms_per_token']:.2f} | {m['decode_ms_per_token']:.2f} {_range(m, 'decode_spread', 2)} | "
            f"{_ratio(m['decode_ms_per_token'], e['decode_ms_per_token'])} | {_gc(m)} | {_reads(m, p)} | {_looped(m, p)} | "
            f"{p['ttft_ms']:.1f} | {ttft_c:.1f} | {_ratio(ttft_c, p['ttft_ms'])} | "
            f"{p['decode_ms_per_token']:.2f} | {dec_c:.2f} | {_ratio(dec_c, p['decode_ms_per_token'])} |")
    lines += ["", "Where the run's time went (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report.get("phases", {}).items()),
              "", "| model | profile | budget | plan | page cache (mmap) | free | load | warm-up | timed requests | close | row |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows_b"]:
        ph = (r.get("measured") or {}).get("phases", {})
        cell = lambda k: f"{ph[k]:.1f}" if k in ph else "-"  # noqa: E731
        lines.append(f"| {r['model']} | {r['profile']} | {r['fraction']} | {r.get('plan_s', 0):.1f} | {cell('page_cache_s')} | "
                     f"{cell('free_s')} | {cell('load_s')} | {cell('warmup_s')} | {cell('requests_s')} | {cell('close_s')} | "
                     f"{r.get('row_s', 0):.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
