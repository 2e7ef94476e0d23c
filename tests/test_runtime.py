"""The runtime's seams: one prediction ledger for both decode paths, the step context's owner, stats
built from a decode run's counters, and the CUDA graph pool the static decoders share."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vismmoe
from vismmoe.offload.cache import CacheCounters
from vismmoe.offload.ledger import PredictionCounters, PredictionLedger, score_predicted
from vismmoe.stats import DecodeRun, RequestClock, request_stats

from .conftest import random_requests


def _random_steps(seed: int, steps: int, layers: int, experts: int, top_k: int, depth: int):
    """Per step and layer: the layer's distinct experts and its lookahead masks [depth, E] (may be empty)."""
    rng = np.random.RandomState(seed)
    return [[(np.sort(rng.choice(experts, top_k, replace=False)), (rng.rand(depth, experts) < 0.3).astype(np.int32))
             for _ in range(layers)] for _ in range(steps)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_host_and_device_scoring_give_the_same_counters(seed):
    L, E, k, depth = 5, 12, 3, 2
    steps = _random_steps(seed, 6, L, E, k, depth)
    # What the counters must hold, straight from the sets.
    expected = PredictionCounters.zeros(depth, L)
    for step in steps:
        for layer, (_, masks) in enumerate(step):
            for d in range(1, depth + 1):
                target = layer + d
                if target < L:
                    actual, predicted = set(step[target][0]), set(np.flatnonzero(masks[d - 1]))
                    expected.true_pos[d - 1, target] += len(actual & predicted)
                    # An empty prediction (none made: a layer whose prefetch is off) scores nothing.
                    expected.actual[d - 1, target] += len(actual) if predicted else 0
                    expected.predicted[d - 1, target] += len(predicted)

    host = PredictionLedger(depth, L, torch.device("cpu"))
    for step in steps:
        host.begin_step()
        for layer, (actual, masks) in enumerate(step):
            host.score(layer, actual)
            for d in range(1, depth + 1):
                if layer + d < L:
                    host.expect(layer + d, d, np.flatnonzero(masks[d - 1]))

    # The device path: predictions as id rows (-1 = none) written at the predicting layer, each layer's
    # experts scored against the rows of the layers before it (the cache kernel's scoring; its twin here).
    device = PredictionLedger(depth, L, torch.device("cpu"))
    device.use_device_predictions(E)
    device.begin_device()
    for step in steps:
        device.begin_step()
        for layer, (actual, masks) in enumerate(step):
            score_predicted(*device.scoring(min(depth, layer)), layer, torch.from_numpy(actual))
            device.predicted[layer] = -1
            for d in range(1, depth + 1):
                if layer + d < L:
                    ids = torch.from_numpy(np.flatnonzero(masks[d - 1]))
                    device.predicted[layer, d - 1, : len(ids)] = ids
    device.end_device()

    for name in ("true_pos", "actual", "predicted"):
        assert (getattr(host.counters, name) == getattr(expected, name)).all(), name
        assert (getattr(device.counters, name) == getattr(expected, name)).all(), name
    assert expected.true_pos.sum() > 0 and expected.actual[0, 0] == 0  # nothing predicts the first layer
    skipped = sum(not masks[d].any() for step in steps for layer, (_, masks) in enumerate(step)
                  for d in range(depth) if layer + d + 1 < L)
    assert seed != 2 or skipped > 0  # this seed has empty predictions: the rule for them is exercised


def test_device_counts_add_to_the_host_counts_of_the_same_request():
    ledger = PredictionLedger(1, 2, torch.device("cpu"))
    ledger.expect(1, 1, np.array([0, 1]))
    ledger.score(1, np.array([1, 2]))  # the prefill, on the host: 1 of 2 right
    ledger.use_device_predictions(2)
    ledger.begin_device()
    ledger.begin_step()
    ledger.predicted[0, 0] = torch.tensor([0, 2])  # layer 0 predicts experts 0 and 2 for layer 1
    score_predicted(*ledger.scoring(1), 1, torch.tensor([2, 1]))  # a static step: 1 of 2 right
    ledger.end_device()
    c = ledger.counters
    assert (c.true_pos[0, 1], c.actual[0, 1], c.predicted[0, 1]) == (2, 4, 4)
    ledger.begin_request()
    assert ledger.counters.actual.sum() == 0


def _counters() -> tuple[CacheCounters, PredictionCounters]:
    cache = CacheCounters(np.array([5, 7]), np.array([1, 2]), bytes_h2d=300, waves=1, prefetch_issued_bytes=100,
                          prefetch_used_bytes=60, prefetch_wasted_bytes=20)
    predictions = PredictionCounters(np.array([[0, 3]]), np.array([[0, 4]]), np.array([[0, 6]]))
    return cache, predictions


def test_request_stats_come_from_the_run_counters():
    cache, predictions = _counters()
    run = DecodeRun(tokens=[4, 5, 6], path="static-eager", first_token_at=10.5, end_at=11.0, prefill_misses=2,
                    prefill_bytes_h2d=200, cache=cache, predictions=predictions)
    s = request_stats(run, started_at=10.0, prompt_tokens=30, visual_total=16, visual_kept=8, pruning_s=0.01,
                      budget_bytes=1000, num_slots=10, record_bytes=100, device="cpu")
    assert (s.ttft_s, s.decode_s, s.new_tokens, s.decode_path) == (0.5, 0.5, 3, "static-eager")
    assert (s.hits_per_layer, s.misses_per_layer, s.expert_hits, s.expert_misses) == ([5, 7], [1, 2], 12, 3)
    assert (s.bytes_h2d, s.waves, s.prefill_misses, s.prefill_bytes_h2d) == (300, 1, 2, 200)
    assert (s.prefetch_issued_bytes, s.prefetch_used_bytes, s.prefetch_wasted_bytes) == (100, 60, 20)
    assert s.prefetch_recall == [[None, 0.75]] and s.prefetch_precision == [[None, 0.5]]
    assert (s.visual_tokens_total, s.visual_tokens_kept, s.pruning_s) == (16, 8, 0.01)
    assert s.peak_gpu_bytes is None and s.stall_s is None and s.device == "cpu"


def test_clock_without_a_first_token_counts_everything_as_prefill():
    cache, predictions = _counters()

    class Runtime:
        def request_counters(self):
            return cache, predictions

    clock = RequestClock(type("Cache", (), {"device": torch.device("cpu"), "counters": cache})())
    run = clock.finish([1], "generate", Runtime())
    assert run.first_token_at == run.end_at and (run.prefill_misses, run.prefill_bytes_h2d) == (3, 300)
    clock.first_token()
    cache.misses[0] += 4
    run = clock.finish([1, 2], "generate", Runtime())
    assert run.first_token_at < run.end_at and (run.prefill_misses, run.prefill_bytes_h2d) == (3, 300)


@pytest.mark.parametrize("decode", ["generate", "static"])
def test_the_decode_loop_owns_the_step_context(qwen_checkpoint, decode):
    engine = vismmoe.load(qwen_checkpoint, expert_budget="min", prefetch=True, decode=decode)
    seen = []
    original = engine.runtime.begin_step

    def begin_step(index, visual_mask=None):
        seen.append((index, None if visual_mask is None else int(visual_mask.sum())))
        original(index, visual_mask)

    engine.runtime.begin_step = begin_step
    (image, prompt), = random_requests(1, seed=3)
    result = engine.generate(image=image, prompt=prompt, max_new_tokens=4, min_new_tokens=4)
    assert seen[0] == (0, result.stats.visual_tokens_kept) and seen[0][1] > 0  # the prefill sees its image
    if decode == "generate":
        assert [i for i, _ in seen] == [0, 1, 2, 3] and all(v is None for _, v in seen[1:])
    else:
        assert seen == seen[:1]  # static steps build their own context (begin_static_step)
    step = engine.runtime.context.get()
    assert step.index == -1 and step.visual_mask is None and not step.predictions  # reset at the end
    assert any(v is not None for row in result.stats.prefetch_recall for v in row)


def test_decoders_share_one_graph_pool_only_on_cuda(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.5, decode="static")
    assert engine.decoders.graph_pool is None
    engine.generate(image=None, prompt="hello", max_new_tokens=3)
    assert all(d.graph_pool is None and d.mode == "eager" for d in engine.decoders.held.values())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_decoders_share_one_graph_pool(qwen_checkpoint, monkeypatch):
    from vismmoe import static_decode

    monkeypatch.setattr(static_decode, "_CACHE_BUCKET", 16)  # cache lengths 16, 32, 64, ...
    results = {}
    for graphs in (True, False):
        engine = vismmoe.load(qwen_checkpoint, device="cuda", dtype="bfloat16", expert_budget=0.5, decode="static",
                              cuda_graphs=graphs)
        # Prompts of different lengths: decoders of several cache lengths, each with its own graph.
        results[graphs] = [engine.generate(image=None, prompt="x" * n, max_new_tokens=6, min_new_tokens=6).token_ids
                           for n in (1, 40, 1, 80, 40)]
        if graphs:
            held = list(engine.decoders.held.values())
            assert len(held) >= 2 and all(d.mode == "graph" and d.graphs for d in held)
            assert engine.decoders.graph_pool is not None
            assert all(d.graph_pool is engine.decoders.graph_pool for d in held)
    assert results[True] == results[False]


def test_ttft_names_the_time_spent_building_the_inputs(qwen_checkpoint):
    """RequestStats.inputs_s: the image, chat template and processor, a part of the TTFT (validate_plan
    records it per request, to tell host-side input time from the prefill in a spread of TTFTs)."""
    import vismmoe

    from .conftest import random_requests

    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=1.0)
    (image, prompt), = random_requests(1, seed=5)
    s = engine.generate(image=image, prompt=prompt, max_new_tokens=2).stats
    assert 0.0 < s.inputs_s < s.ttft_s
    assert "inputs" in s.table()
    engine.close()
