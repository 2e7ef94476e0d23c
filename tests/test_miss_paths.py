"""Miss paths (offload/miss_paths.py): copy, zerocopy and cpu give the same tokens on every decode path
where they run, decide alike on the static and generate paths, count what they served, and auto's cost
model picks what its figures say."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vismmoe
from vismmoe import ConfigError
from vismmoe.offload import miss_paths
from vismmoe.offload.miss_paths import COPY, CPU, ZEROCOPY, MissFigures, MissPlanner, check_setting, choose

from .conftest import random_requests

RUNS = [("static", "copy"), ("static", "zerocopy"), ("generate", "copy"), ("generate", "zerocopy"),
        ("generate", "cpu")]


def _answers(checkpoint, budget, requests, fused_twin=False, **config):
    """{(decode, miss_path): [Result per request]} for every path that can run on this CPU."""
    out = {}
    engine = vismmoe.load(checkpoint, expert_budget=budget, **config)
    for decode, path in RUNS:
        engine.reconfigure(decode=decode, miss_path=path)  # a new runtime and cache, the same model
        if fused_twin:  # decode steps through ops.fused_moe_decode (its torch twin on the CPU), as on a GPU
            engine.runtime.fused_decode = True
        assert engine.info().miss_paths["per_layer"] == [path] * len(engine.layout.layers)
        out[(decode, path)] = [engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
                               for image, prompt in requests]
    return out


def _check_counts(result, path):
    s = result.stats
    served = s.misses_by_path
    assert sum(served.values()) == s.expert_misses
    for layer, total in enumerate(s.misses_per_layer):
        assert sum(v[layer] for v in s.misses_by_path_per_layer.values()) == total
    # Prefill steps copy; in-place misses move no bytes into slots.
    assert served["copy"] >= s.prefill_misses
    assert s.bytes_h2d == served["copy"] * s.record_bytes + s.prefetch_issued_bytes
    others = {"zerocopy", "cpu"} - {path}
    assert all(served[o] == 0 for o in others)
    return served.get(path, 0)


def test_every_miss_path_gives_the_copy_paths_tokens(qwen_checkpoint):
    requests = random_requests(1, seed=31) + [(None, "what is the color of the red square?")]
    runs = _answers(qwen_checkpoint, "min", requests, prefetch=True)
    base = runs[("static", "copy")]
    in_place = 0
    for (decode, path), results in runs.items():
        for a, b in zip(base, results):
            assert b.token_ids == a.token_ids, (decode, path)
            assert b.stats.decode_path.startswith("static") == (decode == "static")
            served = _check_counts(b, path)
            if path != "copy":
                in_place += served
                assert b.stats.miss_paths == [path] * len(b.stats.miss_paths)
    assert in_place > 0
    # In place decides alike on both decode paths: the same hits and misses per layer.
    for a, b in zip(runs[("static", "zerocopy")], runs[("generate", "zerocopy")]):
        assert (a.stats.hits_per_layer, a.stats.misses_per_layer, a.stats.misses_by_path_per_layer) == \
            (b.stats.hits_per_layer, b.stats.misses_per_layer, b.stats.misses_by_path_per_layer)


def test_in_place_paths_through_the_fused_ops_twin(qwen_checkpoint):
    # Decode steps through ops.fused_moe_decode (the GPU's path; its torch twin here): zerocopy passes host
    # rows (-r-1) to it, cpu computes the resident pairs there (the missed ones read a zero expert) and adds
    # the CPU's results.
    requests = random_requests(1, seed=32)
    runs = _answers(qwen_checkpoint, 0.3, requests, fused_twin=True, prefetch=False)
    base = runs[("static", "copy")]
    for key, results in runs.items():
        for a, b in zip(base, results):
            assert b.token_ids == a.token_ids, key
            _check_counts(b, key[1])
    assert sum(r.stats.misses_by_path["cpu"] for r in runs[("generate", "cpu")]) > 0


def test_cpu_path_reads_an_mmap_store(qwen_checkpoint):
    (image, prompt), = random_requests(1, seed=33)
    copy = vismmoe.load(qwen_checkpoint, expert_budget="min", store="mmap", miss_path="copy")
    cpu = vismmoe.load(qwen_checkpoint, expert_budget="min", store="mmap", miss_path="cpu")
    a = copy.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    b = cpu.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    assert a.token_ids == b.token_ids and b.stats.misses_by_path["cpu"] > 0
    cpu.close()


def test_cpu_path_with_decode_auto_takes_the_generate_path(qwen_checkpoint):
    (image, prompt), = random_requests(1, seed=34)
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, miss_path="cpu")
    info = engine.info()
    assert info.decode_path == "generate" and "miss_path: cpu" in info.static_unavailable
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path == "generate"
    engine.reconfigure(miss_path="zerocopy")  # a new runtime: static decode again, misses read in place
    assert engine.info().miss_paths["per_layer"][0] == "zerocopy"
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path.startswith("static")
    with pytest.raises(ConfigError, match="decode: static"):
        engine.reconfigure(miss_path="cpu", decode="static")
    assert engine.config.miss_path == "zerocopy"  # the engine keeps serving as it was


def test_bad_miss_path_settings_are_config_errors(qwen_checkpoint):
    with pytest.raises(ConfigError, match="miss_path must be one of auto, copy, zerocopy, cpu"):
        vismmoe.load(qwen_checkpoint, miss_path="fast")
    with pytest.raises(ConfigError, match="store: mmap has none"):
        vismmoe.load(qwen_checkpoint, miss_path="zerocopy", store="mmap")
    with pytest.raises(ConfigError, match="host-decided path"):
        vismmoe.load(qwen_checkpoint, miss_path="cpu", decode="static")
    # What needs the machine (a GPU reading the slab): a page-locked store and the fused decode kernel.
    with pytest.raises(ConfigError, match="page-locked store"):
        check_setting("zerocopy", "auto", "pageable", cuda=True, fused=True)
    with pytest.raises(ConfigError, match="fused decode kernel"):
        check_setting("zerocopy", "auto", "page-locked", cuda=True, fused=False)
    check_setting("zerocopy", "auto", "page-locked", cuda=True, fused=True)
    check_setting("cpu", "generate", "mmap", cuda=True, fused=False)


def test_auto_on_a_cpu_device_copies_and_says_why(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min", miss_path="auto")
    info = engine.info()
    assert info.miss_path == "auto" and info.miss_paths["per_layer"] == ["copy"] * info.layers
    assert "no GPU" in info.miss_paths["why"]
    full = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=1.0, miss_path="auto")
    assert "resident" in full.info().miss_paths["why"]
    assert vismmoe.load(qwen_checkpoint, device="cpu").info().miss_path == "copy"  # the default


def test_auto_copies_where_the_pool_keeps_experts(qwen_checkpoint):
    """Reading in place gives up the reuse a slot would give: auto considers it only below 2 x top-k slots."""
    from vismmoe.offload.miss_paths import MissPathControl

    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static")
    assert engine.num_slots >= 2 * engine.layout.top_k
    control = MissPathControl("auto", engine.runtime, engine.store, engine.layout, engine.num_slots, "auto",
                              figures=figures(copy_ms=0.2, zero_copy_ms=0.01, layer_us=1))  # in place far cheaper
    assert control.names() == ["copy"] * len(engine.layout.layers) and "keeps experts" in control.why


# -- auto's cost model on constructed figures -------------------------------------------------------------


def figures(copy_ms=0.19, zero_copy_ms=0.187, layer_us=7.5, cpu_ms=0.3, host_layer_ms=2.13, host_copy_ms=None):
    return MissFigures(copy_ms / 1e3, (host_copy_ms or copy_ms) / 1e3, zero_copy_ms / 1e3, layer_us / 1e6,
                       cpu_ms / 1e3, host_layer_ms / 1e3)


ALL = {COPY, ZEROCOPY, CPU}


def test_cost_model_choices(monkeypatch):
    L = 4
    # Nothing expected to miss: zerocopy's fixed cost per layer loses to copy.
    paths, static, _ = choose(figures(), np.zeros(L), ALL, True)
    assert static and (paths == COPY).all()
    # Many misses, reads in place slightly cheaper per record than copies (H200-like): zerocopy.
    paths, static, report = choose(figures(), np.full(L, 6.0), ALL, True)
    assert static and (paths == ZEROCOPY).all()
    assert report["static_ms_per_token"] == pytest.approx(L * (6 * 0.187 + 0.0075), rel=1e-6)
    # One miss per token saves 3 µs, less than the 7.5 µs fixed cost: copy. Per layer.
    paths, _, _ = choose(figures(), np.array([1.0, 6.0, 0.5, 6.0]), ALL, True)
    assert paths.tolist() == [COPY, ZEROCOPY, COPY, ZEROCOPY]
    # A slow link (12 GB/s: 0.79 ms per record) and a CPU at 0.15 ms per expert (costed at twice that): with
    # few misses, static decode stays (the host path costs 2.13 ms per layer call); with many, the host
    # path and the CPU win.
    slow = figures(copy_ms=0.79, zero_copy_ms=0.78, cpu_ms=0.15)
    paths, static, _ = choose(slow, np.full(L, 1.0), ALL, True)
    assert static and (paths != CPU).all()
    paths, static, report = choose(slow, np.full(L, 8.0), ALL, True)
    assert not static and (paths == CPU).all()
    assert report["host_ms_per_token"] == pytest.approx(L * (8 * 0.15 * miss_paths.CPU_COST_MARGIN + 2.13))
    # The H200 run's figures on that link at the minimum budget of the 12-layer bench model
    # (eval/results/miss_paths/miss_path_table_session5.json): without the margin the model chose the CPU
    # (69.8 vs 75.0 ms/token predicted), which ran at 107-122 ms/token against 74 for zerocopy. With it, the bus.
    h200_12 = figures(copy_ms=0.793432, zero_copy_ms=0.793432, layer_us=0, cpu_ms=0.468081)
    misses = np.array([7.9792] * 11 + [6.8125])
    paths, static, _ = choose(h200_12, misses, ALL, True)
    assert static and (paths != CPU).all()
    monkeypatch.setattr(miss_paths, "CPU_COST_MARGIN", 1.0)
    paths, static, report = choose(h200_12, misses, ALL, True)
    assert not static and (paths == CPU).all()
    assert report["static_ms_per_token"] == pytest.approx(75.02, abs=0.05)
    assert report["host_ms_per_token"] == pytest.approx(69.82, abs=0.05)
    # A request on the host path anyway (decode: generate): the CPU wins as soon as it is cheaper per miss.
    paths, static, _ = choose(slow, np.full(L, 1.0), ALL, False)
    assert not static and (paths == CPU).all()
    # Zero-copy not available here: never chosen.
    paths, _, _ = choose(figures(), np.full(L, 6.0), {COPY, CPU}, True)
    assert (paths == COPY).all()


def test_cost_model_hysteresis_and_planner():
    fig = figures(copy_ms=0.19, zero_copy_ms=0.185)  # zerocopy 2.6% cheaper per record at 6 misses
    current = np.full(2, COPY)
    paths, _, _ = choose(fig, np.full(2, 6.0), ALL, True, current)
    assert (paths == COPY).all()  # within 10%: no switch
    paths, _, _ = choose(figures(zero_copy_ms=0.1), np.full(2, 6.0), ALL, True, current)
    assert (paths == ZEROCOPY).all()
    planner = MissPlanner(miss_paths.prior_misses(8, 16, 2, 64), 8)
    assert planner.misses.tolist() == [8 * (1 - 8 / 64)] * 2
    planner.observe(np.array([8, 0]), np.array([8, 0]))  # layer 0: half missed; layer 1 not seen
    assert planner.misses[0] == pytest.approx(0.5 * 7 + 0.5 * 4) and planner.misses[1] == 7


def test_switching_a_layer_that_reads_host_rows_needs_no_new_capture(qwen_checkpoint):
    # On a CPU device, where auto starts every layer on copy (on a GPU it may start on zerocopy at "min").
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min", miss_path="zerocopy", decode="static")
    runtime, L = engine.runtime, len(engine.layout.layers)
    assert runtime.residency.miss_modes.tolist() == [1] * L
    assert runtime.set_miss_paths([COPY] * L) is False  # the device scalars only
    assert runtime.residency.miss_modes.tolist() == [0] * L
    assert runtime.set_miss_paths([ZEROCOPY] + [COPY] * (L - 1)) is False
    copy = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min", miss_path="copy", decode="static")
    assert copy.runtime.residency.miss_modes is None  # copy only: the decision kernel runs without it
    auto = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min", decode="static", miss_path="auto")
    assert auto.runtime.residency.miss_modes is not None
    assert auto.runtime.set_miss_paths([ZEROCOPY] * L) is True  # new host-reading layers: capture again
    (image, prompt), = random_requests(1, seed=35)
    a = auto.generate(image=image, prompt=prompt, max_new_tokens=5, min_new_tokens=5)
    b = copy.generate(image=image, prompt=prompt, max_new_tokens=5, min_new_tokens=5)
    assert a.token_ids == b.token_ids and a.stats.misses_by_path["zerocopy"] > 0


def _auto_moves_every_layer_to_zero_copy(engine, monkeypatch):
    """Before the engine's next request that follows decode steps, auto chooses zerocopy for every layer
    (the engine's own path: MissPathControl.before_request, then drop_graphs where it returns True).
    Returns the list that counts drop_graphs calls."""
    L = len(engine.layout.layers)
    assert engine.miss.names() == ["copy"] * L and engine.runtime.device.host_layers == set()
    engine.miss.figures = figures()  # auto re-decides only with figures (a GPU's are measured at load)
    monkeypatch.setattr(engine.miss, "_decide", lambda current: setattr(engine.miss, "paths", np.full(L, ZEROCOPY)))
    dropped, drop = [], engine.decoders.drop_graphs
    monkeypatch.setattr(engine.decoders, "drop_graphs", lambda: (dropped.append(1), drop()))
    return dropped


@pytest.mark.parametrize("install", [True, False])
def test_a_layer_joining_zero_copy_is_captured_again_only_where_its_step_changes(qwen_checkpoint, monkeypatch,
                                                                                 install):
    """A captured static step bakes in, per layer, whether the decode op is handed the host slab's views
    (and an install list). With the fused kernel installing copied misses (DevicePath.install_misses, the
    default) every layer is handed them already, copy or zerocopy: moving layers copy -> zerocopy changes
    nothing a step launches, so set_miss_paths asks for no new capture (the engine drops no graphs). With
    installs off, a layer joining zerocopy is newly handed the views: the graphs are captured again. On the
    CPU the static steps run eagerly through the fused op's twin: the calls the steps make are compared."""
    from vismmoe import ops

    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min", decode="static", miss_path="auto",
                          prefetch=False)
    runtime, L = engine.runtime, len(engine.layout.layers)
    runtime.fused_decode = True  # decode steps through ops.fused_moe_decode (its torch twin), as on a GPU
    runtime.device.install_misses = install
    dropped = _auto_moves_every_layer_to_zero_copy(engine, monkeypatch)
    calls, fused = [], ops.fused_moe_decode

    def recorded(*args, host_gate_up=None, install=None, **kwargs):
        if runtime.static:  # a static step's layer call: what its capture would bake in
            calls.append((host_gate_up is not None, install is not None))
        return fused(*args, host_gate_up=host_gate_up, install=install, **kwargs)

    monkeypatch.setattr(ops, "fused_moe_decode", recorded)
    (image, prompt), = random_requests(1, seed=38)
    first = engine.generate(image=image, prompt=prompt, max_new_tokens=5, min_new_tokens=5)
    before, calls[:] = list(calls), []
    second = engine.generate(image=image, prompt=prompt, max_new_tokens=5, min_new_tokens=5)
    assert first.stats.decode_path.startswith("static") and second.stats.decode_path == first.stats.decode_path
    assert len(before) == len(calls) > 0
    assert second.stats.miss_paths == ["zerocopy"] * L and second.stats.misses_by_path["zerocopy"] > 0
    assert runtime.device.host_layers == set(range(L))  # kept either way (a non-installing step reads it)
    assert second.token_ids == first.token_ids
    if install:
        assert set(before) == set(calls) == {(True, True)} and dropped == []
    else:
        assert set(before) == {(False, False)} and set(calls) == {(True, False)} and dropped == [1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("install", [True, False])
def test_zero_copy_switch_captures_again_on_the_gpu_only_without_installs(qwen_checkpoint, monkeypatch, install):
    """The captured CUDA graphs themselves: auto moving every layer copy -> zerocopy between two requests
    captures nothing more where the fused kernel installs copied misses (the graph captured with every
    layer on copy serves the in-place reads: misses read in place, the copy engine's tokens), and captures
    once more where it does not."""
    (image, prompt), = random_requests(1, seed=39)
    tokens = {}
    for path in ("copy", "auto"):
        engine = vismmoe.load(qwen_checkpoint, device="cuda", dtype="bfloat16", expert_budget=0.3, decode="static",
                              miss_path=path, prefetch=False)
        engine.runtime.device.install_misses = install  # before anything is captured
        if path == "auto":
            dropped = _auto_moves_every_layer_to_zero_copy(engine, monkeypatch)
        first = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
        decoder, = engine.decoders.held.values()
        captured = decoder.captures
        assert decoder.mode == "graph" and captured >= 1
        second = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
        assert engine.decoders.held == {decoder.max_cache_len: decoder}  # the same decoder, its cache long enough
        tokens[path] = (first.token_ids, second.token_ids)
    assert second.stats.miss_paths == ["zerocopy"] * len(engine.layout.layers)
    assert second.stats.misses_by_path["zerocopy"] > 0
    assert decoder.captures - captured == (0 if install else 1) and dropped == ([] if install else [1])
    assert tokens["auto"] == tokens["copy"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_zero_copy_on_the_gpu_equals_copy(qwen_checkpoint):
    """The fused decode kernel reading missed experts from the page-locked slab inside the captured step:
    the same tokens as copies (the same bits are read), on both decode paths; auto measures its figures."""
    requests = random_requests(2, seed=36)
    tokens = {}
    for decode, path in [("static", "copy"), ("static", "zerocopy"), ("generate", "zerocopy"), ("static", "auto")]:
        engine = vismmoe.load(qwen_checkpoint, expert_budget="min", decode=decode, miss_path=path, device="cuda",
                              dtype="bfloat16")
        results = [engine.generate(image=i, prompt=p, max_new_tokens=8, min_new_tokens=8) for i, p in requests]
        tokens[(decode, path)] = [r.token_ids for r in results]
        for r in results:
            assert sum(r.stats.misses_by_path.values()) == r.stats.expert_misses
        if path == "zerocopy":
            assert sum(r.stats.misses_by_path["zerocopy"] for r in results) > 0
        if path == "auto":
            assert engine.info().miss_paths["figures"]["copy_s"] > 0
    base = tokens[("static", "copy")]
    assert all(t == base for t in tokens.values())
    # The CPU path on a GPU: the fused kernel computes the resident pairs (missed ones read a zero expert),
    # the CPU the missed ones, added; float32 so that the CPU's and the GPU's rounding stay far below the
    # logit gaps: the same tokens as copies on the GPU.
    for path in ("copy", "cpu"):
        engine = vismmoe.load(qwen_checkpoint, expert_budget="min", decode="generate", miss_path=path, device="cuda",
                              dtype="float32")
        results = [engine.generate(image=i, prompt=p, max_new_tokens=8, min_new_tokens=8) for i, p in requests]
        tokens[path] = [r.token_ids for r in results]
        assert all(sum(r.stats.misses_by_path.values()) == r.stats.expert_misses for r in results)
    assert sum(r.stats.misses_by_path["cpu"] for r in results) > 0 and tokens["cpu"] == tokens["copy"]


def test_auto_follows_the_misses_it_observes(qwen_checkpoint, monkeypatch):
    """auto on given figures (a GPU's are measured at load): the uniform prior expects many misses and reads
    them in place; once requests show few misses per layer token, the layers copy, by the device scalars
    alone; tokens stay the copy path's."""
    from vismmoe.offload.miss_paths import MissPathControl

    (image, prompt), = random_requests(1, seed=37)
    engine = vismmoe.load(qwen_checkpoint, expert_budget="min", decode="static", miss_path="auto")
    L = len(engine.layout.layers)
    fig = figures(copy_ms=0.2, zero_copy_ms=0.19, layer_us=5)  # 10 µs saved per miss, 5 µs per layer call
    engine.miss = MissPathControl("auto", engine.runtime, engine.store, engine.layout, engine.num_slots, "auto",
                                  figures=fig)
    assert engine.miss.names() == ["zerocopy"] * L and engine.runtime.residency.miss_modes.tolist() == [1] * L
    first = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    assert first.stats.miss_paths == ["zerocopy"] * L
    assert engine.runtime.host.decode_calls.sum() > 0  # the static steps' hits and misses, for the planner
    engine.miss.planner.misses[:] = 0.05  # as if earlier requests had missed 0.05 experts per layer and token
    monkeypatch.setattr(miss_paths, "EWMA", 0.0)  # ... and this one is not weighed in
    second = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    assert second.stats.miss_paths == ["copy"] * L and engine.runtime.residency.miss_modes.tolist() == [0] * L
    assert second.stats.misses_by_path["zerocopy"] == 0 and engine.miss.planner.observed >= 1
    copy = vismmoe.load(qwen_checkpoint, expert_budget="min", decode="static", miss_path="copy")
    assert copy.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6).token_ids == \
        first.token_ids == second.token_ids
    info = engine.info().miss_paths
    assert info["setting"] == "auto" and info["figures"]["copy_s"] == pytest.approx(2e-4) and "static_ms_per_token" in info


def test_cpu_device_figures_are_measured():
    """The figures' measurement on a CPU device (a GPU's is exercised by the GPU tests)."""
    from types import SimpleNamespace

    from vismmoe.offload.miss_paths import measure_figures

    record, read = torch.randn(2 * 8 * 16 + 16 * 8), set()
    store = SimpleNamespace(record_bytes=record.numel() * 4, num_layers=2, num_experts=3, dtype=torch.float32,
                            record=lambda layer, expert, staging=None: read.add((layer, expert)) or record,
                            split=lambda r: (r[: 256].view(16, 16), r[256:].view(16, 8)))
    cache = SimpleNamespace(device=torch.device("cpu"), slots=torch.empty(2, record.numel()))
    fig = measure_figures(store, cache, SimpleNamespace(is_transposed=False), repeats=1)
    assert fig.copy_s > 0 and fig.cpu_s > 0 and fig.zero_copy_s == 0 and "measured" in fig.source["cpu_s"]
    # The CPU's time per expert is taken over distinct records (as misses read them), not one cached record.
    assert read == {(layer, expert) for layer in range(2) for expert in range(3)}
