"""The scene-VQA model's training recipe (models/train_scenevqa.py), end to end on the CPU for a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# the `recipe` fixture (tests/conftest.py) imports this file as a module
RECIPE = Path(__file__).resolve().parents[1] / "models" / "train_scenevqa.py"


def test_token_labels_follow_the_objects(recipe):
    from vismmoe.evaluation import scenevqa

    objs = [scenevqa.Obj("square", "blue", 0, 24, 24, 32, large=True),  # covers the 16 px blocks 8..40 -> tokens 0..2
            scenevqa.Obj("digit", None, 8, 200, 200, 28, digit=7)]
    scene = scenevqa.Scene(objs)
    _, mask = scenevqa.render(scene, mask=True)
    lab = recipe.token_labels(scene, mask).reshape(14, 14, 5)
    blue = list(scenevqa.COLORS).index("blue") + 1
    assert (lab[0:3, 0:3, 0] == blue).all() and (lab[0:3, 0:3, 3] == 2).all()  # colour, large
    assert lab[1, 1, 4] == 1 and lab[0, 0, 4] == 0  # the centre (24, 24) is in token (1, 1)
    assert (lab[12, 12] == [0, len(scenevqa.SHAPES) + 1, 8, 0, 1]).all()  # digit tile, digit 7 -> class 8
    assert (lab[5:10, 5:10] == 0).all()  # background


def test_generation_is_the_same_for_any_worker_count(recipe):
    one = recipe.generate("val", 6, workers=1, chunk=4)
    two = recipe.generate("val", 6, workers=2, chunk=2)
    assert np.array_equal(one["images"], two["images"]) and np.array_equal(one["labels"], two["labels"])
    assert one["questions"] == two["questions"] and list(one["image_ids"]) == list(range(6))


@pytest.mark.slow
def test_smoke_run_writes_a_checkpoint_that_vismmoe_runs(recipe, tmp_path):
    import vismmoe

    out = tmp_path / "ckpt"
    summary = recipe.main(["--smoke", "--out", str(out), "--device", "cpu"])
    assert summary["steps"] == 3 and summary["visual_tokens_per_image"] == [196]
    assert summary["checkpoint_dtype"] == "float32"
    weights = (out / "model.safetensors").stat().st_size
    assert weights <= 40e6 and summary["checkpoint_mb"] <= 40.1
    assert summary["params"]["experts"] == 6 * 32 * summary["params"]["per_expert"]
    assert (out / "train_log.txt").read_text().count("done in") == 1
    examples = json.loads((out / "examples" / "questions.json").read_text())
    assert len(examples) >= 2

    engine = vismmoe.load(out, device="cpu", expert_budget=1.0)
    text = engine.model.config.text_config
    assert (text.num_hidden_layers, text.num_experts, text.num_experts_per_tok) == (6, 32, 4)
    name, ex = next(iter(examples.items()))
    result = engine.generate(image=out / "examples" / name, prompt=ex["question"], max_new_tokens=4)
    assert result.stats.visual_tokens_total == 196 and isinstance(result.text, str)


def test_name_loss_labels_sit_on_the_last_character_of_each_named_object(recipe):
    import sys

    sys.path.insert(0, str(RECIPE.parent))
    import recipe_common as common
    from vismmoe.evaluation import scenevqa

    blue = scenevqa.Obj("square", "blue", 0, 24, 24, 32, large=True)
    red = scenevqa.Obj("circle", "red", 5, 180, 110, 24)
    scene = scenevqa.Scene([blue, red, scenevqa.Obj("digit", None, 8, 200, 200, 28, digit=7)])
    question = "is the red circle left of the blue square?"
    found = recipe.name_bindings(scene, question)
    assert found == [(len("is the red circle"), 0, 1, 2), (len("is the red circle left of the blue square"), 1, 0, 0)]
    assert recipe.name_bindings(scene, "how many circles are there?") == []

    model, processor, (_, _, tok, _) = common.build_model_and_processor(0, 0.0, recipe.TEXT_SHAPE, recipe.VISION,
                                                                        recipe.GEOM)
    ids = recipe.encode(processor, [question], ["yes"])[0][0].tolist()
    start = recipe.question_start(processor, tok, question, ids, recipe.GEOM.n_visual)
    for end, *_ in found:  # the label's token is the name's last character ("e" of circle and of square)
        assert tok.decode([ids[start + end - 1]]) == question[end - 1] == "e"
    assert ids[start - 1] != ids[start] and tok.decode(ids[start: start + len(question)]) == question
