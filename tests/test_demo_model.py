"""The bundled demo model (models/easyvqa-qwen3vlmoe), through vismmoe on the CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

import vismmoe

easy_vqa = pytest.importorskip("easy_vqa")  # a dev dependency: installed by `make test`

DEMO = Path(__file__).resolve().parents[1] / "models" / "easyvqa-qwen3vlmoe"
N_QUESTIONS = 20  # the first 20 questions of the easy-VQA test split, fixed


@pytest.fixture(scope="module")
def questions():
    qs, answers, image_ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [(paths[image_ids[i]], qs[i], answers[i]) for i in range(N_QUESTIONS)]


@pytest.fixture(scope="module")
def full_budget_answers(questions):
    engine = vismmoe.load(DEMO, device="cpu", expert_budget=1.0)
    return [engine.generate(image=path, prompt=q, max_new_tokens=16) for path, q, _ in questions]


def test_demo_model_answers_fixed_questions(questions, full_budget_answers):
    correct = sum(r.text.strip() == answer for r, (_, _, answer) in zip(full_budget_answers, questions))
    assert correct >= 0.9 * N_QUESTIONS, f"{correct}/{N_QUESTIONS} correct"
    # 64x64 images upscaled to 224x224: 49 visual tokens after merging.
    assert all(r.stats.visual_tokens_total == 49 for r in full_budget_answers)


def test_quarter_budget_gives_the_same_answers(questions, full_budget_answers):
    engine = vismmoe.load(DEMO, device="cpu", expert_budget=0.25)
    misses = 0
    for r_full, (path, q, _) in zip(full_budget_answers, questions):
        r = engine.generate(image=path, prompt=q, max_new_tokens=16)
        assert r.token_ids == r_full.token_ids
        misses += r.stats.expert_misses
    assert misses > 0  # the quarter budget really evicts


def test_demo_command_uses_the_bundled_model(capsys):
    from vismmoe.cli import main

    assert main(["run", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "models/easyvqa-qwen3vlmoe" in out and "question: what is the red shape?" in out
    assert "answer:   triangle" in out
