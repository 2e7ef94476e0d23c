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


# ---- the static path under a captured CUDA graph ----------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graph_follows_the_device_decision_without_recapture(qwen_checkpoint):
    """The gate runs inside the captured step: switching every layer off on the device (its state, not
    the graph) stops the prefetches of the next steps, switching them on again restarts them; the graph is
    the one captured first, and the tokens never change."""
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, prefetch="auto", decode="static", device="cuda",
                          dtype="bfloat16")
    auto = engine.runtime.auto
    assert auto.costs_from == "measured" and auto.params[ap.COPY_S] > 0 and auto.params[ap.PREDICT_S] > 0
    auto.params[ap.WRONG_COST] = 0.0
    auto.set_costs(1.0, 0.0, "test")  # prefetch always pays: every layer stays on
    (image, prompt), = random_requests(1, seed=5)
    first = engine.generate(image=image, prompt=prompt, max_new_tokens=40, min_new_tokens=40)
    (decoder,) = engine.decoders.held.values()
    graph = decoder.graph
    assert decoder.mode == "graph" and first.stats.prefetch_issued_bytes > 0
    auto.set_costs(0.0, 1.0, "test")  # never pays: the next decision (within one period) switches every layer off
    second = engine.generate(image=image, prompt=prompt, max_new_tokens=40, min_new_tokens=40)
    third = engine.generate(image=image, prompt=prompt, max_new_tokens=40, min_new_tokens=40)
    assert decoder.graph is graph and second.token_ids == first.token_ids == third.token_ids
    assert all(v < 1.0 for v in second.stats.prefetch_on[1:])  # off from its first decision on
    assert third.stats.prefetch_issued_bytes == 0 and all(v == 0.0 for v in third.stats.prefetch_on[1:])
