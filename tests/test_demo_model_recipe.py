"""The demo model's training recipe (models/train_easyvqa.py), end to end on the CPU for a few steps."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("easy_vqa")  # the recipe's data; a dev dependency

# the `recipe` fixture (tests/conftest.py) imports this file as a module
RECIPE = Path(__file__).resolve().parents[1] / "models" / "train_easyvqa.py"


def test_image_attributes_are_read_off_the_answers(recipe):
    qs = ["what shape is in the image?", "is there a blue shape?", "does the image not contain a circle?",
          "is there not a red shape in the image?", "what color is the shape?"]
    answers = ["triangle", "yes", "no", "no", "teal"]
    shape, color = recipe.image_attributes(qs, answers, [0, 1, 2, 3, 4], 5)
    assert list(shape) == [recipe.SHAPES.index("triangle"), -100, recipe.SHAPES.index("circle"), -100, -100]
    assert list(color) == [-100, recipe.COLORS.index("blue"), -100, recipe.COLORS.index("red"),
                           recipe.COLORS.index("teal")]


@pytest.mark.slow
def test_smoke_run_writes_a_loadable_checkpoint(recipe, tmp_path):
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor

    from vismmoe.inputs import image_only_processor_class

    out = tmp_path / "ckpt"
    summary = recipe.main(["--smoke", "--data", str(tmp_path / "absent.npz"), "--out", str(out), "--device", "cpu"])
    assert summary["steps"] == 3
    assert summary["visual_tokens_per_image"] == [49]
    assert summary["checkpoint_mb"] < 25
    cfg = summary["params"]
    assert cfg["experts"] == 4 * 16 * cfg["per_expert"]

    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    text = model.config.text_config
    assert (text.num_hidden_layers, text.num_experts, text.num_experts_per_tok) == (4, 16, 2)
    assert model.generation_config.eos_token_id == model.generation_config.pad_token_id == 2
    proc = image_only_processor_class(Qwen3VLProcessor).from_pretrained(str(out))
    assert proc.tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
