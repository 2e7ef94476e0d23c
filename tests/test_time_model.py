"""The planner's time model (deploy/time_model.py), its probed engine figures (deploy/engine_times.py) and the
warm engine its trace replays count (deploy/planner._Simulator), and the slot-plan DP in predicted time
(deploy/slot_plan.py)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vismmoe.deploy.model_info import model_info
from vismmoe.deploy.profiles import load_profile, parse_profile
from vismmoe.deploy.time_model import ENGINE_PRIOR, _times

from .conftest import import_script


def _with(profile, **values) -> "object":
    data = profile.to_dict()
    for name, value in values.items():
        data["figures"][name] = dict(value=value, source="measured", ref="test")
    return parse_profile(data, "test")


@pytest.fixture(scope="module")
def info(tiny_checkpoints):
    return model_info(tiny_checkpoints["qwen3_vl_moe"])


def test_a_static_miss_costs_its_link_time_and_the_partial_cache_its_per_layer_figure(info):
    """Static decode below a full budget = the full-budget step + L x offload_layer_ms + misses x the link's
    time per record: nothing per miss beyond the copy (the captured step runs its decision and copy launch
    in every layer whatever it misses). The probed figure replaces the prior."""
    L = info.num_moe_layers
    base = load_profile("rtx4090-24gb")
    args = ("bfloat16", "static")
    full = _times(info, base, *args, True, 0.02, 0.0, 0.0, 0.0, 64)
    for misses in (0.0, 1.5, 7.0):
        part = _times(info, base, *args, False, 0.02, misses, 0.0, 0.0, 64)
        assert part["decode_ms_per_token"] == pytest.approx(
            full["decode_ms_per_token"] + L * ENGINE_PRIOR["offload_layer_ms"] + misses * 0.02)
        assert part["decode_miss_ms"] == pytest.approx(misses * 0.02)
    probed = _with(base, offload_layer_ms=0.011, generate_offload_layer_ms=2.1)
    part = _times(info, probed, *args, False, 0.02, 3.0, 0.0, 0.0, 64)
    assert part["decode_overhead_ms"] == pytest.approx(full["decode_overhead_ms"] + L * 0.011)
    # the prefill's one-at-a-time experts: the probed loop_expert_ms in place of the prior's
    looped = _times(info, _with(base, loop_expert_ms=0.07), *args, False, 0.02, 0.0, 0.0, 0.0, 64, 120.0)
    assert looped["ttft_loop_ms"] == pytest.approx(120.0 * 0.07)
    assert _times(info, base, *args, False, 0.02, 0.0, 0.0, 0.0, 64, 120.0)["ttft_loop_ms"] == pytest.approx(
        120.0 * ENGINE_PRIOR["loop_expert_ms"])
    # a prefill below a full budget pays the host path's per-layer work (prefill_offload_layer_ms, prior 0)
    offl = _with(base, prefill_offload_layer_ms=0.4)
    assert _times(info, offl, *args, False, 0.02, 0.0, 0.0, 0.0, 64)["ttft_overhead_ms"] == pytest.approx(
        _times(info, base, *args, False, 0.02, 0.0, 0.0, 0.0, 64)["ttft_overhead_ms"] + L * 0.4)
    assert _times(info, offl, *args, True, 0.02, 0.0, 0.0, 0.0, 64)["ttft_ms"] == pytest.approx(
        _times(info, base, *args, True, 0.02, 0.0, 0.0, 0.0, 64)["ttft_ms"])  # (a full budget: no readbacks)
    cpu = parse_profile({"name": "cpu", "description": "a CPU-only machine", "kind": "cpu", "figures": {
        n: dict(value=v, source="measured", ref="test") for n, v in
        dict(ram_gb=64.0, cpu_cores=16, host_memcpy_gbs=10.0, disk_read_gbs=2.0, reserved_gb=4.0).items()}}, "test")
    assert _times(info, _with(cpu, prefill_offload_layer_ms=0.4), "float32", "generate", False, 0.02, 0.0, 0.0, 0.0,
                  64)["ttft_ms"] == pytest.approx(_times(info, cpu, "float32", "generate", False, 0.02, 0.0, 0.0, 0.0,
                                                         64)["ttft_ms"])  # (a CPU runs that path at any budget)
    # the generate path's partial-cache term is its own probed figure
    g_full = _times(info, probed, "bfloat16", "generate", True, 0.02, 0.0, 0.0, 0.0, 64)
    g_part = _times(info, probed, "bfloat16", "generate", False, 0.02, 3.0, 0.0, 0.0, 64)
    assert g_part["decode_ms_per_token"] == pytest.approx(g_full["decode_ms_per_token"] + L * 2.1 + 3.0 * 0.02)
    # ... and its prefetch's host work per layer too, charged only where the plan prefetches (never on the static path)
    g_pf = _times(info, _with(probed, generate_prefetch_layer_ms=1.3), "bfloat16", "generate", False, 0.02, 3.0, 0.0,
                  0.0, 64, prefetch=True)
    assert g_pf["decode_overhead_ms"] == pytest.approx(g_part["decode_overhead_ms"] + L * 1.3)
    assert _times(info, probed, "bfloat16", "generate", False, 0.02, 3.0, 0.0, 0.0, 64, prefetch=True)[
        "decode_overhead_ms"] == pytest.approx(g_part["decode_overhead_ms"] + L * ENGINE_PRIOR["generate_prefetch_layer_ms"])
    assert _times(info, _with(probed, generate_prefetch_layer_ms=1.3), *args, False, 0.02, 3.0, 0.0, 0.0, 64,
                  prefetch=True)["decode_overhead_ms"] == pytest.approx(part["decode_overhead_ms"])


def test_planner_replays_count_the_warm_engine_not_the_first_requests():
    """The planner's replay leaves out the trace's first WARMUP_REQUESTS requests (they fill an empty cache,
    and eval/validate_plan.py times requests after as many warm-ups): the prefill misses per request are
    simulate(measure_from=2)'s over the other requests, fewer than with the first or the first two counted,
    and the decode misses per token are those requests' too. A shorter trace keeps at least one request."""
    from vismmoe.deploy.planner import WARMUP_REQUESTS, _Simulator
    from vismmoe.offload.simulate import simulate
    from vismmoe.offload.trace import synthetic_trace

    assert WARMUP_REQUESTS == 2
    # 150 of 192 slots: the cache takes more than one request to fill, as the bench model's near a full budget
    trace = synthetic_trace(num_requests=7, num_layers=3, num_experts=64, top_k=2, visual_tokens=12, seed=3)
    sim = _Simulator(trace, SimpleNamespace(num_moe_layers=3))
    got = sim.run("lru", 150, "none")
    warm = simulate(trace, "lru", 150, "none", measure_from=2)
    decode_steps = int(((trace.group_step > 0) & (trace.group_request >= 2)).sum()) // 3
    assert got["prefill_misses"] == pytest.approx((warm.misses - warm.decode_misses) / 5)
    assert got["decode_misses_per_token"] == pytest.approx(warm.decode_misses / decode_steps)
    for start in (0, 1):
        earlier = simulate(trace, "lru", 150, "none", measure_from=start)
        assert got["prefill_misses"] < (earlier.misses - earlier.decode_misses) / (7 - start)
    # two requests: the second is counted; one request: it is counted
    two = _Simulator(trace.requests(0, 2), SimpleNamespace(num_moe_layers=3)).run("lru", 24, "none")
    second = simulate(trace.requests(0, 2), "lru", 24, "none", measure_from=1)
    assert two["prefill_misses"] == pytest.approx(second.misses - second.decode_misses)
    one = _Simulator(trace.requests(0, 1), SimpleNamespace(num_moe_layers=3)).run("lru", 24, "none")
    first = simulate(trace.requests(0, 1), "lru", 24, "none")
    assert one["prefill_misses"] == pytest.approx(first.misses - first.decode_misses)


# The fake engine's decode ms/token and misses per token by (full budget, decode path[, prefetch]), and the
# machine figures the probe's engine times are measured against.
_PROBE_TIMES = {(True, "auto"): (0.30, 0.0), (True, "generate"): (8.0, 0.0), (True, "generate", True): (8.6, 0.0),
                (False, "auto"): (0.45, 2.0), (False, "generate"): (17.0, 3.0), (False, "generate", True): (29.0, 2.6)}


def _probe_figures() -> dict:
    return {name: dict(value=v, source="measured", ref="") for name, v in
            dict(memory_bandwidth_gbs=3000.0, bf16_tflops=600.0, copy_kernel_gbs=50.0, h2d_pinned_gbs=25.0).items()}


class _FakeConfig(dict):
    """The engine's config as the probe reads it (attributes), kept as a dict by the fake."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class _FakeEngine:
    """What engine_times._measure_engine drives: generate() -> .stats, reconfigure(), store, device. Decode ms/token
    and misses per token are set per (budget, decode path) or (budget, decode path, prefetch)."""

    # The prefill-only settings: the host's work per expert computed one at a time, per miss, and in all per
    # prefill below a full budget (its layers' readbacks; ms); each layer's distinct experts (TOUCHED, what a
    # full-budget request reports) and B's misses per layer (B: distinct - 1 slots, every expert looped, few
    # miss). C (distinct slots) misses every expert when its cache was just emptied (by a reconfigure), none
    # after; it loops nothing, unless C_LOOPS (a model whose prefill touches more experts than MAX_GROUPS).
    EXPERT_MS, MISS_MS, PARTIAL_MS = 0.1, 0.5, 3.0
    # A one-token request's TTFT holds generate's teardown (its first token is never marked: stats.py), so the
    # prefill rounds' settings take this much longer than the probe's own full-budget requests (ms)
    ONE_TOKEN_MS = 2.0
    TOUCHED, B_MISSES = [20, 20], [2, 2]
    C_LOOPS = False

    def __init__(self, times: dict, record_bytes: int):
        self.times, self.config = times, _FakeConfig(expert_budget=1.0, decode="auto", slot_plan="global", prefetch=False)
        self.store = SimpleNamespace(pinned=True)
        self.device = SimpleNamespace(type="cuda")
        self.calls = []
        self.record_bytes = record_bytes
        self.host_offset_ms = lambda: 0.0  # the host's mode: ms it adds to every TTFT at the moment
        self.since_reconfigure = 0

    def _setting(self):
        plan = self.config["slot_plan"]
        return "full" if self.config["expert_budget"] == 1.0 else "C" if plan == self.TOUCHED else "B"

    def reconfigure(self, **kw):
        self.calls.append(kw)
        self.config.update(kw)
        self.since_reconfigure = 0

    def generate(self, image=None, prompt="", max_new_tokens=16, min_new_tokens=16):
        full = self.config["expert_budget"] == 1.0
        decode = self.config["decode"]
        ms, misses = self.times.get((full, decode, bool(self.config.get("prefetch"))), self.times[(full, decode)])
        path = "generate" if decode == "generate" else "static-graph"
        stats = SimpleNamespace(ttft_s=0.05, inputs_s=0.02, decode_s=ms * (max_new_tokens - 1) / 1e3,
                                new_tokens=max_new_tokens, decode_path=path, prefill_tokens=90,
                                expert_misses=10 + round(misses * (max_new_tokens - 1)), prefill_misses=10,
                                hits_per_layer=[5, 5], misses_per_layer=[5, 5 + round(misses * (max_new_tokens - 1))])
        if full and max_new_tokens == 1:  # a prefill-only request at a full budget: every distinct expert, resident
            stats.hits_per_layer, stats.misses_per_layer = list(self.TOUCHED), [0] * len(self.TOUCHED)
            stats.expert_misses = stats.prefill_misses = 0
        if self.config["slot_plan"] != "global":
            assert max_new_tokens == 1 and not self.config["prefetch"]
            assert self.config["expert_budget"] == sum(self.config["slot_plan"]) * self.record_bytes
            if self._setting() == "C":
                misses = list(self.TOUCHED) if self.since_reconfigure == 0 else [0] * len(self.TOUCHED)
                host_ms = self.PARTIAL_MS + sum(misses) * self.MISS_MS + self.C_LOOPS * sum(self.TOUCHED) * self.EXPERT_MS
            else:  # B: one slot fewer than each layer's distinct experts
                assert self.config["slot_plan"] == [t - 1 for t in self.TOUCHED] and not self.C_LOOPS
                misses = self.B_MISSES
                host_ms = self.PARTIAL_MS + sum(self.TOUCHED) * self.EXPERT_MS + sum(misses) * self.MISS_MS
            stats.ttft_s, stats.prefill_misses = 0.05 + host_ms / 1e3, sum(misses)
            stats.hits_per_layer = [t - m for t, m in zip(self.TOUCHED, misses)]
            stats.misses_per_layer = list(misses)
        if max_new_tokens == 1:
            stats.ttft_s += self.ONE_TOKEN_MS / 1e3
        self.since_reconfigure += 1
        slower = self.host_offset_ms()  # (a slow mode slows decode steps too: a tenth of it per token)
        stats.ttft_s += slower / 1e3
        stats.decode_s += slower / 10 * (max_new_tokens - 1) / 1e3
        return SimpleNamespace(stats=stats)


def test_probe_partial_budget_figures_take_the_misses_copies_out(info):
    """offload_layer_ms and generate_offload_layer_ms = (the path's ms/token at a partial budget - at a full
    budget - decode misses per token x one record at the machine's link) / MoE layers, each path with its
    link (the static path's copy kernel, the generate path's pinned DMA); the generate path's without
    prefetch, and generate_prefetch_layer_ms = its prefetch on against off, per layer."""
    from vismmoe.deploy.engine_times import _measure_engine

    L, record = info.num_moe_layers, info.expert_bytes("bfloat16")
    # (at a full budget the generate path's prefetch costs too: the rounds' full budget must run it off, as the
    # partial budget they subtract it from)
    times = dict(_PROBE_TIMES)
    engine = _FakeEngine(times, record)
    figures = _probe_figures()
    out = _measure_engine(engine, info, "bfloat16", figures, new_tokens=16)
    static_copy, host_copy = record / 50e9 * 1e3, record / 25e9 * 1e3
    assert out["offload_layer_ms"][0] == pytest.approx((0.45 - 0.30 - 2.0 * static_copy) / L, rel=1e-6)
    assert out["generate_offload_layer_ms"][0] == pytest.approx((17.0 - 8.0 - 3.0 * host_copy) / L, rel=1e-6)
    assert out["generate_prefetch_layer_ms"][0] == pytest.approx((29.0 - 17.0 + 0.4 * host_copy) / L, rel=1e-6)
    assert "prefetch off" in out["generate_offload_layer_ms"][1] and "prefetch on" in out["offload_layer_ms"][1]
    assert out["generate_layer_ms"][0] == pytest.approx(8.0 / L)
    assert out["prefill_inputs_ms"][0] == pytest.approx(20.0) and "65 timed requests" in out["prefill_inputs_ms"][1]
    # the prefill's host work, split between per expert computed one by one and per miss by the two settings
    assert out["loop_expert_ms"][0] == pytest.approx(_FakeEngine.EXPERT_MS, rel=1e-6)
    assert out["prefill_miss_host_ms"][0] == pytest.approx(_FakeEngine.MISS_MS, rel=1e-6)
    assert out["prefill_offload_layer_ms"][0] == pytest.approx(_FakeEngine.PARTIAL_MS / L, rel=1e-6)
    slots = max(info.top_k, min(L * info.num_experts // 2, 1023))
    budgets = [c["expert_budget"] for c in engine.calls if "expert_budget" in c]
    b_slots = sum(_FakeEngine.TOUCHED) - len(_FakeEngine.TOUCHED)
    c_budget = sum(_FakeEngine.TOUCHED) * record
    assert budgets == [slots * record] + [1.0, slots * record] * 5 + [1.0] + [1.0] + [1.0, c_budget, c_budget,
                                                                                      b_slots * record] * 8 + [1.0]
    assert "8 rounds" in out["loop_expert_ms"][1] and "5 rounds" in out["generate_offload_layer_ms"][1]
    # the full budget's prefill figure: three groups of the probe's own kind of request (its five at the start,
    # three after each kind of rounds), at the engine's own settings
    assert "median of 3 groups" in out["prefill_fixed_ms"][1]
    assert [c for c in engine.calls if c.get("decode") == "auto" and c.get("expert_budget") == 1.0] == [
        dict(expert_budget=1.0, decode="auto", prefetch=False, slot_plan="global")] * 2
    assert f"{slots} of {L * info.num_experts}" in out["offload_layer_ms"][1]
    # where the partial cache cannot run static decode (it fell back to generate), no offload_layer_ms
    times[(False, "auto")] = (17.0, 3.0)
    engine = _FakeEngine(dict(times), record)
    original = engine.generate

    def generate_only(**kw):
        result = original(**kw)
        if engine.config["expert_budget"] != 1.0:
            result.stats.decode_path = "generate"
        return result

    engine.generate = generate_only
    out = _measure_engine(engine, info, "bfloat16", figures, new_tokens=16)
    assert "offload_layer_ms" not in out and "generate_offload_layer_ms" in out
    assert np.isfinite(out["generate_offload_layer_ms"][0])


def test_probe_prefill_host_figures_pair_each_round_against_the_host_mode(info):
    """The host's CPU speed moves between modes lasting seconds (session 8: TTFT 1.8x apart). The prefill's
    host figures and the generate path's partial-budget figures are differences between settings, so rounds
    time the settings in turn and the figures are the medians of the rounds' own differences: modes that
    shift every request's times, lasting longer than a round, leave them exact (a round that a change falls
    in is outvoted). (Differences against a
    full budget timed once, before the partial settings, gave 0.001-0.42 ms per miss on one model in three
    probes.)"""
    from vismmoe.deploy.engine_times import _measure_engine

    record = info.expert_bytes("bfloat16")
    times = dict(_PROBE_TIMES)
    figures = _probe_figures()
    engine = _FakeEngine(times, record)
    calls = []

    def offset():  # the host's mode by time (requests served): a new one every 16 requests
        calls.append(engine._setting())
        return [0.0, 30.0, 9.0, 50.0][(len(calls) - 1) // 16 % 4]

    engine.host_offset_ms = offset
    out = _measure_engine(engine, info, "bfloat16", figures, new_tokens=16)
    assert len(calls) > 48  # (the mode changed while the settings of both kinds of rounds were timed)
    assert out["loop_expert_ms"][0] == pytest.approx(_FakeEngine.EXPERT_MS, rel=1e-6)
    assert out["prefill_miss_host_ms"][0] == pytest.approx(_FakeEngine.MISS_MS, rel=1e-6)
    assert out["prefill_offload_layer_ms"][0] == pytest.approx(_FakeEngine.PARTIAL_MS / info.num_moe_layers, rel=1e-6)
    # the generate path's partial-budget figures, from its own rounds, as exact
    L, host_copy = info.num_moe_layers, record / 25e9 * 1e3
    assert out["generate_offload_layer_ms"][0] == pytest.approx((17.0 - 8.0 - 3.0 * host_copy) / L, rel=1e-6)
    assert out["generate_prefetch_layer_ms"][0] == pytest.approx((29.0 - 17.0 + 0.4 * host_copy) / L, rel=1e-6)


def test_probe_full_budget_prefill_figure_is_a_median_over_the_whole_probe(info):
    """prefill_fixed_ms and prefill_layer_ms come from the full budget's TTFT beyond input building: the median
    of three groups' medians, its five requests at the probe's start and three more of the same kind after each
    kind of rounds. Five requests in a slow mode of the host (one probe's came out 20.9 ms where five others
    gave 10.6-13.6) do not move it, and the rounds' one-token requests (generate's teardown in their TTFT,
    ONE_TOKEN_MS longer) are not pooled with them."""
    from vismmoe.deploy.engine_times import _measure_engine

    record = info.expert_bytes("bfloat16")
    times = dict(_PROBE_TIMES)
    figures = _probe_figures()
    got = []
    for slow_first in (0, 7):  # (7: the two warm-ups and the five timed requests at a full budget, 40 ms slow)
        engine = _FakeEngine(times, record)
        served = []

        def offset(served=served, slow_first=slow_first):  # the host's mode by requests served
            served.append(1)
            return 40.0 if len(served) <= slow_first else 0.0

        engine.host_offset_ms = offset
        out = _measure_engine(engine, info, "bfloat16", figures, new_tokens=16)
        got.append((out["prefill_fixed_ms"][0], out["prefill_layer_ms"][0]))
    assert got[1] == pytest.approx(got[0], rel=1e-9) and got[0][0] > 0
    # the fake's full-budget TTFT beyond input building is 30 ms (less a few us of FLOPs at 600 TFLOPS)
    L = info.num_moe_layers
    assert got[0][0] + L * got[0][1] == pytest.approx(30.0, abs=0.01)


def test_probe_prefill_figures_where_every_layer_loops(info, monkeypatch):
    """A model whose prefill touches more experts than the grouped kernel's groups (a 48-layer model with 128
    experts a layer: ~5,000 against ops.MAX_GROUPS) loops every layer of C, as its rows below a full budget
    loop every layer: C cold minus warm still gives the miss, C warm minus the full budget per distinct expert
    is loop_expert_ms (the per-layer work folded in), B is not timed and no per-layer figure is written."""
    from vismmoe import ops
    from vismmoe.deploy.engine_times import _measure_engine

    monkeypatch.setattr(ops, "MAX_GROUPS", sum(_FakeEngine.TOUCHED) - 1)
    record = info.expert_bytes("bfloat16")
    times = {(True, "auto"): (0.30, 0.0), (True, "generate"): (8.0, 0.0), (False, "auto"): (0.45, 2.0),
             (False, "generate"): (17.0, 3.0)}
    figures = _probe_figures()
    engine = _FakeEngine(times, record)
    engine.C_LOOPS = True  # (and B, were it timed, fails the fake's assertion)
    out = _measure_engine(engine, info, "bfloat16", figures, new_tokens=16)
    touched = sum(_FakeEngine.TOUCHED)
    assert out["prefill_miss_host_ms"][0] == pytest.approx(_FakeEngine.MISS_MS, rel=1e-6)
    assert out["loop_expert_ms"][0] == pytest.approx(_FakeEngine.EXPERT_MS + _FakeEngine.PARTIAL_MS / touched, rel=1e-6)
    assert "prefill_offload_layer_ms" not in out and "every layer loops" in out["loop_expert_ms"][1]


def test_validate_plan_probes_engine_times_on_the_traces_engine(tiny_checkpoints, tmp_path, monkeypatch):
    """eval/validate_plan.py records a model's trace and measures its engine times on one engine (one load
    of the store): the trace is written, the measurement (stubbed here: its arithmetic is tested above, its
    real run in test_deploy) gets the trace's engine, and the engine is set back to a full budget after."""
    from pathlib import Path

    import vismmoe
    from vismmoe.deploy import engine_times
    from vismmoe.deploy.engine_times import with_engine_times

    root = Path(__file__).resolve().parents[1]
    module = import_script(root / "eval" / "validate_plan.py")
    loads = []
    real_load = vismmoe.load
    monkeypatch.setattr(module.vismmoe, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    model = tiny_checkpoints["qwen3_vl_moe"]
    machine = load_profile("rtx4090-24gb").to_dict()
    machine["figures"]["prefill_fixed_ms"] = dict(value=999.0, source="measured", ref="another model")
    seen = []

    def measured(engine, info, dtype, figures, new_tokens):
        seen.append(engine)
        engine.reconfigure(expert_budget=0.5, decode="generate", slot_plan="uniform")  # as the probe leaves it
        return {"offload_layer_ms": (0.02, "stub"), "loop_expert_ms": (0.1, "stub")}

    monkeypatch.setattr(engine_times, "_measure_engine", measured)
    got = {}
    path = module.record_trace(model, module.requests("bench", 1, 0), 3, "cpu", tmp_path / "t.npz",
                               then=lambda engine: got.update(here=with_engine_times(machine, model, 3, engine=engine)))
    assert path.is_file() and len(loads) == 1 and loads[0]["store"] == "pinned" and len(seen) == 1
    engine = seen[0]
    assert engine.closed and engine.config.expert_budget == 1.0 and engine.config.decode == "auto"
    assert engine.config.slot_plan == "global"
    figures = got["here"]["figures"]
    assert figures["offload_layer_ms"]["value"] == 0.02 and figures["loop_expert_ms"]["ref"] == "stub"
    assert "prefill_fixed_ms" not in figures  # the other model's engine figure is dropped, not carried


def test_an_mmap_prefetch_copy_pays_its_disk_read_in_full(info):
    """With an mmap store the host reads a prefetched record synchronously before queueing its copy
    (ExpertStore.record), as it does for a miss: each prefetch copy adds its disk read to the decode step,
    and only its copy may hide under the step's compute. A pinned store's prefetch copies hide as before.
    The emulation holds each read to the same time (Emulation.read_target_s)."""
    import torch

    from vismmoe.deploy.emulate import Emulation
    from vismmoe.deploy.time_model import _miss_ms, read_ms

    B = info.expert_bytes("bfloat16")
    jetson, rtx = load_profile("jetson-orin-nano-8gb"), load_profile("rtx4090-24gb")
    assert read_ms(rtx, "pinned", B) == 0.0 and read_ms(jetson, "memory", B) == 0.0
    disk = read_ms(jetson, "mmap", B)
    assert disk == pytest.approx(B / (jetson["disk_read_gbs"] * 1e9) * 1e3)
    assert Emulation(jetson, "mmap", B, torch.device("cpu")).read_target_s() == pytest.approx(disk / 1e3)
    miss = _miss_ms(jetson, "mmap", B, "generate")
    args = (info, jetson, "bfloat16", "generate", False, miss, 0.1, 5.0)
    none = _times(*args, 0.0, 64, read_ms=disk)
    two = _times(*args, 2.0, 64, read_ms=disk)
    assert two["decode_prefetch_read_ms"] == pytest.approx(2 * disk)
    hidden = none["decode_compute_ms"] + none["decode_overhead_ms"]
    assert two["decode_ms_per_token"] - none["decode_ms_per_token"] == pytest.approx(
        2 * disk + max(0.0, 2 * (miss - disk) - hidden))
    assert two["ttft_ms"] == none["ttft_ms"]  # the engine prefetches in decode steps only
    # a store in memory: the same copies hide under compute (read_ms 0, the default)
    p_miss = _miss_ms(rtx, "pinned", B, "generate")
    pinned = [_times(info, rtx, "bfloat16", "generate", False, p_miss, 0.1, 5.0, c, 64) for c in (0.0, 2.0)]
    assert pinned[1]["decode_ms_per_token"] == pinned[0]["decode_ms_per_token"]


def test_an_mmap_read_takes_at_least_the_hosts_floor(info, tmp_path):
    """An mmap read costs fixed host work (safetensors' slice, the copy) that a fast disk's rate does not
    show: easy-VQA's 96 KiB records took 0.11-0.20 ms each on the H200 host where a Jetson's NVMe rate
    gives 0.033 ms. With the probe's mmap_read_ms the read (and the miss that includes it) is the longer of
    the two; without it, the disk rate alone. The emulated prediction (eval/validate_plan.py) charges a
    profile's misses this host's floor: emulation holds reads to the profile's time, never shortens them."""
    from pathlib import Path
    from types import SimpleNamespace

    from vismmoe.deploy.time_model import _miss_ms, read_ms

    B = info.expert_bytes("bfloat16")
    jetson = load_profile("jetson-orin-nano-8gb")
    disk = B / (jetson["disk_read_gbs"] * 1e9) * 1e3
    slow = _with(jetson, mmap_read_ms=disk + 0.2)
    assert read_ms(jetson, "mmap", B) == pytest.approx(disk)
    assert read_ms(slow, "mmap", B) == pytest.approx(disk + 0.2) and read_ms(slow, "pinned", B) == 0.0
    assert _miss_ms(slow, "mmap", B, "generate") == pytest.approx(_miss_ms(jetson, "mmap", B, "generate") + 0.2)
    fast = _with(jetson, mmap_read_ms=disk / 2)  # a floor under the disk's time changes nothing
    assert read_ms(fast, "mmap", B) == pytest.approx(disk)
    # the emulated prediction: the profile's plan, this host's floor on each read
    module = import_script(Path(__file__).resolve().parents[1] / "eval" / "validate_plan.py")
    here = _with(load_profile("rtx4090-24gb"), mmap_read_ms=disk + 0.5)
    miss = _miss_ms(jetson, "mmap", B, "generate")
    predicted = dict(decode_misses_per_token=2.0, prefill_misses=30.0, prompt_tokens=64, read_ms=disk,
                     decode_compute_ms=0.0, decode_overhead_ms=0.0, ttft_compute_ms=0.0, ttft_overhead_ms=0.0)
    chosen = SimpleNamespace(store="mmap", budget_slots=8, decode_path="generate", miss_ms=miss, prefetch=False,
                             predicted=predicted)
    plan = SimpleNamespace(chosen=chosen, dtype="bfloat16")
    floored = module.emulated_prediction(plan, info, here)
    plain = module.emulated_prediction(plan, info, _with(load_profile("rtx4090-24gb"), mmap_read_ms=disk / 2))
    assert floored["decode_miss_ms"] - plain["decode_miss_ms"] == pytest.approx(2.0 * 0.5)
    assert floored["ttft_ms"] > plain["ttft_ms"]
    chosen.store = "pinned"  # no reads: the floor does not apply
    assert module.emulated_prediction(plan, info, here)["decode_ms_per_token"] == pytest.approx(
        module.emulated_prediction(plan, info, _with(load_profile("rtx4090-24gb"), mmap_read_ms=0.001))["decode_ms_per_token"])


def test_the_planner_weighs_an_mmap_prefetch_copy_at_its_disk_read(tmp_path):
    """Prefetch on or off is chosen per store: with a pinned store a prefetch copy hides under compute (a
    quarter of a miss: it takes the link and a slot), with an mmap store it costs its disk read, nearly a
    whole miss. On bench-size records (9.4 MB) and a trace whose predictions save fewer misses than they
    copy, pinned keeps prefetch on and mmap turns it off; each choice is the fastest the time model
    predicts among the (policy, prefetch) settings, and its prefetch copies are the replay's decode-step
    copies."""
    from vismmoe.deploy.planner import POLICIES_WITH_DEVICE_TWIN, _evaluate, _Simulator
    from vismmoe.deploy.time_model import _miss_ms, read_ms
    from vismmoe.offload.trace import synthetic_trace
    from vismmoe.testing.tiny_models import QWEN3_VL_30B_A3B_TEXT, TextShape, family_parts

    cfg = family_parts("qwen3_vl_moe", TextShape(num_hidden_layers=2, **QWEN3_VL_30B_A3B_TEXT), 256)[0]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(str(tmp_path))
    model = model_info(tmp_path)  # sizes from the config: 2 MoE layers of 128 experts, 9.4 MB records
    trace = synthetic_trace(num_requests=6, num_layers=2, num_experts=128, top_k=8, predict_accuracy=0.8, seed=1,
                            visual_tokens=30, text_tokens=8, decode_steps=16)
    sim = _Simulator(trace, model)
    slots, B = 2 * 128 // 3, model.expert_bytes("bfloat16")
    chosen = {}
    for profile_name, store in (("rtx4060-laptop-8gb", "pinned"), ("rtx4060-laptop-8gb", "mmap"),
                                ("jetson-orin-nano-8gb", "mmap")):
        profile = load_profile(profile_name)
        cand = _evaluate(model, profile, "bfloat16", store, slots, {}, sim, 64)
        chosen[profile_name, store] = cand.prefetch
        r = sim.run(cand.policy, slots, "trace" if cand.prefetch else "none")
        assert cand.predicted["decode_prefetch_copies"] == pytest.approx(r["decode_prefetch_per_token"] if cand.prefetch else 0.0)
        miss, disk = _miss_ms(profile, store, B, "generate"), read_ms(profile, store, B)
        options = []
        for policy in POLICIES_WITH_DEVICE_TWIN:
            for prefetch in (False, True):
                o = sim.run(policy, slots, "trace" if prefetch else "none")
                options.append(_times(model, profile, "bfloat16", "generate", False, miss, o["decode_misses_per_token"],
                                      o["prefill_misses"], o["decode_prefetch_per_token"] if prefetch else 0.0, 64,
                                      read_ms=disk, prefetch=prefetch)["decode_ms_per_token"])
        if store == "mmap":
            assert cand.predicted["decode_ms_per_token"] == pytest.approx(min(options))
    assert chosen == {("rtx4060-laptop-8gb", "pinned"): True, ("rtx4060-laptop-8gb", "mmap"): False,
                      ("jetson-orin-nano-8gb", "mmap"): False}
    # On the generate path prefetch also costs the host generate_prefetch_layer_ms per layer: with a disk
    # so fast that a prefetch copy's read costs nothing, an mmap plan prefetches when that work is cheap,
    # and not when it outweighs the misses prefetch saves.
    fast_disk = _with(load_profile("rtx4060-laptop-8gb"), disk_read_gbs=1e6)
    cheap = _evaluate(model, _with(fast_disk, generate_prefetch_layer_ms=0.001), "bfloat16", "mmap", slots, {}, sim, 64)
    dear = _evaluate(model, _with(fast_disk, generate_prefetch_layer_ms=50.0), "bfloat16", "mmap", slots, {}, sim, 64)
    assert cand.decode_path == cheap.decode_path == dear.decode_path == "generate"
    assert cheap.prefetch and not dear.prefetch
    # (the one charged for it, the other not: 2 MoE layers x 0.001 ms apart)
    assert cheap.predicted["decode_overhead_ms"] == pytest.approx(dear.predicted["decode_overhead_ms"] + 2 * 0.001)


def test_without_a_trace_the_plan_prefetches_only_where_it_costs_the_host_nothing(tmp_path):
    """No trace, no predicted saving: the static path keeps prefetch on (its lookahead runs inside the
    captured step), the generate path turns it off and is not charged generate_prefetch_layer_ms."""
    from vismmoe.deploy.planner import _evaluate
    from vismmoe.testing.tiny_models import QWEN3_VL_30B_A3B_TEXT, TextShape, family_parts

    cfg = family_parts("qwen3_vl_moe", TextShape(num_hidden_layers=2, **QWEN3_VL_30B_A3B_TEXT), 256)[0]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(str(tmp_path))
    model = model_info(tmp_path)
    profile = _with(load_profile("rtx4060-laptop-8gb"), generate_prefetch_layer_ms=5.0)
    static = _evaluate(model, profile, "bfloat16", "pinned", 64, {}, None, 64)
    generate = _evaluate(model, profile, "bfloat16", "mmap", 64, {}, None, 64)
    assert static.decode_path == "static" and static.prefetch
    assert generate.decode_path == "generate" and not generate.prefetch
    off = _times(model, profile, "bfloat16", "generate", False, generate.miss_ms,
                 generate.predicted["decode_misses_per_token"], generate.predicted["prefill_misses"], 0.0, 64,
                 generate.predicted["prefill_loop_experts"], generate.predicted["read_ms"])
    assert generate.predicted["decode_overhead_ms"] == pytest.approx(off["decode_overhead_ms"])


def test_prefill_misses_cost_the_longer_of_the_link_and_the_hosts_work(info):
    """TTFT's prefill part: misses x the link's time per miss, or the host's work beside those copies
    (misses x prefill_miss_host_ms + experts computed one by one x loop_expert_ms), whichever is longer."""
    profile = _with(load_profile("rtx4090-24gb"), loop_expert_ms=0.1, prefill_miss_host_ms=0.4)
    args = ("bfloat16", "static", False)
    none = _times(info, profile, *args, 0.02, 0.0, 0.0, 0.0, 64)
    # a slow link: 100 misses x 3 ms on the link against 100 x 0.4 + 50 x 0.1 of host work
    slow = _times(info, profile, *args, 3.0, 0.0, 100.0, 0.0, 64, 50.0)
    assert slow["ttft_miss_ms"] == pytest.approx(300.0) and slow["ttft_host_ms"] == pytest.approx(45.0)
    assert slow["ttft_ms"] == pytest.approx(none["ttft_ms"] + 300.0)
    # a fast link: the host's work is the longer chain
    fast = _times(info, profile, *args, 0.05, 0.0, 100.0, 0.0, 64, 50.0)
    assert fast["ttft_ms"] == pytest.approx(none["ttft_ms"] + 45.0)
    assert fast["ttft_loop_ms"] == pytest.approx(5.0) and fast["ttft_miss_host_ms"] == pytest.approx(40.0)


def test_the_planners_looped_layers_are_the_layers_the_engine_runs_in_waves(tiny_checkpoints):
    """time_model.looped_layers (what the planner charges loop_expert_ms for) against the engine: for a
    one-token request (its prefill alone) under per-layer quotas, RequestStats.waves counts the layer calls
    run in several waves; given the distinct experts each layer touched, the planner's predicate names the
    same number of layers."""
    import vismmoe
    from vismmoe.deploy.time_model import loop_experts, looped_layers

    from .conftest import random_requests

    ckpt = tiny_checkpoints["qwen3_vl_moe"]
    info = model_info(ckpt)
    L, k = info.num_moe_layers, info.top_k
    (image, prompt), = random_requests(1, seed=5)
    engine = vismmoe.load(ckpt, expert_budget=1.0, prefetch=False)
    try:
        full = engine.generate(image=image, prompt=prompt, max_new_tokens=1).stats
        distinct = np.add(full.hits_per_layer, full.misses_per_layer)
        assert (distinct > k).all()  # (every layer can be made to loop)
        # layer 0 keeps all its experts, the others one fewer than they touch (at least top-k)
        quotas = [int(distinct[0])] + [max(k, int(d) - 1) for d in distinct[1:]]
        engine.reconfigure(expert_budget=sum(quotas) * info.expert_bytes("float32"), slot_plan=quotas)
        stats = engine.generate(image=image, prompt=prompt, max_new_tokens=1).stats
        assert np.array_equal(np.add(stats.hits_per_layer, stats.misses_per_layer), distinct)
        predicted = looped_layers(distinct, sum(quotas), quotas, info)
        assert stats.waves == predicted.sum() == L - 1 and not predicted[0]
        # over several requests the planner counts each request's looped layers, averaged
        other = np.where(np.arange(L) == 1, quotas[1], distinct)  # a request whose layer 1 fits its quota
        experts, layers = loop_experts(np.stack([distinct, other]), sum(quotas), quotas, info)
        assert layers == pytest.approx(((L - 1) + (L - 2)) / 2)
        assert experts == pytest.approx((distinct[1:].sum() + distinct[2:].sum()) / 2)
    finally:
        engine.close()


# -- the slot plan's DP in predicted time (deploy/slot_plan.py) ---------------------------------------------


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """A 4-layer model of 16 experts (top-2), sizes from its config, and a synthetic routing trace whose
    prefills touch 9-15 distinct experts per layer: below that quota a layer's prefill loops."""
    from vismmoe.deploy.planner import _Simulator
    from vismmoe.offload.trace import synthetic_trace
    from vismmoe.testing.tiny_models import TextShape, family_parts

    path = tmp_path_factory.mktemp("plan_model")
    cfg = family_parts("qwen3_vl_moe", TextShape(num_hidden_layers=4, num_experts=16, top_k=2), 256)[0]
    cfg.dtype = "bfloat16"
    cfg.save_pretrained(str(path))
    model = model_info(path)
    trace = synthetic_trace(num_requests=12, num_layers=4, num_experts=16, top_k=2, visual_tokens=12, text_tokens=6,
                            decode_steps=8, predict_accuracy=None, seed=3)
    return SimpleNamespace(model=model, trace=trace, sim=_Simulator(trace, model))


def test_the_time_aware_slot_plan_stops_a_layer_looping_where_the_misses_only_plan_starves_it(planned):
    """The misses-only DP gives a layer fewer slots than every request's prefill touches there, so it
    computes its experts one at a time in every request (loop_expert_ms each, on the host's chain of TTFT);
    the time-aware DP, weighing that loop time, covers the layer's prefills: fewer experts looped, a lower
    predicted request time, and that plan is the one written (it beats the global pool too)."""
    from vismmoe.deploy.planner import _evaluate
    from vismmoe.deploy.slot_plan import choose_slot_plan, per_layer_plans
    from vismmoe.deploy.time_model import loop_experts, request_ms

    model, sim, slots, new_tokens = planned.model, planned.sim, 40, 16
    profile = _with(load_profile("rtx3060-12gb"), loop_expert_ms=0.2)  # an H200 host measured 0.13-0.19
    cand = _evaluate(model, profile, "bfloat16", "pinned", slots, {}, sim, 64)
    global_ms = request_ms(cand.predicted, new_tokens)
    plans = per_layer_plans(model, profile, "bfloat16", cand, sim, 64, new_tokens)
    by_misses, aware = plans[0], min(plans[1:], key=lambda p: p["request_ms"])
    distinct = sim.prefill_distinct_by_request
    mq, aq = by_misses["quotas"], aware["quotas"]
    loops_always = mq < distinct.min(0)  # layers the misses-only plan starves in every request
    rarely = (distinct > aq).mean(0) < 0.5  # ... that loop in under half the requests under the time-aware plan
    assert (loops_always & rarely).any(), (mq, aq, distinct.min(0), distinct.max(0))
    assert by_misses["replay"]["misses"] < aware["replay"]["misses"]  # it does miss less ...
    assert loop_experts(distinct, slots, aq, model)[0] < loop_experts(distinct, slots, mq, model)[0] - 5
    assert aware["request_ms"] < by_misses["request_ms"] - 1.0  # ... but the time-aware plan is faster
    quotas, note = choose_slot_plan(model, profile, "bfloat16", cand, sim, 64, new_tokens)
    assert quotas == aq.tolist() and "time-aware DP's" in note
    assert aware["request_ms"] < global_ms and cand.predicted == aware["predicted"]
    assert cand.hit_rates["per_layer_plan"] == aware["replay"]["hit_rate"]
    assert cand.hit_rates["misses_only_plan"] == by_misses["replay"]["hit_rate"]


def test_with_no_loop_time_and_every_miss_alike_the_time_aware_plan_is_the_misses_only_plan(planned, monkeypatch):
    """With loop_expert_ms = 0, no host work per prefill miss (the link's chain is TTFT's longer) and a
    store in memory (no disk reads), `_times` charges every miss miss_ms: weighed by the trace's own decode
    tokens per request, the time-aware DP's costs are the misses-only DP's misses x miss_ms per counted
    request, and the plan chosen is the misses-only one (checks the curves' per-token and per-request
    normalisation against the misses the replay counts)."""
    from vismmoe.deploy.planner import _evaluate
    from vismmoe.deploy.slot_plan import (best_quotas, choose_slot_plan, layer_cost_curves, layer_miss_curves,
                                          layer_time_curves)

    monkeypatch.setitem(ENGINE_PRIOR, "loop_expert_ms", 0.0)
    monkeypatch.setitem(ENGINE_PRIOR, "prefill_miss_host_ms", 0.0)
    model, sim, slots = planned.model, planned.sim, 40
    profile = load_profile("rtx3060-12gb")  # (no engine figures of its own: the prior's)
    cand = _evaluate(model, profile, "bfloat16", "pinned", slots, {}, sim, 64)
    new_tokens = sim.decode_tokens / sim.counted_requests  # the trace's decode tokens per counted request
    misses = layer_miss_curves(sim, cand.policy, "none", 16, min_quota=2)
    curves = layer_time_curves(sim, cand.policy, "none", slots, 16, min_quota=2)
    for w in ((1.0, 1.0), (1.0, 0.0)):
        cost = layer_cost_curves(curves, profile, cand.miss_ms, 0.0, new_tokens, *w)
        assert np.allclose(cost, misses * cand.miss_ms / sim.counted_requests)
        quotas = best_quotas(cost, slots)
        assert sum(misses[l, q] for l, q in enumerate(quotas)) == sum(
            misses[l, q] for l, q in enumerate(best_quotas(misses, slots)))
    assert curves["loop_experts"][:, 2:].sum() > 0  # (there are loops: they cost nothing here)
    quotas, note = choose_slot_plan(model, profile, "bfloat16", cand, sim, 64, new_tokens)
    assert quotas == best_quotas(misses, slots).tolist() and "misses-only DP's" in note, note


def test_a_plans_predicted_times_are_the_time_model_of_its_chosen_quotas(planned):
    """make_plan's figures are `_times` of the quotas it writes (their replay, their looped experts), its
    request time TTFT + new tokens x decode; the per-layer curves summed at those quotas are that replay's
    own inputs; the plan is no slower than the misses-only DP's nor the global pool. Where loops cost
    more than the plan saves, the global pool is written and its figures stay the pool's."""
    from vismmoe.deploy.planner import _evaluate, make_plan, memory_cap_for
    from vismmoe.deploy.slot_plan import best_quotas, layer_miss_curves, layer_time_curves
    from vismmoe.deploy.time_model import loop_experts, read_ms, request_ms
    from vismmoe.offload.policies import SlotPlan

    model, trace, sim, new_tokens = planned.model, planned.trace, planned.sim, 16
    for loop_ms, per_layer in ((0.2, True), (1.0, False)):
        profile = _with(load_profile("rtx3060-12gb"), loop_expert_ms=loop_ms)
        cap = memory_cap_for(make_plan(model, profile, trace, max_new_tokens=new_tokens), 40)
        plan = make_plan(model, profile, trace, max_gpu_memory=cap, max_new_tokens=new_tokens)
        c, S = plan.chosen, plan.chosen.budget_slots
        assert S == 40 and (plan.slot_plan is not None) == per_layer, plan.slot_plan_note
        prefetch = "trace" if c.prefetch else "none"
        quotas = plan.slot_plan
        r = sim.run(c.policy, S, prefetch, None if quotas is None else SlotPlan(quotas))
        experts, looped = loop_experts(sim.prefill_distinct_by_request, S, quotas, model)
        read = read_ms(profile, c.store, model.expert_bytes(plan.dtype))
        expected = _times(model, profile, plan.dtype, c.decode_path, False, c.miss_ms, r["decode_misses_per_token"],
                          r["prefill_misses"], r["decode_prefetch_per_token"] if c.prefetch else 0.0,
                          c.predicted["prompt_tokens"], experts, read, prefetch=c.prefetch)
        assert {k: c.predicted[k] for k in expected} == pytest.approx(expected)
        assert c.predicted["prefill_looped_layers"] == pytest.approx(looped)
        assert c.predicted["request_ms"] == pytest.approx(expected["ttft_ms"] + new_tokens * expected["decode_ms_per_token"])
        pool = _evaluate(model, profile, plan.dtype, c.store, S, c.memory, sim, c.predicted["prompt_tokens"])
        misses_only = best_quotas(layer_miss_curves(sim, c.policy, prefetch, 16, min_quota=2), S)
        r0 = sim.run(c.policy, S, prefetch, SlotPlan(misses_only))
        e0 = loop_experts(sim.prefill_distinct_by_request, S, misses_only, model)[0]
        t0 = _times(model, profile, plan.dtype, c.decode_path, False, c.miss_ms, r0["decode_misses_per_token"],
                    r0["prefill_misses"], r0["decode_prefetch_per_token"] if c.prefetch else 0.0,
                    c.predicted["prompt_tokens"], e0, read, prefetch=c.prefetch)  # the misses-only plan's times
        if per_layer:
            assert c.predicted["request_ms"] < request_ms(pool.predicted, new_tokens)
            assert c.predicted["request_ms"] < request_ms(t0, new_tokens)  # the time-aware plan, strictly faster
            curves = layer_time_curves(sim, c.policy, prefetch, S, 16, min_quota=2)
            at = {n: sum(curves[n][l, q] for l, q in enumerate(quotas)) for n in curves if n != "allowed"}
            assert at["decode_misses"] == pytest.approx(r["decode_misses_per_token"])
            assert at["decode_prefetch"] == pytest.approx(r["decode_prefetch_per_token"])
            assert at["prefill_misses"] == pytest.approx(r["prefill_misses"])
            assert at["loop_experts"] == pytest.approx(experts)
        else:
            assert {k: c.predicted[k] for k in pool.predicted} == pytest.approx(pool.predicted)
            assert request_ms(pool.predicted, new_tokens) <= request_ms(t0, new_tokens)


def test_the_per_layer_curves_add_up_to_a_plans_replay_with_prefetch(planned):
    """With prefetch copies (a trace with predictions), each layer's curves at a plan's quotas add up to
    that plan's replay: decode misses and prefetch copies per decode token, prefill misses per request."""
    from vismmoe.deploy.planner import _Simulator
    from vismmoe.deploy.slot_plan import layer_time_curves
    from vismmoe.offload.policies import SlotPlan
    from vismmoe.offload.trace import synthetic_trace

    trace = synthetic_trace(num_requests=12, num_layers=4, num_experts=16, top_k=2, visual_tokens=12, text_tokens=6,
                            decode_steps=8, predict_accuracy=0.8, seed=3)
    sim = _Simulator(trace, planned.model)
    curves = layer_time_curves(sim, "lru", "trace", 40, 16, min_quota=2)
    for quotas in ([12, 2, 13, 13], [10, 10, 10, 10], [16, 16, 6, 2]):
        r = sim.run("lru", 40, "trace", SlotPlan(quotas))
        at = {n: sum(curves[n][l, q] for l, q in enumerate(quotas)) for n in ("decode_misses", "decode_prefetch",
                                                                          "prefill_misses")}
        assert at["decode_prefetch"] == pytest.approx(r["decode_prefetch_per_token"]) and at["decode_prefetch"] > 0
        assert at["decode_misses"] == pytest.approx(r["decode_misses_per_token"])
        assert at["prefill_misses"] == pytest.approx(r["prefill_misses"])
