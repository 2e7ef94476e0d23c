"""Replay a routing trace through the expert cache under a policy, a budget and a prefetch setting.

The replay follows the live engine (offload/experts_op.py run_layer + offload/cache.py) call by call:
  * a group (one layer call) needs the distinct experts its tokens routed to, in ascending id order;
    they load in waves of at most `wave_size` experts (all slots, or the layer's quota under a
    SlotPlan). Each wave is one `acquire`: the clock advances by 1; resident experts are hits and
    protected; each missing one is one record copy into `policy.victim(mask, layer)`, where mask =
    `evictable_mask(plan, ...)` over slots neither protected nor prefetch-pinned (if that is empty,
    prefetch pins yield: a demand load outranks them), then `on_insert`; finally every expert of the
    wave gets `on_access` with its visual / text token counts;
  * after the group: prefetch pins held for its layer (or an earlier one) are released;
  * prefetch: before a group (i.e. right after the previous layer ran, as the engine issues it), the
    experts predicted for it are pinned if resident, and up to `prefetch_limit` missing ones are
    loaded (`victim` + `on_insert` at the current clock, no `on_access`) into slots that are neither
    protected nor pinned; it stops when there is none. A prefetched expert is "used" at its first
    demand hit and "wasted" if evicted before one (issued - used - wasted are still unused at the end);
  * `policy.reset_request()` at the start of every request; all pins drop at the start of every step.
`simulate` runs this in numba with the policies' twins; `replay_reference` runs it in plain Python on
the policy classes the live cache uses. Both give identical counts (tests/test_trace_sim.py, which
also checks them against the live ExpertCache), which is what makes sweep results transfer.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from .policies import POLICIES, SlotPlan, evictable_mask, make_policy
from .policies.base import on_access_jit, on_insert_jit, reset_request_jit, victim_jit
from .policies.slot_plan import evictable_mask_jit
from .trace import Trace

PINNED_GBPS = 54.0  # H100 PCIe Gen5 x16 host->GPU from pinned memory, measured (MISSION.md section 4)
COPY_OVERHEAD_S = 7e-6  # fixed cost of one extra copy, measured there too
PREFETCH_MODES = ("none", "trace", "oracle")  # oracle: a perfect next-layer predictor (layers >= 1)


@dataclass
class SimResult:
    policy: str
    budget_slots: int
    prefetch: str
    slot_plan: str  # "global" or the quotas
    hits_per_layer: np.ndarray
    misses_per_layer: np.ndarray
    decode_hits: int  # steps > 0 only: what decode tokens/s depends on
    decode_misses: int
    prefetch_issued: np.ndarray  # per layer: copies a prefetch made
    prefetch_used: np.ndarray  # ...that a demand later hit
    prefetch_wasted: np.ndarray  # ...evicted before any demand hit
    waves: int  # layer calls that needed more distinct experts than one wave holds
    expert_bytes: int
    link_gbps: float = PINNED_GBPS
    copy_overhead_s: float = COPY_OVERHEAD_S
    seconds: float = 0.0  # wall time of the replay
    extra: dict = field(default_factory=dict)

    @property
    def hits(self) -> int:
        return int(self.hits_per_layer.sum())

    @property
    def misses(self) -> int:
        return int(self.misses_per_layer.sum())

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 1.0

    @property
    def decode_hit_rate(self) -> float:
        total = self.decode_hits + self.decode_misses
        return self.decode_hits / total if total else 1.0

    @property
    def copies(self) -> int:
        return self.misses + int(self.prefetch_issued.sum())

    @property
    def bytes_moved(self) -> int:
        return self.copies * self.expert_bytes

    @property
    def copy_seconds(self) -> float:
        return self.expert_bytes / (self.link_gbps * 1e9) + self.copy_overhead_s

    @property
    def predicted_link_time_s(self) -> float:
        """Time the host->GPU link is busy: every demand and prefetch copy."""
        return self.copies * self.copy_seconds

    @property
    def demand_link_time_s(self) -> float:
        """Link time of demand misses alone: the stall if prefetches hide completely under compute."""
        return self.misses * self.copy_seconds

    def to_dict(self) -> dict:
        return dict(
            policy=self.policy, budget_slots=self.budget_slots, prefetch=self.prefetch, slot_plan=self.slot_plan,
            hits=self.hits, misses=self.misses, hit_rate=self.hit_rate, decode_hit_rate=self.decode_hit_rate,
            bytes_moved=self.bytes_moved, predicted_link_time_s=self.predicted_link_time_s,
            demand_link_time_s=self.demand_link_time_s, hits_per_layer=self.hits_per_layer.tolist(),
            misses_per_layer=self.misses_per_layer.tolist(), prefetch_issued=int(self.prefetch_issued.sum()),
            prefetch_used=int(self.prefetch_used.sum()), prefetch_wasted=int(self.prefetch_wasted.sum()),
            waves=self.waves, seconds=self.seconds, **self.extra,
        )


def simulate(trace: Trace, policy: str = "lru", budget_slots: int = 8, prefetch="none",
             slot_plan: SlotPlan | str | None = None, prefetch_limit: int = 0, link_gbps: float = PINNED_GBPS,
             expert_bytes: int | None = None, copy_overhead_s: float = COPY_OVERHEAD_S,
             policy_options: dict | None = None) -> SimResult:
    """Replay `trace` in numba. prefetch: "none" (or False), "trace" (recorded predictions), "oracle".
    slot_plan: None (one global pool), "uniform", or a SlotPlan. prefetch_limit: copies per prefetch
    call, 0 = no limit (the engine's `prefetch_limit`)."""
    meta = trace.meta
    plan = _resolve_plan(slot_plan, budget_slots, meta.num_layers)
    mode = _prefetch_mode(prefetch, trace)
    pol = make_policy(policy, budget_slots, meta.num_layers, meta.num_experts, **(policy_options or {}))
    demand = trace.demand_sets()
    pred_offsets, pred_experts = _predictions(trace, mode)
    quota = plan.quota if plan is not None else np.zeros(0, np.int64)
    limit = prefetch_limit if prefetch_limit > 0 else meta.num_experts
    start = time.perf_counter()
    work = _workspace(budget_slots, meta.num_layers, meta.num_experts)
    waves = _replay(pol.jit_state(), trace.group_request, trace.group_step, trace.group_layer, demand.offsets,
                    demand.experts, demand.n_visual, demand.n_text, pred_offsets, pred_experts, limit, quota, *work)
    hits, misses, pf = work[-3:]
    seconds = time.perf_counter() - start
    return _result(policy, budget_slots, mode, plan, hits, misses, pf, waves, trace, expert_bytes, link_gbps,
                   copy_overhead_s, seconds)


def sweep(trace: Trace, policies=None, budgets=None, prefetch="none", slot_plan=None, threads: int | None = None,
          **options) -> list[SimResult]:
    """`simulate` for every (policy, budget), in parallel threads (the kernel releases the GIL).
    Default: every registered policy; budgets 10%, 20%, ..., 100% of all experts."""
    policies = list(POLICIES) if policies is None else list(policies)
    budgets = default_budgets(trace) if budgets is None else budgets
    configs = [(p, int(b)) for p in policies for b in budgets]
    trace.demand_sets()  # build the shared inputs once, before the threads start
    run = lambda config: simulate(trace, config[0], config[1], prefetch, slot_plan, **options)  # noqa: E731
    for name in dict.fromkeys(policies):  # compile (or load) each policy's kernel once, serially
        run((name, configs[0][1]))
    with ThreadPoolExecutor(max_workers=threads or os.cpu_count()) as pool:
        return list(pool.map(run, configs))


def default_budgets(trace: Trace, count: int = 10) -> list[int]:
    total = trace.meta.num_layers * trace.meta.num_experts
    floor = max(trace.meta.num_layers, trace.meta.top_k)  # a uniform plan needs one slot per layer
    return sorted({max(floor, int(round(total * f))) for f in np.linspace(1 / count, 1.0, count)})


def results_table(results: list[SimResult], metric: str = "hit_rate", fmt: str = "{:.1%}") -> str:
    """Markdown: one row per budget, one column per policy."""
    policies = list(dict.fromkeys(r.policy for r in results))
    budgets = sorted({r.budget_slots for r in results})
    cell = {(r.policy, r.budget_slots): getattr(r, metric) for r in results}
    lines = ["| slots | " + " | ".join(policies) + " |", "|---:|" + "---:|" * len(policies)]
    for b in budgets:
        values = [fmt.format(cell[(p, b)]) if (p, b) in cell else "" for p in policies]
        lines.append(f"| {b} | " + " | ".join(values) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- plain-Python reference
class ReferenceCache:
    """ExpertCache's host-side bookkeeping (acquire / prefetch / unpin_through) without tensors, plus
    slot plans. Slow; it is the executable statement of the semantics the numba kernel reproduces."""

    def __init__(self, policy, num_slots: int, num_layers: int, num_experts: int, plan: SlotPlan | None):
        self.policy, self.num_slots, self.plan = policy, num_slots, plan
        self.host_table = np.full((num_layers, num_experts), -1, np.int64)
        self.slot_owner = np.full((num_slots, 2), -1, np.int64)
        self.pinned_for = np.full(num_slots, -1, np.int64)  # layer a prefetched slot waits for
        self.prefetched_unused = np.zeros(num_slots, bool)
        self.clock = 0
        self.hits = np.zeros((2, num_layers), np.int64)  # [prefill / decode, layer]
        self.misses = np.zeros((2, num_layers), np.int64)
        self.prefetch_counts = np.zeros((3, num_layers), np.int64)  # issued, used, wasted

    def wave_size(self, layer: int) -> int:
        return self.num_slots if self.plan is None else self.plan.wave_size(layer, self.num_slots)

    def acquire(self, layer, experts, n_visual, n_text, phase):
        self.clock += 1
        slots = self.host_table[layer, experts].copy()
        protected = np.zeros(self.num_slots, bool)
        protected[slots[slots >= 0]] = True
        self.hits[phase, layer] += int((slots >= 0).sum())
        self.misses[phase, layer] += int((slots < 0).sum())
        for i in np.flatnonzero(slots < 0):
            mask = evictable_mask(self.plan, self.slot_owner[:, 0], layer, protected | (self.pinned_for >= 0))
            if not mask.any():  # a demand load outranks any prefetch pin
                mask = evictable_mask(self.plan, self.slot_owner[:, 0], layer, protected)
            slots[i] = self._fill(layer, int(experts[i]), mask)
            protected[slots[i]] = True
        used = slots[self.prefetched_unused[slots]]
        self.prefetch_counts[1, layer] += len(used)
        self.prefetched_unused[used] = False
        for i, expert in enumerate(experts):
            self.policy.on_access(int(slots[i]), layer, int(expert), self.clock, int(n_visual[i]), int(n_text[i]))

    def prefetch(self, layer, experts, limit):
        protected = np.zeros(self.num_slots, bool)
        resident = self.host_table[layer, experts]
        held = resident[resident >= 0]
        protected[held] = True
        self.pinned_for[held] = np.maximum(self.pinned_for[held], layer)
        for expert in experts[resident < 0][:limit]:
            mask = evictable_mask(self.plan, self.slot_owner[:, 0], layer, protected | (self.pinned_for >= 0))
            if not mask.any():
                break  # every slot is in use or pinned: demand keeps priority
            slot = self._fill(layer, int(expert), mask)
            self.prefetched_unused[slot] = True
            self.pinned_for[slot] = layer
            protected[slot] = True
            self.prefetch_counts[0, layer] += 1

    def unpin_through(self, layer):
        self.pinned_for[self.pinned_for <= layer] = -1

    def _fill(self, layer, expert, mask) -> int:
        slot = self.policy.victim(mask, layer)
        old_layer, old_expert = self.slot_owner[slot]
        if self.prefetched_unused[slot]:
            self.prefetch_counts[2, old_layer] += 1
            self.prefetched_unused[slot] = False
        self.pinned_for[slot] = -1
        if old_layer >= 0:
            self.host_table[old_layer, old_expert] = -1
        self.host_table[layer, expert] = slot
        self.slot_owner[slot] = (layer, expert)
        self.policy.on_insert(slot, layer, expert, self.clock)
        return slot


def replay_reference(trace: Trace, policy: str = "lru", budget_slots: int = 8, prefetch="none",
                     slot_plan: SlotPlan | str | None = None, prefetch_limit: int = 0,
                     policy_options: dict | None = None) -> SimResult:
    """`simulate` in plain Python on the policy classes (slow: for tests and reading)."""
    meta = trace.meta
    plan = _resolve_plan(slot_plan, budget_slots, meta.num_layers)
    mode = _prefetch_mode(prefetch, trace)
    pol = make_policy(policy, budget_slots, meta.num_layers, meta.num_experts, **(policy_options or {}))
    cache = ReferenceCache(pol, budget_slots, meta.num_layers, meta.num_experts, plan)
    demand = trace.demand_sets()
    pred_offsets, pred_experts = _predictions(trace, mode)
    limit = prefetch_limit if prefetch_limit > 0 else meta.num_experts
    waves, request, step = 0, -1, -1
    start = time.perf_counter()
    for g in range(trace.num_groups):
        layer, phase = int(trace.group_layer[g]), int(trace.group_step[g] > 0)
        if trace.group_request[g] != request:
            request, step = trace.group_request[g], -1
            pol.reset_request()
        if trace.group_step[g] != step:
            step = trace.group_step[g]
            cache.unpin_through(meta.num_layers)
        if len(pred_offsets):
            cache.prefetch(layer, pred_experts[pred_offsets[g]:pred_offsets[g + 1]], limit)
        lo, hi = demand.offsets[g], demand.offsets[g + 1]
        wave = cache.wave_size(layer)
        waves += hi - lo > wave
        for w in range(lo, hi, wave):
            part = slice(w, min(w + wave, hi))
            cache.acquire(layer, demand.experts[part], demand.n_visual[part], demand.n_text[part], phase)
        cache.unpin_through(layer)
    seconds = time.perf_counter() - start
    return _result(policy, budget_slots, mode, plan, cache.hits, cache.misses, cache.prefetch_counts, waves, trace,
                   None, PINNED_GBPS, COPY_OVERHEAD_S, seconds)


# ------------------------------------------------------------------------------------------ helpers
def _resolve_plan(slot_plan, budget_slots: int, num_layers: int) -> SlotPlan | None:
    if budget_slots < 1:
        raise ValueError(f"budget_slots must be at least 1, got {budget_slots}")
    if slot_plan is None or slot_plan == "global":
        return None
    if slot_plan == "uniform":
        return SlotPlan.uniform(budget_slots, num_layers)
    if isinstance(slot_plan, SlotPlan):
        if len(slot_plan.quota) != num_layers:
            raise ValueError(f"slot plan has {len(slot_plan.quota)} quotas for {num_layers} layers")
        return slot_plan
    raise ValueError(f"slot_plan must be None, 'global', 'uniform' or a SlotPlan, got {slot_plan!r}")


def _prefetch_mode(prefetch, trace: Trace) -> str:
    mode = "none" if prefetch in (None, False) else "trace" if prefetch is True else str(prefetch)
    if mode not in PREFETCH_MODES:
        raise ValueError(f"prefetch must be one of {PREFETCH_MODES}, got {prefetch!r}")
    if mode == "trace" and not trace.has_predictions:
        raise ValueError("prefetch='trace' needs a trace recorded with predictions")
    return mode


def _predictions(trace: Trace, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [G+1], experts) of the set to prefetch before each group; empty arrays for no prefetch."""
    if mode == "trace":
        return trace.predicted_offsets, trace.predicted
    if mode == "oracle":  # what a perfect predictor would give: the engine predicts layer l+1 from layer l
        demand = trace.demand_sets()
        sizes = np.diff(demand.offsets) * (trace.group_layer > 0)
        keep = np.repeat(trace.group_layer > 0, np.diff(demand.offsets))
        offsets = np.zeros(trace.num_groups + 1, np.int64)
        np.cumsum(sizes, out=offsets[1:])
        return offsets, demand.experts[keep]
    return np.zeros(0, np.int64), np.zeros(0, np.int16)


def _result(policy, budget_slots, mode, plan, hits, misses, pf, waves, trace, expert_bytes, link_gbps,
            copy_overhead_s, seconds) -> SimResult:
    return SimResult(
        policy=policy, budget_slots=budget_slots, prefetch=mode,
        slot_plan="global" if plan is None else ",".join(map(str, plan.quota)),
        hits_per_layer=hits.sum(0), misses_per_layer=misses.sum(0),
        decode_hits=int(hits[1].sum()), decode_misses=int(misses[1].sum()),
        prefetch_issued=pf[0].copy(), prefetch_used=pf[1].copy(), prefetch_wasted=pf[2].copy(), waves=int(waves),
        expert_bytes=int(expert_bytes if expert_bytes is not None else trace.meta.expert_bytes),
        link_gbps=link_gbps, copy_overhead_s=copy_overhead_s, seconds=seconds,
    )


def _workspace(num_slots: int, num_layers: int, num_experts: int) -> tuple:
    """Fresh work and output arrays for `_replay`, in its argument order."""
    return (np.full((num_layers, num_experts), -1, np.int64),  # table: (layer, expert) -> slot
            np.full(num_slots, -1, np.int64), np.full(num_slots, -1, np.int64),  # owner_layer, owner_expert
            np.full(num_slots, -1, np.int64),  # pinned_for
            np.zeros(num_slots, np.bool_), np.zeros(num_slots, np.bool_), np.zeros(num_slots, np.bool_),
            np.zeros(num_slots, np.bool_), np.empty(num_slots, np.int64),  # protected .. wave_slots
            np.zeros((2, num_layers), np.int64), np.zeros((2, num_layers), np.int64),  # hits, misses
            np.zeros((3, num_layers), np.int64))  # prefetch issued, used, wasted


# ------------------------------------------------------------------------------------- numba kernel
@njit(cache=True, inline="always")
def _fill(st, table, owner_layer, owner_expert, pinned_for, prefetched_unused, wasted, evictable, layer, expert,
          now):
    """ReferenceCache._fill: evict the policy's victim among `evictable`, install (layer, expert)."""
    slot = victim_jit(st, evictable, layer)
    old_layer = owner_layer[slot]
    if prefetched_unused[slot]:
        wasted[old_layer] += 1
        prefetched_unused[slot] = False
    pinned_for[slot] = -1
    if old_layer >= 0:
        table[old_layer, owner_expert[slot]] = -1
    table[layer, expert] = slot
    owner_layer[slot] = layer
    owner_expert[slot] = expert
    on_insert_jit(st, slot, layer, expert, now)
    return slot


@njit(cache=True, inline="always")
def _mask(quota, owner_layer, layer, protected, pinned_for, respect_pins, blocked, evictable):
    """evictable_mask over slots neither protected nor (if respect_pins) pinned; returns whether any."""
    for s in range(protected.shape[0]):
        blocked[s] = protected[s] or (respect_pins and pinned_for[s] >= 0)
    return evictable_mask_jit(quota, owner_layer, layer, blocked, evictable)


# _nrt=False: no reference counting. The kernel allocates nothing (the caller passes every array);
# with it, every access to an array of the policy state cost two atomic operations, which was most of
# the replay time.
@njit(cache=True, nogil=True, _nrt=False)
def _replay(st, group_request, group_step, group_layer, set_offsets, set_experts, set_visual, set_text,
            pred_offsets, pred_experts, prefetch_limit, quota, table, owner_layer, owner_expert, pinned_for,
            protected, blocked, evictable, prefetched_unused, wave_slots, hits, misses, pf):
    """ReferenceCache driven as replay_reference does; numba compiles one kernel per policy (per type
    of `st`). Returns the number of layer calls that needed several waves."""
    num_slots = protected.shape[0]
    wasted = pf[2]
    waves = 0
    clock = 0
    request = -1
    step = -1
    any_pins = False
    use_prefetch = pred_offsets.shape[0] > 0
    # `protected` is all False between calls: each section clears exactly the slots it set, so a
    # layer call costs O(its experts) plus O(slots) per miss (the victim scan), not O(slots).
    for g in range(group_layer.shape[0]):
        layer = group_layer[g]
        phase = 1 if group_step[g] > 0 else 0
        if group_request[g] != request:
            request = group_request[g]
            step = -1
            reset_request_jit(st)
        if group_step[g] != step:  # a new forward step: every prefetch pin drops
            step = group_step[g]
            if any_pins:
                pinned_for[:] = -1
                any_pins = False
        if use_prefetch and pred_offsets[g + 1] > pred_offsets[g]:
            any_pins = True
            for i in range(pred_offsets[g], pred_offsets[g + 1]):
                slot = table[layer, pred_experts[i]]
                if slot >= 0:
                    protected[slot] = True
                    pinned_for[slot] = max(pinned_for[slot], layer)
            issued = 0
            for i in range(pred_offsets[g], pred_offsets[g + 1]):
                expert = pred_experts[i]
                if table[layer, expert] >= 0:  # resident (loading others cannot change that: distinct ids)
                    continue
                if issued >= prefetch_limit:
                    break
                if not _mask(quota, owner_layer, layer, protected, pinned_for, True, blocked, evictable):
                    break
                slot = _fill(st, table, owner_layer, owner_expert, pinned_for, prefetched_unused, wasted, evictable,
                             layer, expert, clock)
                prefetched_unused[slot] = True
                pinned_for[slot] = layer
                protected[slot] = True
                issued += 1
            pf[0, layer] += issued
            for i in range(pred_offsets[g], pred_offsets[g + 1]):
                slot = table[layer, pred_experts[i]]
                if slot >= 0:
                    protected[slot] = False
        lo = set_offsets[g]
        hi = set_offsets[g + 1]
        wave = num_slots if quota.shape[0] == 0 else min(num_slots, quota[layer])
        if hi - lo > wave:
            waves += 1
        for start in range(lo, hi, wave):
            stop = min(start + wave, hi)
            clock += 1
            for i in range(start, stop):
                slot = table[layer, set_experts[i]]
                wave_slots[i - start] = slot
                if slot >= 0:
                    protected[slot] = True
                    hits[phase, layer] += 1
            for i in range(start, stop):
                if wave_slots[i - start] >= 0:
                    continue
                if not _mask(quota, owner_layer, layer, protected, pinned_for, True, blocked, evictable):
                    if not _mask(quota, owner_layer, layer, protected, pinned_for, False, blocked, evictable):
                        raise RuntimeError("no evictable slot for a demand load")
                slot = _fill(st, table, owner_layer, owner_expert, pinned_for, prefetched_unused, wasted, evictable,
                             layer, set_experts[i], clock)
                protected[slot] = True
                wave_slots[i - start] = slot
                misses[phase, layer] += 1
            for i in range(start, stop):
                slot = wave_slots[i - start]
                protected[slot] = False
                if prefetched_unused[slot]:
                    prefetched_unused[slot] = False
                    pf[1, layer] += 1
                on_access_jit(st, slot, layer, set_experts[i], clock, set_visual[i], set_text[i])
        if any_pins:  # unpin_through(layer)
            any_pins = False
            for s in range(num_slots):
                if pinned_for[s] <= layer:
                    pinned_for[s] = -1
                any_pins |= pinned_for[s] >= 0
    return waves


def _drop_stale_kernels() -> None:
    """numba's cache only notices edits to a function's own file, but `_replay` inlines the policy
    twins from policies/*.py: forget its cached builds whenever any of those files changes."""
    import hashlib
    from pathlib import Path

    sources = sorted(Path(__file__).parent.joinpath("policies").glob("*.py"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    cache = _replay._cache
    if cache.cache_path is None:  # caching disabled
        return
    stamp = Path(cache.cache_path) / "simulate._replay.policies.sha256"
    try:
        if stamp.exists() and stamp.read_text() == digest:
            return
        cache.flush()  # empties the index, so every specialisation recompiles (and is cached again)
        stamp.write_text(digest)
    except OSError:  # read-only cache location: numba then compiles in memory anyway
        pass


_drop_stale_kernels()
