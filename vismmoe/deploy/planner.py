"""Fit a model to a device: expert budget, per-layer slot plan, store tier, policy, prefetch; predict
TTFT and decode ms/token; write a deployment YAML that `vismmoe.load` accepts.

Memory (bytes on the GPU): the parts of deploy/memory.py (non-expert weights, expert cache, KV cache
with static decode's held buckets and growth copy, the prefill's activation peak, the CUDA graph pool,
cuBLAS workspaces, stacked routers, kernel workspaces, device cache state, staging, and a stated margin
for the allocator's rounding) + the profile's reserve must fit the usable memory. They are counted by
the same function (memory.gpu_parts) that the engine's load and request checks call under emulation,
for the plan's envelope: one image of `image_size` pixels, a question of `question_tokens` tokens in the
checkpoint's chat template (prompt tokens counted by its own processor), `max_new_tokens` new tokens. On unified-memory devices
the host store lives in the same DRAM, so a `memory` store costs its bytes twice and `mmap` (NVMe)
costs none.

Time: deploy/time_model.py (the bytes a token reads, the engine's per-layer times from the profile
or a stated prior measured on an H200 host, misses x time per miss, prefill FLOPs and misses).
Misses come from replaying the model's routing trace (vismmoe.offload.simulate) under the chosen
policy and budget; without a trace, from the stated PRIOR.

Per-layer slot plan (deploy/slot_plan.py): quotas from an exact DP over per-layer curves replayed from
the trace, in predicted ms per request (misses, and the experts a prefill computes one at a time where a
layer's quota is below the distinct experts it touches) as well as in misses; the faster of the two
plans is written as the engine's `slot_plan` when its predicted request time (TTFT + new tokens x
decode ms/token) is lower than one global pool's (then the predictions are the plan's); otherwise
`slot_plan: global`.

(Over 400 lines: the candidate search and the replays it memoises read each other's state; split
apart they would pass it all around.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import BudgetError, ConfigError
from ..ops import MAX_GROUPS
from .memory import PARTS, gpu_parts, total
from .model_info import ModelInfo
from .profiles import DeviceProfile
from .slot_plan import best_quotas, choose_slot_plan, layer_miss_curves  # noqa: F401 - re-exported
from .time_model import (ENGINE, ENGINE_FIGURES, ENGINE_PRIOR, _engine_note, _miss_ms, _times,  # noqa: F401 - re-exported
                         engine_figure, loop_experts, prior_prefill_distinct, read_ms, request_ms)

PRIOR = ("uniform independent routing (no trace): each layer's decode hit rate = its slots / experts, and a "
         "prefill of n tokens touches E(1-(1-k/E)^n) experts per layer with the same hit rate; pessimistic "
         "for trained models, whose routing has locality")
POLICIES_WITH_DEVICE_TWIN = ("lru", "lfu")
GB = 1e9


@dataclass
class Candidate:
    store: str
    budget_slots: int
    decode_path: str  # static or generate
    miss_ms: float
    memory: dict
    predicted: dict = field(default_factory=dict)
    policy: str = "lru"
    prefetch: bool = True
    hit_rates: dict = field(default_factory=dict)
    # predicted request time (TTFT + the envelope's new tokens x decode ms/token) of each slot plan weighed:
    # global_pool, and with a trace per_layer_plan and misses_only_plan (deploy/slot_plan.py)
    request_ms: dict = field(default_factory=dict)


@dataclass
class Plan:
    model: ModelInfo
    profile: DeviceProfile
    goal: str
    dtype: str
    context_tokens: int
    image_size: int
    max_new_tokens: int  # the envelope's new tokens (what the written config's max_new_tokens is)
    chosen: Candidate
    slot_plan: list | None
    slot_plan_note: str
    usable_gpu_bytes: int
    trace_path: str | None
    notes: list = field(default_factory=list)
    question_tokens: int = 64

    def engine_config(self) -> dict:
        c = self.chosen
        return dict(device="cpu" if self.profile.kind == "cpu" else "cuda", dtype=self.dtype,
                    expert_budget=int(c.budget_slots * self.model.expert_bytes(self.dtype)), store=c.store,
                    policy=c.policy, prefetch=c.prefetch, prefetch_depth=1, decode="auto",
                    max_new_tokens=self.max_new_tokens,
                    slot_plan=list(self.slot_plan) if self.slot_plan else "global")  # a copy: no YAML alias

    def to_dict(self) -> dict:
        c = self.chosen
        return dict(
            engine=self.engine_config(),
            plan=dict(
                model=self.model.name, device_profile=self.profile.name, goal=self.goal,
                context_tokens=self.context_tokens, image_size=self.image_size,
                prompt_tokens=self.chosen.predicted["prompt_tokens"], question_tokens=self.question_tokens,
                envelope_note=f"memory is planned for requests of at most {self.chosen.predicted['prompt_tokens']} "
                f"prompt tokens (the chat template, one image of at most {self.image_size} px, a question of at most "
                f"{self.question_tokens} tokens) and {self.context_tokens} tokens with the answer; a longer request "
                "may not fit (under emulation the engine refuses it, saying by how much)",
                expert_slots=c.budget_slots, expert_slots_total=self.model.num_moe_layers * self.model.num_experts,
                slot_plan=self.slot_plan, slot_plan_note=self.slot_plan_note,
                miss_path="copy", miss_path_note="a miss copies the expert into a cache slot (the engine's default; "
                "zerocopy and cpu exist, but on the bench model copy was the fastest at 10-25% budgets, and the "
                "planner does not weigh the other paths yet)",
                visual_keep=1.0, visual_keep_note="1.0 keeps every visual token: pruning (visual_keep < 1, "
                "visual_prune) shortens the prefill but trades accuracy, and the planner has no accuracy target "
                "to trade against; BENCHMARKS.md measures the retention per keep and method",
                decode_path=c.decode_path, routing=self.trace_path or f"prior: {PRIOR}",
                memory={k: int(v) for k, v in c.memory.items()}, usable_gpu_bytes=int(self.usable_gpu_bytes),
                hit_rates={k: round(v, 4) for k, v in c.hit_rates.items()},
                request_ms={k: round(v, 3) for k, v in c.request_ms.items()},
                predicted={k: round(v, 3) for k, v in c.predicted.items()}, notes=self.notes,
            ),
        )

    def summary_lines(self) -> list[str]:
        c, p = self.chosen, self.chosen.predicted
        m = c.memory
        return [
            f"model {self.model.name} on {self.profile.name} ({self.goal}), {self.dtype}, context {self.context_tokens} tokens "
            f"(prompt <= {self.chosen.predicted['prompt_tokens']}: chat template + {self.image_size} px image + "
            f"{self.question_tokens}-token question; <= {self.max_new_tokens} new)",
            f"expert budget {c.budget_slots}/{self.model.num_moe_layers * self.model.num_experts} slots = "
            f"{_gb(m['expert_cache'])}, store {c.store}, policy {c.policy}, prefetch {c.prefetch}, "
            f"decode path {c.decode_path}",
            f"{'host' if self.profile.kind == 'cpu' else 'GPU'} memory: "
            + " + ".join(f"{k.replace('_', ' ')} {_gb(m[k])}" for k in (*PARTS, "reserved") if m.get(k))
            + f" = {_gb(m['gpu_total'])} of {_gb(self.usable_gpu_bytes)}; host store {_gb(m['host_store'])}",
            f"predicted TTFT {p['ttft_ms']:.1f} ms = "
            + (f"host inputs {p['ttft_inputs_ms']:.1f} + " if p.get("ttft_inputs_ms") else "")
            + f"fixed+layers {p['ttft_overhead_ms'] - p.get('ttft_inputs_ms', 0.0):.1f} + compute "
            f"{p['ttft_compute_ms']:.1f} + the longer of {p['prefill_misses']:.0f} misses on the link "
            f"{p['ttft_miss_ms']:.1f} and the host's work beside them {p.get('ttft_host_ms', 0.0):.1f} (per miss "
            f"{p.get('ttft_miss_host_ms', 0.0):.1f}, {p['prefill_loop_experts']:.0f} experts one by one "
            f"{p['ttft_loop_ms']:.1f}"
            + (f", disk reads {p['prefill_misses'] * p['read_ms']:.1f}" if p.get("read_ms") else "") + ")",
            f"predicted decode {p['decode_ms_per_token']:.2f} ms/token = compute {p['decode_compute_ms']:.2f} + "
            f"engine overhead {p['decode_overhead_ms']:.2f} + {p['decode_misses_per_token']:.2f} misses "
            f"{p['decode_miss_ms']:.2f} + {p['decode_prefetch_copies']:.2f} prefetch copies "
            f"{p['decode_prefetch_ms']:.2f} (their disk reads and the copies compute does not hide)",
            f"slot plan: {self.slot_plan_note}",
        ]


def make_plan(model: ModelInfo, profile: DeviceProfile, trace=None, goal: str = "latency",
              max_gpu_memory: float | None = None, context: int | None = None, image_size: int = 448,
              max_new_tokens: int = 64, trace_path: str | None = None, question_tokens: int = 64) -> Plan:
    if goal not in ("latency", "memory"):
        raise ConfigError(f"goal must be latency or memory, got {goal!r}")
    if trace is not None:
        meta = trace.meta
        if trace.num_requests == 0:
            raise ConfigError(f"the trace{' ' + str(trace_path) if trace_path else ''} holds no requests (tracing "
                              "stopped before any request ran): record one over the requests you serve, or plan "
                              "without a trace (a stated prior)")
        if (meta.num_layers, meta.num_experts, meta.top_k) != (model.num_moe_layers, model.num_experts, model.top_k):
            raise ConfigError(f"the trace is of a model with {meta.num_layers} MoE layers x {meta.num_experts} "
                              f"experts, top-{meta.top_k}; {model.name} has {model.num_moe_layers} x "
                              f"{model.num_experts}, top-{model.top_k}: record a trace of this model")
    dtype = "bfloat16" if profile.kind != "cpu" else "float32"
    if image_size < 0 or question_tokens < 1 or max_new_tokens < 1:
        raise ConfigError(f"image_size must be >= 0, question_tokens and max_new_tokens >= 1 (got {image_size}, "
                          f"{question_tokens}, {max_new_tokens})")
    visual = model.visual_tokens(image_size)
    prompt = model.prompt_tokens(image_size, question_tokens)
    context = context if context is not None else prompt + max_new_tokens
    if context < prompt + 1:
        raise ConfigError(f"context {context} tokens is shorter than one request of this envelope: {prompt} prompt "
                          f"tokens (chat template, a {image_size} px image = {visual} tokens, a {question_tokens}-token "
                          "question) + 1 new token; raise --context or lower --image-size / --question-tokens")
    max_new_tokens = min(max_new_tokens, context - prompt)  # the written config stays inside the envelope
    usable = _usable_bytes(profile, max_gpu_memory)
    reserved = int(profile["reserved_gb"] * GB)
    total_slots = model.num_moe_layers * model.num_experts
    sim = _simulator(trace, model) if trace is not None else None
    sizing = dict(prompt=prompt, new_tokens=context - prompt, visual=visual, dtype=dtype)
    candidates, shortfalls = [], []
    for store in _stores(profile):
        host_store = model.total_expert_bytes(dtype) if store != "mmap" else 0
        if profile.kind == "discrete" and host_store > 0.85 * profile["ram_gb"] * GB:
            shortfalls.append(f"store {store}: {_gb(host_store)} of experts exceed 85% of {profile['ram_gb']:.0f} "
                              "GB host RAM")
            continue
        shared = host_store if profile.kind != "discrete" else 0  # unified / cpu: the store shares the pool
        max_slots = _largest_fit(model, profile, store, usable - reserved - shared, sizing)
        if max_slots < model.top_k:
            need = total(_parts(model, profile, store, model.top_k, sizing)) + reserved + shared
            shortfalls.append(f"store {store}: needs {_gb(need)} for the smallest budget ({model.top_k} experts), "
                              f"{_gb(usable)} usable: short by {_gb(need - usable)}")
            continue
        budgets = [max_slots] if goal == "latency" else sorted(
            {max(model.top_k, int(max_slots * f)) for f in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)})
        if store != "mmap" and MAX_GROUPS < max_slots < total_slots:
            budgets.append(MAX_GROUPS)  # the most a partial cache may hold and keep static decode (_path)
        for slots in budgets:
            memory = dict(_parts(model, profile, store, slots, sizing), reserved=reserved)
            memory["host_store"] = shared if profile.kind != "discrete" else host_store
            memory["gpu_total"] = sum(v for k, v in memory.items() if k != "host_store") + shared
            candidates.append(_evaluate(model, profile, dtype, store, slots, memory, sim, prompt))
    if not candidates:
        raise BudgetError(f"{model.name} cannot fit {profile.name} at any setting (context {context} tokens, {dtype}): "
                          + "; ".join(shortfalls) + ". Use a bigger device, a shorter --context, or a smaller model")
    best_time = min(c.predicted["decode_ms_per_token"] for c in candidates)
    if goal == "latency":
        chosen = min(candidates, key=lambda c: (c.predicted["decode_ms_per_token"], c.predicted["ttft_ms"]))
    else:  # the least GPU memory whose decode is within 10% of the fastest
        ok = [c for c in candidates if c.predicted["decode_ms_per_token"] <= 1.1 * best_time]
        chosen = min(ok, key=lambda c: (c.memory["gpu_total"], c.predicted["decode_ms_per_token"]))
    chosen.request_ms = dict(global_pool=request_ms(chosen.predicted, max_new_tokens))
    slot_plan, note = choose_slot_plan(model, profile, dtype, chosen, sim, prompt, max_new_tokens)
    chosen.predicted["request_ms"] = request_ms(chosen.predicted, max_new_tokens)
    notes = [f"sizes from {model.sizes_from}", _engine_note(profile)] + [f"rejected {s}" for s in shortfalls]
    return Plan(model, profile, goal, dtype, context, image_size, max_new_tokens, chosen, slot_plan, note, usable,
                trace_path, notes, question_tokens)


def fit_budget_bytes(model: ModelInfo, dtype: str, available: int, shared_store: bool, new_tokens: int,
                     image_size: int = 448, gpu: bool = True, compute_capability: str = "9.0",
                     store: str = "pinned", unified: bool = False, question_tokens: int = 64) -> int:
    """`expert_budget: auto`: the largest budget that fits `available` bytes next to everything else
    (deploy/memory.py's parts, as the planner counts them) for one `image_size` image, a question of
    `question_tokens` and `new_tokens` new tokens."""
    prompt = model.prompt_tokens(image_size, question_tokens)
    shared = model.total_expert_bytes(dtype) if shared_store else 0

    def parts(slots):
        return gpu_parts(model, dtype, slots=slots, prompt_tokens=prompt, new_tokens=new_tokens,
                         visual_tokens=model.visual_tokens(image_size), static=_path(store, slots, model) == "static",
                         prefetch=True, store=store, unified=unified, compute_capability=compute_capability, gpu=gpu)

    lo, hi = model.top_k, model.num_moe_layers * model.num_experts
    if total(parts(lo)) + shared > available:
        raise BudgetError(f"expert_budget: auto found {_gb(available)} available here, but the model needs "
                          f"{_gb(total(parts(lo)) + shared)} at its smallest budget; free memory or use store: mmap")
    slots = _search(lambda s: total(parts(s)) + shared <= available, lo, hi)
    return slots * model.expert_bytes(dtype)


def memory_cap_for(plan: "Plan", slots: int) -> int:
    """GPU memory (the reserve included) at which `plan`'s store holds `slots` expert slots and nothing
    more fits: for re-planning a device at a smaller budget (eval/validate_plan.py, measure_memory.py)."""
    prompt = plan.chosen.predicted["prompt_tokens"]
    sizing = dict(prompt=prompt, new_tokens=plan.context_tokens - prompt, visual=plan.model.visual_tokens(plan.image_size),
                  dtype=plan.dtype)
    m = plan.chosen.memory
    shared = m["host_store"] if plan.profile.kind != "discrete" else 0
    return int(m["reserved"] + shared + total(_parts(plan.model, plan.profile, plan.chosen.store, slots, sizing))
               + 0.5 * plan.model.expert_bytes(plan.dtype))


# ------------------------------------------------------------------------------------------ internals
def _path(store: str, slots: int, model: ModelInfo) -> str:
    """The decode path `decode: auto` takes (engine._static_unavailable): static decode needs every expert
    resident, or a host slab (not mmap) and at most ops.MAX_GROUPS slots for its grouped kernel."""
    if slots >= model.num_moe_layers * model.num_experts:
        return "static"
    return "static" if store != "mmap" and slots <= MAX_GROUPS else "generate"


def _parts(model, profile, store, slots, sizing) -> dict:
    return gpu_parts(model, sizing["dtype"], slots=slots, prompt_tokens=sizing["prompt"], new_tokens=sizing["new_tokens"],
                     visual_tokens=sizing["visual"], static=_path(store, slots, model) == "static", prefetch=True,
                     store=store, unified=profile.unified, compute_capability=profile.compute_capability or "9.0",
                     gpu=profile.kind != "cpu")


def _largest_fit(model, profile, store, room: int, sizing) -> int:
    """The most slots whose parts fit `room` bytes (0 if not even top-k do)."""
    lo, hi = model.top_k, model.num_moe_layers * model.num_experts
    fits = lambda s: total(_parts(model, profile, store, s, sizing)) <= room  # noqa: E731
    if not fits(lo):
        return 0
    return _search(fits, lo, hi)


def _search(fits, lo: int, hi: int) -> int:
    """The largest s in [lo, hi] with fits(s), given fits(lo); the full budget is tried on its own
    (its decode path, and so its parts, differ from a partial cache's)."""
    if fits(hi):
        return hi
    hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _usable_bytes(profile: DeviceProfile, max_gpu_memory) -> int:
    pool = profile["ram_gb"] if profile.kind == "cpu" else profile["memory_gb"]
    usable = pool * GB
    if max_gpu_memory is not None:
        if max_gpu_memory <= 0:
            raise ConfigError(f"max_gpu_memory must be positive, got {max_gpu_memory}")
        usable = min(usable, max_gpu_memory)
    return int(usable)


def _stores(profile: DeviceProfile) -> list[str]:
    if profile.kind == "discrete":
        return ["pinned", "mmap"]
    return ["mmap", "memory"]  # shared DRAM: the NVMe tier costs no memory, a memory store costs it twice


def _evaluate(model, profile, dtype, store, slots, memory, sim, prompt) -> Candidate:
    total_slots = model.num_moe_layers * model.num_experts
    complete = slots >= total_slots
    path = _path(store, slots, model)
    B = model.expert_bytes(dtype)
    miss_ms = _miss_ms(profile, store, B, path)
    read = read_ms(profile, store, B)  # an mmap store's disk read: a prefetch copy cannot hide it
    cand = Candidate(store, slots, path, miss_ms, memory)
    L, k = model.num_moe_layers, model.top_k
    distinct = sim.prefill_distinct_by_request if sim is not None else prior_prefill_distinct(model, prompt)
    if complete:
        decode_misses = prefill_misses = prefetch_copies = 0.0
        cand.hit_rates = dict(global_pool=1.0)
    elif sim is not None:
        best = None
        for policy in POLICIES_WITH_DEVICE_TWIN:
            for prefetch in ((False, True) if sim.trace.has_predictions else (False,)):
                r = sim.run(policy, slots, "trace" if prefetch else "none")
                # a prefetch copy weighs a quarter of a miss (it takes the link and a slot, hidden under
                # compute), or with an mmap store its disk read's share of a miss (read synchronously)
                weight = max(0.25, read / miss_ms)
                # (on a GPU's generate path prefetch also costs the host its per-layer work, in misses' time)
                host = L * engine_figure(profile, "generate_prefetch_layer_ms") / miss_ms \
                    if prefetch and path == "generate" and profile.kind != "cpu" else 0.0
                key = (r["decode_misses_per_token"] + r["decode_prefetch_per_token"] * weight + host,
                       r["prefill_misses"])
                if best is None or key < best[0]:
                    best = (key, policy, prefetch, r)
        _, cand.policy, cand.prefetch, r = best
        decode_misses, prefill_misses = r["decode_misses_per_token"], r["prefill_misses"]
        prefetch_copies = r["decode_prefetch_per_token"]
        cand.hit_rates = dict(global_pool=r["hit_rate"], global_pool_decode=r["decode_hit_rate"])
    else:
        h = min(1.0, slots / total_slots)
        decode_misses = L * k * (1 - h)
        prefill_misses = float(distinct.sum()) * (1 - h)  # (the prior's [L]: no trace here)
        prefetch_copies = 0.0
        # No trace, no predicted saving from prefetch: off where it costs the host (a GPU's generate path,
        # generate_prefetch_layer_ms per layer); on elsewhere (the static path's lookahead runs in its step).
        cand.prefetch = not (path == "generate" and profile.kind != "cpu")
        cand.hit_rates = dict(global_pool_prior=h)
    looped_experts, looped = loop_experts(distinct, slots, None, model)
    cand.predicted = _times(model, profile, dtype, path, complete, miss_ms, decode_misses, prefill_misses,
                            prefetch_copies if cand.prefetch else 0.0, prompt, looped_experts, read,
                            prefetch=cand.prefetch and not complete)
    # (layers a prefill loops: RequestStats.waves counts them per request, eval/validate_plan.py compares)
    cand.predicted["prefill_looped_layers"] = looped
    return cand


_SIMULATORS: list = []  # (trace, model, simulator), most recent last: replays are memoised across plans


def _simulator(trace, model: ModelInfo) -> "_Simulator":
    """The replays of `trace` for `model`, shared by every plan made from that trace in this process (a
    replay depends on the trace, policy, slots, prefetch and quotas, not on the device: planning one
    model for several profiles and budgets replays each setting once)."""
    for t, m, sim in _SIMULATORS:
        if t is trace and m == model:
            return sim
    sim = _Simulator(trace, model)
    _SIMULATORS.append((trace, model, sim))
    del _SIMULATORS[:-4]
    return sim


# The requests a replay leaves out before it counts: a running engine's first requests fill its cache.
# eval/validate_plan.py warms each engine with as many before it times one.
WARMUP_REQUESTS = 2


class _Simulator:
    """Replays of one trace, memoised: misses per decode token and per request's prefill, in a warm engine:
    the trace's first WARMUP_REQUESTS requests fill the empty cache and are not counted (simulate's
    measure_from), as a running engine's earlier requests have filled it (eval/validate_plan.py times
    requests after as many warm-ups). A trace of fewer requests leaves out its first (one of two) or none
    (one alone).
    Counting the first overstated the prefill misses of a short trace: the bench model's 8-request trace
    predicted 80-89 prefill misses per request at 40-47% budgets, where the engine missed 10-40 after its
    warm-ups (session 6). Near a full budget one request does not fill the cache either: with 721 of 1,536
    slots the engine's third to tenth requests missed 46, 31, 21, 10, 13, 10, 5 and 7 experts (session 12),
    and counting from the trace's second request (the replay put about 72 misses on it) gave 17.5 on each
    where the timed requests' median was 11.5. A long trace (the bundled model's 9,673 requests) hardly moves."""

    def __init__(self, trace, model: ModelInfo):
        # replayed as the planned engine prefetches: in decode steps only (it writes no prefetch_prefill)
        self.trace, self.model = trace.decode_predictions_only(), model
        L = trace.meta.num_layers
        self.measure_from = min(WARMUP_REQUESTS, max(0, trace.num_requests - 1))
        self.counted_requests = trace.num_requests - self.measure_from
        decode_groups = (trace.group_step > 0) & (trace.group_request >= self.measure_from)
        self.decode_tokens = max(1, int(decode_groups.sum()) // L)
        self._memo = {}
        # Distinct experts per layer of each request's prefill (step 0), [requests, L]: every request,
        # the first too (distinct experts depend on the routing alone, not on what the cache holds).
        by_request = np.zeros((trace.num_requests, L))
        for g in np.flatnonzero(trace.group_step == 0):
            lo, hi = trace.group_offsets[g], trace.group_offsets[g + 1]
            by_request[trace.group_request[g], trace.group_layer[g]] = len(np.unique(trace.experts[lo:hi]))
        self.prefill_distinct_by_request = by_request

    def run(self, policy: str, slots: int, prefetch: str, plan=None) -> dict:
        from ..offload.simulate import simulate

        key = (policy, slots, prefetch, None if plan is None else tuple(plan.quota))
        if key not in self._memo:
            r = simulate(self.trace, policy, slots, prefetch, slot_plan=plan, measure_from=self.measure_from)
            self._memo[key] = dict(
                decode_misses_per_token=r.decode_misses / self.decode_tokens,
                prefill_misses=(r.misses - r.decode_misses) / self.counted_requests,
                decode_prefetch_per_token=r.decode_prefetch_issued / self.decode_tokens, hit_rate=r.hit_rate,
                decode_hit_rate=r.decode_hit_rate, misses_per_layer=r.misses_per_layer, misses=r.misses,
                # per layer, in the units above: decode misses and prefetch copies per decode token (the replayed
                # trace predicts in decode steps only, so every prefetch copy is a decode step's), prefill
                # misses per counted request
                decode_misses_per_layer_per_token=r.decode_misses_per_layer / self.decode_tokens,
                decode_prefetch_per_layer_per_token=r.prefetch_issued / self.decode_tokens,
                prefill_misses_per_layer=(r.misses_per_layer - r.decode_misses_per_layer) / self.counted_requests)
        return self._memo[key]


def _gb(n) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= 0.1 * GB else f"{n / 1e6:.1f} MB"
