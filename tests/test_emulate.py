"""Emulation of a device profile (deploy/emulate.py): bad values, the memory cap at load and per request,
planned configs under their profile's cap, and pacing of host-path copies."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import vismmoe
from vismmoe.config import load_config
from vismmoe.errors import BudgetError, ConfigError

from .conftest import random_requests
from .test_cache_core import kernel_device  # noqa: F401 - the fixture (Triton's interpreter on the CPU)

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "models" / "easyvqa-qwen3vlmoe"
GRID_PROFILES = ["jetson-orin-nano-8gb", "rtx4060-laptop-8gb", "rtx3060-12gb", "rtx4090-24gb"]


def shrunk_profile(tmp_path, name: str, usable_bytes: float) -> str:
    """The shipped profile `name` with memory_gb set so that memory - reserved = usable_bytes."""
    data = yaml.safe_load((ROOT / "configs" / "devices" / f"{name}.yaml").read_text())
    data["figures"]["memory_gb"] = dict(value=data["figures"]["reserved_gb"]["value"] + usable_bytes / 1e9,
                                        source="estimate", ref="test: shrunk to make memory the limit")
    data["name"] = f"{name}-shrunk"
    path = tmp_path / f"{name}-{int(usable_bytes)}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_bad_emulate_values_name_the_profiles(tmp_path):
    with pytest.raises(ConfigError, match="jetson-orin-nano-8gb.*rtx4090-24gb"):
        load_config({"emulate": "jetson-nano"})
    with pytest.raises(ConfigError, match="emulate must be a device profile name or file"):
        load_config({"emulate": 8})
    cpu = {"name": "laptop-cpu", "description": "a CPU", "kind": "cpu", "figures": {
        k: {"value": v, "source": "estimate", "ref": "test"} for k, v in
        dict(ram_gb=16, cpu_cores=8, host_memcpy_gbs=10, disk_read_gbs=2, reserved_gb=2).items()}}
    (tmp_path / "cpu.yaml").write_text(yaml.safe_dump(cpu))
    with pytest.raises(ConfigError, match="CPU-only profile"):
        load_config({"emulate": str(tmp_path / "cpu.yaml")})
    assert load_config({"emulate": "rtx3060-12gb"}).emulate == "rtx3060-12gb"


def test_memory_cap_at_load_and_per_request(qwen_checkpoint, tmp_path):
    import re

    from vismmoe.deploy.memory import HELD, PARTS

    (image, prompt), = random_requests(1, seed=3)
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=1.0, prefetch=False, emulate="rtx3060-12gb")
    rb = engine.store.record_bytes
    load = engine.emulation.load_parts(engine, 32)
    other = sum(load.values()) - load["expert_cache"]  # what loading holds besides the experts
    result = engine.generate(image=image, prompt=prompt, max_new_tokens=4)
    parts = result.stats.emulation["parts"]
    assert set(parts) == set(PARTS)  # the planner's part names
    assert parts["kv_cache"] > 0 and parts["activations"] > 0 and parts["graph_pool"] > 0  # static decode
    request = sum(parts.values())  # what this request needs on the device, the experts included
    engine.close()
    # At load: room for 10 experts besides the rest. The full budget is refused with the most that fits,
    # one more slot too; that budget loads, but its request is refused with how far it is from fitting.
    tight = shrunk_profile(tmp_path, "rtx3060-12gb", other + 10.5 * rb)
    with pytest.raises(BudgetError, match=r"needs .*usable .*lower expert_budget to \d+ bytes \(10 experts\) at most"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=1.0, prefetch=False, emulate=tight)
    with pytest.raises(BudgetError, match=r"\(10 experts\) at most"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=11 * rb, prefetch=False, emulate=tight)
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=10 * rb, prefetch=False, emulate=tight)
    with pytest.raises(BudgetError, match=r"this request .*no expert budget fits: even the smallest \(2 experts\) is "
                                          "short by"):
        engine.generate(image=image, prompt=prompt, max_new_tokens=4)
    engine.close()
    # Per request: room for the request with about 3.5 experts. The full budget loads, the request is
    # refused before it runs with a budget that leaves it room; the engine keeps serving, and at that
    # budget the same request runs with the same tokens.
    tight = shrunk_profile(tmp_path, "rtx3060-12gb", request - 28.5 * rb)
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=1.0, prefetch=False, emulate=tight)
    with pytest.raises(BudgetError, match=r"this request \(\d+ prompt \+ 4 new tokens\) needs .*kv cache .*"
                                          r"lower expert_budget to \d+ bytes \((\d+) experts\)") as refused:
        engine.generate(image=image, prompt=prompt, max_new_tokens=4)
    fits = int(re.search(r"\((\d+) experts\)", str(refused.value)).group(1))
    assert 2 <= fits <= 4
    engine.reconfigure(expert_budget=fits * rb)
    again = engine.generate(image=image, prompt=prompt, max_new_tokens=4)
    assert again.token_ids == result.token_ids
    e = again.stats.emulation
    assert e["profile"] == "rtx3060-12gb-shrunk" and e["accounted_bytes"] <= e["usable_bytes"]
    held = engine.held_bytes()
    assert set(held) == set(HELD)
    # each held part counts what the engine has allocated, or its planned size where that is larger
    assert all(e["parts"][k] >= v for k, v in held.items()) and e["parts"]["expert_cache"] == held["expert_cache"]
    assert any("compute" in x for x in engine.info().emulation["not_emulated"])
    engine.close()
    # Not even the smallest budget loads: how far it is from fitting.
    with pytest.raises(BudgetError, match=r"no expert budget fits: even the smallest \(2 experts\) is short by"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min",
                     emulate=shrunk_profile(tmp_path, "rtx3060-12gb", other - 1e6))


def test_unified_memory_counts_the_host_store(qwen_checkpoint, tmp_path):
    """On a Jetson the store lives in the same DRAM: a memory store must fit next to the rest, mmap need not."""
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min", store="mmap",
                          emulate="jetson-orin-nano-8gb")
    rb, total = engine.store.record_bytes, 32 * engine.store.record_bytes
    load = engine.emulation.load_parts(engine, 8)
    assert load["staging"] == 4 * rb  # mmap's page-locked staging ring lives in the shared DRAM
    engine.close()
    profile = shrunk_profile(tmp_path, "jetson-orin-nano-8gb", sum(load.values()) + total / 2)
    with pytest.raises(BudgetError, match="host store .*store: mmap"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=8 * rb, store="memory", emulate=profile)
    vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=8 * rb, store="mmap", emulate=profile).close()


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled model missing")
@pytest.mark.parametrize("name", GRID_PROFILES)
def test_planned_configs_run_under_their_emulated_profile(name, tmp_path):
    """A grid of budgets (memory sizes from below the smallest plan to the whole model) x contexts on
    each profile: every config the planner writes loads under the emulated cap and serves requests up
    to the plan's context with no out-of-budget error; what the engine has allocated (weights, expert
    cache, stacked routers, device state, KV caches) is within the planner's part of the same name; a
    size the planner refuses is one the engine refuses too."""
    from vismmoe.deploy.memory import gpu_parts, total
    from vismmoe.deploy.model_info import model_info
    from vismmoe.deploy.planner import make_plan
    from vismmoe.deploy.profiles import load_profile
    from vismmoe.deploy.writer import write_plan

    info = model_info(BUNDLED)
    image = str(BUNDLED / "examples" / "test_0.png")
    question = "what is the red shape?"  # with the image: 92 prompt tokens
    profile = load_profile(name)
    rb = info.expert_bytes("bfloat16")
    ran = refused = requests = 0
    # (slots of room beyond the smallest plan, context): the first is 16 MB short of the smallest plan
    prompt = info.prompt_tokens(256, 64)  # the planner's envelope (chat template, image, question): >= 92
    for extra_slots, context in [(-16e6 / rb, 256), (2.5, 512), (12.5, 256), (12.5, 1024), (40.5, 512), (80, 256)]:
        smallest = min(total(gpu_parts(info, "bfloat16", slots=info.top_k, prompt_tokens=prompt,
                                       new_tokens=context - prompt, visual_tokens=info.visual_tokens(256),
                                       static=static, prefetch=True, store=store, unified=profile.unified,
                                       compute_capability=profile.compute_capability))
                       for store, static in (("pinned", True), ("mmap", False)))
        usable = smallest + extra_slots * rb
        profile_path = shrunk_profile(tmp_path, name, usable)
        try:
            plan = make_plan(info, load_profile(profile_path), context=context, image_size=256, max_new_tokens=8)
        except BudgetError as exc:
            assert "short by" in str(exc) and extra_slots < 0
            with pytest.raises(BudgetError):  # at load, or at the request (its KV cache and activations)
                engine = vismmoe.load(BUNDLED, device="cpu", dtype="bfloat16", expert_budget="min", store="mmap",
                                      emulate=profile_path)
                try:  # a request as large as the plan's context
                    engine.generate(image=image, prompt=question, max_new_tokens=context - 92)
                finally:
                    engine.close()
            refused += 1
            continue
        planned = plan.chosen.memory
        assert planned["gpu_total"] <= plan.usable_gpu_bytes
        path = write_plan(plan, tmp_path / f"{name}-{extra_slots}-{context}.yaml")
        engine = vismmoe.load(BUNDLED, config=path, device="cpu", emulate=profile_path)
        assert engine.num_slots == plan.chosen.budget_slots
        # requests at the plan's context: a short answer, then one that fills the context (the static
        # cache grows to it); on this CPU one request per profile runs end to end, the rest only the
        # check generate makes before a request runs (on the decode path the config takes)
        for new_tokens in (8, context - 92):
            if requests == 0 and new_tokens == 8:
                stats = engine.generate(image=image, prompt=question, max_new_tokens=new_tokens).stats
                e, m = stats.emulation, stats.memory
                for part in ("non_expert_weights", "expert_cache", "router_stack", "kernel_scratch", "device_state",
                             "kv_cache"):
                    assert m[part] <= planned[part], (part, m[part], planned[part])
                requests += 1
            else:
                static = engine._static_unavailable({}) is None  # the path this config's requests take
                decoder = engine.decoders.get(92, new_tokens, engine.context) if static else None
                accounted = sum(engine.emulation.check_request(engine, 92, new_tokens, decoder, 49).values())
                e = dict(usable_bytes=engine.emulation.usable_bytes, accounted_bytes=accounted)
            assert e["accounted_bytes"] <= e["usable_bytes"]
            assert e["accounted_bytes"] <= planned["gpu_total"] - planned["reserved"]  # the planner counted it all
        engine.close()
        ran += 1
    assert ran >= 4 and refused >= 1


def test_pacing_slows_host_path_copies_by_the_link_time(qwen_checkpoint):
    """Every host-path copy wave sleeps (on the CPU; a spin on the copy stream on CUDA) records x the
    profile's time per record: the sleeps requested add up to the misses' link time."""
    from vismmoe.deploy.planner import _miss_ms

    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.25, decode="generate", prefetch=False,
                          emulate="rtx4060-laptop-8gb")
    asked = []
    engine.emulation.sleep = asked.append
    (image, prompt), = random_requests(1, seed=5)
    stats = engine.generate(image=image, prompt=prompt, max_new_tokens=4).stats
    from vismmoe.deploy.profiles import load_profile

    per_record = _miss_ms(load_profile("rtx4060-laptop-8gb"), "pinned", engine.store.record_bytes, "generate") / 1e3
    assert stats.expert_misses > 0 and len(asked) > 0
    assert sum(asked) == pytest.approx(stats.expert_misses * per_record, rel=1e-9)
    assert stats.emulation["host_paced_s"] == pytest.approx(sum(asked), abs=1e-6)
    # A slower link (a Jetson's NVMe through mmap) asks for proportionally longer sleeps; with an mmap store
    # the disk read is paced apart (pace_read), the wave's delay is the rest of the profile's miss time.
    jetson = engine.emulation.__class__(load_profile("jetson-orin-nano-8gb"), "mmap", engine.store.record_bytes,
                                        engine.device, sleep=asked.append)
    asked.clear()
    jetson.pace_host(3)
    want = _miss_ms(load_profile("jetson-orin-nano-8gb"), "mmap", engine.store.record_bytes, "generate") / 1e3
    disk = engine.store.record_bytes / (load_profile("jetson-orin-nano-8gb")["disk_read_gbs"] * 1e9)
    assert jetson.read_target_s() == pytest.approx(disk) and 0 < disk < want
    assert asked == [pytest.approx(3 * (want - disk))] and want > per_record
    engine.close()


def test_a_pageable_memory_store_is_paced_at_the_pageable_link_without_a_disk_read(qwen_checkpoint):
    """store: memory is a pageable slab in host RAM: under a discrete profile each miss is paced to the record's
    bytes at h2d_pageable_gbs plus one copy's fixed cost, on either path, and no disk read is paced (there
    is none: no pace_read, no disk time in the link's delay); engine.info() says so."""
    from vismmoe.deploy.profiles import load_profile
    from vismmoe.deploy.time_model import ENGINE_PRIOR

    profile = load_profile("rtx4060-laptop-8gb")
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.25, store="memory", decode="generate",
                          prefetch=False, emulate="rtx4060-laptop-8gb")
    rb = engine.store.record_bytes
    per_record = rb / (profile["h2d_pageable_gbs"] * 1e9) + profile.get(
        "copy_latency_ms", ENGINE_PRIOR["copy_overhead_ms"]) / 1e3
    emu = engine.emulation
    assert engine.store.read_pacer is None and emu.read_target_s() == 0.0
    assert emu.target_s("host") == pytest.approx(per_record) and emu.target_s("static") == pytest.approx(per_record)
    info = engine.info().emulation
    assert info["disk_read_ms_per_expert"] == 0.0
    assert info["link_ms_per_expert"] == {k: round(per_record * 1e3, 4) for k in ("host", "static")}
    assert not any("mmap" in x for x in info["emulated"])
    asked = []
    emu.sleep = asked.append
    (image, prompt), = random_requests(1, seed=5)
    stats = engine.generate(image=image, prompt=prompt, max_new_tokens=4).stats
    assert stats.expert_misses > 0 and "reads" not in stats.emulation
    assert sum(asked) == pytest.approx(stats.expert_misses * per_record, rel=1e-9)
    engine.close()


class _FakeClock:
    """A clock that moves `tick` per reading and by what is slept: pace_read's waits without waiting."""

    def __init__(self, tick: float = 1e-6):
        self.now, self.tick, self.slept = 100.0, tick, []
        self.oversleep = 0.0  # how late a sleep wakes

    def __call__(self) -> float:
        self.now += self.tick
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds + self.oversleep


def test_mmap_reads_are_held_to_the_profiles_disk_time_by_wall_clock():
    """pace_read: a read faster here than on the profile's disk (the page cache) is held until the profile's
    time since it began (a wait up to SPIN_S is spun, one beyond it sleeps all but SPIN_S: time.sleep wakes
    late); a read slower than that is not held, and counted. read_late_s: how far past the deadline it returned."""
    import torch

    from vismmoe.deploy.emulate import Emulation
    from vismmoe.deploy.profiles import load_profile

    jetson = load_profile("jetson-orin-nano-8gb")
    clock = _FakeClock()
    record = 9_437_184  # a 9.4 MB bench record: 3.1 ms on the Jetson's NVMe, within SPIN_S: spun, not slept
    emu = Emulation(jetson, "mmap", record, torch.device("cpu"), sleep=clock.sleep, clock=clock)
    target = emu.read_target_s()
    assert target == pytest.approx(record / (jetson["disk_read_gbs"] * 1e9)) and target < Emulation.SPIN_S
    started = clock()
    clock.now += 0.4e-3  # the read took 0.4 ms here (page cache)
    emu.pace_read(started)
    assert clock.slept == [] and clock.now >= started + target  # held to the disk's time
    assert 0 <= emu.read_late_s < 2e-6  # (the fake clock moves 1 us per reading)
    assert emu.read_paced_s == pytest.approx(target - 0.4e-3 - 1e-6) and emu.paced_s == emu.read_paced_s
    assert (emu.reads, emu.reads_slower) == (1, 0)
    started = clock()
    clock.now += 2 * target  # a cold read slower than the profile's disk: nothing added, counted
    emu.pace_read(started)
    assert emu.read_paced_s == pytest.approx(target - 0.4e-3 - 1e-6) and emu.read_late_s < 2e-6
    assert (emu.reads, emu.reads_slower) == (2, 1)
    assert emu.read_native_s == pytest.approx(0.4e-3 + 1e-6 + 2 * target + 1e-6)
    # a wait beyond SPIN_S (a 200 MB record: 67 ms) sleeps all but SPIN_S of it, then spins to the deadline
    big = Emulation(jetson, "mmap", 200_000_000, torch.device("cpu"), sleep=clock.sleep, clock=clock)
    started = clock()
    big.pace_read(started)
    assert clock.slept == [pytest.approx(big.read_target_s() - 1e-6 - Emulation.SPIN_S)]
    assert clock.now >= started + big.read_target_s() and big.read_late_s < 2e-6
    # a sleep that wakes past the deadline: the read returns late, and read_late_s says by how much
    clock.oversleep = Emulation.SPIN_S + 5e-3
    started = clock()
    big.pace_read(started)
    assert big.read_late_s == pytest.approx(5e-3, abs=1e-5) and big.reads_slower == 0
    # a store in memory has no disk to pace
    assert Emulation(load_profile("rtx4090-24gb"), "pinned", record, torch.device("cpu")).read_target_s() == 0.0


def test_mmap_store_reads_are_paced_in_a_request(qwen_checkpoint):
    """An engine with an mmap store under emulation: every record the host reads for a miss goes through
    pace_read (one read per copy), each held to the profile's disk time; the copy waves add the rest of the
    profile's miss time; RequestStats.emulation reports the reads."""
    from vismmoe.deploy.planner import _miss_ms
    from vismmoe.deploy.profiles import load_profile

    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.25, store="mmap", decode="generate",
                          prefetch=False, emulate="jetson-orin-nano-8gb")
    assert engine.store.read_pacer is engine.emulation
    clock = _FakeClock()
    engine.emulation.clock, engine.emulation.sleep = clock, clock.sleep
    (image, prompt), = random_requests(1, seed=7)
    stats = engine.generate(image=image, prompt=prompt, max_new_tokens=4).stats
    e = stats.emulation
    disk = engine.emulation.read_target_s()
    miss = _miss_ms(load_profile("jetson-orin-nano-8gb"), "mmap", engine.store.record_bytes, "generate") / 1e3
    assert stats.expert_misses > 0 and e["reads"] == stats.expert_misses and e["reads_slower"] == 0
    assert e["read_native_s"] + e["read_paced_s"] == pytest.approx(e["reads"] * disk, abs=3e-6)  # (rounded to us)
    assert e["host_paced_s"] == pytest.approx(e["read_paced_s"] + stats.expert_misses * (miss - disk), abs=3e-6)
    assert 0 <= e["read_late_s"] <= e["reads"] * 2e-6  # (the fake clock moves 1 us per reading)
    engine.close()


def test_pacing_the_device_path_counts_the_copies(qwen_checkpoint):
    """The static path's copy lists are paced by the records they copy (on CUDA the count is read on the
    device by kernels/pace.py; here the same count on the host)."""
    for prefetch in (False, True):  # with prefetch: the lookahead's one copy launch per layer is paced too
        engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.25, prefetch=prefetch,
                              emulate="rtx4090-24gb")
        asked = []
        engine.emulation.sleep = asked.append
        (image, prompt), = random_requests(1, seed=6)
        stats = engine.generate(image=image, prompt=prompt, max_new_tokens=6).stats
        assert stats.decode_path.startswith("static")
        per_record = engine.emulation.delay_s("static")
        prefetched = stats.prefetch_issued_bytes // stats.record_bytes
        assert prefetched > 0 if prefetch else prefetched == 0
        assert sum(asked) == pytest.approx((stats.expert_misses + prefetched) * per_record, rel=1e-9)
        engine.close()


def test_pace_kernel_counts_the_copied_records(kernel_device):
    """kernels/pace.py spins count(fill >= 0) x iters_per_record + extra iterations (read back from its
    scratch); in Triton's interpreter on the CPU, natively on a GPU."""
    import torch

    from vismmoe.kernels.pace import pace

    out = torch.zeros(2, dtype=torch.float32, device=kernel_device)
    pace(torch.tensor([3, -1, 7, 0, -1], device=kernel_device), 5, 11, out)
    assert out[1].item() == 3 * 11 + 5
    pace(None, 17, 11, out)
    assert out[1].item() == 17


@pytest.mark.gpu
def test_pace_kernel_delay_scales_and_captures_in_a_graph():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from vismmoe.deploy.emulate import _time_cuda
    from vismmoe.kernels.pace import pace

    out = torch.zeros(2, dtype=torch.float32, device="cuda")
    fill = torch.tensor([0, 1, -1, 2], device="cuda")
    one = _time_cuda(lambda: pace(None, 100_000, 0, out))
    three = _time_cuda(lambda: pace(fill, 0, 100_000, out))  # 3 records
    assert 2.5 < three / one < 3.5
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pace(fill, 0, 100_000, out)
    fill.fill_(-1)  # the count is read on the device at replay: no records, no spin
    graph.replay()
    torch.cuda.synchronize()
    assert out[1].item() == 0
    fill.fill_(5)
    graph.replay()
    torch.cuda.synchronize()
    assert out[1].item() == 4 * 100_000


@pytest.mark.gpu
def test_mmap_reads_from_the_page_cache_take_the_profiles_disk_time_on_cuda(qwen_checkpoint):
    """On CUDA with the real clock: an mmap store's records come from this host's page cache (read once
    before), yet each read of a request lasts the profile's disk time at least; the copy calibration for
    mmap times the staging copy alone (no read inside it)."""
    import time

    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    engine = vismmoe.load(qwen_checkpoint, device="cuda", expert_budget=0.25, store="mmap", decode="generate",
                          prefetch=False, emulate="jetson-orin-nano-8gb")
    emu = engine.emulation
    # The mmap calibration times the staging copy alone: a 98 KB record's copy (13.6 µs on an H200, session 6),
    # not a read from the file (milliseconds when cold). Not compared with the profile's miss time: for a
    # record this small that is 13.4 µs on the Jetson profile, below this machine's fixed cost per copy.
    assert emu.native_s["host"] < 1e-3
    (image, prompt), = random_requests(1, seed=8)
    engine.generate(image=image, prompt=prompt, max_new_tokens=4)  # the page cache holds the records now
    start = time.perf_counter()
    stats = engine.generate(image=image, prompt=prompt, max_new_tokens=4).stats
    wall = time.perf_counter() - start
    e = stats.emulation
    assert e["reads"] > 0  # (a tiny record may read slower here than on the profile: reads_slower, not held)
    assert e["read_native_s"] + e["read_paced_s"] >= 0.99 * e["reads"] * emu.read_target_s()
    assert wall >= e["reads"] * emu.read_target_s()
    engine.close()


def test_mmap_reads_are_the_misses_and_the_decode_steps_prefetch_copies(qwen_checkpoint, tmp_path):
    """Why an mmap row reads more records than it misses: every prefetch copy reads its record on the host
    too (ExpertCache._copy -> ExpertStore.record, synchronously, paced to the profile's disk), and the engine
    prefetches in decode steps only (prefetch_prefill off): a prefill reads exactly its misses, a decode
    step its misses and its prefetch copies. The planner's replay of the engine's own trace counts those
    copies per decode token as the engine made them (it once scaled them by the decode steps' share of all
    misses: 0.025 copies per token predicted on the bench model where 1.0 were read, session 7)."""
    from vismmoe.deploy.model_info import model_info
    from vismmoe.deploy.planner import WARMUP_REQUESTS, _Simulator
    from vismmoe.offload.trace import load_trace

    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.5, store="mmap", decode="generate",
                          prefetch=True, emulate="jetson-orin-nano-8gb")
    clock = _FakeClock()
    engine.emulation.clock, engine.emulation.sleep = clock, clock.sleep
    phase_reads = {0: 0, 1: 0}
    pace_read = engine.emulation.pace_read

    def counted(started):  # the step each read belongs to: 0 the prefill, 1 a decode step
        phase_reads[min(1, engine.runtime.context.get().index)] += 1
        pace_read(started)

    engine.emulation.pace_read = counted
    rb = engine.store.record_bytes
    engine.start_trace("tiny")
    per_request = []
    for i, (image, prompt) in enumerate(random_requests(5, seed=11)):
        phase_reads.update({0: 0, 1: 0})
        s = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6, request_id=f"q{i}").stats
        copies = s.prefetch_issued_bytes // rb
        assert s.emulation["reads"] == s.expert_misses + copies
        assert phase_reads == {0: s.prefill_misses, 1: s.expert_misses - s.prefill_misses + copies}
        per_request.append((s.expert_misses - s.prefill_misses, copies, s.new_tokens - 1))
    engine.stop_trace(tmp_path / "trace.npz")
    slots = engine.num_slots
    engine.close()
    later = per_request[WARMUP_REQUESTS:]  # the planner counts a warm engine: the trace's first requests are left out
    steps = sum(n for _, _, n in later)
    assert sum(c for _, c, _ in later) > 0, "no prefetch copies: the test would not tell"
    got = _Simulator(load_trace(tmp_path / "trace.npz"), model_info(qwen_checkpoint)).run("lru", slots, "trace")
    assert got["decode_misses_per_token"] == pytest.approx(sum(m for m, _, _ in later) / steps)
    assert got["decode_prefetch_per_token"] == pytest.approx(sum(c for _, c, _ in later) / steps)
