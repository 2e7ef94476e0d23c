"""`vismmoe probe`: measure the machine it runs on, in seconds, as a device profile.

Every figure it writes is `source: measured` with how it was measured. On a machine without CUDA the
GPU figures are absent and the profile's kind is `cpu`. Timings use small repeat counts: the probe is
a sanity figure for the planner, not a benchmark (eval/bench_offload.py is).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

GB = 1e9
_DEFAULT_SHAPE = (2048, 768)  # Qwen3-VL-30B-A3B: hidden, moe_intermediate


def probe(model_dir=None, copy_mib: int = 64, repeats: int = 5, engine: bool = True) -> dict:
    """A device-profile mapping (configs/devices schema) of this machine. With `model_dir` (and `engine`),
    also the engine's own times on it (`_engine_times`): the planner's per-layer decode and prefill terms."""
    hidden, inter, model_name = _shape(model_dir)
    figures, notes = {}, {}

    def put(name, value, how):
        if value is not None and value > 0:
            figures[name] = {"value": round(float(value), 4), "source": "measured", "ref": how}

    cuda = torch.cuda.is_available()
    kind, gpu_name, cc = "cpu", "", ""
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu_name, cc = props.name, f"{props.major}.{props.minor}"
        kind = "unified" if getattr(props, "is_integrated", False) else "discrete"
        free, total = torch.cuda.mem_get_info(0)
        put("memory_gb", total / GB, "torch.cuda.mem_get_info total")
        put("reserved_gb", max(0.05, (total - free) / GB), "total - free GPU memory at probe time (torch.cuda.mem_get_info)")
        put("memory_bandwidth_gbs", _d2d_gbs(copy_mib, repeats), f"{copy_mib} MiB device-to-device copies (read + write)")
        put("bf16_tflops", _gemm_tflops(), "4096^3 bf16 torch.matmul")
        if kind == "discrete":
            put("h2d_pinned_gbs", _h2d_gbs(copy_mib, repeats, pinned=True), f"{copy_mib} MiB pinned host->device copies")
            put("h2d_pageable_gbs", _h2d_gbs(copy_mib, repeats, pinned=False), f"{copy_mib} MiB pageable host->device copies")
            n, numel = copy_records_shape(copy_mib)
            gbs, latency_ms = _copy_kernel(n, numel, repeats) or (None, None)
            put("copy_kernel_gbs", gbs, f"vismmoe.ops.copy_records, {n} records of {numel * 2 / 2**20:.0f} MiB from "
                "page-locked host memory (large enough to reach the link's rate, whatever the model's record size)")
            put("copy_latency_ms", latency_ms, "vismmoe.ops.copy_records of one 16 KiB record (its fixed cost per copy)")
        put("expert_decode_ms", _expert_ms(hidden, inter, 1, "cuda"), f"one expert MLP ({hidden}x{inter}, bf16), 1 token")
        put("expert_prefill_ms", _expert_ms(hidden, inter, 512, "cuda"), f"one expert MLP ({hidden}x{inter}, bf16), 512 tokens")
    ram_total, ram_available = _meminfo()
    if kind != "unified":
        put("ram_gb", ram_total / GB, "/proc/meminfo MemTotal (or sysconf)")
    if kind == "cpu":
        put("reserved_gb", max(0.05, (ram_total - ram_available) / GB), "MemTotal - MemAvailable at probe time")
    put("cpu_cores", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cores this process may use (sched_getaffinity)")
    put("host_memcpy_gbs", _memcpy_gbs(copy_mib, repeats), f"{copy_mib} MiB host memory copies (torch)")
    put("cpu_expert_decode_ms", _expert_ms(hidden, inter, 1, "cpu"), f"one expert MLP ({hidden}x{inter}, float32) on the CPU, 1 token")
    put("cpu_tflops", _cpu_tflops(), "1024^3 float32 torch.matmul on the CPU")
    disk, how = _disk_gbs(model_dir)
    put("disk_read_gbs", disk, how)
    if model_dir is not None and engine:
        for name, (value, how) in _engine_times(model_dir, "cuda" if cuda else "cpu", dict(figures)).items():
            put(name, value, how)
    name = "probe-" + (gpu_name or platform.node() or "cpu").lower().replace(" ", "-")
    return {"name": name, "description": f"measured by `vismmoe probe` on {platform.node()} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} (expert shape from {model_name})", "kind": kind,
            "gpu_name": gpu_name, "compute_capability": cc, "figures": figures}


def with_engine_times(machine: dict, model_dir, new_tokens: int = 16, engine=None) -> dict:
    """`machine` (a probe() mapping) with the engine's times measured on `model_dir` in place of any it
    holds: they are the model's (its layers, shapes and processor), not the machine's, so a profile
    probed on one model must not time another (an H200 probe on the 4-layer easy-VQA model predicted the
    12-layer bench model's TTFT overhead at 136 ms where its whole TTFT measured 55-64 ms at a full budget).
    `engine`: an engine already loaded on `model_dir` at a full budget with a pinned store (reconfigured
    in place and left open; eval/validate_plan.py reuses the one that recorded the trace)."""
    figures = {k: v for k, v in machine["figures"].items() if k not in ENGINE_TIME_FIGURES}
    device = "cuda" if machine["kind"] != "cpu" and torch.cuda.is_available() else "cpu"
    for name, (value, how) in _engine_times(model_dir, device, figures, new_tokens, engine).items():
        if value is not None and value > 0:
            figures[name] = {"value": round(float(value), 4), "source": "measured", "ref": how}
    return dict(machine, figures=figures)


ENGINE_TIME_FIGURES = ("decode_layer_ms", "generate_layer_ms", "prefill_fixed_ms", "prefill_layer_ms",
                       "prefill_inputs_ms", "offload_layer_ms", "generate_offload_layer_ms",
                       "generate_prefetch_layer_ms", "loop_expert_ms",
                       "prefill_miss_host_ms")


def _value(figures: dict, *names):
    for name in names:
        if name in figures:
            return figures[name]["value"]
    return None


def _engine_times(model_dir, device: str, figures: dict, new_tokens: int = 16, engine=None) -> dict:
    """{figure: (ms, how)}: the model served with every expert resident (skipped if it does not fit free
    memory), two warm-up requests (JIT builds, the decode graph's capture), then the median of five, each
    after a gc.collect() (a collection inside one request was a suspect of a single-request figure
    3.6x off: generate_layer_ms 13.7 ms on an H200 where the same model's generate rows ran at 3-4 ms
    per layer; every request's time is in the figure's ref): decode_layer_ms =
    (static decode ms/token - the bytes a token reads at the machine's memory bandwidth) / MoE layers;
    prefill_inputs_ms = the host's input building inside TTFT (RequestStats.inputs_s); TTFT minus that and
    its FLOPs (at the machine's tflops x the prior's efficiency) split into prefill_fixed_ms and
    prefill_layer_ms in the prior's proportion (one model has one layer count, so the two cannot be told
    apart on it); generate_layer_ms = transformers' generate ms/token / MoE layers.
    Then at a partial budget (half the experts, at most ops.MAX_GROUPS slots: static decode's limit):
    offload_layer_ms = (static decode's ms/token there, one warm-up and three timed requests - at a full
    budget - the decode misses per token x one record's copy at the machine's link) / MoE layers: the
    cache's own work per layer (the decision kernel, copy launch and lookahead); the generate path's two
    figures from rounds that time its full and partial budgets in turn (_generate_partial_figures).
    Last, loop_expert_ms and prefill_miss_host_ms from two prefill-only settings where every layer computes
    its experts one at a time, timed in turn with the full budget (_prefill_host_figures)."""
    import vismmoe

    from .model_info import model_info

    info = model_info(model_dir)
    dtype = "bfloat16" if device == "cuda" else "float32"
    own = engine is None
    if own:
        need = (info.total_expert_bytes(dtype) + info.non_expert_bytes(dtype)) * 1.2
        if device == "cuda" and need > torch.cuda.mem_get_info(0)[0]:
            return {}
        # A pinned store: the partial-budget static decode copies misses from the page-locked slab.
        engine = vismmoe.load(model_dir, device=device, dtype=dtype, expert_budget=1.0, store="pinned", prefetch=True)
    try:
        return _measure_engine(engine, info, dtype, figures, new_tokens)
    finally:
        if own:
            engine.close()
        else:  # the caller's engine goes back to what it was given as
            engine.reconfigure(expert_budget=1.0, decode="auto", slot_plan="global")


def _measure_engine(engine, info, dtype, figures, new_tokens) -> dict:
    import gc

    import numpy as np
    from PIL import Image

    from ..ops import MAX_GROUPS
    from .model_info import DTYPE_BYTES
    from .planner import ENGINE_PRIOR

    image = Image.fromarray((np.random.RandomState(0).rand(256, 256, 3) * 255).astype("uint8"))
    prompt = "Describe the image."

    inputs_all = []  # every timed request's input building: its figure is their median (it is the host's, any budget)

    def measure(n, warmup=2, tokens=new_tokens):
        for _ in range(warmup):  # JIT builds, the decode graph's capture, the cache's first loads
            engine.generate(image=image, prompt=prompt, max_new_tokens=tokens, min_new_tokens=tokens)
        stats = []
        for _ in range(n):
            gc.collect()
            stats.append(engine.generate(image=image, prompt=prompt, max_new_tokens=tokens, min_new_tokens=tokens).stats)
        inputs_all.extend(s.inputs_s * 1e3 for s in stats)
        steps = [max(1, s.new_tokens - 1) for s in stats]
        each = [s.decode_s / k * 1e3 for s, k in zip(stats, steps)]
        misses = [(s.expert_misses - s.prefill_misses) / k for s, k in zip(stats, steps)]
        return dict(ttft=float(np.median([s.ttft_s for s in stats])) * 1e3, decode=float(np.median(each)),
                    prefill_rest=float(np.median([(s.ttft_s - s.inputs_s) * 1e3 for s in stats])),
                    prefill_misses=float(np.median([s.prefill_misses for s in stats])),
                    touched=float(np.median([sum(s.hits_per_layer) + sum(s.misses_per_layer) for s in stats])),
                    touched_per_layer=np.median([np.add(s.hits_per_layer, s.misses_per_layer) for s in stats], axis=0),
                    path=stats[-1].decode_path, prompt_tokens=stats[-1].prefill_tokens,
                    each=", ".join(f"{v:.2f}" for v in each), inputs=float(np.median([s.inputs_s for s in stats])) * 1e3,
                    misses=float(np.median(misses)))

    L, b, name = info.num_moe_layers, DTYPE_BYTES[dtype], info.name
    bandwidth = _value(figures, "memory_bandwidth_gbs", "host_memcpy_gbs")
    tflops = _value(figures, "bf16_tflops", "cpu_tflops")
    full = measure(5)  # (the TTFT figures come from these: five, as one stalled request moved a median of three)
    out = {}
    decoder = (info.non_expert_numel - info.vision_numel - info.vocab_size * info.hidden_size) * b
    bytes_ms = (decoder + L * info.top_k * info.expert_bytes(dtype)) / (bandwidth * GB) * 1e3 if bandwidth else 0
    if full["path"].startswith("static"):
        out["decode_layer_ms"] = (max(0.001, (full["decode"] - bytes_ms) / L),
                                  f"{name}: {full['path']} decode {full['decode']:.3f} ms/token, every expert resident, minus "
                                  f"{bytes_ms:.3f} ms of bytes, over {L} MoE layers")
    fixed, layer = ENGINE_PRIOR["prefill_fixed_ms"], ENGINE_PRIOR["prefill_layer_ms"]
    share = fixed / (fixed + L * layer)
    flops = 2 * full["prompt_tokens"] * (decoder / b + L * info.top_k * info.record_numel) \
        + 2 * info.vision_numel * full["prompt_tokens"] * info.merge_size ** 2
    compute = flops / (tflops * ENGINE_PRIOR["prefill_efficiency"] * 1e12) * 1e3 if tflops else 0.0
    rest = max(0.001, full["ttft"] - full["inputs"] - compute)
    how = (f"{name}: TTFT {full['ttft']:.1f} ms for {full['prompt_tokens']} prompt tokens minus {full['inputs']:.1f} ms "
           f"of host input building and {compute:.1f} ms of FLOPs, split fixed / per-layer in the prior's proportion "
           f"at {L} layers")
    inputs_figure = lambda: (max(0.001, float(np.median(inputs_all))), f"{name}: host-side input building inside "  # noqa: E731
                             f"TTFT (RequestStats.inputs_s: the processor), median of the probe's {len(inputs_all)} "
                             "timed requests")
    out["prefill_inputs_ms"] = inputs_figure()
    out["prefill_fixed_ms"] = (rest * share, how)
    out["prefill_layer_ms"] = (rest * (1 - share) / L, how)
    engine.reconfigure(decode="generate")
    gen = measure(3)
    out["generate_layer_ms"] = (gen["decode"] / L, f"{name}: transformers' generate {gen['decode']:.2f} ms/token (median "
                                f"of {gen['each']} ms/token) over {L} MoE layers")
    # A partial budget: the cache's own per-layer work on each decode path, the misses' copies taken out.
    total = L * info.num_experts
    slots = max(info.top_k, min(total // 2, MAX_GROUPS))
    out["prefill_inputs_ms"] = inputs_figure()
    if slots >= total or not engine.store.pinned and engine.device.type == "cuda":
        return out
    record = info.expert_bytes(dtype)
    links = dict(static=_value(figures, "copy_kernel_gbs", "h2d_pinned_gbs", "host_memcpy_gbs"),
                 generate=_value(figures, "h2d_pinned_gbs", "host_memcpy_gbs"))
    # Static decode with prefetch on, as its lookahead runs inside the captured step.
    engine.reconfigure(expert_budget=slots * record, decode="auto", prefetch=True)
    part = measure(3, warmup=1)
    if part["path"].startswith("static") and full["path"].startswith("static"):  # else nothing to compare
        copy_ms = record / (links["static"] * GB) * 1e3 if links["static"] else 0.0
        value = (part["decode"] - full["decode"] - part["misses"] * copy_ms) / L
        out["offload_layer_ms"] = (max(0.001, value), f"{name}: {part['path']} decode at {slots} of {total} expert "
                                   f"slots, prefetch on, {part['decode']:.3f} ms/token (median of {part['each']}) minus "
                                   f"{full['decode']:.3f} at a full budget minus {part['misses']:.2f} misses/token x "
                                   f"{copy_ms:.4f} ms per record copy, over {L} MoE layers")
    out.update(_generate_partial_figures(engine, info, measure, slots, record, links["generate"]))
    out.update(_prefill_host_figures(engine, info, measure, record, links["generate"]))
    out["prefill_inputs_ms"] = inputs_figure()  # pooled: on a shared host one row's 8 requests took 31-77 ms (session 6)
    return out


# Rounds of the generate path's partial-budget figures: a full budget, the partial one with prefetch off,
# then on, timed in turn. One probe's generate_offload_layer_ms was 1.95 ms per layer where the two before
# had 0.45-0.50 (session 9): each figure is a difference of ms/token measured seconds apart.
GENERATE_ROUNDS = 3


def _generate_partial_figures(engine, info, measure, slots: int, record: int, link_gbs,
                              rounds: int = GENERATE_ROUNDS) -> dict:
    """generate_offload_layer_ms = (the generate path's ms/token at `slots` with prefetch off - at a full
    budget - its decode misses per token x one record at the link) / MoE layers: the cache's own work per
    layer there (readback, host decisions, copy issue); generate_prefetch_layer_ms = prefetch on against
    off, its extra copies taken out, per layer. The three settings are timed in turn, `rounds` times (one
    timed request each after a warm-up), and each figure is the median of the rounds' own differences."""
    import numpy as np

    L, name, total = info.num_moe_layers, info.name, info.num_moe_layers * info.num_experts
    copy_ms = record / (link_gbs * GB) * 1e3 if link_gbs else 0.0
    settings = (("full", dict(expert_budget=1.0, decode="generate", prefetch=False)),
                ("off", dict(expert_budget=slots * record, prefetch=False)), ("on", dict(prefetch=True)))
    offload, prefetch, seen = [], [], []
    for _ in range(max(1, rounds)):
        got = {}
        for setting, overrides in settings:
            engine.reconfigure(**overrides)
            got[setting] = measure(1, warmup=1)
        full, off, on = got["full"], got["off"], got["on"]
        offload.append((off["decode"] - full["decode"] - off["misses"] * copy_ms) / L)
        prefetch.append((on["decode"] - off["decode"] - (on["misses"] - off["misses"]) * copy_ms) / L)
        seen.append(f"{full['decode']:.2f}/{off['decode']:.2f} ({off['misses']:.2f})/{on['decode']:.2f} ({on['misses']:.2f})")
    how = (f"{len(seen)} rounds of generate decode at a full budget, then {slots} of {total} expert slots with prefetch "
           f"off and on, in turn, ms/token (misses/token): {', '.join(seen)}; record copy {copy_ms:.4f} ms")
    return {"generate_offload_layer_ms": (max(0.001, float(np.median(offload))), f"{name}: prefetch off minus full "
                                          f"minus misses x copy, over {L} MoE layers, median of {', '.join(f'{v:.3f}' for v in offload)}; {how}"),
            "generate_prefetch_layer_ms": (max(0.001, float(np.median(prefetch))), f"{name}: prefetch on minus off "
                                           f"minus the extra misses x copy, over {L} MoE layers, median of "
                                           f"{', '.join(f'{v:.3f}' for v in prefetch)}; {how}")}


# Rounds of the prefill's host figures. Each round times the full budget, A and B one after another, and
# the figures are the medians of the rounds' own differences: on the H200 host the CPU ran at speeds up to
# 1.8x apart for seconds at a time (eval/profile_host_modes.py), and differences of settings timed seconds
# apart came out at 0.001, 0.24 and 0.42 ms per miss in three probes of one model (session 9).
PREFILL_HOST_ROUNDS = 4


def _prefill_host_figures(engine, info, measure, record: int, link_gbs, rounds: int = PREFILL_HOST_ROUNDS) -> dict:
    """loop_expert_ms and prefill_miss_host_ms: the host's work per expert computed one at a time and per
    prefill miss, from two prefill-only (one-token) settings where every layer loops (touches more experts
    than its wave): A, top-k slots per layer, where every expert is a miss; B, one slot fewer than the
    layer's distinct experts (read from a first request of A), where most of them hit. Each setting's time
    beyond the full budget's is the longer of its misses' copies on the link and the host's work
    (time_model); the host's is the longer in both on an H200 (A: 404 misses, 167 ms against 70 of
    copies), so A gives expert + miss time per expert and B, with the same experts and few misses, splits
    the two. The full budget, A and B are timed in turn, `rounds` times (one timed request each after a
    warm-up: the cache starts empty at every reconfigure); each round's differences give its own split and
    the figures are their medians, so a change of the host's speed between settings stays out of them."""
    import numpy as np

    L, k, name = info.num_moe_layers, info.top_k, info.name
    copy_ms = record / (link_gbs * GB) * 1e3 if link_gbs else 0.0
    a_setting = dict(expert_budget=L * k * record, slot_plan="uniform")
    engine.reconfigure(**a_setting, decode="generate", prefetch=False)
    first = measure(1, warmup=1, tokens=1)
    distinct = np.rint(first["touched_per_layer"]).astype(int)
    looped = distinct > k
    if not looped.any():
        return {}
    quotas = np.where(looped, np.maximum(k, distinct - 1), np.maximum(k, distinct))
    settings = (("full", dict(expert_budget=1.0, slot_plan="global"), 1), ("A", a_setting, 1),
                ("B", dict(expert_budget=int(quotas.sum()) * record, slot_plan=quotas.tolist()), 2))
    experts, misses, seen = [], [], []
    for _ in range(max(1, rounds)):
        got = {}
        for setting, overrides, warmup in settings:
            engine.reconfigure(**overrides)
            got[setting] = measure(1, warmup=warmup, tokens=1)
        full, a, b = got["full"]["prefill_rest"], got["A"], got["B"]
        host_a = max(a["prefill_rest"] - full, a["prefill_misses"] * copy_ms)  # (the host's chain, or the link's)
        per_a = host_a / a["touched"]  # (every expert of A is a miss: per expert = expert + miss time)
        host_b = max(0.0, b["prefill_rest"] - full)
        # host_b = touched_b x expert + misses_b x miss, and per_a = expert + miss
        if b["touched"] > b["prefill_misses"]:
            expert = (host_b - b["prefill_misses"] * per_a) / (b["touched"] - b["prefill_misses"])
        else:
            expert = per_a / 2
        expert = min(max(0.001, expert), per_a)
        experts.append(expert)
        misses.append(max(0.001, per_a - expert))
        seen.append(f"{full:.1f}/{a['prefill_rest']:.1f}/{b['prefill_rest']:.1f}")
    how = (f"{len(seen)} rounds of the full budget, A ({k} slots per layer: {a['touched']:.0f} experts, "
           f"{a['prefill_misses']:.0f} misses, {a['prefill_misses'] * copy_ms:.1f} ms of copies) and B (quotas of "
           f"distinct - 1 {quotas.tolist()}: {b['touched']:.0f} experts, {b['prefill_misses']:.0f} misses) in turn, one "
           f"one-token request each, ms of TTFT beyond input building full/A/B: {', '.join(seen)}; per round "
           f"expert {', '.join(f'{v:.3f}' for v in experts)} and miss {', '.join(f'{v:.3f}' for v in misses)} ms, medians")
    return {"loop_expert_ms": (float(np.median(experts)), f"{name}: prefill host work per expert computed one at a time; {how}"),
            "prefill_miss_host_ms": (float(np.median(misses)), f"{name}: prefill host work per miss beside its copy; {how}")}


def _shape(model_dir):
    if model_dir is None:
        return (*_DEFAULT_SHAPE, "Qwen3-VL-30B-A3B (no --model)")
    from .model_info import model_info

    info = model_info(model_dir)
    return info.hidden_size, info.record_numel // (3 * info.hidden_size), info.name


def _timed(fn, repeats: int, cuda: bool) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _h2d_gbs(mib, repeats, pinned):
    src = torch.empty(mib * 2**20, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty_like(src, device="cuda")
    return src.numel() / _timed(lambda: dst.copy_(src, non_blocking=pinned), repeats, True) / GB


def _d2d_gbs(mib, repeats):
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _timed(lambda: dst.copy_(src), repeats, True) / GB


def _gemm_tflops():
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    return 2 * 4096 ** 3 / _timed(lambda: a @ a, 5, True) / 1e12


def _cpu_tflops():
    a = torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / _timed(lambda: a @ a, 3, False) / 1e12


COPY_RECORD_MIB = 8  # a record this size moves at the link's rate (a 100 KB record is latency-bound: an
#                     H200 probe measured 17 GB/s on the bundled model's records, 48 GB/s on 9 MiB ones)


def copy_records_shape(copy_mib: int = 64) -> tuple[int, int]:
    """(records, bf16 elements per record) the probe's copy-kernel test moves: COPY_RECORD_MIB records,
    at least 8 of them and at least `copy_mib` (64 MiB by default) in all. Independent of the model: the
    time model costs a record as bytes / bandwidth + copy_latency_ms, so one probe serves any record size."""
    numel = COPY_RECORD_MIB * 2**20 // 2
    return max(8, -(-copy_mib // COPY_RECORD_MIB)), numel


def _copy_kernel(n: int, numel: int, repeats: int):
    """(GB/s over `n` records of `numel` bf16 elements, ms of one 16 KiB record) for ops.copy_records
    from page-locked host memory; None without the device copy (no triton)."""
    from .. import ops

    src = torch.empty((n, numel), dtype=torch.bfloat16, pin_memory=True)
    if not ops.device_copy_available(src):
        return None
    dst = torch.empty((n, numel), dtype=torch.bfloat16, device="cuda")
    rows = torch.arange(n, device="cuda")
    gbs = src.numel() * 2 / _timed(lambda: ops.copy_records(src, dst, rows, rows), repeats, True) / GB
    small_src = torch.empty((1, 8192), dtype=torch.bfloat16, pin_memory=True)
    small_dst = torch.empty((1, 8192), dtype=torch.bfloat16, device="cuda")
    one = torch.zeros(1, dtype=torch.long, device="cuda")
    latency_ms = _timed(lambda: ops.copy_records(small_src, small_dst, one, one), 20, True) * 1e3
    return gbs, latency_ms


def _memcpy_gbs(mib, repeats):
    src = torch.empty(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _timed(lambda: dst.copy_(src), repeats, False) / GB


def _expert_ms(hidden, inter, tokens, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gate_up = torch.randn(2 * inter, hidden, dtype=dtype, device=device) * 0.02
    down = torch.randn(hidden, inter, dtype=dtype, device=device) * 0.02
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)

    def run():
        g, u = (x @ gate_up.t()).chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u) @ down.t()

    return _timed(run, 10, device == "cuda") * 1e3


def _meminfo() -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def _disk_gbs(model_dir, limit_bytes: int = 256 * 2**20, limit_s: float = 1.0):
    """Read bandwidth of the disk holding the model: its largest file, page cache dropped first
    (POSIX_FADV_DONTNEED), up to `limit_bytes` or `limit_s`. Without a model: a temporary file."""
    import tempfile

    temp = None
    files = sorted(Path(model_dir).glob("*.safetensors"), key=lambda p: -p.stat().st_size) if model_dir else []
    if files:
        path = files[0]
    else:
        fd, temp = tempfile.mkstemp(prefix="vismmoe-probe-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32 * 2**20))
            fh.flush()
            os.fsync(fh.fileno())
        path = Path(temp)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done, start = 0, time.perf_counter()
            while done < limit_bytes and time.perf_counter() - start < limit_s:
                chunk = os.read(fd, 8 * 2**20)
                if not chunk:
                    break
                done += len(chunk)
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        if temp:
            os.unlink(temp)
    how = (f"read {done / 2**20:.0f} MiB of {path.name if not temp else 'a temporary file'} after dropping it "
           "from the page cache (POSIX_FADV_DONTNEED)")
    return (done / seconds / GB if seconds > 0 and done else None), how


def profile_table(profile: dict) -> "object":
    """A rich Table of a profile mapping (probe output or a shipped profile's to_dict())."""
    from rich.table import Table

    table = Table(title=f"{profile['name']} ({profile['kind']})", show_lines=False)
    for col in ("figure", "value", "source", "how / where from"):
        table.add_column(col, overflow="fold")
    table.add_row("gpu", profile.get("gpu_name") or "-", "", f"compute capability {profile.get('compute_capability') or '-'}")
    for name, fig in profile["figures"].items():
        table.add_row(name, f"{fig['value']:g}", fig["source"], fig["ref"])
    return table
