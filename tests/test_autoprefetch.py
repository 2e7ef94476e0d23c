"""`prefetch: auto` (offload/autoprefetch.py): the per-layer rule, its runners (numba on the host path and in
the simulator, torch on the static path, the Triton gate kernel), the engine under it (never other tokens),
the config switch, and the simulator's auto against the fixed settings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vismmoe
from vismmoe import ops
from vismmoe.errors import ConfigError
from vismmoe.offload import autoprefetch as ap
from vismmoe.offload.simulate import simulate
from vismmoe.offload.trace import Trace, synthetic_trace
from vismmoe.testing.tiny_models import FAMILIES

from .conftest import random_requests, rewrite_predictions

COPY_S, PREDICT_S = 100e-6, 30e-6
RULE = dict(copy_s=COPY_S, predict_s=PREDICT_S, wrong_cost=2.0, decay=0.5, period=8.0)


def decide(used=0.0, issued=0.0, steps=0.0, on=1.0, demand=0.0, demand_steps=0.0, on_demand=0.0, d_used=0.0,
           d_issued=0.0, d_missed=0.0, d_true=None):
    """One fold; d_true (the ledger's true positives) defaults to d_used: every used prefetch was timely."""
    names = ("used", "issued", "steps", "on", "demand", "demand_steps", "on_demand")
    d_true = d_used if d_true is None else d_true
    return dict(zip(names, ap.fold(used, issued, steps, on, demand, demand_steps, on_demand, d_used, d_issued,
                                   d_missed, d_true, **RULE)))


# ---- the rule ---------------------------------------------------------------------------------------

def test_rule_keeps_a_layer_on_while_its_used_prefetches_save_more_than_they_cost():
    # 8 steps on: 8 * 30 us of predictions; 5 used copies save 500 us, 1 wrong copy costs 200 us: on.
    assert decide(d_used=5, d_issued=6)["on"] == 1.0
    assert decide(d_used=4, d_issued=5)["on"] == 0.0  # 400 us saved < 440 us
    # 2 used (200 us) against 240 us of predictions and 2 wrong copies (400 us): off.
    assert decide(d_used=2, d_issued=4, d_missed=9)["on"] == 0.0
    # The decode misses do not enter the decision of a layer that ran: only what its prefetches did.
    assert decide(d_used=2, d_issued=4, d_missed=1000)["on"] == 0.0


def test_rule_credits_only_timely_prefetches():
    """A prefetched expert hit in a later step (a refresh of the cache: it evicted another one) is no saved
    miss; the ledger's true positives (predicted and needed in the step) bound the credited hits."""
    assert decide(d_used=5, d_issued=6, d_true=5)["on"] == 1.0
    late = decide(d_used=5, d_issued=6, d_true=1)  # 4 of the 5 hits came in later steps
    assert late["on"] == 0.0 and late["used"] == 1.0
    assert decide(d_used=5, d_issued=6, d_true=9)["used"] == 5.0  # true positives of resident experts: no credit


def test_rule_starts_off_and_comes_on_only_where_exact_predictions_could_pay():
    state = ap.new_state(3)
    assert (state[ap.ON] == 0.0).all()
    # No evidence: 8 steps with 3 would-be misses (300 us) pay for 8 predictions (240 us)...
    assert decide(on=0.0, d_missed=3)["on"] == 1.0
    # ...2 (200 us) do not, nor do none at all (a free prediction with nothing to save stays off).
    assert decide(on=0.0, d_missed=2)["on"] == 0.0
    assert decide(on=0.0)["on"] == 0.0
    free = dict(RULE, predict_s=0.0)
    assert ap.fold(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, **free)[ap.ON] == 0.0


def test_rule_decays_prefetch_counts_only_while_the_layer_runs_and_would_be_misses_always():
    out = decide(10, 10, steps=8, demand=4, demand_steps=8, on_demand=4, d_used=2, d_issued=2, d_missed=3)
    assert (out["used"], out["issued"], out["steps"]) == (7.0, 7.0, 12.0)
    assert (out["demand"], out["demand_steps"], out["on_demand"]) == (7.0, 12.0, 7.0)  # 3 misses + 2 saved
    out = decide(10, 10, steps=8, on=0.0, demand=4, demand_steps=8, on_demand=4, d_missed=3)
    assert (out["used"], out["issued"], out["steps"], out["on_demand"]) == (10.0, 10.0, 8.0, 4.0)
    assert (out["demand"], out["demand_steps"]) == (5.0, 12.0)


def test_switched_off_layer_comes_back_when_its_would_be_misses_rise_enough():
    # It ran 8 steps: saved 2 of its 8 would-be misses (a share of 1/4), 2 wrong copies: off.
    state = decide(d_used=2, d_issued=4, d_missed=6)
    assert state["on"] == 0.0
    cost_per_step = (8 * PREDICT_S + 2 * 2 * COPY_S) / 8  # 80 us
    # Off: it stays off while share x would-be misses per step x copy_s < 80 us, i.e. below 3.2 per step...
    for per_period in (8, 16, 24):
        state = decide(**dict(state, on=0.0, d_missed=per_period))
        assert state["on"] == 0.0
    assert state["used"] == 2.0 and state["on_demand"] == 8.0  # nothing it did is forgotten while off
    # ...and comes back (for at least a period, to measure) when they rise above.
    state = decide(**dict(state, on=0.0, d_missed=40))
    assert 0.25 * state["demand"] / state["demand_steps"] * COPY_S >= cost_per_step and state["on"] == 1.0
    # Still no good (nothing saved): off again, and the share it measured drops.
    state = decide(**dict(state, on=1.0, d_issued=8, d_missed=40))
    assert state["on"] == 0.0 and state["used"] / state["on_demand"] < 0.25


def test_tick_decides_every_period_on_the_counts_of_that_period():
    L = 4
    state, params = ap.new_state(L), ap.new_params(COPY_S, PREDICT_S)
    pf = np.zeros((3, L), np.int64)
    missed, true_pos = np.zeros(L, np.int64), np.zeros(L, np.int64)
    period = int(params[ap.PERIOD_P])
    for step in range(1, period + 1):  # the first period (all off): layers 1-3 miss 4 per step, layer 0 none
        assert not ap.tick(state, params, pf, missed, true_pos, step)
        missed[1:] += 4
    assert ap.tick(state, params, pf, missed, true_pos, period + 1)
    assert state[ap.ON].tolist() == [0.0, 1.0, 1.0, 1.0] and state[ap.ON_STEPS].tolist() == [0, 1, 1, 1]
    for step in range(period + 2, 2 * period + 1):  # on: layer 1 wastes, layer 2 saves all, layer 3 3 of 4
        assert not ap.tick(state, params, pf, missed, true_pos, step)
        pf[0, 1:] += 4
        pf[1, 2] += 4
        pf[1, 3] += 3
        true_pos[2:] += 4  # the predictions of layers 2 and 3 were all needed (layer 3: one was resident)
        missed[1] += 4
        missed[3] += 1
    assert ap.tick(state, params, pf, missed, true_pos, 2 * period + 1)
    assert state[ap.ON].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert state[ap.ON_STEPS].tolist() == [0, period, period + 1, period + 1]
    assert state[ap.LAST_ISSUED].tolist() == [0] + [4 * (period - 1)] * 3
    assert state[ap.LAST_MISSED].tolist() == [0, 4 * (2 * period - 1), 4 * period, 4 * period + period - 1]


@pytest.mark.parametrize("seed", range(4))
def test_device_twin_makes_the_host_decisions(seed):
    """The static path's torch twin (what the CPU runs; the kernel's reference) against `tick` (numba: the host
    path and the simulator) on random prefetch counts: the same state and limits at every step."""
    assert ops.compare_prefetch_gate("cpu", seed=seed, steps=60, kernel=False)


def test_twin_comparison_sees_layers_switch_both_ways():
    """The random counts of the comparison above do flip decisions (so it compares something)."""
    gen = np.random.default_rng(0)
    L = 7
    state = ap.new_state(L)
    params = ap.new_params(float(gen.uniform(5e-6, 2e-4)), float(gen.uniform(5e-6, 5e-5)))
    params[ap.PERIOD_P] = 3
    pf = np.zeros((3, L + 1), np.int64)
    missed = np.zeros(L, np.int64)
    history = []
    for step in range(1, 61):
        issued = gen.integers(0, 9, L)
        pf[0, :L] += issued
        pf[1, :L] += gen.integers(0, issued + 1)
        missed += gen.integers(0, 5, L)
        ap.tick(state, params, pf, missed, pf[1, :L], step)
        history.append(state[ap.ON].copy())
    flips = np.diff(np.array(history), axis=0)
    assert (flips > 0).any() and (flips < 0).any()


def test_gate_kernel_matches_the_host_decisions(kernel_device):
    for seed in range(3):
        assert ops.compare_prefetch_gate(kernel_device, seed=seed, steps=60, kernel=True)


# ---- config -------------------------------------------------------------------------------------------

def test_prefetch_setting_values(tmp_path):
    assert vismmoe.EngineConfig().prefetch == "auto"
    for value in ("auto", True, False):
        assert vismmoe.load_config({"prefetch": value}).prefetch == value
    for value in ("yes", "on", 1, None, "AUTO", 0.5):
        with pytest.raises(ConfigError, match="prefetch must be auto, true or false"):
            vismmoe.load_config({"prefetch": value})
    path = tmp_path / "deploy.yaml"
    path.write_text("engine:\n  prefetch: auto\n")
    assert vismmoe.load_config(path).prefetch == "auto"


# ---- the engine: never other tokens; stats say what auto decided ---------------------------------------

REQUESTS = random_requests(2, seed=31)


def _tokens(engine, n=12, **kwargs):
    results = [engine.generate(image=i, prompt=p, max_new_tokens=n, **kwargs) for i, p in REQUESTS]
    return [r.token_ids for r in results], results


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_gives_the_tokens_of_prefetch_off(tiny_checkpoints, family):
    model_dir = tiny_checkpoints[family]
    off, _ = _tokens(vismmoe.load(model_dir, expert_budget=0.5, prefetch=False))
    engine = vismmoe.load(model_dir, expert_budget=0.5, prefetch="auto")
    auto, results = _tokens(engine)
    assert auto == off
    info = engine.info()
    # The costs are timed at load where static decode runs on a GPU, a prior elsewhere (a CPU device).
    measured = engine.device.type == "cuda" and engine.info().decode_path == "static"
    assert info.prefetch == "auto" and info.prefetch_auto["costs_from"] == ("measured" if measured else "prior")
    stats = results[-1].stats
    assert stats.prefetch_on[0] is None and all(0.0 <= v <= 1.0 for v in stats.prefetch_on[1:])
    assert "prefetch on (auto), per layer" in stats.table() and "prefetch_on" in stats.to_dict()


@pytest.mark.parametrize("decode", ["static", "generate"])
def test_auto_follows_the_costs_on_both_paths(qwen_checkpoint, decode):
    """Where prefetch pays (copies cost much, predictions nothing) auto switches every layer on after the first
    period (in which it measures the would-be misses) and keeps it on; where it can never pay it never
    switches one on and prefetches nothing; the tokens are those of prefetch off throughout."""
    want, _ = _tokens(vismmoe.load(qwen_checkpoint, expert_budget=0.5, prefetch=False, decode=decode), n=20, min_new_tokens=20)
    issued = {}
    for name, (copy_s, predict_s) in {"pays": (1.0, 0.0), "never": (0.0, 1.0)}.items():
        engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, prefetch="auto", decode=decode)
        engine.runtime.auto.params[ap.WRONG_COST] = 0.0
        engine.runtime.auto.set_costs(copy_s, predict_s, "test")
        got, results = _tokens(engine, n=20, min_new_tokens=20)
        assert got == want
        issued[name] = sum(r.stats.prefetch_issued_bytes for r in results)
        on = results[-1].stats.prefetch_on
        decode_steps = engine.runtime.auto.step
        assert decode_steps == sum(len(t) - 1 for t in got)
        if name == "pays":
            assert engine.runtime.auto.params[ap.PERIOD_P] < len(got[0]) - 1  # on from the first request's end
            assert on[1:] == [1.0] * (len(on) - 1)
            assert engine.info().prefetch_auto["on_layers"] == list(range(1, len(on)))
        else:
            assert all(v < 0.5 for v in on[1:])
            assert engine.info().prefetch_auto["on_layers"] == []
    assert issued["pays"] > 0 and issued["never"] == 0


def test_reconfigure_between_auto_and_fixed(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, prefetch=True)
    assert engine.runtime.auto is None
    engine.reconfigure(prefetch="auto")
    assert engine.runtime.auto is not None and engine.info().prefetch == "auto"
    engine.reconfigure(prefetch_limit=1)  # in place: the controller stays, the limits it gates change
    auto = engine.runtime.auto
    engine.reconfigure(prefetch_limit=2)
    assert engine.runtime.auto is auto and engine.runtime.prefetch_limits.max() == 2
    engine.reconfigure(prefetch=False)
    assert engine.runtime.auto is None and engine.info().prefetch_auto is None
    with pytest.raises(ConfigError, match="prefetch must be auto, true or false"):
        engine.reconfigure(prefetch="sometimes")


# ---- the simulator ------------------------------------------------------------------------------------

def _trace_with_one_good_and_one_bad_layer(seed=0) -> Trace:
    """A synthetic decode trace (3 layers, top-2 of 16): predictions for layer 1 are exact, those for layer 2
    are random experts; none in the prefill (as the engine's default)."""
    trace = synthetic_trace(60, num_layers=3, num_experts=16, top_k=2, decode_steps=40, predict_accuracy=1.0,
                            expert_bytes=9_437_184, seed=seed)
    rng = np.random.default_rng(seed)

    def choose(g, predicted):
        if trace.group_step[g] == 0:
            return predicted[:0]
        if trace.group_layer[g] == 2:
            return np.sort(rng.choice(16, len(predicted), replace=False))
        return predicted

    return rewrite_predictions(trace, choose)


def test_simulated_auto_keeps_the_good_layer_and_drops_the_bad_one():
    trace = _trace_with_one_good_and_one_bad_layer()
    runs = {mode: simulate(trace, "lru", 12, mode) for mode in ("none", "trace", "auto")}
    auto = runs["auto"]
    assert auto.prefetch_on[1] > 0.9 and auto.prefetch_on[2] < 0.2
    best_fixed = min(runs["none"].decode_overhead_s, runs["trace"].decode_overhead_s)
    assert auto.decode_overhead_s < best_fixed
    # Prediction costs are counted: the fixed setting predicts for every decode layer call of layers 1, 2.
    decode_calls = int(((trace.group_step > 0) & (trace.group_layer > 0)).sum())
    assert runs["trace"].predictions == decode_calls and runs["none"].predictions == 0
    assert 0 < auto.predictions < decode_calls


def test_simulated_auto_needs_predictions():
    with pytest.raises(ValueError, match="needs a trace recorded with predictions"):
        simulate(synthetic_trace(2, predict_accuracy=None), "lru", 8, "auto")


# ---- the static path: two captured steps under auto, the one without the lookahead where it changes nothing ---

def test_limits_on_counts_only_the_cells_a_lookahead_acts_on():
    """Cell [t, d - 1] (target layer t at distance d) is predicted at layer t - d: layer 0's own limit and a
    distance past the first layer count for nothing; the gate's count (twin) is the same number."""
    limits = np.zeros((4, 2), np.int64)
    limits[0] = 5  # layer 0: nothing predicts it (auto may switch it on: its would-be misses are counted)
    limits[1, 1] = 3  # layer 1 at distance 2: predicted at layer -1
    assert ap.limits_on(limits) == 0
    limits[1, 0], limits[3, 1] = 1, 2
    assert ap.limits_on(limits) == 2
    L, D = 4, 2
    base = torch.full((L, D), 5, dtype=torch.int64)
    for on, want in (([1, 0, 0, 0], 0), ([0, 1, 0, 0], 1), ([0, 0, 1, 1], 4), ([1, 1, 1, 1], 5)):
        state = torch.from_numpy(ap.new_state(L))
        state[ap.ON] = torch.tensor(on, dtype=torch.float64)
        limits_t, count = torch.zeros_like(base), torch.full((1,), -1, dtype=torch.int64)
        ops.prefetch_gate(state, torch.zeros(1, dtype=torch.int64), torch.from_numpy(ap.new_params(1e-4, 1e-5)),
                          torch.zeros((3, L + 1), dtype=torch.int64), torch.zeros(L, dtype=torch.int64),
                          torch.zeros((D, L), dtype=torch.int64), base, limits_t, kernel=False, count=count)
        assert int(count) == want == ap.limits_on(limits_t.numpy())


def test_lookahead_choice_mirrors_the_gate_and_skips_only_steps_that_change_nothing():
    """The host's choice against the gate (torch twin) over random counts, starting mid-period (as after a
    host-path request): its step counter is the device's after every step; it skips the lookahead exactly
    when the limits of the step before were all off and no decision falls due; every skipped step's limits
    are all off; and steps where a due decision switched layers on after skipped steps do occur."""
    gen = np.random.default_rng(7)
    L, D = 5, 2
    auto = ap.AutoPrefetch(L, 2e-4, 2e-5, torch.device("cpu"))
    auto.params[ap.PERIOD_P] = 3
    auto.step = 7  # mid-period
    base = np.full((L, D), 4, np.int64)
    auto.to_device()
    choice = ap.LookaheadChoice(auto, base)
    pf, missed = torch.zeros((3, L + 1), dtype=torch.int64), torch.zeros(L, dtype=torch.int64)
    true_pos = torch.zeros((D, L), dtype=torch.int64)
    limits, count = torch.zeros((L, D), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)
    before = ap.limits_on(np.where(auto.state[ap.ON][:, None] > 0.5, base, 0))
    switched_on_after_skips = skipped = 0
    for t in range(90):
        lookahead = choice.lookahead()
        due = ap.falls_due(int(auto.device_step) + 1, 3)
        assert lookahead == (before > 0 or due)
        # Counts that make layers come and go: 12 steps of random misses that every prefetch saves, then 12
        # of no misses and wasted prefetches, and so on.
        issued = torch.from_numpy(gen.integers(0, 5, L))
        if (t // 12) % 2 == 0:
            missed += torch.from_numpy(gen.integers(0, 20, L))
            pf[1, :L] += issued
            true_pos[0] += issued
        pf[0, :L] += issued
        ops.prefetch_gate(auto.device_state, auto.device_step, auto.device_params, pf, missed, true_pos,
                          torch.from_numpy(base), limits, kernel=False, count=count)
        assert choice.step == int(auto.device_step)
        now = int(count)
        assert now == ap.limits_on(limits.numpy())
        if not lookahead:
            assert now == 0
            skipped += 1
        elif before == 0 and now > 0:
            switched_on_after_skips += 1
        choice.read_back(now)
        before = now
    assert skipped > 10 and switched_on_after_skips > 0


def _state_snapshot(st) -> dict:
    from dataclasses import fields

    return {f.name: getattr(st, f.name).clone() for f in fields(st)}


def _busy_device_state(seed: int, device, S=10, L=4, E=8, k=2):
    """A device cache state after random demand and prefetch calls (slots owned, pins, prefetched marks)."""
    from vismmoe.offload import device_core
    from vismmoe.offload.policies import make_policy

    gen = torch.Generator().manual_seed(seed)
    st = device_core.DeviceState.empty(S, L, E, torch.full((L * E + 1,), -1, dtype=torch.int32, device=device))
    st.load(make_policy("lru").new_state(S, L, E))
    ones, zeros = torch.ones(k, dtype=torch.int64, device=device), torch.zeros(k, dtype=torch.int64, device=device)
    device_core.begin_step(st)
    for i in range(13):
        layer = i % L
        ops.cache_demand(st, layer, torch.randperm(E, generator=gen)[:k].sort().values.to(device), zeros, ones,
                         kernel=False)
        if layer + 1 < L:
            ops.cache_prefetch(st, layer + 1, torch.randperm(E, generator=gen)[:k].to(device), None, layer,
                               torch.tensor(k, device=device), kernel=False)
    return st


@pytest.mark.parametrize("kernel", [False, True], ids=["twin", "kernel"])
def test_a_full_step_with_every_limit_off_changes_no_cache_state(request, kernel):
    """What the full step's lookahead does where every limit is 0 (the step the auto choice replaces by the one
    without it): predictions of -1 (tests/test_route_predict.py), a prefetch decision per distance with limit
    0 and a copy of its (empty) list, and the demand calls scoring those -1 predictions. Against the same
    demand calls unscored: every field of the cache state, the slot pool and the ledger's counts are equal
    (a skipped prediction scores nothing: no true positive, no actual, no predicted), twin and kernel."""
    device = request.getfixturevalue("kernel_device") if kernel else "cpu"
    L, E, k, depth = 4, 8, 2, 2
    for seed in range(3):
        full, lean = _busy_device_state(seed, device), _busy_device_state(seed, device)
        slab = torch.randn(L * E, 3)
        slots_full, slots_lean = torch.zeros(10, 3, device=device), torch.zeros(10, 3, device=device)
        resident = torch.nonzero(full.table[:-1] >= 0).flatten().cpu()
        gen = torch.Generator().manual_seed(100 + seed)
        predicted = torch.full((L, depth, k), -1, dtype=torch.int64, device=device)
        counts = torch.zeros((3, depth, L), dtype=torch.int64, device=device)
        off = torch.zeros((), dtype=torch.int64, device=device)
        ones, zeros = torch.ones(k, dtype=torch.int64, device=device), torch.zeros(k, dtype=torch.int64, device=device)
        for st in (full, lean):
            from vismmoe.offload import device_core

            device_core.begin_step(st)
        before = _state_snapshot(full)
        for layer in range(L):
            experts = torch.randperm(E, generator=gen)[:k].sort().values.to(device)
            n_dist = min(layer, depth)
            for st, score in ((full, (predicted, counts, n_dist) if n_dist else None), (lean, None)):
                ops.cache_demand(st, layer, experts, zeros, ones, kernel=kernel, score=score)
            if layer + 1 < L:  # the full step's lookahead after this layer, every limit 0
                for d in range(1, min(depth, L - 1 - layer) + 1):
                    # Predicted ids that a limit > 0 would act on: resident ones (pins) and misses.
                    ids = torch.cat([resident[resident // E == layer + d] % E, torch.randperm(E, generator=gen)])
                    ids = torch.unique(ids, sorted=False)[:k].to(device)
                    src, fill = ops.cache_prefetch(full, layer + d, ids, None, layer, off, kernel=kernel)
                    assert (fill == -1).all()
                    ops.copy_records(slab.to(device), slots_full, src, fill)
        after_full, after_lean = _state_snapshot(full), _state_snapshot(lean)
        for name in after_full:
            assert torch.equal(after_full[name], after_lean[name]), (seed, name)
        assert torch.equal(slots_full, slots_lean) and not counts.any()
        assert not torch.equal(after_full["owner"], before["owner"])  # the demand calls did change the cache
        # The same kind of call with a limit does act: a missing expert is loaded (and pinned).
        missing = torch.nonzero(full.table[E: 2 * E] < 0).flatten()[:k].to(device)
        src, fill = ops.cache_prefetch(full, 1, missing, None, 0, torch.tensor(k, device=device), kernel=kernel)
        assert (fill >= 0).any() and not torch.equal(full.table, after_full["table"])


# The sequence of requests for the two-step tests: costs switched between requests, so that auto switches layers
# on (pays), off (never) and on again; the third request takes the host path (auto's step counter moves there).
_SEQUENCE = [(1.0, 0.0, {}), (0.0, 1.0, {}), (0.0, 1.0, dict(repetition_penalty=1.0)), (1.0, 0.0, {})]


def _sequence(checkpoint, lean_steps: bool):
    """Per request of _SEQUENCE under auto at 50% (decode: auto: static eager on the CPU), yields (what must not
    change: tokens, stats without times and step kinds, cache, controller and ledger state; the decode path, the
    step kinds and the stats table)."""
    engine = vismmoe.load(checkpoint, expert_budget=0.5, prefetch="auto")
    runtime, auto = engine.runtime, engine.runtime.auto
    runtime.lean_steps = lean_steps
    auto.params[ap.WRONG_COST] = 0.0
    auto.params[ap.PERIOD_P] = 4  # many decisions, due at different offsets of each request
    requests = random_requests(2, seed=41)
    for i, (copy_s, predict_s, kwargs) in enumerate(_SEQUENCE):
        auto.set_costs(copy_s, predict_s, "test")
        image, prompt = requests[i % 2]
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=15, min_new_tokens=15, **kwargs)
        stats = result.stats.to_dict()
        kinds = (stats["decode_path"], stats.pop("step_variants"), result.stats.table())
        for name in ("ttft_s", "decode_s", "inputs_s", "pruning_s", "decode_tokens_per_s"):
            stats.pop(name)
        cache = {name: np.copy(value) for name, value in engine.cache.state._asdict().items()}
        c = runtime.prediction_counters
        if stats["decode_path"].startswith("static"):  # the host's mirror ended where the device's counter did
            assert runtime.lookahead_choice is None or runtime.lookahead_choice.step == auto.step
        yield dict(tokens=result.token_ids, stats=stats, cache=cache, auto=auto.state.copy(), step=auto.step,
                   ledger=(c.true_pos.copy(), c.actual.copy(), c.predicted.copy())), kinds


def _same_run(x, y) -> bool:
    return (x["tokens"] == y["tokens"] and x["stats"] == y["stats"] and x["step"] == y["step"]
            and all(np.array_equal(x["cache"][name], y["cache"][name]) for name in x["cache"])
            and np.array_equal(x["auto"], y["auto"]) and all(map(np.array_equal, x["ledger"], y["ledger"])))


@pytest.fixture(scope="module")
def single_step_runs(qwen_checkpoint):
    """The sequence with one (full) step, as before the second captured step existed."""
    return list(_sequence(qwen_checkpoint, lean_steps=False))


def test_two_captured_steps_make_the_single_steps_decisions(qwen_checkpoint, single_step_runs):
    """Over requests that switch layers on, off and on again (one on the host path in between), choosing per
    step between the full step and the one without the lookahead leaves the tokens, every stat, the cache
    state, the controller and the ledger exactly as the single full step does; both kinds ran."""
    two = list(_sequence(qwen_checkpoint, lean_steps=True))
    for i, ((x, _), (y, _)) in enumerate(zip(single_step_runs, two)):
        assert x["tokens"] == y["tokens"] and x["stats"] == y["stats"], i
        for name in x["cache"]:
            assert np.array_equal(x["cache"][name], y["cache"][name]), (i, name)
        assert _same_run(x, y), i
    kinds = [k for _, k in two]
    assert [path for path, _, _ in kinds] == ["static-eager", "static-eager", "generate", "static-eager"]
    assert all(k == {} for _, (_, k, _) in single_step_runs)
    static = [k for path, k, _ in kinds if path != "generate"]
    assert all(k["full"] + k["no_lookahead"] == 14 for k in static)
    assert sum(k["no_lookahead"] for k in static) > 0 and sum(k["full"] for k in static) > 0
    assert two[3][0]["stats"]["prefetch_issued_bytes"] > 0  # layers came back on after steps without lookahead
    assert "decode steps full / no lookahead (auto)" in kinds[0][2]


def _ignores_due(self):
    self.step += 1
    return self.limits_on > 0


def _ignores_the_count(self):
    self.step += 1
    return ap.falls_due(self.step, self.period)


def _mirror_one_step_late(self):
    self.step += 1
    return self.limits_on > 0 or ap.falls_due(self.step - 1, self.period)


@pytest.mark.parametrize("wrong", [_ignores_due, _ignores_the_count, _mirror_one_step_late])
def test_the_equivalence_test_sees_a_wrong_choice(qwen_checkpoint, single_step_runs, monkeypatch, wrong):
    """The comparison above fails for a rule that skips the lookahead on a step where a due decision switches
    layers on, one that skips it while layers are on, or a mirror of the gate's counter one step off (it stops
    at the first request that differs)."""
    monkeypatch.setattr(ap.LookaheadChoice, "lookahead", wrong)
    runs = zip(single_step_runs, _sequence(qwen_checkpoint, lean_steps=True))
    assert any(not _same_run(x, y) for (x, _), (y, _) in runs)


# ---- the static path under captured CUDA graphs ----------------------------------------------------------

def _pool_bytes(pool) -> int:
    """Bytes of the CUDA caching allocator's segments that belong to the graph memory pool `pool`."""
    segments = torch.cuda.memory._snapshot()["segments"]
    return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id") or ()) == tuple(pool))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_steps_switch_without_recapture_and_skip_the_lookahead_once_every_layer_is_off(qwen_checkpoint):
    """Under auto at 50% on a GPU: the first period (every layer off) replays the step without the lookahead,
    the first decision's step and those after it (prefetch pays: layers on) the full one, and once every layer
    is off again (prefetch never pays) only the decisions' steps are full; each of the two graphs is captured
    once and replayed after (switching captures nothing), the device counter is the host's mirror, the tokens
    are those of prefetch: false, and the second graph adds at most one segment to the shared graph pool."""
    common = dict(expert_budget=0.5, decode="static", device="cuda", dtype="bfloat16")
    (image, prompt), = random_requests(1, seed=5)
    n = 40

    def generate(engine):
        return engine.generate(image=image, prompt=prompt, max_new_tokens=n, min_new_tokens=n)

    want = generate(vismmoe.load(qwen_checkpoint, prefetch=False, **common)).token_ids
    pools = {}
    for lean in (False, True):
        engine = vismmoe.load(qwen_checkpoint, prefetch="auto", **common)
        engine.runtime.lean_steps = lean
        auto = engine.runtime.auto
        assert auto.costs_from == "measured" and auto.params[ap.COPY_S] > 0 and auto.params[ap.PREDICT_S] > 0
        auto.params[ap.WRONG_COST] = 0.0
        auto.set_costs(1.0, 0.0, "test")  # prefetch always pays: layers with misses come on at the first decision
        first = generate(engine)
        (decoder,) = engine.decoders.held.values()
        assert decoder.mode == "graph" and first.token_ids == want
        pools[lean] = _pool_bytes(engine.decoders.graph_pool)
        if not lean:
            assert list(decoder.graphs) == [True] and first.stats.step_variants == {}
            continue
        period = int(auto.params[ap.PERIOD_P])
        kinds = first.stats.step_variants
        assert kinds["no_lookahead"] >= period and kinds["full"] >= 1 and sum(kinds.values()) == n - 1
        assert first.stats.prefetch_issued_bytes > 0 and set(decoder.graphs) == {True, False}
        graphs, captures = dict(decoder.graphs), decoder.captures
        assert captures == 2
        auto.set_costs(0.0, 1.0, "test")  # never pays: the next decision switches every layer off
        second = generate(engine)
        start = auto.step
        third = generate(engine)
        due = sum(ap.falls_due(s, period) for s in range(start + 1, start + n))
        assert third.stats.step_variants == {"full": due, "no_lookahead": n - 1 - due}
        assert third.stats.prefetch_issued_bytes == 0 and second.stats.step_variants["no_lookahead"] > 0
        assert decoder.captures == captures and decoder.graphs == graphs  # replayed, never captured again
        assert engine.runtime.lookahead_choice.step == auto.step
        assert second.token_ids == third.token_ids == want
    assert 0 < pools[False] and pools[True] <= pools[False] + 2 * 2**20, pools
