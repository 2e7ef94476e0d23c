"""scene-VQA (vismmoe/evaluation/scenevqa.py): reproducible, balanced, answers true to the pixels, an eval task."""

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import vismmoe
from vismmoe.evaluation import scenevqa
from vismmoe.evaluation.cli import main as eval_cli
from vismmoe.evaluation.errors import BadRecords, EvalDataError
from vismmoe.evaluation.scoring import prepare_samples
from vismmoe.evaluation.tasks import get_task

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "eval"))
from fake_engine import FakeEngine  # noqa: E402


def test_items_are_a_pure_function_of_split_and_index():
    a, b = scenevqa.make_item("test", 17), scenevqa.make_item("test", 17)
    assert a == b
    assert np.array_equal(np.asarray(scenevqa.render(a)), np.asarray(scenevqa.render(b)))
    # chunking does not matter: the middle of a split equals the item made on its own
    assert scenevqa.split_items("val", 40, 43)[1] == scenevqa.make_item("val", 41, 1)
    assert scenevqa.make_item("val", 17) != a and scenevqa.make_item("test", 18) != a


def test_test_split_is_balanced_within_every_question_type():
    items = scenevqa.split_items("test")
    assert len(items) == scenevqa.SPLITS["test"][0] and all(len(s.questions) == 1 for s in items)
    counts = Counter((q[0], q[2]) for s in items for q in s.questions)
    for qtype, answers in scenevqa.ANSWERS.items():
        per_answer = [counts[(qtype, a)] for a in answers]
        assert max(per_answer) - min(per_answer) <= 1, (qtype, per_answer)
        assert sum(per_answer) >= 200
    assert len({q[1] for s in items for q in s.questions}) > 300  # varied questions, not a few templates


def _cell_of(question: str) -> int:
    where = question.split(" in the ")[1].rstrip("?")
    return scenevqa.CELL_NAMES.index(where)


def test_answers_are_true_to_the_rendered_pixels():
    """Position questions are checked on the image itself: the colour at the object in the named cell, the
    digit read back by comparing the tile with every rendered digit, and counts of colour blobs."""
    digits = {}
    for d in range(10):  # a reference rendering of each digit on a tile
        img = scenevqa.render(scenevqa.Scene([scenevqa.Obj("digit", None, 4, 112, 112, 28, digit=d)]))
        digits[d] = np.asarray(img)[98:126, 98:126]
    assert len({v.tobytes() for v in digits.values()}) == 10  # ten distinct glyphs
    checked = Counter()
    for scene in scenevqa.split_items("val", 0, 300):
        image = np.asarray(scenevqa.render(scene))
        qtype, question, answer = scene.questions[0]
        if qtype == "color_at":
            o = scene.at(_cell_of(question))
            assert tuple(image[o.cy, o.cx]) == scenevqa.COLORS[answer]
        elif qtype == "digit":
            o = scene.at(_cell_of(question))
            crop = image[o.cy - 14:o.cy + 14, o.cx - 14:o.cx + 14]
            if o.size == 28:
                assert np.array_equal(crop, digits[int(answer)])
            else:  # other tile sizes: the glyph is the same shape at another scale; check it is dark there
                assert (crop.sum(-1) == 0).any()
        elif qtype == "count" and question.startswith("how many") and "shapes" in question:
            color = question.split()[2]
            on = np.all(image == scenevqa.COLORS[color], axis=-1)
            assert bool(on.any()) == (answer != "0")
        else:
            continue
        checked[qtype] += 1
    assert min(checked.values()) >= 20 and len(checked) == 3


def test_token_budget_of_the_image():
    scene = scenevqa.make_item("test", 0)
    assert scenevqa.render(scene).size == (224, 224)  # 14 x 14 tokens of 16 px with patch 8 and 2x2 merging


def test_task_needs_no_data_and_rejects_an_unknown_split():
    loaded = prepare_samples(get_task("scene-vqa"), None, None, None, None, BadRecords())
    assert loaded.split == "test" and len(loaded.samples) == scenevqa.SPLITS["test"][0]
    sample = loaded.samples[3]
    assert sample.prompt == sample.question and sample.image.load().size == (224, 224)
    with pytest.raises(EvalDataError, match="splits train, val, test"):
        prepare_samples(get_task("scenevqa"), None, "dev", None, None, BadRecords())


def test_cli_eval_scores_per_question_type(tmp_path, monkeypatch):
    monkeypatch.setattr(vismmoe, "load", lambda model, config=None, **kw: FakeEngine(model, config, **kw))
    # FakeEngine says "yes" to every question starting with "is": half right on the three yes/no types
    assert eval_cli(["eval", "--model", "m", "--task", "scenevqa", "--limit", "70", "--output", str(tmp_path)]) == 0
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    per_type = metrics["per_question_type"]
    assert per_type == {"color_at": 0.0, "count": 0.0, "digit": 0.0, "exist": 0.5, "relpos": 0.5, "relsize": 0.5,
                        "shape_at": 0.0}
    assert metrics["accuracy"] == pytest.approx(15 / 70) and metrics["n"] == 70
