"""Routing traces and the trace-replay simulator.

The central guarantee: the numba simulator, the plain-Python reference (driving the policy classes
the live cache uses) and the live ExpertCache itself count exactly the same hits, misses and
prefetches on the same trace, for every policy. That is what makes sweep results transfer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vismmoe.offload.cache import ExpertCache
from vismmoe.offload.policies import POLICIES, SlotPlan
from vismmoe.offload.simulate import (SimResult, default_budgets, replay_reference, results_table, simulate,
                                      sweep)
from vismmoe.offload.trace import TraceRecorder, load_trace, synthetic_trace

ROOT = Path(__file__).resolve().parents[1]
COUNTS = ("hits_per_layer", "misses_per_layer", "prefetch_issued", "prefetch_used", "prefetch_wasted")


@pytest.fixture(scope="module")
def trace():
    # Small but with every feature: waves (17 prompt tokens of 16 experts), predictions, several requests.
    return synthetic_trace(num_requests=12, num_layers=3, num_experts=16, top_k=2, visual_tokens=12,
                           text_tokens=10, decode_steps=16, zipf=1.2, reuse=0.5, predict_accuracy=0.7, seed=3)


def same_counts(a: SimResult, b: SimResult) -> bool:
    return (all(np.array_equal(getattr(a, f), getattr(b, f)) for f in COUNTS)
            and (a.decode_hits, a.decode_misses, a.waves) == (b.decode_hits, b.decode_misses, b.waves))


# ------------------------------------------------------------------------------------------ traces
def test_recorder_round_trip(tmp_path):
    rec = TraceRecorder(num_layers=3, num_experts=8, top_k=2, expert_bytes=1234, model="tiny")
    rec.begin_request("img-1")
    rec.record(0, 0, np.array([[0, 1], [2, 3], [0, 3]]), np.array([True, True, False]))
    rec.record_prediction(1, 0, [[5, 1], [1, 6]])  # made entering layer 0, for layer 1
    rec.record(1, 0, np.array([[1, 5], [4, 5], [1, 2]]), np.array([True, True, False]))
    rec(2, 0, torch.tensor([[7, 6], [6, 0], [1, 2]]), torch.tensor([True, True, False]), torch.tensor([6, 7]))
    rec.end_request()
    rec.begin_request(42)
    rec.record(0, 1, np.array([[3, 4]]))  # no visual mask: text
    rec.end_request()
    path = rec.save(tmp_path / "trace")
    assert path.name == "trace.npz"
    tr = load_trace(path)
    assert (tr.num_requests, tr.num_groups) == (2, 4)
    assert tr.request_ids.tolist() == ["img-1", "42"]
    assert (tr.meta.num_layers, tr.meta.num_experts, tr.meta.top_k, tr.meta.expert_bytes, tr.meta.model) == \
        (3, 8, 2, 1234, "tiny")
    groups = list(tr.groups())
    assert [(g.request, g.step, g.layer) for g in groups] == [(0, 0, 0), (0, 0, 1), (0, 0, 2), (1, 1, 0)]
    assert groups[2].experts.tolist() == [[7, 6], [6, 0], [1, 2]]
    assert groups[3].visual.tolist() == [False]
    assert groups[0].predicted is None
    assert groups[1].predicted.tolist() == [1, 5, 6]
    assert groups[2].predicted.tolist() == [6, 7]
    demand = tr.demand_sets()
    assert demand.experts[demand.offsets[1]:demand.offsets[2]].tolist() == [1, 2, 4, 5]
    assert demand.n_visual[demand.offsets[1]:demand.offsets[2]].tolist() == [1, 0, 1, 2]
    assert demand.n_text[demand.offsets[1]:demand.offsets[2]].tolist() == [1, 1, 0, 0]
    quality = tr.prediction_quality("prefill")
    # layer 1: predicted {1,5,6} vs needed {1,2,4,5}; layer 2: predicted {6,7} vs needed {0,1,2,6,7}
    assert quality["recall"].tolist() == [0.0, 0.5, 0.4]
    assert quality["precision"].tolist() == [0.0, 2 / 3, 1.0]


def test_recorder_rejects_bad_input():
    rec = TraceRecorder(2, 4, 2)
    with pytest.raises(RuntimeError):
        rec.record(0, 0, np.zeros((1, 2)))
    rec.begin_request(0)
    with pytest.raises(ValueError, match="tokens, 2"):
        rec.record(0, 0, np.zeros((1, 3)))
    with pytest.raises(ValueError, match="outside"):
        rec.record(0, 0, np.array([[0, 4]]))
    with pytest.raises(ValueError, match="layer"):
        rec.record(2, 0, np.array([[0, 1]]))


def test_demand_sets_and_prediction_quality_match_a_naive_count(trace):
    demand = trace.demand_sets()
    hit, needed, predicted = np.zeros(3), np.zeros(3), np.zeros(3)
    for g in trace.groups():
        lo, hi = demand.offsets[g.index], demand.offsets[g.index + 1]
        ids, counts = np.unique(g.experts, return_counts=True)
        assert demand.experts[lo:hi].tolist() == ids.tolist()
        vis = np.unique(g.experts[g.visual], return_counts=True)
        assert dict(zip(*vis)) == {e: n for e, n in zip(ids, demand.n_visual[lo:hi]) if n}
        assert (demand.n_visual[lo:hi] + demand.n_text[lo:hi]).tolist() == counts.tolist()
        if g.step > 0 and g.predicted is not None:
            hit[g.layer] += len(np.intersect1d(ids, g.predicted))
            needed[g.layer] += len(ids)
            predicted[g.layer] += len(g.predicted)
    quality = trace.prediction_quality("decode")
    assert needed[0] == 0 and needed[1:].all()  # the engine predicts layers 1.. only
    np.testing.assert_allclose(quality["recall"], hit / np.maximum(needed, 1))
    np.testing.assert_allclose(quality["precision"], hit / np.maximum(predicted, 1))


def test_synthetic_trace_structure(trace):
    steps, layers = trace.group_step, trace.group_layer
    assert (layers == np.tile(np.arange(3), trace.num_groups // 3)).all()  # layer order within each step
    sizes = np.diff(trace.group_offsets)
    assert (sizes[steps > 0] == 1).all() and (sizes[steps == 0] >= 12 + 5).all()
    rows_step = np.repeat(steps, sizes)
    assert not trace.visual[rows_step > 0].any() and trace.visual[rows_step == 0].any()
    assert (np.diff(trace.predicted_offsets)[layers == 0] == 0).all()


# --------------------------------------------------------------------------------------- simulator
@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_numba_simulator_matches_python_reference(trace, policy):
    configs = [(2, "none", None, 0), (5, "none", None, 0), (9, "trace", None, 0), (9, "trace", None, 2),
               (20, "oracle", None, 0), (12, "none", "uniform", 0), (12, "trace", SlotPlan([6, 3, 5]), 0)]
    hits = 0
    for budget, prefetch, plan, limit in configs:
        fast = simulate(trace, policy, budget, prefetch, plan, prefetch_limit=limit)
        slow = replay_reference(trace, policy, budget, prefetch, plan, prefetch_limit=limit)
        assert same_counts(fast, slow), (policy, budget, prefetch, plan, limit)
        hits += fast.hits
    assert hits > 0


def _replay_live(trace, policy, budget, prefetch):
    """Drive the live ExpertCache (CPU, 1x1 expert matrices) as experts_op.run_layer and the engine do."""
    meta = trace.meta
    slab = torch.arange(meta.num_layers * meta.num_experts * 2, dtype=torch.float32).reshape(meta.num_layers, -1, 2)
    store = SimpleNamespace(
        num_layers=meta.num_layers, num_experts=meta.num_experts, record_numel=2, dtype=torch.float32, record_bytes=8,
        gate_up_numel=1, layout=SimpleNamespace(gate_up_shape=(1, 1), down_shape=(1, 1)), slab=slab,
        record=lambda layer, expert, staging=None: slab[layer, expert])
    cache = ExpertCache(store, budget, torch.device("cpu"), policy)
    demand = trace.demand_sets()
    request = step = -1
    for g in trace.groups():
        if g.request != request:  # Engine.generate
            request, step = g.request, -1
            cache.policy.reset_request()
        if g.step != step:  # OffloadRuntime.begin_step
            step = g.step
            cache.unpin_through(meta.num_layers)
        if prefetch and g.predicted is not None:  # issued after the previous layer, as run_layer does
            cache.prefetch(g.layer, g.predicted.astype(np.int64), len(g.predicted))
        lo, hi = demand.offsets[g.index], demand.offsets[g.index + 1]
        for start in range(lo, hi, cache.num_slots):
            part = slice(start, min(start + cache.num_slots, hi))
            cache.release(cache.acquire(g.layer, demand.experts[part].astype(np.int64), demand.n_visual[part],
                                        demand.n_text[part]))
        cache.unpin_through(g.layer)
    return cache.counters


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_numba_simulator_matches_the_live_cache(trace, policy):
    # The live cache passes the incoming layer to victim(), so cost-aware's layer-distance term is on
    # in both.
    options = None
    for budget, prefetch in [(3, False), (10, False), (10, True), (24, True)]:
        live = _replay_live(trace, policy, budget, prefetch)
        sim = simulate(trace, policy, budget, "trace" if prefetch else "none", policy_options=options)
        assert live.hits.tolist() == sim.hits_per_layer.tolist(), (policy, budget, prefetch)
        assert live.misses.tolist() == sim.misses_per_layer.tolist(), (policy, budget, prefetch)
        assert live.prefetch_issued_bytes == 8 * sim.prefetch_issued.sum()
        assert live.prefetch_used_bytes == 8 * sim.prefetch_used.sum()
        assert live.prefetch_wasted_bytes == 8 * sim.prefetch_wasted.sum()
        assert live.bytes_h2d == 8 * sim.copies


def test_full_budget_misses_only_first_uses(trace):
    demand = trace.demand_sets()
    group = np.repeat(np.arange(trace.num_groups), np.diff(demand.offsets))
    distinct = len(np.unique(trace.group_layer[group] * 16 + demand.experts))
    for policy in POLICIES:
        assert simulate(trace, policy, 48).misses == distinct


def test_cyclic_layers_defeat_lru_but_not_the_layer_distance_term():
    # Every step needs the same expert in each of 4 layers, with 3 slots: LRU always evicts the one
    # needed next; evicting the farthest layer's keeps 2 of 4 resident.
    rec = TraceRecorder(4, 2, 1)
    rec.begin_request(0)
    for step in range(50):
        for layer in range(4):
            rec.record(layer, step, np.array([[0]]))
    trace = rec.to_trace()
    assert simulate(trace, "lru", 3).hits == 0
    assert simulate(trace, "cost", 3).hit_rate > 0.45


def test_oracle_prefetch_moves_misses_off_the_critical_path(trace):
    none = simulate(trace, "lru", 24)
    oracle = simulate(trace, "lru", 24, "oracle")
    assert oracle.prefetch_issued.sum() > 0
    assert (oracle.prefetch_used == oracle.prefetch_issued).all() and oracle.prefetch_wasted.sum() == 0
    assert oracle.demand_link_time_s < none.demand_link_time_s
    assert oracle.hit_rate > none.hit_rate


def test_link_time_and_bytes():
    r = SimResult("lru", 4, "none", "global", np.array([5, 5]), np.array([3, 1]), 6, 2, np.array([1, 1]),
                  np.array([1, 0]), np.array([0, 1]), 0, expert_bytes=54_000_000, link_gbps=54.0, copy_overhead_s=0.0)
    assert (r.hits, r.misses, r.copies, r.bytes_moved) == (10, 4, 6, 324_000_000)
    assert r.hit_rate == pytest.approx(10 / 14) and r.decode_hit_rate == pytest.approx(0.75)
    assert r.predicted_link_time_s == pytest.approx(6e-3) and r.demand_link_time_s == pytest.approx(4e-3)


def test_sweep_table_and_errors(trace):
    budgets = default_budgets(trace)
    assert budgets[-1] == 48 and len(budgets) == 10 and budgets[0] >= 3
    results = sweep(trace, ["lru", "lfru"], [4, 8], threads=2)
    assert [(r.policy, r.budget_slots) for r in results] == [("lru", 4), ("lru", 8), ("lfru", 4), ("lfru", 8)]
    assert all(same_counts(r, simulate(trace, r.policy, r.budget_slots)) for r in results)
    table = results_table(results)
    assert table.splitlines()[0] == "| slots | lru | lfru |" and len(table.splitlines()) == 4
    with pytest.raises(ValueError, match="prefetch"):
        simulate(trace, "lru", 4, "sometimes")
    with pytest.raises(ValueError, match="predictions"):
        simulate(synthetic_trace(2, predict_accuracy=None), "lru", 4, "trace")


def test_sweep_script_writes_table_and_plot(tmp_path, trace):
    spec = importlib.util.spec_from_file_location("sweep_policies", ROOT / "eval" / "sweep_policies.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = trace.save(tmp_path / "t.npz")
    assert script.main(["--trace", str(path), "--out", str(tmp_path / "out"), "--budgets", "4,12",
                 "--policies", "lru,affinity", "--threads", "2"]) == 0
    text = (tmp_path / "out" / "policies.md").read_text()
    assert "## Prefetch: oracle" in text and "| 12 |" in text and "decode recall" in text
    assert (tmp_path / "out" / "policies.png").stat().st_size > 10_000
