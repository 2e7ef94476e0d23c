"""Replay a routing trace through the expert cache under a policy, a budget and a prefetch setting.

The replay is a driver of the cache's state machine (offload/core.py, whose docstring is the
specification): the same numba transitions the live host cache (offload/cache.py) runs, called in
the order the engine calls them:
  * `begin_request` at the start of every request, `begin_step` (all pins drop) at every forward step;
  * prefetch (trace predictions, or an oracle): before a group, i.e. right after the previous layer
    ran (running = layer - 1), up to `prefetch_limit` copies; under "auto" only for the layers that
    `prefetch: auto`'s rule keeps on (offload/autoprefetch.py: the engine's own decision code, `tick`
    at every decode step, on the replayed cache's prefetch counters);
  * a group (one layer call) needs the distinct experts its tokens routed to, in ascending id order;
    they load in waves of at most `wave_size` experts (all slots, or the layer's quota under a
    SlotPlan), each wave one `demand` with its visual / text token counts.
tests/test_cache_core.py checks this replay against the live ExpertCache and the device reference,
which is what makes sweep results transfer.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numba import njit

from . import autoprefetch, core
from .policies import POLICIES, SlotPlan, make_policy
from .trace import Trace

PINNED_GBPS = 54.0  # H100 PCIe Gen5 x16 host->GPU from pinned memory, measured (MISSION.md section 4)
COPY_OVERHEAD_S = 7e-6  # fixed cost of one extra copy, measured there too
PREFETCH_MODES = ("none", "trace", "oracle", "auto")  # oracle: a perfect next-layer predictor (layers >= 1);
# auto: the trace's predictions where prefetch: auto's rule keeps the layer on


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
    group_tables: np.ndarray | None = None  # [G, L, E] slot table after each group (record_groups=True)
    group_misses: np.ndarray | None = None  # [G]
    predictions: int = 0  # decode-step predictions made (one per layer call prefetched for)
    predict_s: float = autoprefetch.PREDICT_S_PRIOR
    prefetch_on: list | None = None  # auto: per layer, the share of decode steps its prefetch was on
    auto_state: np.ndarray | None = None  # auto: the controller's state at the end (autoprefetch.ROWS x L)
    # of prefetch_issued, the copies made in decode steps (a trace's prefill has predictions only when
    # recorded with prefetch_prefill: the engine's default prefetches in decode steps alone)
    decode_prefetch_issued: int = 0
    decode_misses_per_layer: np.ndarray | None = None  # of misses_per_layer, the decode steps' (steps > 0)

    @property
    def decode_overhead_s(self) -> float:
        """The time model the prefetch settings are compared by: what the cache adds to decoding, with
        prefetches hidden under compute when right. Demand misses of decode steps, each a copy on the
        compute stream's path; prefetch copies never used, each a copy that took the link (and a slot);
        one prediction launch per layer call predicted for."""
        wrong = int(self.prefetch_issued.sum() - self.prefetch_used.sum())
        return (self.decode_misses + wrong) * self.copy_seconds + self.predictions * self.predict_s

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
            decode_prefetch_issued=self.decode_prefetch_issued, waves=self.waves, seconds=self.seconds, predictions=self.predictions,
            decode_overhead_s=self.decode_overhead_s, prefetch_on=self.prefetch_on, **self.extra,
        )


def simulate(trace: Trace, policy: str = "lru", budget_slots: int = 8, prefetch="none",
             slot_plan: SlotPlan | str | None = None, prefetch_limit: int = 0, link_gbps: float = PINNED_GBPS,
             expert_bytes: int | None = None, copy_overhead_s: float = COPY_OVERHEAD_S,
             policy_options: dict | None = None, record_groups: bool = False,
             predict_s: float = autoprefetch.PREDICT_S_PRIOR, measure_from: int = 0) -> SimResult:
    """Replay `trace` in numba. prefetch: "none" (or False), "trace" (or True: recorded predictions), "oracle",
    "auto" (recorded predictions where prefetch: auto's rule keeps the layer on, weighing one record's copy
    time at `link_gbps` and `predict_s` per prediction).
    slot_plan: None (one global pool), "uniform", or a SlotPlan. prefetch_limit: copies per prefetch
    call, 0 = no limit (the engine's `prefetch_limit`). record_groups: keep the slot table after every
    group and the group's misses (`group_tables`, `group_misses`). measure_from: count (hits, misses,
    prefetches, predictions, auto's share of steps on) only from this request on; the ones before warm up
    the cache and auto's counts, as a server's earlier requests would (e.g. the trace's first half)."""
    meta = trace.meta
    plan = _resolve_plan(slot_plan, budget_slots, meta.num_layers)
    mode = _prefetch_mode(prefetch, trace)
    state = make_policy(policy, **(policy_options or {})).new_state(budget_slots, meta.num_layers, meta.num_experts)
    demand = trace.demand_sets()
    pred_offsets, pred_experts = _predictions(trace, mode)
    quota = plan.quota if plan is not None else core.NO_PLAN
    limit = prefetch_limit if prefetch_limit > 0 else meta.num_experts
    start = time.perf_counter()
    hits, misses = np.zeros((2, meta.num_layers), np.int64), np.zeros((2, meta.num_layers), np.int64)
    scratch = np.empty(budget_slots, np.int64), np.empty(max(budget_slots, meta.num_experts), np.int64)
    G = trace.num_groups if record_groups else 0
    tables, group_misses = np.zeros((G, meta.num_layers, meta.num_experts), np.int32), np.zeros(G, np.int64)
    record = int(expert_bytes if expert_bytes is not None else meta.expert_bytes)
    auto_params = autoprefetch.new_params(record / (link_gbps * 1e9) + copy_overhead_s, predict_s)
    auto_state = autoprefetch.new_state(meta.num_layers if mode == "auto" else 0)
    counts = np.zeros(3, np.int64)  # decode steps, predictions, decode steps' prefetch copies
    true_pos = np.zeros(meta.num_layers, np.int64)  # decode steps' predicted experts that were then needed
    if not 0 <= measure_from < max(1, trace.num_requests):
        raise ValueError(f"measure_from must be a request index below {trace.num_requests}, got {measure_from}")
    # What was counted before request `measure_from`: hits, misses [2, L] each, pf [3, L], counts, on-steps.
    before = (np.zeros_like(hits), np.zeros_like(misses), np.zeros((3, meta.num_layers), np.int64),
              np.zeros(3, np.int64), np.zeros(auto_state.shape[1]))
    waves = _replay(state, trace.group_request, trace.group_step, trace.group_layer, demand.offsets,
                    demand.experts.astype(np.int64), demand.n_visual.astype(np.int64), demand.n_text.astype(np.int64),
                    pred_offsets, pred_experts.astype(np.int64), limit, quota, *scratch, hits, misses, tables,
                    group_misses, auto_state, auto_params, counts, true_pos, measure_from, *before)
    hits -= before[0]
    misses -= before[1]
    pf = state.pf - before[2]
    counts -= before[3]
    auto_state[autoprefetch.ON_STEPS] -= before[4]
    seconds = time.perf_counter() - start
    result = _result(policy, budget_slots, mode, plan, hits, misses, pf, waves, trace, expert_bytes, link_gbps,
                     copy_overhead_s, seconds, int(counts[2]))
    result.predictions, result.predict_s = int(counts[1]), predict_s
    if mode == "auto":
        result.auto_state = auto_state
    if mode == "auto" and counts[0]:
        result.prefetch_on = [None] + [round(float(v), 4) for v in auto_state[autoprefetch.ON_STEPS, 1:] / counts[0]]
    if record_groups:
        result.group_tables, result.group_misses = tables, group_misses
    return result


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
    if mode in ("trace", "auto") and not trace.has_predictions:
        raise ValueError(f"prefetch={mode!r} needs a trace recorded with predictions")
    return mode


def _predictions(trace: Trace, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(offsets [G+1], experts) of the set to prefetch before each group; empty arrays for no prefetch."""
    if mode in ("trace", "auto"):
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
            copy_overhead_s, seconds, decode_prefetch_issued) -> SimResult:
    return SimResult(
        policy=policy, budget_slots=budget_slots, prefetch=mode,
        slot_plan="global" if plan is None else ",".join(map(str, plan.quota)),
        hits_per_layer=hits.sum(0), misses_per_layer=misses.sum(0),
        decode_hits=int(hits[1].sum()), decode_misses=int(misses[1].sum()), decode_misses_per_layer=misses[1].copy(),
        prefetch_issued=pf[0].copy(), prefetch_used=pf[1].copy(), prefetch_wasted=pf[2].copy(),
        decode_prefetch_issued=decode_prefetch_issued, waves=int(waves), expert_bytes=int(expert_bytes if expert_bytes is not None else trace.meta.expert_bytes),
        link_gbps=link_gbps, copy_overhead_s=copy_overhead_s, seconds=seconds,
    )


# ------------------------------------------------------------------------------------- numba driver
# _nrt=False: no reference counting (the driver allocates nothing; the caller passes every array).
@njit(cache=True, nogil=True, _nrt=False)
def _replay(st, group_request, group_step, group_layer, set_offsets, set_experts, set_visual, set_text,
            pred_offsets, pred_experts, prefetch_limit, quota, slots, fill, hits, misses, tables, group_misses,
            auto_state, auto_params, counts, true_pos, measure_from, hits0, misses0, pf0, counts0, on0):
    """Drive the core over the trace; hits / misses [2, L] by phase (prefill, decode). With `tables`
    [G, L, E] (else empty), the slot table after every group and its misses are recorded too. With
    `auto_state` [ROWS, L] (else [ROWS, 0]), prefetch: auto decides at every decode step, as the engine
    does, from the replayed cache's counters. counts: (decode steps, predictions, decode steps' prefetch
    copies) are added up. At the start of request `measure_from` the counts so far are copied into hits0,
    misses0, pf0, counts0 and on0 (auto's ON_STEPS row). Returns the number of layer calls that needed
    several waves."""
    record = tables.shape[0] > 0
    num_slots = st.owner.shape[0]
    waves = 0
    request = -1
    step = -1
    use_prefetch = pred_offsets.shape[0] > 0
    auto = auto_state.shape[1] > 0
    for g in range(group_layer.shape[0]):
        layer = group_layer[g]
        phase = 1 if group_step[g] > 0 else 0
        if group_request[g] != request:
            request = group_request[g]
            step = -1
            core.begin_request(st)
            if request == measure_from:  # element by element: slice copies would allocate (no NRT here)
                for layer_ in range(hits.shape[1]):
                    for row in range(2):
                        hits0[row, layer_] = hits[row, layer_]
                        misses0[row, layer_] = misses[row, layer_]
                    for row in range(3):
                        pf0[row, layer_] = st.pf[row, layer_]
                for layer_ in range(on0.shape[0]):
                    on0[layer_] = auto_state[autoprefetch.ON_STEPS, layer_]
                counts0[0], counts0[1], counts0[2] = counts[0], counts[1], counts[2]
        if group_step[g] != step:
            step = group_step[g]
            core.begin_step(st)
            if phase == 1:
                counts[0] += 1
                if auto:
                    autoprefetch.tick(auto_state, auto_params, st.pf, misses[1], true_pos, counts[0])
        if use_prefetch and pred_offsets[g + 1] > pred_offsets[g] and \
                (not auto or auto_state[autoprefetch.ON, layer] > 0.5):
            counts[1] += phase
            issued = core.prefetch(st, layer, pred_experts[pred_offsets[g]:pred_offsets[g + 1]], layer - 1,
                                   prefetch_limit, quota, fill)
            counts[2] += phase * issued
            if phase == 1:  # the ledger's true positives: predicted experts the layer call then needed
                i, j = pred_offsets[g], set_offsets[g]
                while i < pred_offsets[g + 1] and j < set_offsets[g + 1]:
                    if pred_experts[i] == set_experts[j]:
                        true_pos[layer] += 1
                        i += 1
                        j += 1
                    elif pred_experts[i] < set_experts[j]:
                        i += 1
                    else:
                        j += 1
        lo = set_offsets[g]
        hi = set_offsets[g + 1]
        wave = num_slots if quota.shape[0] == 0 else min(num_slots, quota[layer])
        if hi - lo > wave:
            waves += 1
        for start in range(lo, hi, wave):
            stop = min(start + wave, hi)
            missed = core.demand(st, layer, set_experts[start:stop], set_visual[start:stop], set_text[start:stop],
                                 quota, slots, fill, False)
            hits[phase, layer] += stop - start - missed
            misses[phase, layer] += missed
            if record:
                group_misses[g] += missed
        if record:
            for layer_ in range(st.table.shape[0]):
                for expert in range(st.table.shape[1]):
                    tables[g, layer_, expert] = st.table[layer_, expert]
    return waves


def _drop_stale_kernels() -> None:
    """numba's cache only notices edits to a function's own file, but `_replay` compiles in the core's
    transitions from core.py and auto's rule from autoprefetch.py: forget its cached builds whenever one of
    those files changes."""
    import hashlib
    from pathlib import Path

    digest = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (core, autoprefetch))).hexdigest()
    cache = _replay._cache
    if cache.cache_path is None:  # caching disabled
        return
    stamp = Path(cache.cache_path) / "simulate._replay.core.sha256"
    try:
        if stamp.exists() and stamp.read_text() == digest:
            return
        cache.flush()  # empties the index, so every specialisation recompiles (and is cached again)
        stamp.write_text(digest)
    except OSError:  # read-only cache location: numba then compiles in memory anyway
        pass


_drop_stale_kernels()
