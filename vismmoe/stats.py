"""Per-request statistics (what a user needs to see why a request was slow) and what a loaded engine is
(`EngineInfo`).

A decode loop (static_decode.StaticDecoder, generate_decode.GenerateDecoder) hands back a `DecodeRun`
(its tokens, when the first and the last token were known, the cache's and the predictor's counters);
`request_stats` turns it and what the engine knows of the request into `RequestStats`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .offload.cache import CacheCounters
    from .offload.ledger import PredictionCounters


@dataclass
class DecodeRun:
    tokens: list[int]
    path: str  # "static-graph", "static-eager" or "generate"
    first_token_at: float  # time.perf_counter() once the prefill's token was known (= end_at if never marked)
    end_at: float  # ... once the last token was known
    prefill_misses: int  # of the cache's misses, those before the first token
    prefill_bytes_h2d: int  # of the bytes copied, those before the first token
    cache: "CacheCounters"
    predictions: "PredictionCounters"
    step_variants: dict = field(default_factory=dict)  # RequestStats.step_variants


class RequestClock:
    """A decode loop's clock: marks the first token (and what the prefill had copied by then) and ends
    the run with the runtime's counters. On CUDA it synchronises first, so the times are the GPU's."""

    def __init__(self, cache):
        self.cache = cache
        self.first_token_at = None
        self.prefill = None  # (misses, bytes_h2d) when the first token was known

    def _sync(self) -> None:
        if self.cache.device.type == "cuda":
            torch.cuda.synchronize(self.cache.device)

    def first_token(self) -> None:
        self._sync()
        self.first_token_at = time.perf_counter()
        counters = self.cache.counters
        self.prefill = (int(counters.misses.sum()), counters.bytes_h2d)

    def finish(self, tokens: list[int], path: str, runtime, step_variants: dict | None = None) -> DecodeRun:
        self._sync()
        end = time.perf_counter()
        cache, predictions = runtime.request_counters()
        misses, bytes_h2d = self.prefill or (int(cache.misses.sum()), cache.bytes_h2d)
        return DecodeRun(tokens, path, self.first_token_at or end, end, misses, bytes_h2d, cache, predictions,
                         dict(step_variants or {}))


@dataclass
class RequestStats:
    ttft_s: float  # time to first token: input processing + vision + prefill + first sample
    decode_s: float  # from the first token to the last
    prefill_tokens: int
    new_tokens: int
    visual_tokens_total: int
    visual_tokens_kept: int
    hits_per_layer: list[int]
    misses_per_layer: list[int]
    bytes_h2d: int  # expert bytes copied host -> compute device
    budget_bytes: int
    num_slots: int
    record_bytes: int
    waves: int  # layer calls that ran in several waves (more distinct experts than slots)
    peak_gpu_bytes: int | None  # torch.cuda.max_memory_allocated during the request (None on cpu)
    device: str
    prefill_misses: int = 0  # of expert_misses, those of the prefill step
    prefill_bytes_h2d: int = 0  # of bytes_h2d, those copied before the first token
    prefetch_issued_bytes: int = 0
    prefetch_used_bytes: int = 0  # prefetched experts that their layer then used
    prefetch_wasted_bytes: int = 0  # prefetched experts evicted unused
    stall_s: float | None = None  # compute-stream time spent waiting for copies (measure_stalls: true)
    # [distance][layer]: of the experts a layer used, the share predicted `distance` layers ahead
    # (recall), and of the predicted ones the share used (precision); None where nothing was scored.
    prefetch_recall: list = field(default_factory=list)
    prefetch_precision: list = field(default_factory=list)
    # `prefetch: auto`: per MoE layer, the share of this request's decode steps its prefetch ran (None for
    # layer 0, which nothing predicts); None without auto.
    prefetch_on: list | None = None
    # How the decode steps ran: "static-graph", "static-eager" or "generate" (see EngineConfig.decode).
    decode_path: str = "generate"
    # `prefetch: auto` on the static path: decode steps taken as the full captured step ("full") and as the
    # one without the lookahead ("no_lookahead": every layer off and no decision due); {} otherwise.
    step_variants: dict = field(default_factory=dict)
    # Bytes by part (Engine._memory_parts, the planner's names: deploy/memory.py): non_expert_weights,
    # expert_cache, router_stack, device_state, kv_cache, activations_peak
    # (None on cpu) on the compute device; host_store (0 for mmap) and host_store_kind on the host.
    memory: dict = field(default_factory=dict)
    # Under `emulate: PROFILE`: the emulated device's usable bytes, what this request is accounted to
    # hold there (parts), this GPU's measured peak, the host-path pacing added; {} otherwise.
    emulation: dict = field(default_factory=dict)
    pruning_s: float = 0.0  # visual-token scoring, selection and gather (0 when nothing was pruned)
    # Of ttft_s, building the inputs on the host: loading the image, the chat template, the processor and
    # the copy to the device (the rest of the TTFT is the prefill, pruning_s and the first sample).
    inputs_s: float = 0.0
    # Of the misses per layer, how each miss path served them ("copy" into a slot, "zerocopy" read in place
    # by the decode kernel, "cpu" computed on the CPU); and each layer's miss path for the decode steps.
    misses_by_path_per_layer: dict = field(default_factory=dict)
    miss_paths: list = field(default_factory=list)

    @property
    def misses_by_path(self) -> dict:
        return {path: int(sum(v)) for path, v in self.misses_by_path_per_layer.items()}

    @property
    def expert_hits(self) -> int:
        return int(sum(self.hits_per_layer))

    @property
    def expert_misses(self) -> int:
        return int(sum(self.misses_per_layer))

    @property
    def hit_rate(self) -> float:
        total = self.expert_hits + self.expert_misses
        return self.expert_hits / total if total else 1.0

    @property
    def decode_tokens_per_s(self) -> float:
        steps = self.new_tokens - 1  # the first token is produced by the prefill step
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(
            expert_hits=self.expert_hits, expert_misses=self.expert_misses, hit_rate=self.hit_rate,
            decode_tokens_per_s=self.decode_tokens_per_s, misses_by_path=self.misses_by_path,
        )
        return data

    def table(self) -> str:
        """A plain-text table for terminals and logs."""
        rows = [
            ("time to first token", f"{self.ttft_s * 1e3:.1f} ms (inputs {self.inputs_s * 1e3:.1f} ms)"),
            ("decode", f"{self.decode_tokens_per_s:.2f} tok/s ({self.new_tokens} new tokens, {self.decode_s * 1e3:.1f} ms)"),
            ("prompt tokens", f"{self.prefill_tokens} ({self.visual_tokens_kept}/{self.visual_tokens_total} visual kept)"),
            ("expert cache", f"{self.num_slots} slots x {_size(self.record_bytes)} = {_size(self.budget_bytes)}"),
            ("expert hits / misses", f"{self.expert_hits} / {self.expert_misses} (hit rate {self.hit_rate:.1%})"),
            ("bytes host->device", _size(self.bytes_h2d)),
            ("peak GPU memory", _size(self.peak_gpu_bytes) if self.peak_gpu_bytes is not None else "n/a (cpu)"),
            ("device", self.device),
            ("decode path", self.decode_path),
        ]
        if self.visual_tokens_kept < self.visual_tokens_total:
            rows.append(("visual token pruning", f"{self.pruning_s * 1e3:.1f} ms"))
        if self.prefetch_issued_bytes:
            rows.append(("prefetch issued / used / wasted", f"{_size(self.prefetch_issued_bytes)} / "
                         f"{_size(self.prefetch_used_bytes)} / {_size(self.prefetch_wasted_bytes)}"))
        if self.step_variants:
            rows.append(("decode steps full / no lookahead (auto)",
                         f"{self.step_variants['full']} / {self.step_variants['no_lookahead']}"))
        if self.prefetch_on is not None and any(v is not None for v in self.prefetch_on):
            rows.append(("prefetch on (auto), per layer", " ".join(
                f"L{i}:{v:.0%}" for i, v in enumerate(self.prefetch_on) if v is not None)))
        if any(v is not None for row in self.prefetch_recall for v in row):
            rows.append(("next-layer recall / precision", f"{_mean(self.prefetch_recall[0]):.1%} / "
                         f"{_mean(self.prefetch_precision[0]):.1%}"))
        served = self.misses_by_path
        if served.get("zerocopy") or served.get("cpu"):
            rows.append(("misses copied / zero-copy / cpu", f"{served['copy']} / {served['zerocopy']} / {served['cpu']}"))
        if self.stall_s is not None:
            rows.append(("stalled waiting for copies", f"{self.stall_s * 1e3:.2f} ms"))
        if self.waves:
            rows.append(("layer calls run in waves", str(self.waves)))
        if self.memory:
            m, where = self.memory, "GPU" if self.device.startswith("cuda") else "device"
            act = m.get("activations_peak")
            rows.append((f"{where} memory by part", f"non-expert {_size(m['non_expert_weights'])} + expert cache "
                         f"{_size(m['expert_cache'])} + KV {_size(m['kv_cache'])} + activations "
                         f"{_size(act) if act is not None else 'n/a (cpu)'}"))
            rows.append(("host memory (expert store)", f"{_size(m['host_store'])} {m['host_store_kind']}"))
        if self.emulation:
            e = self.emulation
            rows.append((f"emulated {e['profile']}", f"accounted {_size(e['accounted_bytes'])} of "
                         f"{_size(e['usable_bytes'])} usable; expert copies paced to its link; compute is this "
                         "machine's"))
        width = max(len(k) for k, _ in rows)
        lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
        lines.append("per-layer hits/misses: " + " ".join(
            f"L{i}:{h}/{m}" for i, (h, m) in enumerate(zip(self.hits_per_layer, self.misses_per_layer))))
        return "\n".join(lines)


def request_stats(run: DecodeRun, *, started_at: float, prompt_tokens: int, visual_total: int, visual_kept: int,
                  pruning_s: float, budget_bytes: int, num_slots: int, record_bytes: int, device,
                  inputs_s: float = 0.0) -> RequestStats:
    """The request's statistics from its decode run; `started_at` is the perf_counter() time the request
    arrived (before its inputs were built). Memory by part is the engine's to add (`memory_parts`)."""
    c, p = run.cache, run.predictions
    device = torch.device(device)
    return RequestStats(
        ttft_s=run.first_token_at - started_at, decode_s=run.end_at - run.first_token_at,
        prefill_tokens=prompt_tokens, new_tokens=len(run.tokens), visual_tokens_total=visual_total,
        visual_tokens_kept=visual_kept, pruning_s=pruning_s, inputs_s=inputs_s,
        hits_per_layer=c.hits.tolist(), misses_per_layer=c.misses.tolist(), bytes_h2d=int(c.bytes_h2d),
        budget_bytes=budget_bytes, num_slots=num_slots, record_bytes=record_bytes, waves=c.waves,
        peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        device=str(device), prefill_misses=run.prefill_misses, prefill_bytes_h2d=run.prefill_bytes_h2d,
        prefetch_issued_bytes=c.prefetch_issued_bytes, prefetch_used_bytes=c.prefetch_used_bytes,
        prefetch_wasted_bytes=c.prefetch_wasted_bytes, stall_s=c.stall_s() if c.stall_events else None,
        prefetch_recall=_rounded(p.recall()), prefetch_precision=_rounded(p.precision()), decode_path=run.path,
        misses_by_path_per_layer={"copy": (c.misses - c.zero_copy - c.cpu).tolist(), "zerocopy": c.zero_copy.tolist(),
                                  "cpu": c.cpu.tolist()},
        prefetch_on=p.on_fraction, step_variants=dict(run.step_variants),
    )


def memory_parts(*, held: dict, kv_bytes: int, peak: int | None, store) -> dict:
    """Bytes by part, like `ollama ps`, under the planner's names (deploy/memory.py): on the compute device
    what the engine holds (`held`: non_expert_weights, expert_cache, router_stack, device_state), the KV
    caches, and the rest of the request's `peak` as activations_peak (None on cpu: the prefill's
    activations, the CUDA graph pool, cuBLAS workspaces and the allocator's rounding together); on the
    host the expert store."""
    parts = dict(held, kv_cache=kv_bytes)
    parts["activations_peak"] = None if peak is None else max(0, peak - sum(parts.values()))
    parts["host_store"] = 0 if store.slab is None else store.total_bytes
    # What the store is, not what was asked for: `store: pinned` on a machine without CUDA (or whose
    # registration failed) is plain pageable memory.
    parts["host_store_kind"] = "mmap" if store.slab is None else ("page-locked" if store.pinned else "pageable")
    return parts


def tensor_bytes(*objects) -> int:
    """Bytes of the distinct tensors among `objects` and their attributes (one level: a tensor, or an
    object whose attributes hold tensors); None is skipped."""
    seen, total = set(), 0
    for obj in objects:
        if obj is None:
            continue
        values = [obj] if isinstance(obj, torch.Tensor) else list(vars(obj).values())
        for t in values:
            if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.device.type != "meta":
                seen.add(t.data_ptr())
                total += t.untyped_storage().nbytes() if t.numel() else 0
    return total


def dynamic_kv_bytes(text_config, tokens: int, element_size: int) -> int:
    """What transformers' dynamic KV cache holds for `tokens` positions (the generate path)."""
    kv_heads = getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // text_config.num_attention_heads
    return 2 * text_config.num_hidden_layers * kv_heads * head_dim * tokens * element_size


def _rounded(matrix) -> list:
    # Per distance, per layer; None where the layer had nothing to score (e.g. the first layer).
    return [[None if x != x else round(float(x), 4) for x in row] for row in matrix]


@dataclass(frozen=True)
class EngineInfo:
    """What a loaded engine is and how it will serve (Engine.info()): for logs, reports and benchmarks."""

    model_dir: str
    model_type: str  # transformers' model_type of the checkpoint (the family)
    device: str
    dtype: str
    layers: int  # MoE layers
    experts: int  # routed experts per MoE layer
    top_k: int
    record_bytes: int  # one expert's weights: the unit of the cache and of every copy
    num_slots: int  # experts the GPU cache holds
    budget_bytes: int  # num_slots x record_bytes
    all_resident: bool  # the budget holds every expert: loaded once, never evicted
    policy: str
    store: str  # the store setting: pinned, memory or mmap
    host_store_kind: str  # what the host store is: page-locked, pageable or mmap
    host_store_bytes: int  # 0 for mmap (records are read from the files on demand)
    non_expert_bytes: int  # non-expert weights and buffers on the compute device
    decode: str  # the decode setting: auto, static or generate
    # The path a request without generation arguments takes: "static" or "generate" (static_unavailable
    # says why not static; None when it is). A model the static cache cannot hold is found per request.
    decode_path: str
    static_unavailable: str | None
    cuda_graphs: bool
    experts_kernel: str  # the setting: auto, fused, grouped_mm or loop
    prefill_kernel: str  # what computes the experts of a prefill: grouped_mm or loop
    decode_kernel: str  # ... of a decode step (<= 16 tokens): fused, grouped_mm or loop
    norm_kernel: str  # the setting: auto, fused or torch
    fused_norms: int  # RMSNorm modules running the fused kernel (0: transformers' modules as they are)
    router_kernel: str  # the setting: auto, fused or torch
    fused_routers: int  # routers running the fused kernel in decode steps (0: transformers' routers)
    rope_kernel: str  # the setting: auto, fused or torch
    fused_rotary: int  # modeling modules whose decode-step rotary embedding takes the kernel (0: none)
    prefetch: bool | str  # true, false or "auto"
    prefetch_depth: int
    prefetch_limit: int  # copies per prefetch call (the setting's 0 means top_k)
    prefetch_prefill: bool
    # `emulate: PROFILE`: what is emulated (memory cap, link pacing), what is not (compute), per-copy
    # times; None without emulation (deploy/emulate.py).
    emulation: dict | None = None
    # `miss_path`: the setting (auto, copy, zerocopy, cpu); `miss_paths`: per layer the path in use, why,
    # and auto's figures and predicted costs (offload/miss_paths.py).
    miss_path: str = "copy"
    miss_paths: dict | None = None
    # `prefetch: auto`: the layers whose prefetch is on now, decode steps decided over, and the costs
    # the rule weighs (copy_us, predict_us: measured at load on a GPU, priors on a CPU); None otherwise.
    prefetch_auto: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
