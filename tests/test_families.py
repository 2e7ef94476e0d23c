"""Every verified family: vismmoe's greedy tokens equal transformers' own generate, at every budget."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText

import vismmoe
from vismmoe.inputs import build_inputs
from vismmoe.testing.tiny_models import FAMILIES

from .conftest import random_requests

N_REQUESTS = 20
MAX_NEW_TOKENS = 8


def reference_tokens(model_dir, engine, requests):
    # transformers itself, with its eager experts loop (the same arithmetic as the offloaded path).
    ref = AutoModelForImageTextToText.from_pretrained(str(model_dir), experts_implementation="eager")
    ref = ref.to(engine.device).eval()
    out = []
    for image, prompt in requests:
        inputs = build_inputs(engine.processor, image, prompt).to(engine.device)
        with torch.inference_mode():
            ids = ref.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, generation_config=engine.generation_config)
        out.append(ids[0, inputs["input_ids"].shape[1]:].tolist())
    return out


@pytest.mark.parametrize("decode", ["static", "generate"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_match_transformers_at_all_budgets(tiny_checkpoints, family, decode):
    model_dir = tiny_checkpoints[family]
    requests = random_requests(N_REQUESTS, seed=100 + FAMILIES.index(family))
    expected = None
    for budget in (1.0, 0.5, "min"):
        engine = vismmoe.load(model_dir, expert_budget=budget, decode=decode)
        if expected is None:
            expected = reference_tokens(model_dir, engine, requests)
        misses = 0
        for (image, prompt), want in zip(requests, expected):
            result = engine.generate(image=image, prompt=prompt, max_new_tokens=MAX_NEW_TOKENS)
            assert result.token_ids == want, f"{family} budget={budget} decode={decode} prompt={prompt!r}"
            assert result.stats.decode_path.startswith(decode)
            stats = result.stats
            assert stats.bytes_h2d == stats.expert_misses * stats.record_bytes + stats.prefetch_issued_bytes
            misses += stats.expert_misses
        total = engine.layout.num_experts * len(engine.layout.layers)
        if budget == 1.0:
            assert engine.num_slots == total
        else:
            # Eviction really happens: with fewer slots than experts, later requests miss again.
            assert engine.num_slots < total
            assert misses > total, f"{family} budget={budget}: only {misses} misses"
        if budget == "min":
            assert engine.num_slots == engine.layout.top_k


def test_image_none_is_text_only(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint)
    result = engine.generate(image=None, prompt="hello there", max_new_tokens=4)
    assert result.stats.visual_tokens_total == 0
    assert len(result.token_ids) == 4 or result.token_ids[-1] == engine.generation_config.eos_token_id


def test_image_path_equals_pil(qwen_checkpoint, tmp_path):
    engine = vismmoe.load(qwen_checkpoint)
    (image, prompt), = random_requests(1, seed=7)
    path = tmp_path / "img.png"
    image.save(path)
    a = engine.generate(image=image, prompt=prompt, max_new_tokens=5)
    b = engine.generate(image=str(path), prompt=prompt, max_new_tokens=5)
    assert a.token_ids == b.token_ids
    assert a.stats.visual_tokens_total > 0
