"""Visual-token pruning: keep 1.0 changes nothing; a pruned request equals transformers' own model run on
inputs built by hand from the same kept indices; every method keeps exactly what was asked, deterministically."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, DynamicCache

import vismmoe
from vismmoe import ConfigError
from vismmoe.inputs import build_inputs
from vismmoe.pruning import METHODS
from vismmoe.testing.tiny_models import FAMILIES

from .conftest import random_requests
from .test_families import reference_tokens

MAX_NEW = 6


def _requests(family, n=3):
    # Images big enough for several visual tokens in every family.
    reqs = random_requests(n, seed=200 + FAMILIES.index(family))
    return [(img.resize((96, 80)), prompt) for img, prompt in reqs]


@pytest.fixture(scope="module")
def qwen_grid(tmp_path_factory):
    """A tiny Qwen3-VL-MoE whose processor keeps images up to 256x256 (up to 64 visual tokens)."""
    from vismmoe.testing.tiny_models import build_checkpoint

    path = tmp_path_factory.mktemp("grid") / "qwen3_vl_moe"
    build_checkpoint("qwen3_vl_moe", path, seed=3, init_std=0.2, image_size=256)
    return path


@pytest.fixture(scope="module")
def references(tiny_checkpoints):
    cache = {}

    def get(family):
        if family not in cache:
            model = AutoModelForImageTextToText.from_pretrained(str(tiny_checkpoints[family]),
                                                                experts_implementation="eager")
            cache[family] = model.eval()
        return cache[family]

    return get


# -- the hand-built reference -------------------------------------------------------------------------


def _cat(parts):
    # Per-image tuples (transformers 5.24) or one tensor (5.17 for deepstack features).
    return torch.cat(parts) if isinstance(parts, (list, tuple)) else parts


def full_language_inputs(model, inputs):
    """The unpruned request's language-model inputs, from each family's public methods:
    (embeddings [1, L, D], positions, deepstack features or None)."""
    m, cfg = model.model, model.config
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    deepstack = None
    positions = torch.arange(ids.shape[1]).view(1, -1)
    if cfg.model_type in ("qwen3_vl_moe", "glm4v_moe"):
        out = m.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"], return_dict=True)
        feats = _cat(out.pooler_output)
        if cfg.model_type == "qwen3_vl_moe":
            deepstack = [_cat(d) for d in out.deepstack_features]
        positions = m.get_rope_index(ids, mm_token_type_ids=inputs["mm_token_type_ids"],
                                     image_grid_thw=inputs["image_grid_thw"], attention_mask=inputs["attention_mask"])[0]
    elif cfg.model_type == "internvl":
        out = m.get_image_features(inputs["pixel_values"], vision_feature_layer=cfg.vision_feature_layer,
                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy, return_dict=True)
        feats = out.pooler_output.reshape(-1, embeds.shape[-1])
    else:  # llava_onevision
        out = m.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                   vision_feature_layer=cfg.vision_feature_layer,
                                   vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                                   batch_num_images=torch.tensor([1]), return_dict=True)
        feats = _cat(out.pooler_output)
    visual = ids[0] == cfg.image_token_id
    embeds = embeds.clone()
    embeds[0, visual] = feats.to(embeds.dtype)
    return embeds, positions, deepstack


def _group_mean(rows, kept, assign):
    if assign is None:
        return rows[kept]
    out = torch.zeros((len(kept), rows.shape[-1]))
    out.index_add_(0, assign, rows.float())
    return out / torch.bincount(assign, minlength=len(kept)).unsqueeze(1)


def hand_pruned_greedy(model, inputs, record, eos, max_new):
    """Gather the kept tokens by hand, run transformers' language model + lm_head greedily."""
    embeds, positions, deepstack = full_language_inputs(model, inputs)
    ids = inputs["input_ids"][0]
    visual = (ids == model.config.image_token_id).nonzero().squeeze(1)
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[visual] = False
    keep[visual[record.kept]] = True
    embeds = embeds.clone()
    embeds[0, visual[record.kept]] = _group_mean(embeds[0, visual], record.kept, record.assign).to(embeds.dtype)
    embeds, positions = embeds[:, keep], positions[..., keep]
    extras = {}
    if deepstack is not None:
        extras = {"visual_pos_masks": (ids[keep] == model.config.image_token_id).view(1, -1),
                  "deepstack_visual_embeds": [_group_mean(d, record.kept, record.assign).to(d.dtype) for d in deepstack]}
    lm, length = model.model.language_model, embeds.shape[1]
    cache = DynamicCache(config=model.config.get_text_config())
    tokens, last = [], positions[..., -1:]
    step_embeds, step_pos = embeds, positions
    for i in range(max_new):
        out = lm(inputs_embeds=step_embeds, position_ids=step_pos, attention_mask=torch.ones(1, length + i, dtype=torch.long),
                 past_key_values=cache, use_cache=True, **(extras if i == 0 else {}))
        token = int(model.lm_head(out.last_hidden_state[:, -1]).argmax(-1))
        tokens.append(token)
        if token in eos:
            break
        step_embeds = model.get_input_embeddings()(torch.tensor([[token]]))
        step_pos = last + 1 + i
    return tokens


# -- tests ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("decode", ["static", "generate"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_one_is_identical_to_unpruned(tiny_checkpoints, family, decode):
    requests = _requests(family, 2)
    engine = vismmoe.load(tiny_checkpoints[family], decode=decode, visual_keep=1.0, visual_prune="random")
    want = reference_tokens(tiny_checkpoints[family], engine, requests)
    count = vismmoe.load(tiny_checkpoints[family], decode=decode, visual_keep=10**6)  # a count above the total
    for (image, prompt), expected in zip(requests, want):
        for e in (engine, count):
            result = e.generate(image=image, prompt=prompt, max_new_tokens=8)
            assert result.token_ids == expected, (family, decode, prompt)
            assert result.stats.visual_tokens_kept == result.stats.visual_tokens_total > 0
            assert result.stats.pruning_s == 0.0


@pytest.mark.parametrize("decode", ["static", "generate"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_equals_transformers_on_hand_built_inputs(tiny_checkpoints, references, family, decode):
    model = references(family)
    settings = [(m, 0.5, False) for m in METHODS] + [("diversity", 0.34, True), ("affinity", 2, True)]
    requests = _requests(family, len(settings))
    checked = 0
    engine = vismmoe.load(tiny_checkpoints[family], decode=decode)
    eos = {engine.generation_config.eos_token_id}
    for (method, keep, merge), request in zip(settings, requests):
        engine.reconfigure(visual_keep=keep, visual_prune=method, visual_merge=merge)
        for image, prompt in [request]:
            result = engine.generate(image=image, prompt=prompt, max_new_tokens=MAX_NEW)
            record = engine.last_pruning
            stats = result.stats
            assert result.stats.decode_path.startswith(decode)
            assert stats.visual_tokens_kept == len(record.kept) < stats.visual_tokens_total == record.total
            assert stats.prefill_tokens == len(build_inputs(engine.processor, image, prompt)["input_ids"][0]) - (
                record.total - len(record.kept))
            inputs = build_inputs(engine.processor, image, prompt)
            with torch.inference_mode():
                want = hand_pruned_greedy(model, inputs, record, eos, MAX_NEW)
            assert result.token_ids == want, (family, decode, method, keep, merge, prompt)
            checked += 1
    assert checked == len(settings)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("merge", [False, True])
def test_each_method_keeps_the_requested_count_deterministically(qwen_grid, method, merge):
    (image, prompt), = random_requests(1, seed=5)
    image = image.resize((256, 224))
    engine = vismmoe.load(qwen_grid, visual_prune=method, visual_merge=merge, max_new_tokens=2)
    total = engine.generate(image=image, prompt=prompt).stats.visual_tokens_total
    assert total == 56
    for keep, want in ((0.25, round(0.25 * total)), (3, 3), (1, 1)):
        engine.reconfigure(visual_keep=keep)
        a = engine.generate(image=image, prompt=prompt)
        first = engine.last_pruning
        b = engine.generate(image=image, prompt=prompt)
        assert a.stats.visual_tokens_kept == want == len(first.kept)
        assert torch.equal(first.kept, engine.last_pruning.kept) and a.token_ids == b.token_ids
        assert first.kept.unique().numel() == want and int(first.kept.max()) < total
        if merge or method == "pool":
            assert first.assign is not None and sorted(first.assign.unique().tolist()) == list(range(want))
        else:
            assert first.assign is None


def test_random_method_follows_its_seed(qwen_grid):
    (image, prompt), = random_requests(1, seed=6)
    image = image.resize((256, 224))
    kept = []
    for seed in (0, 0, 1):
        engine = vismmoe.load(qwen_grid, visual_keep=0.25, visual_prune="random", visual_prune_seed=seed,
                              max_new_tokens=2)
        engine.generate(image=image, prompt=prompt)
        kept.append(engine.last_pruning.kept)
    assert torch.equal(kept[0], kept[1]) and not torch.equal(kept[0], kept[2])


def test_default_method_is_affinity_and_text_only_is_a_no_op(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, visual_keep=0.5, max_new_tokens=3)
    (image, prompt), = random_requests(1, seed=8)
    engine.generate(image=image.resize((96, 96)), prompt=prompt)
    assert engine.last_pruning.method == "affinity"
    plain = vismmoe.load(qwen_checkpoint, max_new_tokens=3)
    a = engine.generate(image=None, prompt="hello there")
    assert a.token_ids == plain.generate(image=None, prompt="hello there").token_ids
    assert a.stats.visual_tokens_total == a.stats.visual_tokens_kept == 0


@pytest.mark.parametrize("overrides, message", [
    ({"visual_keep": 0.0}, r"ratio must be in \(0, 1\].*0.0"),
    ({"visual_keep": -0.5}, r"ratio must be in \(0, 1\]"),
    ({"visual_keep": 1.5}, r"ratio must be in \(0, 1\].*1.5"),
    ({"visual_keep": 0}, r"count must be >= 1, got 0"),
    ({"visual_keep": -3}, r"count must be >= 1, got -3"),
    ({"visual_keep": True}, r"visual_keep must be a ratio"),
    ({"visual_keep": "half"}, r"visual_keep must be a ratio"),
    ({"visual_prune": "fastv"}, r"unknown visual_prune method 'fastv'.*affinity, diversity, importance, pool, random"),
    ({"visual_merge": "yes"}, r"visual_merge must be true or false"),
    ({"visual_affinity_weights": {"speed": 1.0}}, r"unknown visual_affinity_weights key"),
    ({"visual_affinity_weights": {"diversity": -1}}, r"non-negative"),
    ({"visual_affinity_layers": 0}, r"visual_affinity_layers must be an integer >= 1"),
])
def test_bad_pruning_settings_raise_config_error(qwen_checkpoint, overrides, message):
    with pytest.raises(ConfigError, match=message):
        vismmoe.load(qwen_checkpoint, **overrides)
    engine = vismmoe.load(qwen_checkpoint, max_new_tokens=2)
    with pytest.raises(ConfigError, match=message):
        engine.reconfigure(**overrides)
    (image, prompt), = random_requests(1, seed=9)
    assert engine.generate(image=image, prompt=prompt).stats.visual_tokens_kept > 0  # still serving


def test_unsupported_family_is_refused_by_name():
    from vismmoe.pruning import VisualPruner

    with pytest.raises(ConfigError, match="not supported for model type 'deepseek_vl_v2'"):
        VisualPruner.check_supported("deepseek_vl_v2")


def test_readme_states_the_affinity_default_weights():
    # README's config table and its pruning section name the defaults chosen by measurement (BENCHMARKS.md).
    import re
    from pathlib import Path

    from vismmoe.pruning.settings import DEFAULT_AFFINITY_WEIGHTS

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    row = re.search(r"\| `visual_affinity_weights` \| `\{([^}]*)\}`", readme).group(1)
    table = {k.strip(): float(v) for k, v in (part.split(":") for part in row.split(","))}
    assert table == DEFAULT_AFFINITY_WEIGHTS
    assert str({k: v if v % 1 else int(v) for k, v in DEFAULT_AFFINITY_WEIGHTS.items()}).replace("'", '"') in readme
