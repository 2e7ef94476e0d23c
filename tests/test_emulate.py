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
    from vismmoe.deploy.planner import ENGINE

    (image, prompt), = random_requests(1, seed=3)
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=1.0, emulate="rtx3060-12gb")
    rb, base = engine.store.record_bytes, engine.non_expert_bytes + ENGINE["gpu_workspace_bytes"]
    result = engine.generate(image=image, prompt=prompt, max_new_tokens=4)
    parts = result.stats.emulation["parts"]
    request = parts["kv_cache"] + parts["activations"]  # what this request adds on the device
    engine.close()
    # Room for the request and 3 experts. At load, the full budget is refused with the most that fits
    # before any request (room for 3 + request/rb experts).
    tight = shrunk_profile(tmp_path, "rtx3060-12gb", base + request + 3.5 * rb)
    most = int((request + 3.5 * rb) // rb)
    assert most < 32
    with pytest.raises(BudgetError, match=rf"needs .*usable .*lower expert_budget to {most * rb} bytes \({most} experts\) "
                                          "at most"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=1.0, emulate=tight)
    # That budget loads, but the request does not fit next to it: refused before it runs, with the
    # budget that leaves it room; the engine keeps serving.
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=most * rb, emulate=tight)
    with pytest.raises(BudgetError, match=r"this request \(\d+ prompt \+ 4 new tokens\) needs .*kv cache .*"
                                          rf"lower expert_budget to {3 * rb} bytes \(3 experts\)"):
        engine.generate(image=image, prompt=prompt, max_new_tokens=4)
    engine.reconfigure(expert_budget=3 * rb)
    again = engine.generate(image=image, prompt=prompt, max_new_tokens=4)
    assert again.token_ids == result.token_ids
    e = again.stats.emulation
    assert e["profile"] == "rtx3060-12gb-shrunk" and e["accounted_bytes"] <= e["usable_bytes"]
    assert set(e["parts"]) == {"non_expert_weights", "expert_cache", "workspace", "kv_cache", "activations"}
    info = engine.info().emulation
    assert info["usable_bytes"] == int(base + request + 3.5 * rb) and any("compute" in x for x in info["not_emulated"])
    engine.close()
    # Not even the smallest budget fits: how far it is from fitting.
    with pytest.raises(BudgetError, match=r"no expert budget fits: even the smallest \(2 experts\) is short by"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min",
                     emulate=shrunk_profile(tmp_path, "rtx3060-12gb", base - 1e6))


def test_unified_memory_counts_the_host_store(qwen_checkpoint, tmp_path):
    """On a Jetson the store lives in the same DRAM: a memory store must fit next to the rest, mmap need not."""
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget="min", store="mmap")
    from vismmoe.deploy.planner import ENGINE

    rb, total = engine.store.record_bytes, 32 * engine.store.record_bytes
    base = engine.non_expert_bytes + ENGINE["gpu_workspace_bytes"] + 8 * rb
    engine.close()
    profile = shrunk_profile(tmp_path, "jetson-orin-nano-8gb", base + total / 2)
    with pytest.raises(BudgetError, match="host store .*store: mmap"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=8 * rb, store="memory", emulate=profile)
    vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=8 * rb, store="mmap", emulate=profile).close()


@pytest.mark.skipif(not (BUNDLED / "model.safetensors").is_file(), reason="bundled model missing")
@pytest.mark.parametrize("name", GRID_PROFILES)
def test_planned_configs_run_under_their_emulated_profile(name, tmp_path):
    """Profiles shrunk to a grid of memory sizes x contexts: every config the planner writes loads under
    the emulated cap and serves a request within the plan's context with no out-of-budget error; a
    size the planner refuses is one the engine refuses too."""
    from vismmoe.deploy.model_info import model_info
    from vismmoe.deploy.planner import ENGINE, make_plan
    from vismmoe.deploy.profiles import load_profile
    from vismmoe.deploy.writer import write_plan

    info = model_info(BUNDLED)
    image = str(BUNDLED / "examples" / "test_0.png")
    question = "what is the red shape?"
    base = info.non_expert_bytes("bfloat16") + ENGINE["gpu_workspace_bytes"]
    ran = refused = 0
    for extra, context in [(-1e6, 128), (1.5e6, 512), (4e6, 128), (4e6, 512), (4e7, 128)]:
        usable = base + extra + info.kv_bytes(context, "bfloat16")
        profile_path = shrunk_profile(tmp_path, name, usable)
        try:
            plan = make_plan(info, load_profile(profile_path), context=context, image_size=256, max_new_tokens=8)
        except BudgetError as exc:
            assert "short by" in str(exc)
            with pytest.raises(BudgetError):  # at load, or at the request (its KV cache and activations)
                engine = vismmoe.load(BUNDLED, device="cpu", dtype="bfloat16", expert_budget="min", store="mmap",
                                      emulate=profile_path)
                try:  # a request as large as the plan's context (the image + question are 92 tokens)
                    engine.generate(image=image, prompt=question, max_new_tokens=context - 92)
                finally:
                    engine.close()
            refused += 1
            continue
        path = write_plan(plan, tmp_path / f"{name}-{extra}-{context}.yaml")
        engine = vismmoe.load(BUNDLED, config=path, device="cpu", emulate=profile_path)
        assert engine.num_slots == plan.chosen.budget_slots
        if ran == 0:  # one request end to end (a few seconds on a CPU)
            e = engine.generate(image=image, prompt=question, max_new_tokens=8).stats.emulation
        else:  # the check generate makes before a request runs, for the same request on both decode paths
            e = dict(usable_bytes=engine.emulation.usable_bytes, accounted_bytes=max(
                sum(engine.emulation.check_request(engine, 92, 8, decoder, 49).values())
                for decoder in (None, engine.decoders.get(92, 8, engine.context))))
        assert e["accounted_bytes"] <= e["usable_bytes"]
        engine.close()
        ran += 1
    assert ran >= 3 and refused >= 1


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
    # A slower link (a Jetson's NVMe through mmap) asks for proportionally longer sleeps.
    jetson = engine.emulation.__class__(load_profile("jetson-orin-nano-8gb"), "mmap", engine.store.record_bytes,
                                        engine.device, sleep=asked.append)
    asked.clear()
    jetson.pace_host(3)
    want = _miss_ms(load_profile("jetson-orin-nano-8gb"), "mmap", engine.store.record_bytes, "generate") / 1e3
    assert asked == [pytest.approx(3 * want)] and want > per_record
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
