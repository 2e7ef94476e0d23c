"""Bad input gets a clear error naming the problem and the fix; the engine keeps answering correctly."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image

import vismmoe
from vismmoe import BudgetError, ConfigError, InputError, ModelLoadError

from .conftest import random_requests


@pytest.fixture(scope="module")
def engine(qwen_checkpoint):
    return vismmoe.load(qwen_checkpoint, expert_budget=0.5)


@pytest.fixture(scope="module")
def probe(engine):
    """A request and its answer; after every error the engine must still give exactly this answer."""
    (image, prompt), = random_requests(1, seed=3)
    want = engine.generate(image=image, prompt=prompt, max_new_tokens=6).token_ids

    def check():
        assert engine.generate(image=image, prompt=prompt, max_new_tokens=6).token_ids == want

    return check


def test_missing_directory(tmp_path, probe):
    with pytest.raises(ModelLoadError, match="does not exist"):
        vismmoe.load(tmp_path / "nope")
    probe()


def test_directory_without_safetensors(tmp_path, qwen_checkpoint, probe):
    shutil.copy(qwen_checkpoint / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"no \.safetensors.*pytorch_model\.bin.*safetensors only"):
        vismmoe.load(tmp_path)
    probe()


def test_dense_model(tmp_path, probe):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
    )
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="dense model"):
        vismmoe.load(tmp_path)
    probe()


def test_truncated_safetensors(tmp_path, qwen_checkpoint, probe):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_checkpoint, broken)
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors is truncated or corrupt"):
        vismmoe.load(broken)
    probe()


def test_corrupt_image(tmp_path, engine, probe):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"this is not a png at all")
    with pytest.raises(InputError, match="not an image file"):
        engine.generate(image=str(bad), prompt="what?")
    probe()


def test_truncated_image(tmp_path, engine, probe):
    (image, _), = random_requests(1, seed=5)
    good = tmp_path / "good.png"
    image.save(good)
    cut = tmp_path / "cut.png"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(InputError, match="truncated or corrupt"):
        engine.generate(image=str(cut), prompt="what?")
    probe()


def test_missing_image_file(engine, probe):
    with pytest.raises(InputError, match="does not exist"):
        engine.generate(image="/no/such/image.png", prompt="what?")
    probe()


def test_image_over_pixel_limit(tmp_path, engine, probe, monkeypatch):
    big = tmp_path / "big.png"
    Image.new("RGB", (64, 64)).save(big)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(InputError, match="over PIL's pixel limit"):
        engine.generate(image=str(big), prompt="what?")
    # Between 1x and 2x the limit PIL only warns; vismmoe refuses that too.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)
    with pytest.raises(InputError, match="over PIL's pixel limit"):
        engine.generate(image=str(big), prompt="what?")
    with pytest.raises(InputError, match="over PIL's pixel limit"):
        engine.generate(image=Image.new("RGB", (64, 64)), prompt="what?")
    monkeypatch.undo()
    probe()


def test_unknown_config_key(tmp_path, qwen_checkpoint, probe):
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) \['expert_budgte'\].*valid keys"):
        vismmoe.load(qwen_checkpoint, config={"expert_budgte": 0.5})
    path = tmp_path / "deploy.yaml"
    path.write_text("expert_budget: 0.5\npolicyy: lru\n")
    with pytest.raises(ConfigError, match="policyy"):
        vismmoe.load(qwen_checkpoint, config=path)
    probe()


@pytest.mark.parametrize("budget", ["lots", "12 parsecs", "-3GiB", 0, 1.5, True])
def test_budget_that_does_not_parse(qwen_checkpoint, budget, probe):
    with pytest.raises(BudgetError):
        vismmoe.load(qwen_checkpoint, expert_budget=budget)
    probe()


def test_budget_below_minimum(qwen_checkpoint, engine, probe):
    record = engine.store.record_bytes
    with pytest.raises(BudgetError, match=rf"minimum budget is {2 * record} bytes"):
        vismmoe.load(qwen_checkpoint, expert_budget=record)  # one expert; top-2 needs two
    vismmoe.load(qwen_checkpoint, expert_budget=2 * record)  # exactly the minimum loads
    probe()


def test_bad_prompt_and_generation_args(engine, probe):
    with pytest.raises(InputError, match="prompt must be a non-empty string"):
        engine.generate(image=None, prompt="   ")
    with pytest.raises(InputError, match="max_new_tokens"):
        engine.generate(image=None, prompt="hi", max_new_tokens=0)
    with pytest.raises(InputError, match="image must be"):
        engine.generate(image=12345, prompt="hi")
    probe()
