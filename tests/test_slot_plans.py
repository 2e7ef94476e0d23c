"""Per-layer slot plans in the live engine: the `slot_plan` key, validated; the host path and the
device path (static decode) honour it with the simulator's decisions; a planned deploy.yaml runs."""

from __future__ import annotations

import numpy as np
import pytest

import vismmoe
from vismmoe.errors import ConfigError
from vismmoe.offload.policies import SlotPlan
from vismmoe.offload.simulate import simulate
from vismmoe.offload.trace import load_trace

from .conftest import random_requests

PLAN = [2, 6, 3, 5]  # the tiny model: 4 MoE layers x 8 experts, top-2; 16 slots = half the experts


def _run(engine, requests, tokens=5):
    hits = np.zeros(4, np.int64)
    misses = np.zeros(4, np.int64)
    answers = []
    for i, (image, prompt) in enumerate(requests):
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=tokens, request_id=f"q{i}")
        hits += engine.cache.counters.hits
        misses += engine.cache.counters.misses
        answers.append(result.token_ids)
        held = np.bincount(engine.cache.state.owner[engine.cache.state.owner >= 0] // 8, minlength=4)
        assert (held <= np.asarray(engine.cache.quota if len(engine.cache.quota) else 99)).all()
    return hits, misses, answers


def test_bad_slot_plans_say_what_to_fix(qwen_checkpoint):
    half = dict(expert_budget=0.5, device="cpu")
    with pytest.raises(ConfigError, match="has 3 quotas but the model has 4 MoE layers"):
        vismmoe.load(qwen_checkpoint, slot_plan=[6, 5, 5], **half)
    with pytest.raises(ConfigError, match=r"layers \[0\] have quotas below the model's top-k = 2"):
        vismmoe.load(qwen_checkpoint, slot_plan=[1, 5, 5, 5], **half)
    with pytest.raises(ConfigError, match="sums to 15 slots but expert_budget gives 16"):
        vismmoe.load(qwen_checkpoint, slot_plan=[2, 5, 3, 5], **half)
    with pytest.raises(ConfigError, match="uniform needs at least top-k = 2 slots per MoE layer"):
        vismmoe.load(qwen_checkpoint, slot_plan="uniform", expert_budget=6 / 32, device="cpu")
    engine = vismmoe.load(qwen_checkpoint, slot_plan=PLAN, **half)
    assert engine.cache.quota.tolist() == PLAN
    with pytest.raises(ConfigError, match="sums to 16 slots but expert_budget gives 8"):
        engine.reconfigure(expert_budget=0.25)
    assert engine.cache.quota.tolist() == PLAN  # the refused change left the engine as it was
    engine.reconfigure(slot_plan="uniform")
    assert engine.cache.quota.tolist() == [4, 4, 4, 4]
    engine.reconfigure(slot_plan="global")
    assert len(engine.cache.quota) == 0
    engine.close()


def test_host_path_with_a_plan_matches_the_simulator(qwen_checkpoint, tmp_path):
    """A traced run (host-decided loads, prefetch on) replayed by the simulator under the same plan gives
    the engine's hits and misses, layer by layer; a different plan gives different ones."""
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, slot_plan=PLAN, prefetch=True, device="cpu")
    engine.start_trace("tiny")
    hits, misses, _ = _run(engine, random_requests(4, seed=41))
    engine.stop_trace(tmp_path / "trace.npz")
    trace = load_trace(tmp_path / "trace.npz")
    limit = int(engine.runtime.prefetch_limits.max())
    sim = simulate(trace, "lru", 16, "trace", slot_plan=SlotPlan(PLAN), prefetch_limit=limit)
    assert sim.hits_per_layer.tolist() == hits.tolist() and sim.misses_per_layer.tolist() == misses.tolist()
    other = simulate(trace, "lru", 16, "trace", slot_plan=SlotPlan([5, 3, 6, 2]), prefetch_limit=limit)
    assert other.misses_per_layer.tolist() != misses.tolist()
    engine.close()


@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_device_path_with_a_plan_decides_as_the_host_path(qwen_checkpoint, policy):
    """Static decode (cache decisions on the device: torch twin here, the fused kernel on a GPU) and
    transformers' generate (decisions on the host) under one plan: same tokens, same hits and misses."""
    requests = random_requests(3, seed=42)
    out = {}
    for decode in ("static", "generate"):
        engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, slot_plan=PLAN, prefetch=False, decode=decode,
                              policy=policy, device="cpu")
        if decode == "static":
            assert engine.runtime.residency is not None and engine.runtime.residency.quota.tolist() == PLAN
        out[decode] = _run(engine, requests)
        engine.close()
    (h1, m1, a1), (h2, m2, a2) = out["static"], out["generate"]
    assert a1 == a2 and h1.tolist() == h2.tolist() and m1.tolist() == m2.tolist()
    assert m1.sum() > 0


def test_static_prefetch_with_a_plan_decides_as_the_host_path(qwen_checkpoint):
    """Prefetch on, depth 2: the static path's lookahead loads (DeviceResidency.prefetch: one decision per
    distance, each within its target layer's quota, one copy launch) are the host path's, call for call."""
    stats = {}
    for decode in ("static", "generate"):
        engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, slot_plan=PLAN, prefetch=True, prefetch_depth=2,
                              decode=decode, device="cpu")
        stats[decode] = []
        for i, (image, prompt) in enumerate(random_requests(3, seed=44)):
            result = engine.generate(image=image, prompt=prompt, max_new_tokens=6, request_id=f"q{i}")
            s = result.stats
            stats[decode].append((result.token_ids, s.hits_per_layer, s.misses_per_layer, s.prefetch_issued_bytes,
                                  s.prefetch_used_bytes, s.prefetch_wasted_bytes))
            assert s.decode_path.startswith("static-" if decode == "static" else "generate")
            held = np.bincount(engine.cache.state.owner[engine.cache.state.owner >= 0] // 8, minlength=4)
            assert (held <= PLAN).all()
        engine.close()
    assert stats["static"] == stats["generate"]
    assert sum(row[3] for row in stats["static"]) > 0  # the lookahead loaded experts under the plan

def test_a_planned_deploy_config_loads_and_runs_its_plan(qwen_checkpoint, tmp_path):
    """vismmoe plan on the tiny model with its own trace: the written deploy.yaml carries a per-layer
    plan, loads (device overridden to this CPU), runs, and the run's misses are the simulator's."""
    from vismmoe.config import load_config
    from vismmoe.deploy.model_info import model_info
    from vismmoe.deploy.planner import make_plan
    from vismmoe.deploy.profiles import load_profile
    from vismmoe.deploy.writer import write_plan

    engine = vismmoe.load(qwen_checkpoint, expert_budget=1.0, device="cpu", prefetch=False)
    engine.start_trace("tiny")
    requests = random_requests(4, seed=43)
    _run(engine, requests, tokens=8)
    engine.stop_trace(tmp_path / "trace.npz")
    engine.close()
    trace = load_trace(tmp_path / "trace.npz")
    info = model_info(qwen_checkpoint)
    from vismmoe.deploy.profiles import parse_profile

    # A host that launches the prefill's experts faster than the prior's 0.07 ms each: the plan's quotas
    # (below the experts a prefill touches) make layers loop, and at the prior the global pool, which does
    # not loop, is predicted faster on this trace; here the plan's fewer misses win and it is written.
    data = load_profile("rtx3060-12gb").to_dict()
    data["figures"]["loop_expert_ms"] = dict(value=0.005, source="measured", ref="test")
    profile = parse_profile(data, "test")
    from vismmoe.deploy.planner import memory_cap_for

    cap = memory_cap_for(make_plan(info, profile, trace, image_size=64), 12)  # 12 of 32 slots fit
    plan = make_plan(info, profile, trace, max_gpu_memory=cap, image_size=64)
    assert plan.chosen.budget_slots == 12
    path = write_plan(plan, tmp_path / "deploy.yaml")
    config = load_config(path)
    assert config.slot_plan == (plan.slot_plan or "global")
    engine = vismmoe.load(qwen_checkpoint, config=path, device="cpu")
    assert engine.num_slots == 12
    assert plan.slot_plan is not None, plan.slot_plan_note  # the tiny model's trace favours a per-layer plan
    assert engine.cache.quota.tolist() == plan.slot_plan and min(plan.slot_plan) >= 2
    engine.start_trace("tiny")
    hits, misses, _ = _run(engine, requests, tokens=8)
    engine.stop_trace(tmp_path / "run.npz")
    run = load_trace(tmp_path / "run.npz")
    sim = simulate(run, config.policy, 12, "trace" if config.prefetch else "none",
                   slot_plan=None if plan.slot_plan is None else SlotPlan(plan.slot_plan),
                   prefetch_limit=int(engine.runtime.prefetch_limits.max()))
    assert sim.misses_per_layer.tolist() == misses.tolist() and sim.hits_per_layer.tolist() == hits.tolist()
    engine.close()
