"""Routing traces and the trace-replay simulator.

That the simulator, the live ExpertCache and the device path make the same decisions on the same
trace, call by call and for every policy, is tests/test_cache_core.py; this file checks traces,
the simulator's results and the sweep around it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from vismmoe.offload.policies import POLICIES, SlotPlan
from vismmoe.offload.simulate import SimResult, default_budgets, results_table, simulate, sweep
from vismmoe.offload.trace import TraceRecorder, load_trace, synthetic_trace

from .conftest import import_script

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
def test_slot_plans_cap_every_layer(trace, policy):
    # (That the simulator makes the live cache's decisions call by call: tests/test_cache_core.py.)
    for plan in ("uniform", SlotPlan([6, 3, 5])):
        for prefetch in ("none", "trace"):
            result = simulate(trace, policy, 12, prefetch, plan, record_groups=True)
            quota = SlotPlan.uniform(12, 3).quota if plan == "uniform" else plan.quota
            held = (result.group_tables >= 0).sum(axis=2)  # [G, L] slots each layer holds
            assert (held <= quota).all() and (held == quota).any(), (policy, plan, prefetch)
            assert result.hits > 0 and result.misses == result.group_misses.sum()


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
    script = import_script(ROOT / "eval" / "sweep_policies.py")
    path = trace.save(tmp_path / "t.npz")
    assert script.main(["--trace", str(path), "--out", str(tmp_path / "out"), "--budgets", "4,12",
                 "--policies", "lru,affinity", "--threads", "2"]) == 0
    text = (tmp_path / "out" / "policies.md").read_text()
    assert "## Prefetch: oracle" in text and "| 12 |" in text and "decode recall" in text
    assert "## Prefetch: auto" in text and "Decode overhead per request" in text
    assert (tmp_path / "out" / "policies.png").stat().st_size > 10_000


def test_requests_slice_a_trace_into_held_out_halves(trace):
    n = trace.num_requests
    first, second = trace.requests(0, n // 2), trace.requests(n // 2, n)
    assert first.num_requests + second.num_requests == n
    assert first.num_groups + second.num_groups == trace.num_groups
    g = first.num_groups
    assert np.array_equal(second.group_layer, trace.group_layer[g:])
    assert np.array_equal(second.group_request, trace.group_request[g:] - n // 2)
    last = trace.num_groups - 1
    for a, b in ((second.group(0), trace.group(g)), (second.group(second.num_groups - 1), trace.group(last))):
        assert np.array_equal(a.experts, b.experts) and np.array_equal(a.predicted, b.predicted)
    with pytest.raises(ValueError, match="outside the trace"):
        trace.requests(1, n + 1)


@pytest.mark.parametrize("mode", ["none", "trace", "auto"])
def test_measure_from_counts_only_the_later_requests(trace, mode):
    """The replay runs every request (the first ones warm the cache and auto's counts up) but counts from
    request k on: the hits and misses add up to the later requests' demand, and the whole run's counts are
    the warm-up's plus the measured ones'."""
    k = trace.num_requests // 2
    big = dict(expert_bytes=9_437_184)  # copies cost ~175 us: auto's prefetch pays and runs
    whole = simulate(trace, "lru", 24, mode, **big)
    later = simulate(trace, "lru", 24, mode, measure_from=k, **big)
    demand = trace.demand_sets()
    sizes = np.diff(demand.offsets)
    assert later.hits + later.misses == sizes[trace.group_request >= k].sum()
    assert later.decode_hits + later.decode_misses == sizes[(trace.group_request >= k) & (trace.group_step > 0)].sum()
    assert 0 < later.misses < whole.misses
    assert later.prefetch_issued.sum() <= whole.prefetch_issued.sum() and later.predictions <= whole.predictions
    if mode != "none":
        assert 0 < later.predictions < whole.predictions
    with pytest.raises(ValueError, match="measure_from"):
        simulate(trace, "lru", 24, mode, measure_from=trace.num_requests)


def test_prefetch_copies_are_counted_by_phase_and_the_prefill_predictions_can_be_dropped(trace):
    """simulate counts the decode steps' prefetch copies apart (decode_prefetch_issued); a synthetic trace
    predicts in the prefill too, and decode_predictions_only() keeps the decode steps' predictions alone
    (what an engine with prefetch_prefill off prefetches from): its replay copies in decode steps only.
    (tests/test_emulate.py checks the decode count against the engine's own copies.)"""
    sizes = np.diff(trace.predicted_offsets)
    assert sizes[trace.group_step == 0].sum() > 0  # the synthetic trace predicts in prefills
    decode = trace.decode_predictions_only()
    d_sizes = np.diff(decode.predicted_offsets)
    assert d_sizes[decode.group_step == 0].sum() == 0
    assert np.array_equal(d_sizes[decode.group_step > 0], sizes[trace.group_step > 0])
    for g in np.flatnonzero(trace.group_step > 0)[:50]:
        assert np.array_equal(decode.group(g).predicted, trace.group(g).predicted)
    assert decode.decode_predictions_only() is decode
    both, only = simulate(trace, "lru", 24, "trace"), simulate(decode, "lru", 24, "trace")
    assert 0 < both.decode_prefetch_issued < both.prefetch_issued.sum()
    assert only.decode_prefetch_issued == only.prefetch_issued.sum() > 0
    assert only.to_dict()["decode_prefetch_issued"] == only.decode_prefetch_issued
