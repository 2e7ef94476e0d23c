"""The engine's own times on this machine, measured on a model (`vismmoe probe --model`): the planner's
per-layer decode and prefill terms (time_model), which are the model's (its layers, shapes and
processor) as much as the machine's. Figures that are differences between settings are timed in rounds
of the settings in turn (_in_turn): the H200 host's CPU speed moved up to 1.8x between modes lasting
seconds, so differences of settings timed seconds apart were noise (session 9).
"""

from __future__ import annotations

import torch

from .time_model import ENGINE_FIGURES

GB = 1e9

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


# What a probe with the model writes: the time model's engine figures, the host's input building and the
# mmap read floor (with_engine_times drops a profile's stale ones before measuring).
ENGINE_TIME_FIGURES = (*ENGINE_FIGURES, "prefill_inputs_ms", "mmap_read_ms")


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
    its FLOPs (at the machine's tflops x the prior's efficiency; on CUDA the median of three groups of such
    requests: the five, and three more after each kind of rounds below) split into prefill_fixed_ms and
    prefill_layer_ms in the prior's proportion (one model has one layer count, so the two cannot be told
    apart on it); generate_layer_ms = transformers' generate ms/token / MoE layers.
    Then at a partial budget (half the experts, at most ops.MAX_GROUPS slots: static decode's limit):
    offload_layer_ms = (static decode's ms/token there, one warm-up and three timed requests - at a full
    budget - the decode misses per token x one record's copy at the machine's link) / MoE layers: the
    cache's own work per layer (the decision kernel, copy launch and lookahead); the generate path's two
    figures from rounds that time its full and partial budgets in turn (_generate_partial_figures).
    Last, the prefill's times below a full budget (prefill_offload_layer_ms, prefill_miss_host_ms,
    loop_expert_ms) from prefill-only settings timed in turn with the full budget (_prefill_host_figures);
    _engine_times adds mmap_read_ms (_mmap_read_figure)."""
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
        return {**_measure_engine(engine, info, dtype, figures, new_tokens), **_mmap_read_figure(model_dir, engine)}
    finally:
        if own:
            engine.close()
        else:  # the caller's engine back at a full budget, auto decode, one pool (prefetch as the probe left it)
            engine.reconfigure(expert_budget=1.0, decode="auto", slot_plan="global")


MMAP_READ_SAMPLES = 48


def _mmap_read_figure(model_dir, engine, samples: int = MMAP_READ_SAMPLES) -> dict:
    """mmap_read_ms: this host's time to read one of the model's expert records through an mmap store whose
    file is in the page cache (the engine's load read it), the way a miss reads it (ExpertStore.record:
    positioned reads into the staging buffer, or safetensors' slices and a copy for a transposed layout or a
    record over store.POSITIONED_READ_MAX_BYTES):
    the median over `samples` records spread over the model, timed on a second pass. A read cannot take less than this here,
    whatever the disk (time_model.record_read_ms), and emulation can only hold a read longer."""
    import time
    from pathlib import Path

    import numpy as np

    from ..checkpoint import checkpoint_files
    from ..offload.store import ExpertStore

    store = ExpertStore(engine.layout, checkpoint_files(Path(model_dir)), engine.dtype, mode="mmap", pin=False)
    try:
        L, E = store.num_layers, store.num_experts
        picks = np.random.RandomState(0).choice(L * E, size=min(samples, L * E), replace=False)
        staging = torch.empty(store.record_numel, dtype=store.dtype)
        times = []
        for timed in (False, True):
            for pick in picks:
                start = time.perf_counter()
                store.record(int(pick // E), int(pick % E), staging)
                if timed:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        store.close()
    return {"mmap_read_ms": (max(0.001, float(np.median(times))),
                             f"{Path(model_dir).name}: one {store.record_bytes / 2**10:.0f} KiB expert record read "
                             f"through an mmap store from the page cache (the store's read into a staging buffer), median of "
                             f"{len(times)} records on a second pass")}


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
                    rests=[(s.ttft_s - s.inputs_s) * 1e3 for s in stats],
                    prefill_misses=float(np.median([s.prefill_misses for s in stats])),
                    touched=float(np.median([sum(s.hits_per_layer) + sum(s.misses_per_layer) for s in stats])),
                    touched_per_layer=np.median([np.add(s.hits_per_layer, s.misses_per_layer) for s in stats], axis=0),
                    path=stats[-1].decode_path, prompt_tokens=stats[-1].prefill_tokens,
                    each=", ".join(f"{v:.2f}" for v in each), inputs=float(np.median([s.inputs_s for s in stats])) * 1e3,
                    misses=float(np.median(misses)))

    L, b, name = info.num_moe_layers, DTYPE_BYTES[dtype], info.name
    bandwidth = _value(figures, "memory_bandwidth_gbs", "host_memcpy_gbs")
    tflops = _value(figures, "bf16_tflops", "cpu_tflops")
    # (the five's setting, the engine's as it came at a full budget: restored for their later groups below)
    start = {k: getattr(engine.config, k) for k in ("expert_budget", "decode", "prefetch", "slot_plan")}
    full = measure(5)  # (five, as one stalled request moved a median of three)
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
    # The full budget's TTFT beyond input building: the median of three groups' medians, these five at the
    # probe's start and three more requests of the same kind after each kind of rounds, not of five requests
    # in a row (one probe's five came in a slow mode of the host, 20.9 ms against 10.6-13.6 in five others,
    # and every row's TTFT ratio of that round was 0.64-0.87: session 11). Only requests of the five's kind
    # count: the rounds' one-token generate requests take 4-12% longer (generate's setup and teardown).
    groups = [full["rests"]]

    def full_again():
        if engine.device.type == "cuda":  # (on a CPU the five alone: the probe is kept short there)
            engine.reconfigure(**start)
            groups.append(measure(3)["rests"])

    def prefill_figures():
        medians = [float(np.median(g)) for g in groups]
        rest = max(0.001, float(np.median(medians)) - compute)
        how = (f"{name}: TTFT beyond host input building {float(np.median(medians)):.1f} ms for "
               f"{full['prompt_tokens']} prompt tokens (the median of {len(groups)} group"
               f"{'s' * (len(groups) > 1)} of full-budget requests over the probe: "
               f"{', '.join(f'{m:.1f}' for m in medians)} ms) minus {compute:.1f} ms of FLOPs, split fixed / "
               f"per-layer in the prior's proportion at {L} layers")
        out["prefill_fixed_ms"] = (rest * share, how)
        out["prefill_layer_ms"] = (rest * (1 - share) / L, how)

    inputs_figure = lambda: (max(0.001, float(np.median(inputs_all))), f"{name}: host-side input building inside "  # noqa: E731
                             f"TTFT (RequestStats.inputs_s: the processor), median of the probe's {len(inputs_all)} "
                             "timed requests")
    out["prefill_inputs_ms"] = inputs_figure()
    prefill_figures()
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
    # Static decode with prefetch on, as its lookahead runs inside the captured step. Not in rounds: its
    # difference is a few µs per layer of GPU work (0.011-0.020 ms in session 9's probes), and the static
    # rows' decode was within 12% in every round.
    engine.reconfigure(expert_budget=slots * record, decode="auto", prefetch=True)
    part = measure(3, warmup=1)
    if part["path"].startswith("static") and full["path"].startswith("static"):  # else nothing to compare
        copy_ms = record / (links["static"] * GB) * 1e3 if links["static"] else 0.0
        value = (part["decode"] - full["decode"] - part["misses"] * copy_ms) / L
        out["offload_layer_ms"] = (max(0.001, value), f"{name}: {part['path']} decode at {slots} of {total} expert "
                                   f"slots, prefetch on, {part['decode']:.3f} ms/token (median of {part['each']}) minus "
                                   f"{full['decode']:.3f} at a full budget minus {part['misses']:.2f} misses/token x "
                                   f"{copy_ms:.4f} ms per record copy, over {L} MoE layers")
    # On a CPU the time model charges none of the rounds' figures (time_model.host_rates, _times' CPU
    # branch): one round each keeps the probe short there.
    rounds = {} if engine.device.type == "cuda" else dict(rounds=1)
    out.update(_generate_partial_figures(engine, info, measure, slots, record, links["generate"], **rounds))
    full_again()
    out.update(_prefill_host_figures(engine, info, measure, record, links["generate"], **rounds))
    full_again()
    prefill_figures()
    out["prefill_inputs_ms"] = inputs_figure()  # pooled: on a shared host one row's 8 requests took 31-77 ms (session 6)
    return out


def _in_turn(engine, measure, settings, rounds: int, tokens=None) -> list[dict]:
    """Each of `settings` ((name, reconfigure overrides, warm-ups), in order) timed by one request after its
    warm-ups, the whole sequence `rounds` times: [{name: measure's dict}] per round. A figure that is a
    difference between settings is then taken within each round, where the host's speed held (on the H200
    host it moved up to 1.8x between modes lasting seconds: eval/profile_host_modes.py)."""
    out = []
    for _ in range(max(1, rounds)):
        got = {}
        for name, overrides, warmup in settings:
            engine.reconfigure(**overrides)
            got[name] = measure(1, warmup=warmup, **({} if tokens is None else dict(tokens=tokens)))
        out.append(got)
    return out


# Rounds of the generate path's partial-budget figures: a full budget, the partial one with prefetch off,
# then on, timed in turn. One probe's generate_offload_layer_ms was 1.95 ms per layer where the two before
# had 0.45-0.50 (session 9): each figure is a difference of ms/token measured seconds apart. (Five since
# session 11, as the prefill's rounds went to eight: two slow rounds move a median of three; one probe's
# first round gave 1.32 ms per layer where its other four gave 0.30-0.45.)
GENERATE_ROUNDS = 5


def _generate_partial_figures(engine, info, measure, slots: int, record: int, link_gbs,
                              rounds: int = GENERATE_ROUNDS) -> dict:
    """generate_offload_layer_ms = (the generate path's ms/token at `slots` with prefetch off - at a full
    budget - its decode misses per token x one record at the link) / MoE layers: the cache's own work per
    layer there (readback, host decisions, copy issue); generate_prefetch_layer_ms = prefetch on against
    off, its extra copies taken out, per layer. The three settings are timed in turn (_in_turn), `rounds`
    times, one request each after a warm-up, and each figure is the median of the rounds' own differences."""
    import numpy as np

    L, name, total = info.num_moe_layers, info.name, info.num_moe_layers * info.num_experts
    copy_ms = record / (link_gbs * GB) * 1e3 if link_gbs else 0.0
    settings = (("full", dict(expert_budget=1.0, decode="generate", prefetch=False), 1),
                ("off", dict(expert_budget=slots * record, prefetch=False), 1), ("on", dict(prefetch=True), 1))
    offload, prefetch, seen = [], [], []
    for got in _in_turn(engine, measure, settings, rounds):
        full, off, on = got["full"], got["off"], got["on"]
        offload.append((off["decode"] - full["decode"] - off["misses"] * copy_ms) / L)
        prefetch.append((on["decode"] - off["decode"] - (on["misses"] - off["misses"]) * copy_ms) / L)
        seen.append(f"{full['decode']:.2f}/{off['decode']:.2f} ({off['misses']:.2f})/{on['decode']:.2f} ({on['misses']:.2f})")
    how = (f"{len(seen)} round{'s' * (len(seen) > 1)} of generate decode at a full budget, then {slots} of "
           f"{total} expert slots with prefetch off and on, in turn, ms/token (misses/token): {', '.join(seen)}; "
           f"record copy {copy_ms:.4f} ms")
    return {"generate_offload_layer_ms": (max(0.001, float(np.median(offload))), f"{name}: prefetch off minus full "
                                          f"minus misses x copy, over {L} MoE layers, median of "
                                          f"{', '.join(f'{v:.3f}' for v in offload)}; {how}"),
            "generate_prefetch_layer_ms": (max(0.001, float(np.median(prefetch))), f"{name}: prefetch on minus off "
                                           f"minus the extra misses x copy, over {L} MoE layers, median of "
                                           f"{', '.join(f'{v:.3f}' for v in prefetch)}; {how}")}


# Rounds of the prefill's host figures. Each round times the full budget, C and B one after another, and
# the figures are the medians of the rounds' own differences: on the H200 host the CPU ran at speeds up to
# 1.8x apart for seconds at a time (eval/profile_host_modes.py), and differences of settings timed seconds
# apart came out at 0.001, 0.24 and 0.42 ms per miss in three probes of one model (session 9). Eight rounds
# since session 11: with four, three of one probe's rounds had C 7-13 ms slow against its full budget
# (easy-VQA, whose one-token prefill takes 15-20 ms), and prefill_offload_layer_ms came out at 2.0 ms per layer
# where five other probes gave 0.001-0.65; every 25% row's TTFT was predicted about 8 ms long.
PREFILL_HOST_ROUNDS = 8


def _prefill_host_figures(engine, info, measure, record: int, link_gbs, rounds: int = PREFILL_HOST_ROUNDS) -> dict:
    """The prefill's times below a full budget, from prefill-only (one-token) settings against the full
    budget (whose prefill takes the host path's no-readback branch):

    C, each layer's quota its distinct experts (read from a first full-budget request), timed twice: warm
    (after a warm-up: no misses) and cold (right after the reconfigure emptied the cache: every expert
    misses). Warm minus the full budget, per MoE layer, is prefill_offload_layer_ms: the host path's own
    work per layer (a readback and sync each), which every prefill below a full budget pays once. Cold
    minus warm, per miss, is prefill_miss_host_ms: the host's work per miss loaded one wave per layer (as
    a partial budget's rows load theirs), or the copy where the link is the longer (the 12-layer bench
    model's 9 MiB records on an H200), which is what time_model's longer-of-the-two charges then. (Until
    session 10 it came from top-k slots per layer, where every expert misses in waves of k: each wave's
    own host work counted as miss time, 0.15-0.40 ms per miss where easy-VQA's 25% rows took about 0.1
    beyond their copies, and their TTFT was predicted 15-25% long.)

    B, one slot fewer than distinct in each layer that touches more than top-k experts: those layers loop
    (compute their experts one at a time, in two waves), most of their experts hit after two warm-ups.
    B minus C warm, less B's misses at C's rate, per looped expert, is loop_expert_ms (the waves' host
    work included, as in the rows' looped layers).

    A model whose prefill touches more experts than the grouped kernel's groups (ops.MAX_GROUPS, e.g. a
    48-layer model with 128 experts a layer) loops every layer of C too, as its rows below a full budget
    loop every layer: there C warm minus the full budget, per distinct expert, is loop_expert_ms (the
    per-layer work folded in, as those rows are charged by looped experts alone), and B is not timed.

    The settings are timed in turn (_in_turn), `rounds` times, one request each (the full budget and C
    warm after a warm-up, C cold after none, B after two); each round's differences give its own figures
    and the figures are their medians, so a change of the host's speed between settings stays out of
    them. (The description quotes the last round's experts and misses.)"""
    import numpy as np

    from ..ops import MAX_GROUPS

    L, k, name = info.num_moe_layers, info.top_k, info.name
    copy_ms = record / (link_gbs * GB) * 1e3 if link_gbs else 0.0
    full_setting = dict(expert_budget=1.0, slot_plan="global")
    engine.reconfigure(**full_setting, decode="generate", prefetch=False)
    distinct = np.rint(measure(1, warmup=1, tokens=1)["touched_per_layer"]).astype(int)
    if distinct.sum() <= 0:
        return {}
    grouped = distinct.sum() <= MAX_GROUPS  # (else every layer of C loops: host_path.run_layer)
    looped = (distinct > k) if grouped else np.ones(len(distinct), bool)
    quotas = np.where(looped, np.maximum(k, distinct - 1), np.maximum(k, distinct))
    c_setting = dict(expert_budget=int(distinct.sum()) * record, slot_plan=distinct.tolist())
    settings = [("full", full_setting, 1), ("C warm", c_setting, 1), ("C cold", c_setting, 0)]
    if grouped and looped.any():  # (no layer touching more than top-k: nothing loops, no B)
        settings.append(("B", dict(expert_budget=int(quotas.sum()) * record, slot_plan=quotas.tolist()), 2))
    looped_experts = int(distinct[looped].sum())
    layer, experts, misses, seen = [], [], [], []
    for got in _in_turn(engine, measure, settings, rounds, tokens=1):
        full, warm, cold, b = (got["full"]["prefill_rest"], got["C warm"]["prefill_rest"], got["C cold"],
                               got.get("B"))
        misses.append(max(0.001, (cold["prefill_rest"] - warm) / max(1.0, cold["prefill_misses"])))
        if grouped:
            layer.append(max(0.001, (warm - full) / L))
        else:
            experts.append(max(0.001, (warm - full) / looped_experts))
        if b:
            experts.append(max(0.001, (b["prefill_rest"] - warm - b["prefill_misses"] * misses[-1]) / looped_experts))
        seen.append(f"{full:.1f}/{warm:.1f}/{cold['prefill_rest']:.1f}" + (f"/{b['prefill_rest']:.1f}" if b else ""))
    how = (f"{len(seen)} round{'s' * (len(seen) > 1)} of the full budget, C (quotas of distinct {distinct.tolist()}"
           + ("" if grouped else f", {int(distinct.sum())} slots: more than {MAX_GROUPS}, every layer loops")
           + f") warm and cold ({cold['prefill_misses']:.0f} misses, {cold['prefill_misses'] * copy_ms:.1f} ms of "
           f"copies)" + (f" and B (quotas {quotas.tolist()}: {looped_experts} experts looped, "
                         f"{b['prefill_misses']:.0f} misses)" if b else "")
           + f" in turn, one one-token request each, ms of TTFT beyond input building full/C warm/C cold"
           f"{'/B' * bool(b)}: {', '.join(seen)}; per round miss {', '.join(f'{v:.3f}' for v in misses)}"
           + (f", layer {', '.join(f'{v:.3f}' for v in layer)}" if layer else "")
           + (f", expert {', '.join(f'{v:.3f}' for v in experts)}" if experts else "") + " ms, medians")
    out = {"prefill_miss_host_ms": (float(np.median(misses)), f"{name}: prefill time per miss loaded one wave per "
                                    f"layer (its copy where the link is the longer); {how}")}
    if layer:
        out["prefill_offload_layer_ms"] = (float(np.median(layer)), f"{name}: prefill host path per MoE layer below "
                                           f"a full budget (C warm minus the full budget, over {L}); {how}")
    if experts:
        out["loop_expert_ms"] = (float(np.median(experts)),
                                 f"{name}: prefill host work per expert computed one at a time; {how}")
    return out
