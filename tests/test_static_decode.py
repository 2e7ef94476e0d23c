"""Static decode (device-decided loads, static KV cache, CUDA graphs on GPUs) against the generate path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import vismmoe
from vismmoe import InputError, ops
from vismmoe.offload.policies import POLICIES
from vismmoe.offload.residency import DeviceResidency

from .conftest import random_requests

DEMO = Path(__file__).resolve().parents[1] / "models" / "easyvqa-qwen3vlmoe"


@pytest.mark.parametrize("budget,policy", [(1.0, "lru")] + [(b, p) for b in (0.5, "min") for p in POLICIES])
def test_static_decode_equals_generate_path(qwen_checkpoint, budget, policy):
    # Same tokens, and the same decisions: per-layer hits and misses agree, prefetch on (with
    # prefetch off: test_demo_model_static_and_generate_decide_alike).
    requests = random_requests(4, seed=11)
    engines = {d: vismmoe.load(qwen_checkpoint, expert_budget=budget, policy=policy, prefetch=True, decode=d)
               for d in ("generate", "static")}
    for i, (image, prompt) in enumerate(requests):
        extra = {"min_new_tokens": 6} if i % 2 else {}
        a = engines["generate"].generate(image=image, prompt=prompt, max_new_tokens=7, **extra)
        b = engines["static"].generate(image=image, prompt=prompt, max_new_tokens=7, **extra)
        assert b.token_ids == a.token_ids, (budget, policy, prompt)
        assert a.stats.decode_path == "generate" and b.stats.decode_path.startswith("static-")
        s = b.stats
        assert s.bytes_h2d == s.expert_misses * s.record_bytes + s.prefetch_issued_bytes
        assert s.prefetch_used_bytes + s.prefetch_wasted_bytes <= s.prefetch_issued_bytes
        assert (s.hits_per_layer, s.misses_per_layer) == (a.stats.hits_per_layer, a.stats.misses_per_layer)
        assert (s.prefetch_issued_bytes, s.prefetch_used_bytes, s.prefetch_wasted_bytes) == (
            a.stats.prefetch_issued_bytes, a.stats.prefetch_used_bytes, a.stats.prefetch_wasted_bytes)
        assert_same_prediction_counters(engines["generate"], engines["static"])
        if extra:
            assert len(b.token_ids) >= 6


def assert_same_prediction_counters(generate, static):
    """The lookahead ledger of the request just run: the host path's (module predictor, host scoring) and
    the static path's (stacked-router kernel or its twin, scored in the demand kernel) count alike."""
    a, b = generate.runtime.prediction_counters, static.runtime.prediction_counters
    for name in ("true_pos", "actual", "predicted"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "glm4v_moe"])
@pytest.mark.parametrize("budget", [0.5, "min"])
def test_deep_lookahead_static_equals_generate(tiny_checkpoints, family, budget):
    # Depth 3 (layers past the end included): the stacked routers (qwen) and the module predictor the
    # static path keeps for GLM-4.5V's bias-corrected router make the host path's predictions, loads
    # and ledger.
    engines = {d: vismmoe.load(tiny_checkpoints[family], expert_budget=budget, prefetch=True, prefetch_depth=3,
                               decode=d) for d in ("generate", "static")}
    assert engines["static"].runtime.lookahead_kind == ("stacked" if family == "qwen3_vl_moe" else
                                                        "the router adds a bias (score correction): not plain "
                                                        "top-k of the logits")
    scored = 0
    for image, prompt in random_requests(2, seed=17):
        a = engines["generate"].generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
        b = engines["static"].generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
        assert b.stats.decode_path.startswith("static-") and b.token_ids == a.token_ids
        assert (b.stats.hits_per_layer, b.stats.misses_per_layer) == (a.stats.hits_per_layer, a.stats.misses_per_layer)
        assert b.stats.prefetch_issued_bytes == a.stats.prefetch_issued_bytes
        assert_same_prediction_counters(engines["generate"], engines["static"])
        deepest = min(3, len(engines["static"].layout.layers) - 1)  # tiny GLM has fewer MoE layers
        scored += int(engines["static"].runtime.prediction_counters.actual[deepest - 1].sum())
    assert scored > 0  # the deepest reachable distance was scored


@pytest.fixture(scope="module")
def demo_engines():
    return {d: vismmoe.load(DEMO, expert_budget=0.25, prefetch=False, decode=d)
            for d in ("generate", "static")}


@pytest.mark.parametrize("policy", POLICIES)
def test_demo_model_static_and_generate_decide_alike(demo_engines, policy):
    # The bundled demo model at a quarter budget, prefetch off: the static path (eager with the torch
    # reference of the device decisions on the CPU; the fused kernel in CUDA graphs on a GPU) and
    # transformers' generate with the host path load exactly the same experts, layer by layer.
    engines = {d: engine.reconfigure(policy=policy) for d, engine in demo_engines.items()}
    misses = 0
    for image, prompt in random_requests(2, seed=21):
        a = engines["generate"].generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
        b = engines["static"].generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
        assert b.stats.decode_path.startswith("static-") and b.token_ids == a.token_ids
        assert b.stats.hits_per_layer == a.stats.hits_per_layer, policy
        assert b.stats.misses_per_layer == a.stats.misses_per_layer, policy
        misses += sum(b.stats.misses_per_layer) - b.stats.prefill_misses
    assert misses > 0  # decode steps did evict and load


def test_prefetch_changes_nothing_but_loads(qwen_checkpoint):
    requests = random_requests(5, seed=12)
    off = vismmoe.load(qwen_checkpoint, expert_budget="min", prefetch=False, decode="static")
    on = vismmoe.load(qwen_checkpoint, expert_budget="min", prefetch=True, prefetch_depth=2, decode="static")
    issued = 0
    for image, prompt in requests:
        a = off.generate(image=image, prompt=prompt, max_new_tokens=8, min_new_tokens=8)
        b = on.generate(image=image, prompt=prompt, max_new_tokens=8, min_new_tokens=8)
        assert a.token_ids == b.token_ids
        issued += b.stats.prefetch_issued_bytes
        assert any(v is not None for row in b.stats.prefetch_recall for v in row)
    assert issued > 0


def test_auto_falls_back_to_generate_and_static_says_why(qwen_checkpoint, monkeypatch):
    (image, prompt), = random_requests(1, seed=13)
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, policy="cost")
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path.startswith("static-")
    # A slot pool larger than the grouped kernel's group limit cannot take the static path.
    monkeypatch.setattr(ops, "MAX_GROUPS", 2)
    monkeypatch.setattr(engine.runtime, "grouped", True)
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path == "generate"
    engine.reconfigure(decode="static")
    engine.runtime.grouped = True
    with pytest.raises(InputError, match="exceed the 2 groups"):
        engine.generate(image=image, prompt=prompt, max_new_tokens=3)
    monkeypatch.undo()
    engine.reconfigure(policy="lru")
    with pytest.raises(InputError, match="sampling"):
        engine.generate(image=image, prompt=prompt, max_new_tokens=3, do_sample=True)
    engine.reconfigure(decode="auto")
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3, do_sample=True).stats.decode_path == "generate"
    engine.start_trace()
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path == "generate"
    engine.stop_trace()
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path.startswith("static-")


def test_prefetch_controls_change_without_a_new_runtime(qwen_checkpoint):
    (image, prompt), = random_requests(1, seed=16)
    engine = vismmoe.load(qwen_checkpoint, expert_budget="min", prefetch=True, prefetch_depth=2, decode="static")
    runtime, limits = engine.runtime, engine.runtime.residency.prefetch_limits
    on = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    assert on.stats.prefetch_issued_bytes > 0
    engine.reconfigure(prefetch=False)
    assert engine.runtime is runtime and (limits == 0).all()  # same runtime (and captured graphs)
    off = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    assert off.stats.prefetch_issued_bytes == 0 and off.token_ids == on.token_ids
    engine.reconfigure(prefetch=True, prefetch_depth=1, prefetch_limit=1)
    assert engine.runtime is runtime
    assert (limits[:, 0] == 1).all() and (limits[:, 1] == 0).all()
    one = engine.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    assert 0 < one.stats.prefetch_issued_bytes and one.token_ids == on.token_ids
    reference = vismmoe.load(qwen_checkpoint, expert_budget="min", prefetch=True, prefetch_depth=1, prefetch_limit=1,
                             decode="static")
    fresh = reference.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6)
    assert (one.stats.misses_per_layer, one.stats.prefetch_issued_bytes) == (
        fresh.stats.misses_per_layer, fresh.stats.prefetch_issued_bytes)
    engine.reconfigure(prefetch_depth=3)  # deeper than the runtime was built for: a new runtime
    assert engine.runtime is not runtime


def _check_consistent(res: DeviceResidency, cache) -> None:
    st = res.state
    owner = st.owner[:-1].cpu().numpy()
    table = st.table[:-1].cpu().numpy()
    for slot, flat in enumerate(owner):
        if flat >= 0:
            assert table[flat] == slot
            assert torch.equal(cache.slots[slot].cpu(), cache.store.slab_rows[flat]), "slot holds the wrong record"
    for flat in np.flatnonzero(table >= 0):
        assert owner[table[flat]] == flat
    assert st.table[-1] == -1 and st.owner[-1] == -1


@pytest.mark.parametrize("policy", POLICIES)
def test_device_residency_keeps_table_owner_and_slots_consistent(qwen_checkpoint, policy):
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.3, policy=policy)
    cache, res = engine.cache, engine.runtime.residency
    assert res is not None
    res.load_from_host()
    rng = np.random.RandomState(0)
    L, E, k = cache.num_layers, cache.num_experts, engine.layout.top_k
    for step in range(40):
        res.begin_step()
        for layer in range(L):
            experts = torch.from_numpy(rng.choice(E, k, replace=False)).to(cache.device)
            slots = res.demand(layer, experts)
            assert len(set(slots.tolist())) == k
            assert torch.equal(cache.slot_table[layer, experts].long(), slots)
            _check_consistent(res, cache)
            if layer + 1 < L and rng.rand() < 0.7:
                pinned_before = (res.state.pin[:-1] > layer).clone()
                held = res.state.owner[:-1].clone()
                predicted = rng.choice(E, k, replace=False)
                predicted[rng.rand(k) >= 0.8] = -1  # -1: no prediction in that position
                res.prefetch_limits[layer + 1, 0] = int(rng.randint(1, k + 1))
                res.prefetch(layer, torch.from_numpy(predicted).view(1, k).to(cache.device))
                if cache.cuda:
                    torch.cuda.synchronize()
                # A prefetch never evicts what is pinned for a layer that has not run yet.
                assert torch.equal(res.state.owner[:-1][pinned_before], held[pinned_before])
                _check_consistent(res, cache)
    res.store_to_host()
    assert cache.counters.hits.sum() + cache.counters.misses.sum() == 40 * L * k
    assert cache.counters.prefetch_issued_bytes > 0
    assert (cache.host_table == cache.slot_table.cpu().numpy()).all()


def test_mmap_store_falls_back_and_short_requests_take_the_static_path(qwen_checkpoint):
    (image, prompt), = random_requests(1, seed=14)
    mmap = vismmoe.load(qwen_checkpoint, expert_budget=0.5, store="mmap")
    assert mmap.runtime.residency is None
    assert mmap.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path == "generate"
    static = vismmoe.load(qwen_checkpoint, expert_budget=0.5)
    generate = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="generate")
    for n in (1, 2):
        a = static.generate(image=image, prompt=prompt, max_new_tokens=n)
        b = generate.generate(image=image, prompt=prompt, max_new_tokens=n)
        assert a.token_ids == b.token_ids and len(a.token_ids) == n
        assert a.stats.expert_hits + a.stats.expert_misses == b.stats.expert_hits + b.stats.expert_misses


def test_a_model_the_static_cache_cannot_hold_falls_back(qwen_checkpoint, monkeypatch):
    from vismmoe import static_decode

    def unsupported(model, layout):
        raise NotImplementedError("sliding-window attention layers")

    monkeypatch.setattr(static_decode, "_text_model", unsupported)
    (image, prompt), = random_requests(1, seed=15)
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5)
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path == "generate"
    engine.reconfigure(decode="static")
    with pytest.raises(InputError, match="sliding-window"):
        engine.generate(image=image, prompt=prompt, max_new_tokens=3)


def test_kv_cache_is_sized_by_what_is_generated_and_the_context(qwen_checkpoint, monkeypatch):
    """max_new_tokens is a limit, not a reservation: the cache starts at prompt + one bucket, grows while
    decoding (same tokens as transformers' generate), and never passes the model's context."""
    from vismmoe import static_decode
    from vismmoe.static_decode import cache_can_grow, cache_length, initial_cache_length

    assert cache_can_grow()  # transformers 5.2x: the cache grows in place
    assert initial_cache_length(30, 800_000, 4096) == 512 and initial_cache_length(30, 6, 4096) == 256
    assert cache_length(5000, 4096) == 4096 and cache_length(257, None) == 512
    monkeypatch.setattr(static_decode, "_CACHE_BUCKET", 16)  # small buckets: growth within a short answer
    static = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static")
    generate = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="generate")
    a = static.generate(image=None, prompt="hello there", max_new_tokens=120, min_new_tokens=120)
    b = generate.generate(image=None, prompt="hello there", max_new_tokens=120, min_new_tokens=120)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 120
    prompt_len = a.stats.prefill_tokens
    (decoder,) = static.decoders.held.values()
    assert decoder.grown >= 2 and decoder.max_cache_len == cache_length(prompt_len + 119, 4096)
    assert list(static.decoders.held) == [decoder.max_cache_len]  # filed under its grown length
    # A huge limit reserves the prompt and one bucket, not max_new_tokens.
    assert static.decoders.get(prompt_len, 10**7, static.context).max_cache_len == cache_length(prompt_len + 16, 4096) < 2 * (prompt_len + 16)


def test_answers_stop_at_the_context(qwen_checkpoint, monkeypatch):
    from vismmoe import static_decode

    monkeypatch.setattr(static_decode, "_CACHE_BUCKET", 16)
    engines = [vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode=d) for d in ("static", "generate")]
    prompt_len = engines[0].generate(image=None, prompt="hello there", max_new_tokens=1).stats.prefill_tokens
    answers = []
    for engine in engines:
        engine.context = prompt_len + 40  # as if the model's context ended 40 tokens after this prompt
        answers.append(engine.generate(image=None, prompt="hello there", max_new_tokens=10**6,  # capped at 41
                                       min_new_tokens=41))
    assert answers[0].token_ids == answers[1].token_ids and len(answers[0].token_ids) == 41
    assert max(engines[0].decoders.held) == prompt_len + 40
    with pytest.raises(InputError, match=rf"the prompt is {prompt_len} tokens .* context is {prompt_len - 1} tokens"):
        engines[0].context = prompt_len - 1
        engines[0].generate(image=None, prompt="hello there", max_new_tokens=3)


def test_decoders_held_are_bounded(qwen_checkpoint, monkeypatch):
    from vismmoe import static_decode

    monkeypatch.setattr(static_decode, "_CACHE_BUCKET", 16)  # lengths 16, 32, 64, ...
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static")
    for n in (1, 40, 80, 160, 320, 640):
        engine.generate(image=None, prompt="x" * n, max_new_tokens=2)
    assert len(engine.decoders.held) <= engine.decoders.MAX_HELD


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grown_cache_recaptures_the_graph(qwen_checkpoint):
    """On a GPU the decode step is a CUDA graph per cache length: a cache that grows mid-answer captures
    again, and the tokens equal the same static decode run eagerly."""
    (image, prompt), = random_requests(1, seed=18)
    results = {}
    for graphs in (True, False):
        engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static", dtype="bfloat16",
                              cuda_graphs=graphs, device="cuda")
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=600, min_new_tokens=600)
        (decoder,) = engine.decoders.held.values()
        assert decoder.grown >= 1 and decoder.mode == ("graph" if graphs else "eager")
        results[graphs] = result.token_ids
    assert results[True] == results[False] and len(results[True]) == 600


def test_no_past_key_values_deprecation_warnings(qwen_checkpoint):
    """The static path passes the cache under the name the model's forward takes (`cache` in 5.2x)."""
    import warnings

    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static")
    (image, prompt), = random_requests(1, seed=19)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path.startswith("static-")
    assert not [w for w in caught if "past_key_values" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captures_run_on_the_engines_one_stream(qwen_checkpoint, monkeypatch):
    """Every capture (two cache lengths, a grown cache, a reconfigure's new runtime) runs on the engine's
    one capture stream: no request draws a new stream (each would keep a cuBLAS workspace; the planner
    counts 3 streams for static decode), and the tokens equal eager static decode's."""
    (image, prompt), = random_requests(1, seed=21)
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static", dtype="bfloat16", device="cuda")
    eager = vismmoe.load(qwen_checkpoint, expert_budget=0.5, decode="static", dtype="bfloat16", device="cuda",
                         cuda_graphs=False)
    drawn = []
    real = torch.cuda.Stream

    def stream(*args, **kwargs):  # torch.cuda.current_stream() wraps an existing stream (stream_id=...): not drawn
        if "stream_id" not in kwargs:
            drawn.append(1)
        return real(*args, **kwargs)

    for new_tokens, budget in ((4, None), (600, None), (4, 0.75)):  # 600: its cache grows (captured again)
        if budget is not None:  # a new runtime (and cache, with its own copy stream): its captures too
            engine.reconfigure(expert_budget=budget)
            eager.reconfigure(expert_budget=budget)
        with monkeypatch.context() as m:  # streams drawn while requests run (the captures)
            m.setattr(torch.cuda, "Stream", stream)
            got = engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        want = eager.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
        assert got.token_ids == want.token_ids and got.stats.decode_path == "static-graph"
    assert drawn == [] and engine.capture_stream is not None
    assert all(d.capture_stream is engine.capture_stream for d in engine.decoders.held.values())
