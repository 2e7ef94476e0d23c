"""Engine.info() and Engine.reset_stats(): the public surface scripts read instead of the cache, store and runtime."""

from __future__ import annotations

import json

import pytest

import vismmoe
from vismmoe.errors import EngineClosedError

from .conftest import random_requests


def test_info_describes_the_engine_and_agrees_with_request_stats(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, device="cpu", dtype="float32", expert_budget=1.0, prefetch=False)
    info = engine.info()
    layout = engine.layout
    assert (info.model_type, info.layers, info.experts, info.top_k) == (
        "qwen3_vl_moe", len(layout.layers), layout.num_experts, layout.top_k)
    assert (info.device, info.dtype, info.policy, info.decode) == ("cpu", "float32", "lru", "auto")
    assert info.num_slots == info.layers * info.experts and info.all_resident
    assert info.budget_bytes == info.num_slots * info.record_bytes
    # `store: pinned` without CUDA is plain pageable memory, and says so.
    assert (info.store, info.host_store_kind) == ("pinned", "pageable")
    assert info.host_store_bytes == info.layers * info.experts * info.record_bytes
    assert (info.decode_path, info.static_unavailable) == ("static", None)
    assert (info.prefill_kernel, info.decode_kernel) == ("loop", "loop")  # grouped_mm and fused need CUDA
    assert not info.prefetch and info.prefetch_limit == info.top_k  # prefetch_limit 0 means top_k
    json.dumps(info.to_dict())  # plain values only: reports write it as JSON

    image, prompt = random_requests(1, seed=3)[0]
    stats = engine.generate(image=image, prompt=prompt, max_new_tokens=4).stats
    assert (stats.num_slots, stats.record_bytes, stats.budget_bytes) == (
        info.num_slots, info.record_bytes, info.budget_bytes)
    assert stats.decode_path.startswith(info.decode_path)
    assert stats.memory["host_store"] == info.host_store_bytes
    assert stats.memory["host_store_kind"] == info.host_store_kind

    engine.reconfigure(expert_budget="min", policy="lfu", decode="generate", prefetch=True, prefetch_depth=2,
                       prefetch_limit=1)
    info = engine.info()
    assert info.num_slots == info.top_k and not info.all_resident and info.policy == "lfu"
    assert (info.decode_path, info.static_unavailable) == ("generate", "decode: generate")
    assert (info.prefetch, info.prefetch_depth, info.prefetch_limit) == (True, 2, 1)
    stats = engine.generate(image=image, prompt=prompt, max_new_tokens=4).stats
    assert stats.decode_path == "generate" and stats.num_slots == info.num_slots
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.info()


def test_info_of_an_mmap_store_says_why_decode_is_not_static(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, device="cpu", dtype="float32", expert_budget="min", store="mmap")
    info = engine.info()
    assert (info.store, info.host_store_kind, info.host_store_bytes) == ("mmap", "mmap", 0)
    assert info.decode_path == "generate" and "mmap" in info.static_unavailable
    image, prompt = random_requests(1, seed=4)[0]
    assert engine.generate(image=image, prompt=prompt, max_new_tokens=3).stats.decode_path == "generate"
    engine.close()


def test_reset_stats_zeroes_the_counters_and_changes_no_answer(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, device="cpu", dtype="float32", expert_budget="min", prefetch=True,
                          decode="generate")
    (img_a, prompt_a), (img_b, prompt_b) = random_requests(2, seed=5)
    engine.generate(image=img_a, prompt=prompt_a, max_new_tokens=4)
    counters = engine.cache.counters
    assert counters.misses.sum() > 0 and counters.bytes_h2d > 0 and counters.prefetch_issued_bytes > 0
    assert engine.runtime.prediction_counters.actual.sum() > 0
    engine.reset_stats()
    counters = engine.cache.counters
    assert counters.hits.sum() == counters.misses.sum() == counters.bytes_h2d == 0
    assert counters.prefetch_issued_bytes == counters.prefetch_used_bytes == counters.prefetch_wasted_bytes == 0
    assert engine.runtime.prediction_counters.actual.sum() == 0
    after_reset = engine.generate(image=img_b, prompt=prompt_b, max_new_tokens=4)

    # The same two requests without the reset: the cache contents carry over either way, so the second
    # request's answer and counts are the same.
    fresh = vismmoe.load(qwen_checkpoint, device="cpu", dtype="float32", expert_budget="min", prefetch=True,
                         decode="generate")
    fresh.generate(image=img_a, prompt=prompt_a, max_new_tokens=4)
    plain = fresh.generate(image=img_b, prompt=prompt_b, max_new_tokens=4)
    assert after_reset.token_ids == plain.token_ids
    assert after_reset.stats.misses_per_layer == plain.stats.misses_per_layer
    assert after_reset.stats.hits_per_layer == plain.stats.hits_per_layer
    for e in (engine, fresh):
        e.close()
    with pytest.raises(EngineClosedError):
        engine.reset_stats()
