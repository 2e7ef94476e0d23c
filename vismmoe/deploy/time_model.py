"""The planner's time model: predicted TTFT and decode ms/token of a configuration, with their breakdown.

Per decode token: the bytes a token reads at the memory bandwidth + the engine's time per MoE layer
(static decode: one captured step; transformers' generate: host-decided layers) + time per layer when
the cache is partial (offload_layer_ms, generate_offload_layer_ms: the probe measures both at a partial
budget; on the generate path, generate_prefetch_layer_ms more where the plan prefetches) + misses x time
per miss on the link + whatever prefetch copies do not hide under the step (with an mmap store, each
prefetch copy's disk read in full: see read_ms). On
the static path a miss costs its copy and nothing else: the decision kernel and the pacing run in every
layer of a captured step whether the layer misses or not (they are the per-layer term), and a layer's
records move in the decode kernel that installs them (the copy kernel's one launch before session 6;
session 5's profile_static on an
H200, bench model: 1.433 ms/token at a full budget, 1.506 at 50% with no misses, 1.755 at 25% with 1.16
misses x 0.197 ms per 9.4 MB record: 1.433 + 0.073 + 0.228 = 1.734, 1% short). TTFT: a fixed part (processor, vision launch, first
sample; with a probed profile the host's input building is its own term, prefill_inputs_ms) + time per
layer (below a full budget, prefill_offload_layer_ms more: the host path's readback and sync per layer) +
FLOPs at ENGINE_PRIOR["prefill_efficiency"] of the dense bf16 peak + the longer of two chains that
overlap: the prefill's misses x time per miss on the link, and the host's work beside them (per miss,
prefill_miss_host_ms; per expert a prefill layer computes one at a time when it touches more experts than
its wave, its quota or all slots, loop_expert_ms). The engine's times are profile figures
(ENGINE_FIGURES: `vismmoe probe --model` measures them on the spot) or the prior ENGINE_PRIOR.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .model_info import DTYPE_BYTES, ModelInfo
from .profiles import DeviceProfile

GB = 1e9

# The engine's own times, per profile figure (profiles.FIGURES; `vismmoe probe --model` measures the
# ENGINE_FIGURES), and the prior used where a profile has no such figure. Fitted on an H200 host (torch
# 2.11, transformers 5.17) to eval/results/profile_static_h200_final.json and the planner-validation
# rows of eval/results/validate_plan_emulated/ (eval/check_time_model.py recomputes those predictions):
ENGINE_PRIOR = dict(
    decode_layer_ms=0.14,  # static decode, every expert resident, per MoE layer beyond reading the bytes:
    #                        easy-VQA 4 layers 0.57 ms/token; bench 12 layers 1.80-2.44 ms with 0.39 ms of bytes
    generate_layer_ms=2.4,  # transformers' generate, per layer (bench_offload c-generate: 28.89 ms / 12)
    prefill_fixed_ms=46.0,  # processor, vision, first sample: easy-VQA TTFT 58 ms at 4 layers, bench 82.7 at 12
    prefill_layer_ms=3.0,  # ... the host-decided prefill per MoE layer (one readback and sync each)
    offload_layer_ms=0.033,  # static decode below a full budget, per layer: profile_static 0.5 vs 1.0 (2.20 - 1.80) / 12
    generate_offload_layer_ms=0.7,  # generate below a full budget, per layer: c-generate 0.25 vs 1.0, easy-VQA 0.25 rows
    # generate with prefetch on, per layer beyond it off (the lookahead's readback, the prefetch decisions and
    # copy issue on the host). Until session 8 the probe measured generate's partial budget with prefetch on
    # and charged it to every generate row, prefetch or not (bench: 42.8 ms/token probed with prefetch, rows
    # without it 25-30). Measured apart since, on an H200 host: 0.30 and 0.22 (bench, easy-VQA), 0.38 and
    # 0.001 (easy-VQA, bench: prefetch on timed faster than off, within this path's noise).
    generate_prefetch_layer_ms=0.3,
    # (no per-miss overhead on the static path: see the module docstring; the prior's 0.05 ms per miss, fitted
    # on older easy-VQA rows, predicted 0.60 ms/token where sessions 5 and 6 measured 0.39-0.41 at 25%)
    # The prefill's host work beside its copies: an expert computed one at a time (a layer touching more
    # experts than its wave) costs the host ~0.06-0.08 ms of launches, a prefill miss more (the decision, the
    # copy's issue, the waves' events); the copies run on the link meanwhile, so a prefill's misses cost the
    # longer of the two chains. Bench model (session 7, H200, probe and 25% validation rows of two runs): per
    # miss 0.27-0.33 ms; the easy-VQA 25% rows of validate_plan.json (waves of 2 experts) need ~0.55; the
    # prior takes 0.5. (The one figure before, 0.55 ms per looped expert added to the copies, predicted the
    # bench model's 25% rows at 181 ms where they measured 117-121.)
    # Since session 10 the probe measures the miss on one-wave loads (C cold minus warm), apart from the
    # per-layer work: 0.064-0.078 ms on easy-VQA, 0.16 for the bench model, whose 9.4 MB copies are the
    # longer there. The prior stays as fitted (waves of 2, the per-layer work folded in) until a
    # validation of datasheet plans refits it.
    loop_expert_ms=0.07,
    prefill_miss_host_ms=0.5,
    # The host path's own work per prefill layer below a full budget (a readback and sync each), measured apart
    # since session 10 (C warm minus the full budget: engine_times._prefill_host_figures). The prior keeps it
    # in prefill_miss_host_ms, which was fitted with it, and charges nothing here.
    prefill_offload_layer_ms=0.0,
    copy_overhead_ms=0.007,  # per copy, where the profile has no copy_latency_ms (research/offload.md)
    prefill_efficiency=0.4,  # share of the dense bf16 peak a prefill's GEMMs reach
)
ENGINE_FIGURES = ("decode_layer_ms", "generate_layer_ms", "prefill_fixed_ms", "prefill_layer_ms", "offload_layer_ms",
                  "generate_offload_layer_ms", "generate_prefetch_layer_ms", "loop_expert_ms", "prefill_miss_host_ms",
                  "prefill_offload_layer_ms")
# (and prefill_inputs_ms, the host's input building, which the probe measures apart from prefill_fixed_ms)
# Back-compatible name: the figures above plus the prior.
ENGINE = ENGINE_PRIOR


def engine_figure(profile: DeviceProfile, name: str) -> float:
    """An engine time of `profile` (probed) or the prior."""
    return profile.get(name, ENGINE_PRIOR[name])


def _engine_note(profile: DeviceProfile) -> str:
    probed = [n for n in ENGINE_FIGURES if profile.has(n)]
    if len(probed) == len(ENGINE_FIGURES):
        return f"engine times from the profile ({', '.join(probed)})"
    return (f"engine times: {', '.join(probed) + ' from the profile, the rest' if probed else 'all'} from the prior "
            "measured on an H200 host (vismmoe probe --model measures them on a machine; a slower CPU or GPU "
            "launches slower)")


def _miss_ms(profile: DeviceProfile, store: str, B: int, path: str) -> float:
    """One record's miss on `profile` from `store` (config._STORES), in ms: only the tiers that store has.
    Discrete GPU: pinned = the pinned link (the device copy kernel on the static path); memory = a pageable
    slab in host RAM, the pageable link; mmap = the disk read (page cache misses), then a pageable copy.
    Unified memory: a slab (pinned or memory) is a DRAM copy; mmap adds the disk read."""
    from ..config import _STORES

    if store not in _STORES:
        raise ConfigError(f"store must be one of {_STORES}, got {store!r}")
    if profile.kind == "discrete":
        if store == "pinned":
            link = profile.get("copy_kernel_gbs", profile["h2d_pinned_gbs"]) if path == "static" else profile["h2d_pinned_gbs"]
            t = B / (link * GB)
        else:
            t = B / (profile["h2d_pageable_gbs"] * GB)
    else:
        t = B / ((profile.get("memory_bandwidth_gbs") or profile.get("host_memcpy_gbs")) * GB)
    if store == "mmap":
        t += record_read_ms(profile, B) / 1e3
    # A record costs its bytes at the link's rate plus one copy's fixed cost: the probe measures both apart
    # (copy_kernel_gbs on 8 MiB records, copy_latency_ms on a 16 KiB one), so one probe serves any record size.
    return t * 1e3 + profile.get("copy_latency_ms", ENGINE_PRIOR["copy_overhead_ms"])


def read_ms(profile: DeviceProfile, store: str, B: int) -> float:
    """ms the host is held reading one record of `B` bytes before its copy can be queued: an mmap store's
    disk read (ExpertStore.record reads the record synchronously, on the thread that drives the layers, for
    a demand miss and for a prefetch alike); 0 for a store in memory. A miss's time (_miss_ms) includes it."""
    return record_read_ms(profile, B) if store == "mmap" else 0.0


def record_read_ms(profile: DeviceProfile, B: int) -> float:
    """ms one mmap read of a `B`-byte record holds the host: its bytes at the disk's rate, or, where longer,
    the host's own floor for a read from the page cache (mmap_read_ms, probed on the model's records: the
    store's read into a staging buffer). The floor is fixed work per read: easy-VQA's 96 KiB records took
    0.11-0.20 ms each on the H200 host through safetensors' slices, where a Jetson's NVMe rate gives 0.033
    (its emulated 25% row's TTFT ran 1.21-1.30x the prediction that charged the disk rate alone, session 10);
    positioned reads since session 11 (offload/store.py, records of at most POSITIONED_READ_MAX_BYTES) take
    0.29-0.45x the slices' time on the CPU box and 0.45-1.14x on the H200 host (eval/bench_record_reads.py);
    larger records go through the slices, which torch's threads copy faster."""
    return max(B / (profile["disk_read_gbs"] * GB) * 1e3, profile.get("mmap_read_ms", 0.0))


def prior_prefill_distinct(model: ModelInfo, prompt: int) -> np.ndarray:
    """Distinct experts a prefill of `prompt` tokens touches per layer under uniform independent routing."""
    E, k = model.num_experts, model.top_k
    return np.full(model.num_moe_layers, E * (1 - (1 - k / E) ** prompt))


def looped_layers(distinct: np.ndarray, slots: int, quotas, model: ModelInfo) -> np.ndarray:
    """bool, distinct's shape ([L], or [requests, L]): the prefill layers that compute their experts one at a
    time (host_path.run_layer): those touching more distinct experts than their wave (the quota, or all
    slots), or every layer when a partial cache has more slots than the grouped kernel's groups."""
    from ..ops import MAX_GROUPS

    distinct = np.asarray(distinct)
    if slots >= model.num_moe_layers * model.num_experts:
        return np.zeros(distinct.shape, bool)
    wave = np.full(distinct.shape[-1], slots) if quotas is None else np.minimum(slots, np.asarray(quotas))
    return (distinct > wave) | (slots > MAX_GROUPS)


def loop_experts(distinct: np.ndarray, slots: int, quotas, model: ModelInfo) -> tuple[float, float]:
    """(experts, layers) a prefill computes one at a time: the distinct experts of its looped_layers and
    their count, per request, averaged over the rows of a [requests, L] `distinct` (the trace's own
    requests: a layer whose average sits just above its wave loops in some requests only, and the average
    alone called it looped in all of them: 10 layers predicted where the bench rows looped in 5-11,
    mean 7.0, session 8)."""
    distinct = np.atleast_2d(np.asarray(distinct, float))
    if not len(distinct):
        return 0.0, 0.0
    looped = looped_layers(distinct, slots, quotas, model)
    return float((distinct * looped).sum(-1).mean()), float(looped.sum(-1).mean())


def host_rates(profile: DeviceProfile) -> tuple[float, float]:
    """(ms per expert a prefill computes one at a time, ms of host work per prefill miss): the host chain's
    rates, which `_times` and the planner's slot-plan DP both charge. 0 on a CPU, where every prefill runs
    expert by expert anyway (the FLOPs term holds it) and a miss is a memory copy on the same host."""
    if profile.kind == "cpu":
        return 0.0, 0.0
    return engine_figure(profile, "loop_expert_ms"), engine_figure(profile, "prefill_miss_host_ms")


def request_ms(predicted: dict, new_tokens: int) -> float:
    """A request's predicted time from `_times`' figures: TTFT + `new_tokens` x decode ms/token (what the
    slot plan is chosen by: a prefill's loops and misses weigh in TTFT, decode misses in every token)."""
    return predicted["ttft_ms"] + new_tokens * predicted["decode_ms_per_token"]


def _times(model, profile, dtype, path, complete, miss_ms, decode_misses, prefill_misses, prefetch_copies, prompt,
           loop_experts: float = 0.0, read_ms: float = 0.0, prefetch: bool = False):
    """Predicted times (ms) and their breakdown; engine times from `profile` (probed) or ENGINE_PRIOR.
    prefetch: lookahead prefetch runs (on the generate path its host work per layer is its own figure).
    read_ms (time_model.read_ms): of a copy's miss_ms, the host's synchronous read (an mmap store's disk):
    a prefetch copy pays it in full; only the rest of its time may hide under the step's compute."""
    L, k, b = model.num_moe_layers, model.top_k, DTYPE_BYTES[dtype]
    decoder_bytes = (model.non_expert_numel - model.vision_numel - model.vocab_size * model.hidden_size) * b
    active = decoder_bytes + L * k * model.expert_bytes(dtype)
    fig = lambda name: engine_figure(profile, name)  # noqa: E731
    if profile.kind == "cpu":
        per_expert = profile.get("cpu_expert_decode_ms", 0.05)
        compute = L * k * per_expert + decoder_bytes / (profile["host_memcpy_gbs"] * GB) * 1e3
        overhead = L * fig("generate_layer_ms")
        tflops = profile.get("cpu_tflops", 0.05) * ENGINE_PRIOR["prefill_efficiency"]
    else:
        compute = active / (profile["memory_bandwidth_gbs"] * GB) * 1e3
        if path == "static":
            overhead = L * (fig("decode_layer_ms") + (0.0 if complete else fig("offload_layer_ms")))
        else:
            # (generate_prefetch_layer_ms is measured with the copies prefetch makes: on this path their link
            # time hides under the host's per-layer work, so `unhidden` below is 0 there and counts nothing twice)
            overhead = L * (fig("generate_layer_ms") + (0.0 if complete else fig("generate_offload_layer_ms")
                                                        + (fig("generate_prefetch_layer_ms") if prefetch else 0.0)))
        tflops = profile["bf16_tflops"] * ENGINE_PRIOR["prefill_efficiency"]
    per_loop_expert, per_miss_host = host_rates(profile)
    loop_ms = loop_experts * per_loop_expert
    miss_host_ms = prefill_misses * per_miss_host
    miss = decode_misses * miss_ms
    prefetch_read = prefetch_copies * read_ms
    unhidden = max(0.0, prefetch_copies * (miss_ms - read_ms) - (compute + overhead))
    flops = 2 * prompt * (active / b) + 2 * model.vision_numel * prompt * model.merge_size ** 2
    ttft_compute = flops / (tflops * 1e12) * 1e3
    # Host-side input building (the processor: image resize and patching, tokenizing) is its own probed
    # figure, measured for the model at hand; the prior's prefill_fixed_ms includes it (no separate prior).
    inputs_ms = profile.get("prefill_inputs_ms", 0.0) if profile.has("prefill_fixed_ms") else 0.0
    # (below a full budget the host path's readback per layer; not on a CPU, which runs that path at any
    # budget, as host_rates charges no host chain there)
    offload_prefill = 0.0 if complete or profile.kind == "cpu" else L * fig("prefill_offload_layer_ms")
    ttft_overhead = inputs_ms + fig("prefill_fixed_ms") + L * fig("prefill_layer_ms") + offload_prefill
    # The prefill's misses: their copies on the link, and beside them the host's work (each miss's decision
    # and copy issue, the experts computed one by one); the host runs ahead of the copies, so the longer chain counts.
    ttft_miss = prefill_misses * miss_ms
    # (an mmap store's reads are the host's own work: it reads each missed record before issuing its copy)
    ttft_host = loop_ms + miss_host_ms + prefill_misses * read_ms
    return dict(decode_ms_per_token=compute + overhead + miss + prefetch_read + unhidden, decode_compute_ms=compute,
                decode_overhead_ms=overhead, decode_miss_ms=miss, decode_prefetch_ms=prefetch_read + unhidden,
                decode_prefetch_read_ms=prefetch_read, read_ms=read_ms,
                decode_misses_per_token=decode_misses, decode_prefetch_copies=prefetch_copies, miss_ms=miss_ms,
                ttft_ms=ttft_overhead + ttft_compute + max(ttft_miss, ttft_host), ttft_overhead_ms=ttft_overhead,
                ttft_inputs_ms=inputs_ms, ttft_loop_ms=loop_ms, ttft_miss_host_ms=miss_host_ms, ttft_host_ms=ttft_host,
                prefill_loop_experts=loop_experts, ttft_compute_ms=ttft_compute,
                ttft_miss_ms=ttft_miss, prefill_misses=prefill_misses, prompt_tokens=prompt)
