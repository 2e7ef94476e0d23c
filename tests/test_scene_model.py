"""The bundled pruning-sensitive model (models/scenevqa-qwen3vlmoe), through vismmoe on the CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import vismmoe
from vismmoe.evaluation import scenevqa

SCENE = Path(__file__).resolve().parents[1] / "models" / "scenevqa-qwen3vlmoe"
N_QUESTIONS = 14  # the first 14 test questions: two of every question type


@pytest.fixture(scope="module")
def engine():
    return vismmoe.load(SCENE, device="cpu", expert_budget=1.0)


@pytest.fixture(scope="module")
def questions():
    items = scenevqa.split_items("test", 0, N_QUESTIONS)
    return [(scenevqa.render(s), *s.questions[0]) for s in items]


def test_scene_model_answers_fixed_questions(engine, questions):
    results = [engine.generate(image=img, prompt=q, max_new_tokens=8) for img, _, q, _ in questions]
    correct = sum(r.text.strip() == a for r, (_, _, _, a) in zip(results, questions))
    assert correct >= 0.85 * N_QUESTIONS, f"{correct}/{N_QUESTIONS} correct"
    assert {t for _, t, _, _ in questions} == set(scenevqa.QUESTION_TYPES)
    assert all(r.stats.visual_tokens_total == r.stats.visual_tokens_kept == 196 for r in results)


def test_scene_model_card_and_files_agree():
    config = json.loads((SCENE / "config.json").read_text())["text_config"]
    experts = config.get("num_experts", config.get("num_local_experts"))  # the name differs across transformers 5.x
    assert (config["num_hidden_layers"], experts, config["num_experts_per_tok"]) == (6, 32, 4)
    assert (SCENE / "model.safetensors").stat().st_size <= 40e6
    metrics = json.loads((SCENE / "train_metrics.json").read_text())
    assert metrics["test_generate_acc"] >= 0.90 and metrics["test_n"] == scenevqa.SPLITS["test"][0]
    examples = json.loads((SCENE / "examples" / "questions.json").read_text())
    assert all((SCENE / "examples" / name).exists() for name in examples)


def test_pruned_scene_model_sees_a_quarter_of_the_tokens(engine, questions):
    img, _, q, _ = questions[1]
    engine.reconfigure(visual_keep=0.25, visual_prune="affinity")
    try:
        r = engine.generate(image=img, prompt=q, max_new_tokens=8)
    finally:
        engine.reconfigure(visual_keep=1.0)
    assert (r.stats.visual_tokens_total, r.stats.visual_tokens_kept) == (196, 49)
