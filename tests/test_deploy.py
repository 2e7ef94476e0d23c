"""Deployment: device profiles, probe, the planner and its configs, expert_budget: auto, memory by part."""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import numpy as np
import pytest
import yaml

import vismmoe
from vismmoe.config import load_config, parse_budget
from vismmoe.deploy.model_info import model_info
from vismmoe.deploy.planner import _Simulator, best_quotas, layer_miss_curves, make_plan
from vismmoe.deploy.profiles import load_profile, parse_profile, profile_names, shipped_profiles
from vismmoe.deploy.writer import write_plan
from vismmoe.errors import BudgetError, ConfigError

from .conftest import import_script

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "easyvqa-qwen3vlmoe"
TRACE = ROOT / "eval" / "results" / "easyvqa_test_traces.npz"
QWEN30B = ROOT / "configs" / "models" / "qwen3-vl-30b-a3b"
needs_bundle = pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file() or not TRACE.is_file(),
                                  reason="bundled model or its trace missing")


@pytest.fixture(scope="module")
def bundled_info():
    return model_info(BUNDLED)


@pytest.fixture(scope="module")
def bundled_trace():
    from vismmoe.offload.trace import load_trace

    return load_trace(TRACE)


# -- profiles ----------------------------------------------------------------------------------------


def test_shipped_profiles_cover_the_device_classes():
    names = set(profile_names())
    assert {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
            "rtx4060-laptop-8gb", "rtx3060-12gb", "rtx4090-24gb", "a100-40gb", "h100-80gb", "h200-141gb"} <= names
    for p in shipped_profiles():
        assert all(f.source in ("datasheet", "measured", "estimate") and f.ref for f in p.figures.values())
        if p.name.startswith("jetson"):
            assert p.unified and not p.has("h2d_pinned_gbs")
        else:
            assert p.kind == "discrete" and p["h2d_pinned_gbs"] < p["memory_bandwidth_gbs"]
    assert load_profile("h100-80gb").figures["h2d_pinned_gbs"].source == "measured"
    assert load_profile("jetson-orin-nano-8gb").figures["memory_gb"].source == "datasheet"


def _raw(name):
    return yaml.safe_load((ROOT / "configs" / "devices" / f"{name}.yaml").read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["figures"].pop("memory_bandwidth_gbs"), r"needs figure\(s\) \['memory_bandwidth_gbs'\]"),
    (lambda d: d["figures"]["memory_gb"].update(value=-8), "positive finite number"),
    (lambda d: d["figures"]["memory_gb"].update(value="8GB"), "positive finite number"),
    (lambda d: d["figures"]["memory_gb"].pop("source"), "source must be one of"),
    (lambda d: d["figures"]["memory_gb"].update(ref=""), "ref must name"),
    (lambda d: d["figures"].update(pcie_gbs={"value": 1, "source": "estimate", "ref": "x"}), "unknown figure"),
    (lambda d: d.update(colour="green"), "unknown key"),
    (lambda d: d.update(kind="tablet"), "kind must be one of"),
    (lambda d: d.update(compute_capability="eight"), "compute_capability"),
    (lambda d: d["figures"]["reserved_gb"].update(value=100), "reserved_gb"),
    (lambda d: d["figures"].update(h2d_pinned_gbs={"value": 10, "source": "estimate", "ref": "x"}),
     "make no sense on a unified-memory device"),
])
def test_bad_profiles_are_rejected_with_the_field_named(mutate, message):
    data = copy.deepcopy(_raw("jetson-orin-nano-8gb"))
    mutate(data)
    with pytest.raises(ConfigError, match=message):
        parse_profile(data, "bad.yaml")


def test_unknown_profile_lists_the_shipped_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown device profile 'jetson-thor'.*rtx4090-24gb"):
        load_profile("jetson-thor")
    bad = tmp_path / "p.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(bad)


def test_probe_runs_on_cpu_and_writes_a_valid_profile(tmp_path):
    from vismmoe.deploy.probe import probe

    data = probe(BUNDLED if BUNDLED.is_dir() else None, copy_mib=8, repeats=2)
    profile = parse_profile(data, "probe")
    if profile.kind == "cpu":  # this machine: no GPU fields at all
        assert not profile.gpu_name and not profile.has("memory_gb") and not profile.has("h2d_pinned_gbs")
    assert profile["cpu_cores"] >= 1 and profile["ram_gb"] > 0.1 and profile["disk_read_gbs"] > 0
    assert all(f.source == "measured" for f in profile.figures.values())
    # a probed profile plans like a shipped one
    path = tmp_path / "probe.yaml"
    path.write_text(yaml.safe_dump(data))
    if BUNDLED.is_dir():
        plan = make_plan(model_info(BUNDLED), load_profile(path), image_size=64)
        assert plan.chosen.predicted["decode_ms_per_token"] > 0


def test_probe_copy_test_moves_link_sized_records_whatever_the_model():
    """The probe's copy-kernel test moves records of several MiB, 64 MiB or more in all, not the model's
    records (the bundled model's 98 KB records are latency-bound: 17.4 GB/s on an H200 against 48 GB/s
    for the bench model's 9.4 MB ones), so its GB/s is the link's for a model of any record size."""
    from vismmoe.deploy.probe import copy_records_shape

    for copy_mib in (1, 8, 64, 100):
        n, numel = copy_records_shape(copy_mib)
        assert numel * 2 >= 4 * 2**20 and n * numel * 2 >= max(64, copy_mib) * 2**20


def test_miss_time_is_record_bytes_over_the_link_plus_the_probed_copy_latency():
    from vismmoe.deploy.time_model import ENGINE_PRIOR, _miss_ms

    data = load_profile("rtx4090-24gb").to_dict()
    data["figures"]["copy_kernel_gbs"] = dict(value=48.0, source="measured", ref="test")
    without = parse_profile(copy.deepcopy(data), "test")
    data["figures"]["copy_latency_ms"] = dict(value=0.02, source="measured", ref="test")
    probed = parse_profile(data, "test")
    for record in (98_304, 9_437_184):  # the bundled model's record, the bench model's
        assert _miss_ms(probed, "pinned", record, "static") == pytest.approx(record / 48e9 * 1e3 + 0.02)
        assert _miss_ms(without, "pinned", record, "static") == pytest.approx(
            record / 48e9 * 1e3 + ENGINE_PRIOR["copy_overhead_ms"])
        # the host path's DMA: the pinned link, the same fixed cost
        assert _miss_ms(probed, "pinned", record, "host") == pytest.approx(
            record / (probed["h2d_pinned_gbs"] * 1e9) * 1e3 + 0.02)


def test_miss_time_per_store_costs_only_the_tiers_the_store_has():
    """pinned: the pinned link (the copy kernel on the static path); memory (a pageable slab, no disk): the
    pageable link on either path; mmap: the disk read, then the pageable copy. On a unified-memory device
    every slab store (pinned or memory) is a DRAM copy and only mmap reads the disk. An unknown store is
    refused rather than costed as one of them."""
    from vismmoe.deploy.time_model import _miss_ms

    GBs = 1e9
    data = load_profile("rtx4090-24gb").to_dict()
    data["figures"]["copy_kernel_gbs"] = dict(value=48.0, source="measured", ref="test")
    data["figures"]["copy_latency_ms"] = dict(value=0.02, source="measured", ref="test")
    gpu = parse_profile(data, "test")
    jetson = load_profile("jetson-orin-nano-8gb")
    for record in (98_304, 9_437_184):
        for path in ("static", "host", "generate"):
            pinned = record / ((48.0 if path == "static" else gpu["h2d_pinned_gbs"]) * GBs)
            assert _miss_ms(gpu, "pinned", record, path) == pytest.approx(pinned * 1e3 + 0.02)
            assert _miss_ms(gpu, "memory", record, path) == pytest.approx(
                record / (gpu["h2d_pageable_gbs"] * GBs) * 1e3 + 0.02)
            assert _miss_ms(gpu, "mmap", record, path) == pytest.approx(
                (record / (gpu["disk_read_gbs"] * GBs) + record / (gpu["h2d_pageable_gbs"] * GBs)) * 1e3 + 0.02)
            dram = record / (jetson["memory_bandwidth_gbs"] * GBs) * 1e3 + 0.007
            assert _miss_ms(jetson, "memory", record, path) == pytest.approx(dram)
            assert _miss_ms(jetson, "pinned", record, path) == pytest.approx(dram)
            assert _miss_ms(jetson, "mmap", record, path) == pytest.approx(
                dram + record / (jetson["disk_read_gbs"] * GBs) * 1e3)
    with pytest.raises(ConfigError, match="store must be one of"):
        _miss_ms(gpu, "nvme", 98_304, "static")


def test_probed_engine_times_are_the_models_own_with_the_input_building_apart(qwen_checkpoint):
    """with_engine_times replaces the engine figures of a profile probed on one model by those measured on
    another (a stale figure must not survive), and the host's input building is its own figure and TTFT
    term, not folded into prefill_fixed_ms."""
    from vismmoe.deploy.engine_times import ENGINE_TIME_FIGURES, with_engine_times
    from vismmoe.deploy.time_model import _times

    machine = load_profile("rtx4090-24gb").to_dict()
    machine["figures"]["prefill_fixed_ms"] = dict(value=999.0, source="measured", ref="another model")
    data = with_engine_times(machine, qwen_checkpoint, new_tokens=3)
    figures = data["figures"]
    assert {"prefill_inputs_ms", "prefill_fixed_ms", "prefill_layer_ms", "generate_layer_ms", "offload_layer_ms",
            "generate_offload_layer_ms", "generate_prefetch_layer_ms", "loop_expert_ms",
            "prefill_miss_host_ms", "mmap_read_ms"} <= set(figures)  # (five at partial budgets)
    assert figures["mmap_read_ms"]["value"] > 0 and "page cache" in figures["mmap_read_ms"]["ref"]
    assert set(ENGINE_TIME_FIGURES) >= {k for k in figures if k.startswith(("prefill_", "decode_layer", "generate_"))}
    assert figures["prefill_fixed_ms"]["value"] != 999.0 and "qwen" in figures["prefill_fixed_ms"]["ref"].lower()
    # on a CPU the rounds' figures are not charged (time_model.host_rates): one round each keeps the probe short
    assert figures["loop_expert_ms"]["ref"].count("1 round of") == 1
    assert "1 round of generate decode" in figures["generate_offload_layer_ms"]["ref"]
    assert figures["h2d_pinned_gbs"] == machine["figures"]["h2d_pinned_gbs"]  # the machine's figures stay
    profile = parse_profile(data, "probe")
    info = model_info(qwen_checkpoint)
    t = _times(info, profile, "bfloat16", "static", True, 0.1, 0.0, 0.0, 0.0, 64)
    assert t["ttft_inputs_ms"] == figures["prefill_inputs_ms"]["value"]
    assert t["ttft_overhead_ms"] == pytest.approx(t["ttft_inputs_ms"] + profile["prefill_fixed_ms"]
                                                  + info.num_moe_layers * profile["prefill_layer_ms"])
    # a profile without probed engine times: the prior's prefill_fixed_ms holds the input building
    assert _times(info, load_profile("rtx4090-24gb"), "bfloat16", "static", True, 0.1, 0.0, 0.0, 0.0, 64)[
        "ttft_inputs_ms"] == 0.0


# -- model sizes -------------------------------------------------------------------------------------


@needs_bundle
def test_bundled_sizes_from_headers_match_the_trace_and_file(bundled_info, bundled_trace):
    info = bundled_info
    assert info.sizes_from == "safetensors headers"
    assert info.expert_bytes(info.checkpoint_dtype) == bundled_trace.meta.expert_bytes
    file_bytes = (BUNDLED / "model.safetensors").stat().st_size
    stored = info.total_expert_bytes("float32") + info.non_expert_bytes("float32")
    assert 0 < file_bytes - stored < 64 * 1024  # the rest is the JSON header


def test_qwen3_vl_30b_sizes_from_its_config():
    info = model_info(QWEN30B)
    assert info.sizes_from.startswith("config")
    assert (info.num_moe_layers, info.num_experts, info.top_k) == (48, 128, 8)
    assert info.expert_bytes("bfloat16") == 9_437_184  # research/models.md
    assert round(info.total_expert_bytes("bfloat16") / 1e9, 1) == 58.0
    assert 3.5e9 < info.non_expert_bytes("bfloat16") < 4.5e9
    # it fits a 4090 only partly, an H200 entirely, and a Jetson Orin Nano not at all
    assert make_plan(info, load_profile("h200-141gb")).chosen.budget_slots == 48 * 128
    assert make_plan(info, load_profile("rtx4090-24gb")).chosen.budget_slots < 48 * 128
    with pytest.raises(BudgetError, match="cannot fit jetson-orin-nano-8gb.*short by"):
        make_plan(info, load_profile("jetson-orin-nano-8gb"), max_gpu_memory=5e9)


# -- the planner -------------------------------------------------------------------------------------


def test_dp_quotas_are_optimal_on_random_curves():
    rng = np.random.default_rng(0)
    for _ in range(20):
        L, Q = 3, 5
        curves = np.concatenate([np.full((L, 1), np.inf), rng.integers(0, 50, (L, Q)).astype(float)], axis=1)
        for S in range(L, L * Q + 1):
            best = min((sum(curves[l, q[l]] for l in range(L)), q)
                       for q in itertools.product(range(1, Q + 1), repeat=L) if sum(q) == S)[0]
            quotas = best_quotas(curves, S)
            assert quotas.sum() == S and (quotas >= 1).all()
            assert sum(curves[l, quotas[l]] for l in range(L)) == best


@needs_bundle
@pytest.mark.parametrize("slots", [8, 16, 24, 32, 40])
def test_per_layer_plan_beats_uniform_on_the_bundled_trace(bundled_info, bundled_trace, slots):
    from vismmoe.offload.policies import SlotPlan

    sim = _Simulator(bundled_trace, bundled_info)
    curves = layer_miss_curves(sim, "lru", "none", min(16, slots - 3))
    quotas = best_quotas(curves, slots)
    planned = sim.run("lru", slots, "none", SlotPlan(quotas))
    uniform = sim.run("lru", slots, "none", SlotPlan.uniform(slots, 4))
    assert planned["misses"] == sum(curves[l, q] for l, q in enumerate(quotas))  # layers are independent
    assert planned["hit_rate"] > uniform["hit_rate"] + 0.01


@needs_bundle
def test_plan_with_and_without_the_trace(bundled_info, bundled_trace, tmp_path):
    profile = load_profile("rtx3060-12gb")
    from vismmoe.deploy.planner import memory_cap_for

    cap = memory_cap_for(make_plan(bundled_info, profile, image_size=64), 20)  # 20 of 64 slots fit
    prior = make_plan(bundled_info, profile, max_gpu_memory=cap, image_size=64)
    traced = make_plan(bundled_info, profile, bundled_trace, max_gpu_memory=cap, image_size=64, trace_path=str(TRACE))
    for plan in (prior, traced):
        p, c = plan.chosen.predicted, plan.chosen
        assert c.budget_slots == 20 and c.memory["gpu_total"] <= cap
        assert p["decode_ms_per_token"] == pytest.approx(p["decode_compute_ms"] + p["decode_overhead_ms"]
                                                         + p["decode_miss_ms"] + p["decode_prefetch_ms"])
        assert p["decode_misses_per_token"] > 0 and p["ttft_ms"] > p["ttft_overhead_ms"]
    assert prior.slot_plan is None and prior.engine_config()["slot_plan"] == "global"  # no trace: no plan
    assert "prior" in prior.to_dict()["plan"]["routing"]
    assert traced.chosen.hit_rates["per_layer_plan"] >= traced.chosen.hit_rates["uniform_plan"]
    times = traced.chosen.request_ms  # predicted TTFT + 64 x decode ms/token of each plan weighed
    assert times["per_layer_plan"] <= times["misses_only_plan"]
    assert traced.chosen.predicted["request_ms"] == min(times.values())
    if traced.slot_plan is not None:  # written only where it is predicted faster than the global pool
        assert sum(traced.slot_plan) == 20 and min(traced.slot_plan) >= bundled_info.top_k
        assert times["per_layer_plan"] < times["global_pool"]
        assert traced.engine_config()["slot_plan"] == traced.slot_plan
    text = (write_plan(traced, tmp_path / "d.yaml")).read_text()
    assert "# predicted decode" in text and "visual_keep: 1.0" in text
    with pytest.raises(ConfigError, match="record a trace of this model"):
        from vismmoe.offload.trace import synthetic_trace

        make_plan(bundled_info, profile, synthetic_trace(2, 3, 8, 2))


def test_a_trace_without_requests_is_refused_by_name(qwen_checkpoint, tmp_path):
    """Tracing stopped before any request ran saves a trace of no requests: planning with it is a ConfigError
    naming the file and the fix, not a division by zero in the replay (the planner counts per request)."""
    from vismmoe.offload.trace import load_trace

    engine = vismmoe.load(qwen_checkpoint, device="cpu")
    engine.start_trace("empty")
    engine.stop_trace(tmp_path / "empty.npz")
    engine.close()
    trace = load_trace(tmp_path / "empty.npz")
    assert trace.num_requests == 0
    info, profile = model_info(qwen_checkpoint), load_profile("rtx4060-laptop-8gb")
    with pytest.raises(ConfigError, match=r"empty\.npz holds no requests.*plan without a trace"):
        make_plan(info, profile, trace, trace_path=str(tmp_path / "empty.npz"))


@needs_bundle
def test_goal_memory_uses_less_gpu_memory(bundled_info, bundled_trace):
    profile = load_profile("rtx4060-laptop-8gb")
    fast = make_plan(bundled_info, profile, bundled_trace, goal="latency", image_size=64)
    lean = make_plan(bundled_info, profile, bundled_trace, goal="memory", image_size=64)
    assert lean.chosen.memory["gpu_total"] <= fast.chosen.memory["gpu_total"]
    assert lean.chosen.predicted["decode_ms_per_token"] <= 1.1 * fast.chosen.predicted["decode_ms_per_token"] + 1e-9


@needs_bundle
@pytest.mark.parametrize("profile_name", ["jetson-orin-nano-8gb", "rtx4060-laptop-8gb", "rtx3060-12gb", "h100-80gb"])
def test_planner_never_writes_a_config_that_fails_to_load(bundled_info, profile_name, tmp_path):
    """Grid of memory caps and contexts: every written config validates, fits its cap, and loads
    (on this CPU, device overridden) with the planned slots and non-expert bytes."""
    profile = load_profile(profile_name)
    from vismmoe.deploy.memory import gpu_parts, total

    loaded = 0
    prompt = bundled_info.prompt_tokens(64, 64)  # the planner's envelope: chat template, image, question
    for extra, context in itertools.product((2e6, 5e6, 2e7, 1e9), (prompt + 1, 512, 4096)):
        smallest = total(gpu_parts(bundled_info, "bfloat16", slots=2, prompt_tokens=prompt, new_tokens=context - prompt,
                                   visual_tokens=bundled_info.visual_tokens(64), static=False, prefetch=True,
                                   store="mmap", unified=profile.unified, compute_capability=profile.compute_capability))
        cap = int(profile["reserved_gb"] * 1e9) + smallest + extra
        try:
            plan = make_plan(bundled_info, profile, max_gpu_memory=cap, context=context, image_size=64)
        except BudgetError as exc:
            assert "short by" in str(exc)
            continue
        assert plan.chosen.memory["gpu_total"] <= cap
        path = write_plan(plan, tmp_path / f"{extra}-{context}.yaml")
        config = load_config(path)
        assert config.expert_budget == plan.chosen.budget_slots * bundled_info.expert_bytes("bfloat16")
        if context == 512 and extra in (2e6, 1e9):
            engine = vismmoe.load(BUNDLED, config=path, device="cpu")
            assert engine.num_slots == plan.chosen.budget_slots
            assert engine.non_expert_bytes == plan.chosen.memory["non_expert_weights"]  # weights and buffers
            engine.close()
            loaded += 1
    assert loaded == 2


# -- engine: auto budget, slot_plan, memory by part ---------------------------------------------------


def test_auto_budget_and_slot_plan_key(qwen_checkpoint):
    assert parse_budget("auto") == ("auto", 0.0)
    with pytest.raises(ConfigError, match="slot_plan must be"):
        load_config({"slot_plan": [1, 0]})
    with pytest.raises(ConfigError, match="slot_plan must be"):
        load_config({"slot_plan": "per-layer"})
    engine = vismmoe.load(qwen_checkpoint, expert_budget="auto", device="cpu")
    total = len(engine.layout.layers) * engine.layout.num_experts
    assert engine.num_slots == total  # a tiny model fits this machine's free memory entirely
    assert isinstance(engine.config.expert_budget, int)
    result = engine.generate(image=None, prompt="hello", max_new_tokens=3)
    m = result.stats.memory
    assert m["non_expert_weights"] == sum(p.numel() * p.element_size() for p in engine.model.parameters()) + sum(
        b.numel() * b.element_size() for b in engine.model.buffers())
    assert m["expert_cache"] == engine.num_slots * engine.store.record_bytes
    assert m["host_store"] == engine.store.total_bytes and m["kv_cache"] > 0 and m["activations_peak"] is None
    assert "memory by part" in result.stats.table() and "host memory (expert store)" in result.stats.table()


def test_cli_devices_plan_and_errors(tmp_path, capsys):
    from vismmoe.cli import main

    assert main(["devices"]) == 0
    assert "jetson-orin-nano-8gb" in capsys.readouterr().out
    assert main(["plan", "--model", str(QWEN30B), "--device", "nope"]) == 2
    assert "unknown device profile" in capsys.readouterr().err
    assert main(["plan", "--model", str(QWEN30B), "--device", "jetson-orin-nano-8gb", "--max-gpu-memory", "5GB"]) == 2
    assert "short by" in capsys.readouterr().err
    out = tmp_path / "q.yaml"
    assert main(["plan", "--model", str(QWEN30B), "--device", "rtx4090-24gb", "--output", str(out)]) == 0
    # 58 GB of experts exceed 85% of the profile's 64 GB host RAM: the NVMe (mmap) tier
    assert load_config(out).store == "mmap" and "predicted decode" in out.read_text()


# -- the time model against recorded GPU runs ---------------------------------------------------------


@needs_bundle
def test_time_model_recomputed_on_the_recorded_gpu_runs():
    """eval/check_time_model.py re-predicts the recorded H200 runs (planner validation under emulation,
    profile_static) from their recorded inputs: every prediction within the issue's +-25%. The prior was
    fitted on these rows (in-sample): this guards the time model against drifting away from them."""
    module = import_script(ROOT / "eval" / "check_time_model.py")
    rows = module.check()
    fitted = [r for r in rows if not r["source"].startswith("session")]
    ratios = [r[f"{k}_meas"] / r[f"{k}_new"] for r in fitted for k in ("ttft", "decode") if r[f"{k}_meas"] is not None]
    assert len(ratios) >= 20
    assert all(0.75 <= x <= 1.25 for x in ratios), ratios
    # Session 4 (after the fit): its one generate-path row, with the probe's one-request generate_layer_ms
    # (the 57.9 ms prediction) and with the prior's (out of sample for that row's run, fitted on the
    # earlier run of the same config)
    generate = {r["source"]: r["decode_meas"] / r["decode_new"] for r in rows
                if r["source"].startswith("session 4") and r["path"] == "generate"}
    assert generate["session 4, the probe's engine times"] < 0.3
    assert 0.75 <= generate["session 4, the prior's generate_layer_ms"] <= 1.25
    # Sessions 5 and 6: the run's probe reproduces its recorded predictions (to the plan's rounding of its
    # recorded inputs) but for the one change since: a static-path miss costs its link time, no longer
    # + the prior's 0.05 ms (the captured step's per-miss work is its copy). Correcting session 5's probe
    # copy kernel (measured on 98 KB records) changes nothing: under emulation a miss costs the profile's link
    five = [r for r in rows if r["source"] == "session 5, the run's probe"]
    fixed = [r for r in rows if r["source"] == "session 5, probe's copy kernel corrected"]
    six = [r for r in rows if r["source"] == "session 6, the run's probe"]
    assert len(five) == len(fixed) == 16 and len(six) == 13 and all(r["inputs_ms"] > 10 for r in five + six)
    changed = 0
    for a in five + six:
        removed = 0.05 * a["decode_misses"] if a["path"].startswith("static") and not a["complete"] else 0.0
        changed += removed > 0
        # TTFT: all but the prefill's misses and one-by-one experts reproduce (session 7 changed those: the
        # longer of the link's chain and the host's, where the two were added)
        rest_new, rest_old = a["ttft_new"] - a["ttft_prefill_new"], a["ttft_old"] - a["ttft_prefill_old"]
        assert rest_new == pytest.approx(rest_old, rel=5e-3, abs=0.05)
        if a["complete"]:
            assert a["ttft_new"] == pytest.approx(a["ttft_old"], rel=5e-3)
        assert a["decode_new"] == pytest.approx(a["decode_old"] - removed, rel=5e-3)
    assert changed == 10  # partial static rows: session 5 bundled x 3 + bench x 3 (3060 at 1.0 holds 1,023 of 1,536); session 6 bundled x 3 + bench x 1
    for a, b in zip(five, fixed):
        assert b["ttft_new"] == pytest.approx(a["ttft_new"]) and b["decode_new"] == pytest.approx(a["decode_new"])
    # The easy-VQA 25% static rows of session 6 (0.67-0.69 before) are inside the band now (in-sample:
    # the change was found on them)
    static_quarter = [r["decode_meas"] / r["decode_new"] for r in six
                      if r["model"] == "bundled" and r["budget"] == 0.25 and r["path"].startswith("static")]
    assert len(static_quarter) == 3 and all(0.75 <= x <= 1.25 for x in static_quarter), static_quarter
    profiles = {r["profile"] for r in rows if r["source"].startswith("validate")}
    assert {"jetson-orin-nano-8gb", "rtx4060-laptop-8gb", "rtx3060-12gb", "rtx4090-24gb"} <= profiles
