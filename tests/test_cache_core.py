"""The cache's state machine (offload/core.py) makes the same decisions wherever it runs.

Traces (the demo model's recorded ones, and synthetic ones with heavy eviction and prefetch) are
replayed through the host core as the live ExpertCache drives it, the trace simulator, the torch
device reference (device_core.py) and the fused kernel (Triton: natively on a GPU, in its
interpreter on the CPU), and the slot table and the misses are compared after every layer call,
for every policy, at budgets min / 10% / 50%, prefetch on and off.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vismmoe import ops
from vismmoe.offload import core, device_core
from vismmoe.offload.cache import ExpertCache
from vismmoe.offload.policies import POLICIES, SlotPlan, make_policy
from vismmoe.offload.simulate import simulate
from vismmoe.offload.trace import Trace, load_trace, synthetic_trace

from .conftest import rewrite_predictions

ROOT = Path(__file__).resolve().parents[1]
DEMO_TRACE = ROOT / "eval" / "results" / "easyvqa_test_traces.npz"


def head(trace: Trace, num_requests: int) -> Trace:
    """The trace's first `num_requests` requests."""
    g = int(np.searchsorted(trace.group_request, num_requests))
    rows = int(trace.group_offsets[g])
    extra = {}
    if trace.predicted is not None:
        extra = dict(predicted=trace.predicted[:trace.predicted_offsets[g]],
                     predicted_offsets=trace.predicted_offsets[:g + 1])
    return Trace(trace.experts[:rows], trace.visual[:rows], trace.group_offsets[:g + 1], trace.group_request[:g],
                 trace.group_step[:g], trace.group_layer[:g], trace.request_ids[:num_requests], trace.meta, **extra)


@pytest.fixture(scope="module")
def traces():
    heavy = synthetic_trace(num_requests=4, num_layers=3, num_experts=32, top_k=4, visual_tokens=10, text_tokens=6,
                            decode_steps=12, zipf=0.6, reuse=0.2, predict_accuracy=0.5, seed=5)
    out = {"synthetic": heavy}
    if DEMO_TRACE.exists():
        out["demo"] = head(load_trace(DEMO_TRACE), 8)
    return out


def budgets(trace: Trace) -> list[int]:
    total = trace.meta.num_layers * trace.meta.num_experts
    return [trace.meta.top_k, max(trace.meta.top_k, total // 10), total // 2]


def _stub_store(meta):
    slab = torch.arange(meta.num_layers * meta.num_experts * 2, dtype=torch.float32).reshape(meta.num_layers, -1, 2)
    return SimpleNamespace(
        num_layers=meta.num_layers, num_experts=meta.num_experts, record_numel=2, dtype=torch.float32, record_bytes=8,
        gate_up_numel=1, layout=SimpleNamespace(gate_up_shape=(1, 1), down_shape=(1, 1)), slab=slab,
        record=lambda layer, expert, staging=None: slab[layer, expert])


def replay_live(trace: Trace, policy: str, budget: int, prefetch: bool, quota=None):
    """The live ExpertCache (CPU, 1x1 expert records), driven as the engine and the host path do."""
    meta = trace.meta
    cache = ExpertCache(_stub_store(meta), budget, torch.device("cpu"), policy, slot_plan=quota)
    demand = trace.demand_sets()
    tables, misses = [], []
    request = step = -1
    for g in trace.groups():
        if g.request != request:
            request, step = g.request, -1
            cache.begin_request()
        if g.step != step:
            step = g.step
            cache.begin_step()
        if prefetch and g.predicted is not None:  # issued after the previous layer ran
            cache.prefetch(g.layer, np.sort(g.predicted.astype(np.int64)), meta.num_experts, running=g.layer - 1)
        before = cache.counters.misses.sum()
        lo, hi = demand.offsets[g.index], demand.offsets[g.index + 1]
        wave = cache.wave_size(g.layer)
        for start in range(lo, hi, wave):
            part = slice(start, min(start + wave, hi))
            slots = cache.acquire(g.layer, demand.experts[part].astype(np.int64), demand.n_visual[part],
                                  demand.n_text[part])
            assert (cache.slot_table[g.layer, demand.experts[part].astype(np.int64)].numpy() == slots).all()
        assert (cache.slot_table.numpy() == cache.host_table).all()
        tables.append(cache.host_table.copy())
        misses.append(cache.counters.misses.sum() - before)
    return np.array(tables), np.array(misses), cache


def replay_device(trace: Trace, policy: str, budget: int, prefetch: bool, kernel: bool = False, device="cpu",
                  quota=None):
    """The device path's state machine (torch reference, or the fused kernel), driven call by call."""
    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    host = make_policy(policy).new_state(budget, L, E)
    table = torch.full((L * E + 1,), -1, dtype=torch.int32, device=device)
    st = device_core.DeviceState.empty(budget, L, E, table)
    st.load(host)
    demand = trace.demand_sets()
    rng = np.random.RandomState(0)
    tables, misses = [], []
    request = step = -1
    on = lambda a: torch.from_numpy(np.ascontiguousarray(a).astype(np.int64)).to(device)  # noqa: E731
    q = None if quota is None else on(quota)
    for g in trace.groups():
        if g.request != request:
            request, step = g.request, -1
            st.mix.zero_()
            st.prefetched.zero_()
        if g.step != step:
            step = g.step
            device_core.begin_step(st)
        if prefetch and g.predicted is not None:
            # In a shuffled order with invalid padding, as the static path hands them over.
            pred = g.predicted.astype(np.int64)
            pad = np.setdiff1d(np.arange(E), pred)[:2]
            experts = np.concatenate([pred, pad])
            valid = np.concatenate([np.ones(len(pred), bool), np.zeros(len(pad), bool)])
            order = rng.permutation(len(experts))
            ops.cache_prefetch(st, g.layer, on(experts[order]), torch.from_numpy(valid[order]).to(device), g.layer - 1,
                               torch.tensor(E, device=device), kernel=kernel, quota=q)
        before = int(st.misses.sum())
        lo, hi = demand.offsets[g.index], demand.offsets[g.index + 1]
        wave = budget if quota is None else min(budget, int(quota[g.layer]))
        for start in range(lo, hi, wave):
            part = slice(start, min(start + wave, hi))
            order = rng.permutation(part.stop - part.start)  # any order in, ascending-id decisions out
            experts = demand.experts[part][order]
            slots, fill, src = ops.cache_demand(st, g.layer, on(experts), on(demand.n_visual[part][order]),
                                                on(demand.n_text[part][order]), kernel=kernel, quota=q)
            assert (table[:-1].view(L, E)[g.layer, on(experts)].long() == slots).all()
            assert ((fill < 0) | (fill == slots)).all() and (src == g.layer * E + on(experts)).all()
        tables.append(table[:-1].view(L, E).cpu().numpy().copy())
        misses.append(int(st.misses.sum()) - before)
    return np.array(tables), np.array(misses), st


def assert_same(a, b, what):
    tables_a, misses_a = a[:2]
    tables_b, misses_b = b[:2]
    assert len(misses_a) == len(misses_b)
    bad = np.flatnonzero((tables_a != tables_b).any(axis=(1, 2)) | (misses_a != misses_b))
    assert not len(bad), f"{what}: first difference after layer call {bad[0]}"


def replay_three_ways(trace: Trace, policy: str, budget: int, prefetch: bool, what, quota=None):
    """The trace through the live cache, the simulator and the torch device reference: the tables, the
    misses after every layer call and the counters (hits, misses per layer; prefetch ledger) agree."""
    live = replay_live(trace, policy, budget, prefetch, quota)
    sim = simulate(trace, policy, budget, "trace" if prefetch else "none",
                   slot_plan=None if quota is None else SlotPlan(quota), record_groups=True)
    dev = replay_device(trace, policy, budget, prefetch, quota=quota)
    assert_same(live, (sim.group_tables, sim.group_misses), what)
    assert_same(live, dev, what)
    cache, st = live[2], dev[2]
    assert cache.counters.misses.tolist() == sim.misses_per_layer.tolist() == st.misses.tolist(), what
    assert cache.counters.hits.tolist() == sim.hits_per_layer.tolist() == st.hits.tolist(), what
    assert (st.pf[:, :-1].numpy() == cache.state.pf).all(), what
    return live, sim, dev


CONFIGS = [(name, b, p) for name in ("synthetic", "demo") for b in range(3) for p in (False, True)]


@pytest.mark.parametrize("policy", POLICIES)
def test_host_core_simulator_and_device_reference_decide_alike(traces, policy):
    compared = 0
    for name, b, prefetch in CONFIGS:
        if name not in traces:
            continue
        trace = traces[name]
        budget = budgets(trace)[b]
        what = (name, policy, budget, prefetch)
        live, sim, dev = replay_three_ways(trace, policy, budget, prefetch, what)
        cache, st = live[2], dev[2]
        assert (sim.prefetch_issued.tolist(), sim.prefetch_used.tolist(), sim.prefetch_wasted.tolist()) == \
            tuple(cache.state.pf.tolist()), what
        assert (st.owner[:-1].numpy() == cache.state.owner).all() and np.array_equal(
            st.counts[:, :-1].numpy().reshape(cache.state.counts.shape), cache.state.counts), what
        compared += 1
        if prefetch:
            assert sim.prefetch_issued.sum() > 0, what
        if b == 0:
            assert sim.misses > sim.hits / 4, what  # the smallest budget evicts heavily
    assert compared >= 6


def random_calls(state_factory, policy, steps, seed, S=7, L=4, E=12, k=4, half_life=None, kernel=None,
                 id_rows=False, quota=None, in_place_rate=0.0):
    """Random demand and prefetch calls (any order, random limits, modality counts) through the host
    core and `ops`; every table and every state array compared after each call. `quota`: a slot plan
    (each quota >= k).

    `id_rows`: as the static path calls them: predictions as rows of ids (-1 = none) in a persistent
    [L, depth, k] buffer, copy lists written into persistent rows, and every demand scoring the ledger
    against the rows predicted for its layer (compared with the host path's count of the same sets).

    `in_place_rate`: the share of demand calls whose layer serves misses in place (the zero-copy and CPU
    miss paths: no slot, no eviction), switched per call by a device scalar as the static path does."""
    rng = np.random.RandomState(seed)
    host_quota = core.NO_PLAN if quota is None else np.asarray(quota, np.int64)
    options = {} if half_life is None or policy in ("lru", "lfu") else {"half_life": half_life}
    host = make_policy(policy, **options).new_state(S, L, E)
    st = state_factory(S, L, E)
    st.load(host)
    slots, fill = np.empty(max(S, E), np.int64), np.empty(max(S, E), np.int64)
    dev = st.owner.device
    pred_rows = torch.full((L, 2, k), -1, dtype=torch.int64, device=dev)
    copy_rows = torch.full((2, k), -1, dtype=torch.int64, device=dev)
    ledger = torch.zeros((3, 2, L), dtype=torch.int64, device=dev)
    want_ledger = np.zeros((3, 2, L), np.int64)
    dev_quota = None if quota is None else torch.from_numpy(host_quota).to(dev)
    modes = torch.zeros(L, dtype=torch.int64, device=dev)  # per layer: 1 = misses served in place
    in_place_calls = 0
    for step in range(steps):
        core.begin_step(host)
        device_core.begin_step(st)
        if step % 7 == 0:
            core.begin_request(host)
            st.mix.zero_()
            st.prefetched.zero_()
        for layer in range(L):
            n = int(rng.randint(1, min(k, S) + 1))
            ex = np.sort(rng.choice(E, n, replace=False)).astype(np.int64)
            nv, nt = rng.randint(0, 3, n).astype(np.int64), rng.randint(0, 3, n).astype(np.int64)
            in_place = bool(rng.rand() < in_place_rate)
            in_place_calls += in_place
            modes[layer] = int(in_place)
            core.demand(host, layer, ex, nv, nt, host_quota, slots, fill, in_place)
            perm = rng.permutation(n)
            n_dist = min(2, layer) if id_rows else 0
            for d in range(1, n_dist + 1):
                p = pred_rows[layer - d, d - 1].cpu().numpy()
                made = (p >= 0).sum()  # an all -1 row (a skipped prediction) scores nothing
                want_ledger[:, d - 1, layer] += (len(np.intersect1d(ex, p[p >= 0])), n * (made > 0), made)
            s, f, _ = ops.cache_demand(st, layer, torch.from_numpy(ex[perm]).to(dev), torch.from_numpy(nv[perm]).to(dev),
                                       torch.from_numpy(nt[perm]).to(dev), kernel=kernel,
                                       score=(pred_rows, ledger, n_dist) if n_dist else None, quota=dev_quota,
                                       in_place=modes[layer] if in_place_rate else None)
            assert (s.cpu().numpy() == slots[:n][perm]).all() and (f.cpu().numpy() == fill[:n][perm]).all()
            if in_place:  # misses name their host rows, nothing is copied
                assert (f.cpu().numpy() == -1).all()
                missed = s.cpu().numpy() < 0
                assert (s.cpu().numpy()[missed] == -(layer * E + ex[perm][missed]) - 1).all()
            for d in (1, 2):
                target = layer + d
                if target >= L:
                    break
                pred = rng.choice(E, int(rng.randint(1, k + 1)), replace=False).astype(np.int64)
                valid = rng.rand(len(pred)) < 0.8
                limit = int(rng.randint(0, k + 1))
                issued = core.prefetch(host, target, np.sort(pred[valid]), layer, limit, host_quota, fill)
                if id_rows:
                    row = np.full(k, -1, np.int64)
                    row[: len(pred)] = np.where(valid, pred, -1)
                    pred_rows[layer, d - 1] = torch.from_numpy(rng.permutation(row))
                    copy_rows.fill_(-2)
                    ops.cache_prefetch(st, target, pred_rows[layer, d - 1], None, layer, torch.tensor(limit, device=dev),
                                       kernel=kernel, out=(copy_rows[0], copy_rows[1]), quota=dev_quota)
                    src, dst = copy_rows.cpu().numpy()
                    assert (dst >= -1).all()  # every row written
                    table = st.table[:-1].cpu().numpy()
                    assert (table[src[dst >= 0]] == dst[dst >= 0]).all()  # each copy lands where the table says
                    assert (dst >= 0).sum() == issued
                else:
                    ops.cache_prefetch(st, target, torch.from_numpy(pred).to(dev), torch.from_numpy(valid).to(dev),
                                       layer, torch.tensor(limit, device=dev), kernel=kernel, quota=dev_quota)
            assert (st.table[:-1].view(L, E).cpu().numpy() == host.table).all(), (step, layer)
    for name in ("owner", "last_use", "pin", "prefetched", "weight", "layer_now", "mix", "clock", "hits", "misses",
                 "in_place"):
        assert (getattr(st, name)[: getattr(host, name).size].cpu().numpy().reshape(getattr(host, name).shape)
                == getattr(host, name)).all(), name
    assert np.array_equal(st.counts[:, :-1].cpu().numpy().reshape(2, L, E), host.counts)
    assert (st.pf[:, :-1].cpu().numpy() == host.pf).all()
    assert (ledger.cpu().numpy() == want_ledger).all()
    if id_rows:
        assert want_ledger[0].sum() > 0 and want_ledger[2].sum() > 0
    if in_place_rate:
        assert in_place_calls and 0 < host.in_place.sum() < host.misses.sum()
    return host


def _cpu_state(S, L, E):
    return device_core.DeviceState.empty(S, L, E, torch.full((L * E + 1,), -1, dtype=torch.int32))


@pytest.mark.parametrize("policy", POLICIES)
def test_random_calls_through_host_core_and_device_reference(policy):
    for seed, half_life in [(0, None), (1, 0.1)]:  # 0.1: weights pass 1e100 (and renormalise) in 34 calls
        host = random_calls(_cpu_state, policy, 50, seed, half_life=half_life)
        assert host.hits.sum() > 0 and host.pf[0].sum() > 0 and host.pf[2].sum() > 0
        if half_life and policy not in ("lru", "lfu"):
            assert (host.weight < 1e100).all() and host.counts.max() > 0


@pytest.mark.parametrize("policy", POLICIES)
def test_static_path_calls_through_host_core_and_device_reference(policy):
    # Predictions as id rows with -1 padding, copy lists written in place, the ledger scored in demand;
    # one global pool, then a slot plan (a partition of the slots).
    host = random_calls(_cpu_state, policy, 40, 2, id_rows=True)
    assert host.pf[0].sum() > 0
    quota = [5, 4, 6, 4]
    host = random_calls(_cpu_state, policy, 40, 7, S=19, id_rows=True, quota=quota)
    assert host.pf[0].sum() > 0
    assert (np.bincount(host.owner[host.owner >= 0] // 12, minlength=4) <= quota).all()


@pytest.mark.parametrize("policy", POLICIES)
def test_in_place_misses_decide_alike_in_host_core_and_device_reference(policy):
    # The zero-copy / CPU miss paths: a layer whose misses are served in place takes no slot and evicts
    # nothing, switched per layer call; with prefetch, id rows, the ledger and a slot plan.
    host = random_calls(_cpu_state, policy, 40, 11, in_place_rate=0.5)
    assert host.pf[0].sum() > 0
    random_calls(_cpu_state, policy, 40, 12, id_rows=True, in_place_rate=0.3)
    random_calls(_cpu_state, policy, 40, 13, S=19, quota=[5, 4, 6, 4], id_rows=True, in_place_rate=0.5)


def test_in_place_misses_keep_the_cache_as_it_is():
    """All calls in place and no prefetch: after the cache fills, nothing is ever evicted."""
    st = make_policy("lru").new_state(4, 2, 8)
    slots, fill = np.empty(8, np.int64), np.empty(8, np.int64)
    core.demand(st, 0, np.array([1, 2]), np.zeros(2, np.int64), np.ones(2, np.int64), core.NO_PLAN, slots, fill, False)
    core.demand(st, 1, np.array([0, 3]), np.zeros(2, np.int64), np.ones(2, np.int64), core.NO_PLAN, slots, fill, False)
    table = st.table.copy()
    missed = core.demand(st, 0, np.array([2, 5, 7]), np.zeros(3, np.int64), np.ones(3, np.int64), core.NO_PLAN,
                         slots, fill, True)
    assert missed == 2 and (st.table == table).all() and (fill[:3] == -1).all()
    assert slots[:3].tolist() == [table[0, 2], -(0 * 8 + 5) - 1, -(0 * 8 + 7) - 1]
    assert st.in_place.tolist() == [2, 0] and st.misses.tolist() == [4, 2] and st.hits.tolist() == [1, 0]


def quota_cases(trace: Trace):
    """(budget, quotas) per case: two partitions (quotas summing to the slots) and caps summing above them."""
    L, k = trace.meta.num_layers, trace.meta.top_k
    rng = np.random.RandomState(L)
    for extra, over in ((L, 0), (3 * L, 0), (2 * L, L)):
        quota = k + rng.multinomial(extra, np.full(L, 1.0 / L))
        yield int(quota.sum()) - over, quota


@pytest.mark.parametrize("policy", POLICIES)
def test_slot_plans_decide_alike_in_host_core_simulator_and_device_reference(traces, policy):
    for name, trace in traces.items():
        for budget, quota in quota_cases(trace):
            for prefetch in (False, True):
                what = (name, policy, budget, quota.tolist(), prefetch)
                live, _, _ = replay_three_ways(trace, policy, budget, prefetch, what, quota)
                # Every layer stays within its quota after every call, and the plan changes decisions.
                held = np.stack([(t >= 0).sum(axis=1) for t in live[0]])
                assert (held <= quota).all(), what
                unplanned = replay_live(trace, policy, budget, prefetch)
                assert (unplanned[0] != live[0]).any(), what


@pytest.mark.parametrize("policy", POLICIES)
def test_random_calls_with_a_slot_plan(policy):
    for seed, S, quota in [(0, 18, [4, 6, 4, 4]), (1, 14, [5, 4, 6, 4])]:  # a partition, then caps above S
        host = random_calls(_cpu_state, policy, 40, seed, S=S, quota=quota, half_life=0.1)
        assert host.hits.sum() > 0 and host.pf[0].sum() > 0
        held = np.bincount(host.owner[host.owner >= 0] // 12, minlength=4)
        assert (held <= quota).all()


def test_prefetch_limit_zero_is_off():
    st = make_policy("lfu").new_state(4, 2, 8)
    fill = np.empty(8, np.int64)
    assert core.prefetch(st, 1, np.array([0, 1, 2]), 0, 0, core.NO_PLAN, fill) == 0
    assert (st.table < 0).all() and (st.pin < 0).all()


# ------------------------------------------------------------------------------ the fused kernel
def _kernel_device():
    """'cuda' on a GPU; 'cpu' when Triton's interpreter is on (or can be switched on); None: skip."""
    if torch.cuda.is_available():
        return "cuda"
    if "triton" not in __import__("sys").modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return "cpu"


@pytest.fixture(scope="module")
def kernel_device():
    pytest.importorskip("triton")
    device = _kernel_device()
    if device is None:
        pytest.skip("no GPU and triton already imported without its interpreter")
    pytest.importorskip("vismmoe.kernels.cache_step")
    return device


@pytest.mark.parametrize("policy", POLICIES)
def test_fused_kernel_matches_the_host_core(kernel_device, policy):
    steps = 50 if kernel_device == "cuda" else 6
    state = lambda S, L, E: device_core.DeviceState.empty(  # noqa: E731
        S, L, E, torch.full((L * E + 1,), -1, dtype=torch.int32, device=kernel_device))
    random_calls(state, policy, steps, 3, kernel=True)
    random_calls(state, policy, steps, 4, S=13, L=3, E=16, k=6, half_life=0.1, kernel=True)
    random_calls(state, policy, steps, 5, kernel=True, id_rows=True)
    random_calls(state, policy, steps, 5, S=18, quota=[4, 6, 4, 4], half_life=0.1, kernel=True)
    random_calls(state, policy, steps, 6, S=14, quota=[5, 4, 6, 4], kernel=True)
    random_calls(state, policy, steps, 7, S=19, quota=[5, 4, 6, 4], kernel=True, id_rows=True)
    random_calls(state, policy, steps, 8, kernel=True, id_rows=True, in_place_rate=0.5)
    random_calls(state, policy, steps, 9, S=19, quota=[5, 4, 6, 4], kernel=True, in_place_rate=0.4)


@pytest.mark.parametrize("policy", POLICIES)
def test_fused_kernel_replays_traces_like_the_host_core(kernel_device, policy, traces):
    trace = traces["synthetic"] if kernel_device == "cuda" else head(traces["synthetic"], 1)
    for b in range(3):
        for prefetch in (False, True):
            budget = budgets(trace)[b]
            live = replay_live(trace, policy, budget, prefetch)
            fused = replay_device(trace, policy, budget, prefetch, kernel=True, device=kernel_device)
            assert_same(live, fused, (policy, budget, prefetch))
    for budget, quota in list(quota_cases(trace))[:1]:  # a partition (caps: test_fused_kernel_matches_the_host_core)
        live = replay_live(trace, policy, budget, True, quota)
        fused = replay_device(trace, policy, budget, True, kernel=True, device=kernel_device, quota=quota)
        assert_same(live, fused, (policy, budget, quota.tolist()))


def test_fused_kernel_self_check_catches_a_disagreement(kernel_device, monkeypatch):
    """The engine trusts the kernel on a device only after ops' one-time replay against the twin agrees;
    a kernel that decides differently (here: a sabotaged twin) is refused with one warning."""
    from vismmoe import ops

    device = torch.device(kernel_device)
    assert ops._compare_cache_kernel(device)
    real = device_core.demand

    def wrong(st, layer, experts, n_visual, n_text, quota=None, in_place=None):
        slots, fill = real(st, layer, experts, n_visual, n_text, quota, in_place)
        return slots, torch.where(fill >= 0, fill + 1, fill)

    monkeypatch.setattr(device_core, "demand", wrong)
    assert not ops._compare_cache_kernel(device)
    monkeypatch.setattr(ops, "_CACHE_KERNEL_CHECKED", {})
    with pytest.warns(UserWarning, match="fused cache kernel is not used"):
        assert not ops._cache_kernel_checked(device)
    assert not ops._cache_kernel_checked(device)  # decided once per device


def test_fused_kernel_self_check_covers_the_ledger_scoring(kernel_device, monkeypatch):
    """The one-time check launches every variant the static path does (so a variant that fails to build
    on a GPU is caught there, not inside a decode step), the ledger scoring included."""
    from vismmoe import ops
    from vismmoe.offload import ledger

    real = ledger.score_predicted

    def off_by_one(predicted, counts, n_dist, layer, experts):
        real(predicted, counts, n_dist, layer, experts)
        if n_dist:
            counts[0, 0, layer] += 1

    monkeypatch.setattr(ledger, "score_predicted", off_by_one)
    assert not ops._compare_cache_kernel(torch.device(kernel_device))


def test_fused_kernel_self_check_covers_in_place_demand(kernel_device, monkeypatch):
    """... and demand calls that serve their misses in place (the zero-copy miss path)."""
    from vismmoe import ops

    real = device_core.demand

    def ignores_in_place(st, layer, experts, n_visual, n_text, quota=None, in_place=None):
        return real(st, layer, experts, n_visual, n_text, quota, None)

    monkeypatch.setattr(device_core, "demand", ignores_in_place)
    assert not ops._compare_cache_kernel(torch.device(kernel_device))


# ---- prefetch: auto: the simulator makes the live runtime's decisions, and so does the device gate ----------

def _auto_trace(seed=3) -> Trace:
    """Decode-heavy, 4 layers; layer 2's predictions exact, layer 3's random, layer 1's as recorded (60%)."""
    trace = synthetic_trace(num_requests=10, num_layers=4, num_experts=16, top_k=2, visual_tokens=8, text_tokens=4,
                            decode_steps=30, zipf=0.6, reuse=0.3, predict_accuracy=0.6, seed=seed)
    rng = np.random.default_rng(seed)
    demand = trace.demand_sets()

    def choose(g, predicted):
        if trace.group_step[g] == 0:
            return predicted[:0]  # none in the prefill, as the engine's default
        if trace.group_layer[g] == 2:
            return demand.experts[demand.offsets[g]:demand.offsets[g + 1]]
        if trace.group_layer[g] == 3:
            return np.sort(rng.choice(16, len(predicted), replace=False))
        return predicted

    return rewrite_predictions(trace, choose)


def replay_live_auto(trace: Trace, policy: str, budget: int, copy_s: float, predict_s: float):
    """The live ExpertCache under the runtime's controller, driven as the host path does: at every decode
    step `AutoPrefetch.host_step` on the cache's pf counters and the decode misses per layer, then each layer
    call prefetches (all its predictions) only where the controller's limit is on."""
    from vismmoe.offload.autoprefetch import AutoPrefetch
    from vismmoe.offload.ledger import PredictionLedger

    meta = trace.meta
    cache = ExpertCache(_stub_store(meta), budget, torch.device("cpu"), policy)
    auto = AutoPrefetch(meta.num_layers, copy_s, predict_s, torch.device("cpu"))
    ledger = PredictionLedger(1, meta.num_layers, torch.device("cpu"))
    base = np.full((meta.num_layers, 1), meta.num_experts, np.int64)
    active = np.zeros_like(base)
    decode_misses = np.zeros(meta.num_layers, np.int64)
    demand = trace.demand_sets()
    tables, misses = [], []
    request = step = -1
    for g in trace.groups():
        if g.request != request:
            request, step = g.request, -1
            cache.begin_request()
        if g.step != step:
            step = g.step
            cache.begin_step()
            if step > 0:
                auto.host_step(cache.state.pf, decode_misses, ledger.decode_true_pos, base, active)
        if g.predicted is not None and active[g.layer, 0] > 0:
            predicted = np.sort(g.predicted.astype(np.int64))
            ledger.expect(g.layer, 1, predicted)
            cache.prefetch(g.layer, predicted, int(active[g.layer, 0]), running=g.layer - 1)
        before = cache.counters.misses.sum()
        lo, hi = demand.offsets[g.index], demand.offsets[g.index + 1]
        ledger.score(g.layer, demand.experts[lo:hi].astype(np.int64), decode=step > 0)
        for start in range(lo, hi, cache.wave_size(g.layer)):
            part = slice(start, min(start + cache.wave_size(g.layer), hi))
            cache.acquire(g.layer, demand.experts[part].astype(np.int64), demand.n_visual[part], demand.n_text[part])
            if step > 0:  # as the host path counts a decode step's misses (HostPath.decode_calls)
                decode_misses[g.layer] += cache.last_missed
        tables.append(cache.host_table.copy())
        misses.append(cache.counters.misses.sum() - before)
    return np.array(tables), np.array(misses), cache, auto


def replay_device_auto(trace: Trace, policy: str, budget: int, copy_s: float, predict_s: float, kernel: bool = False,
                       device="cpu"):
    """The device path's state machine with `ops.prefetch_gate` (its torch twin, or the Triton kernel) at the
    start of every decode step, the prefetch limit read from the gate's limits on the device."""
    from vismmoe.offload import autoprefetch as ap

    meta = trace.meta
    L, E = meta.num_layers, meta.num_experts
    host = make_policy(policy).new_state(budget, L, E)
    table = torch.full((L * E + 1,), -1, dtype=torch.int32, device=device)
    st = device_core.DeviceState.empty(budget, L, E, table)
    st.load(host)
    f64 = dict(dtype=torch.float64, device=device)
    state = torch.from_numpy(ap.new_state(L)).to(**f64)
    params = torch.from_numpy(ap.new_params(copy_s, predict_s)).to(**f64)
    gate_step = torch.zeros(1, dtype=torch.int64, device=device)
    base = torch.full((L, 1), E, dtype=torch.int64, device=device)
    limits = torch.zeros_like(base)
    decode_misses = torch.zeros(L, dtype=torch.int64, device=device)
    # The device ledger: predictions made at layer l for l + 1 as ids (-1: none, or switched off), scored by
    # the demand call of l + 1 into counts [3, 1, L]; the gate reads the true positives, counts[0].
    pred = torch.full((L, 1, E), -1, dtype=torch.int64, device=device)
    counts = torch.zeros((3, 1, L), dtype=torch.int64, device=device)
    demand = trace.demand_sets()
    on = lambda a: torch.from_numpy(np.ascontiguousarray(a).astype(np.int64)).to(device)  # noqa: E731
    tables, misses = [], []
    request = step = -1
    for g in trace.groups():
        if g.request != request:
            request, step = g.request, -1
            st.mix.zero_()
            st.prefetched.zero_()
        if g.step != step:
            step = g.step
            device_core.begin_step(st)
            if step > 0:
                ops.prefetch_gate(state, gate_step, params, st.pf, decode_misses, counts[0], base, limits, kernel=kernel)
        if g.layer > 0:
            pred[g.layer - 1].fill_(-1)
        if g.predicted is not None:
            ops.cache_prefetch(st, g.layer, on(g.predicted), None, g.layer - 1, limits[g.layer, 0], kernel=kernel)
            if step > 0 and int(limits[g.layer, 0]) > 0:
                pred[g.layer - 1, 0, :len(g.predicted)] = on(g.predicted)
        before = st.misses.clone()
        lo, hi = demand.offsets[g.index], demand.offsets[g.index + 1]
        for start in range(lo, hi, budget):
            part = slice(start, min(start + budget, hi))
            score = (pred, counts, 1) if step > 0 and g.layer > 0 else None
            ops.cache_demand(st, g.layer, on(demand.experts[part]), on(demand.n_visual[part]),
                             on(demand.n_text[part]), kernel=kernel, score=score)
        if step > 0:  # the static path's residency counts decode steps' misses only
            decode_misses += st.misses - before
        tables.append(table[:-1].view(L, E).cpu().numpy().copy())
        misses.append(int((st.misses - before).sum()))
    return np.array(tables), np.array(misses), st, state.cpu().numpy()


AUTO_RECORD = 9_437_184  # the bench model's record: one copy ~175 us at the simulator's link rate


@pytest.mark.parametrize("predict_us", [20.0, 120.0])
def test_simulated_auto_makes_the_live_controllers_decisions(predict_us):
    """`simulate(..., "auto")` against the live cache under the runtime's controller (host path) and the
    device reference under the gate: the slot table and the misses after every layer call, the prefetch
    counters, and each layer's decode steps with prefetch on agree; layers do switch both ways."""
    from vismmoe.offload import autoprefetch as ap

    trace = _auto_trace()
    budget = 12
    sim = simulate(trace, "lru", budget, "auto", expert_bytes=AUTO_RECORD, predict_s=predict_us * 1e-6,
                   record_groups=True)
    copy_s = sim.copy_seconds
    live = replay_live_auto(trace, "lru", budget, copy_s, predict_us * 1e-6)
    dev = replay_device_auto(trace, "lru", budget, copy_s, predict_us * 1e-6)
    what = ("auto", predict_us)
    assert_same(live, (sim.group_tables, sim.group_misses), what)
    assert_same(live, dev, what)
    cache, auto = live[2], live[3]
    assert (dev[2].pf[:, :-1].numpy() == cache.state.pf).all()
    assert (sim.prefetch_issued.tolist(), sim.prefetch_used.tolist()) == tuple(cache.state.pf[:2].tolist())
    assert np.array_equal(dev[3], auto.state) and np.array_equal(sim.auto_state, auto.state)
    steps = auto.step
    assert steps == int(((trace.group_step > 0) & (trace.group_layer == 0)).sum())
    assert sim.prefetch_on[1:] == [round(float(v), 4) for v in auto.state[ap.ON_STEPS, 1:] / steps]
    on = auto.state[ap.ON_STEPS, 1:] / steps
    assert on.max() > 0.5 and on.min() < 0.5 and sim.prefetch_issued.sum() > 0, on  # some on, some off


def test_gate_and_cache_kernels_make_the_simulated_auto_decisions(kernel_device):
    """The same replay with the fused cache kernel and the Triton gate (natively on a GPU, interpreted on
    the CPU): the simulator's tables, misses and controller state."""
    trace = head(_auto_trace(), 4)
    sim = simulate(trace, "lru", 12, "auto", expert_bytes=AUTO_RECORD, predict_s=20e-6, record_groups=True)
    dev = replay_device_auto(trace, "lru", 12, sim.copy_seconds, 20e-6, kernel=True, device=kernel_device)
    assert_same((sim.group_tables, sim.group_misses), dev, "auto, kernels")
    assert np.array_equal(dev[3], sim.auto_state) and sim.prefetch_issued.sum() > 0
