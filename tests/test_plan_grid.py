"""The planner never writes a config that fails its engine's own checks (issue 13's acceptance), on sizes
alone: a grid of GPU memory caps x contexts x image sizes x goals x every shipped GPU profile x models
described by their config and processor only (the bundled ones, Qwen3-VL-30B-A3B, and the 12-layer bench
model whose plans on the small profiles fill the memory to the megabyte).

For each written config the engine's real checks run (deploy/emulate.Emulation.check_engine at load,
check_request before each request) against a stand-in engine that holds what the plan planned (a real
engine holds no more: test_emulate.py compares them on the bundled model) and a real DecoderPool whose
decoders hold meta tensors, through a sequence of requests inside the plan's envelope (the largest
first, then shorter prompts and answers, growing caches, a sampled request on the generate path) that
leaves the pool in the states its policy reaches.

Why the earlier tests missed the GPU failure ("this request needs 6.51 GB ... 6.50 GB usable"): the
planner assumed a prompt of image tokens + 32 (36 tokens for the bundled model's 64 px image, 96 for the
bench model's 256 px), while the processor makes 49 image tokens of any easy-VQA image and the chat
template and question add 45-90 more (real prompts: 94 and 141 tokens); the tests planned with explicit
contexts and image sizes whose assumed prompt happened to cover their own requests, the engine's request
check counted the KV cache by its own formula, and no test planned the bench-shaped model, whose expert
cache fills an 8 GB profile to within a megabyte.
"""

from __future__ import annotations

import functools
import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from vismmoe import static_decode
from vismmoe.config import load_config
from vismmoe.deploy.emulate import Emulation
from vismmoe.deploy.memory import HELD, total
from vismmoe.deploy.model_info import model_info
from vismmoe.deploy.planner import make_plan, memory_cap_for
from vismmoe.deploy.profiles import shipped_profiles
from vismmoe.deploy.writer import plan_yaml
from vismmoe.errors import BudgetError
from vismmoe.static_decode import cache_length

ROOT = Path(__file__).resolve().parents[1]
MODELS = {"easyvqa": ROOT / "models" / "easyvqa-qwen3vlmoe", "scenevqa": ROOT / "models" / "scenevqa-qwen3vlmoe",
          "qwen3-vl-30b-a3b": ROOT / "configs" / "models" / "qwen3-vl-30b-a3b"}
GPU_PROFILES = [p for p in shipped_profiles() if p.kind != "cpu"]


@pytest.fixture(scope="module")
def infos(tmp_path_factory):
    from vismmoe.testing.tiny_models import full_size_description

    out = {name: model_info(path) for name, path in MODELS.items() if (path / "config.json").is_file()}
    out["bench-12"] = model_info(full_size_description(12, tmp_path_factory.mktemp("bench") / "vismmoe-fullsize-12"))
    return out


class _Cache:
    """A static KV cache's layers as meta tensors: sizes without memory (emulate._cache_bytes reads them)."""

    def __init__(self, info, dtype, length: int):
        self.info, self.dtype, self.length = info, dtype, length
        self.layers = [SimpleNamespace(keys=None, values=None) for _ in range(info.num_attention_layers)]

    def fill(self):
        shape = (1, self.info.num_kv_heads, self.length, self.info.head_dim)
        for layer in self.layers:
            layer.keys = torch.empty(shape, dtype=self.dtype, device="meta")
            layer.values = torch.empty(shape, dtype=self.dtype, device="meta")


class _Decoder:
    """What the pool and the check read of a StaticDecoder: its cache and length; grows as run() does."""

    def __init__(self, model, text_model, runtime, kv_cache, length, **_):
        self.kv_cache, self.max_cache_len = kv_cache, length

    def run_request(self, tokens: int, context):
        self.kv_cache.fill()  # the prefill initialises the cache
        while self.max_cache_len < tokens - 1:  # static_decode.StaticDecoder._decode: one bucket at a time
            length = cache_length(self.max_cache_len + 1, context)
            self.kv_cache = _Cache(self.kv_cache.info, self.kv_cache.dtype, length)
            self.kv_cache.fill()
            self.max_cache_len = length


class _SizedEngine:
    """What Emulation's checks read of an Engine, from sizes: the written config, the layout's numbers, the
    plan's held parts as what it holds, and a real DecoderPool (its decoders hold meta tensors)."""

    def __init__(self, info, config, plan, static: bool):
        self.config, self.dtype = config, getattr(torch, config.dtype)
        self.layout = SimpleNamespace(layers=[None] * info.num_moe_layers, num_experts=info.num_experts,
                                      top_k=info.top_k, record_numel=info.record_numel)
        self.layout_record_bytes = info.expert_bytes(config.dtype)
        self.num_slots = config.expert_budget // self.layout_record_bytes
        assert self.num_slots == plan.chosen.budget_slots
        self.model_dir = Path(info.name)
        self.context = None  # the model's own limit: none here, so caches grow by whole buckets (the larger)
        self.static = static
        self.held = {k: plan.chosen.memory[k] for k in HELD}
        runtime = SimpleNamespace(cache=SimpleNamespace(device=torch.device("cpu")), grouped=True)
        self.decoders = static_decode.DecoderPool(SimpleNamespace(config=None), None, runtime, eos_token_id=None,
                                                  image_token_id=None, cuda_graphs=False)
        self.info = info

    def held_bytes(self):
        return dict(self.held)

    def _static_unavailable(self, kwargs):
        return None if self.static else "generate path"

    def request(self, emulation, prompt: int, new: int, visual: int, sample: bool = False) -> dict:
        """Emulation.check_request as Engine.generate calls it, then the request's effect on the pool."""
        decoder = self.decoders.get(prompt, new, self.context) if self.static and not sample else None
        parts = emulation.check_request(self, prompt, new, decoder, visual)
        if decoder is not None:
            length = decoder.max_cache_len
            decoder.run_request(prompt + new, self.context)
            self.decoders.refile(decoder, length)
        return parts


@pytest.fixture
def sized_pool(monkeypatch):
    monkeypatch.setattr(static_decode, "StaticDecoder", _Decoder)
    monkeypatch.setattr(static_decode, "_text_model", lambda model, layout: None)
    holder = {}
    monkeypatch.setattr(static_decode, "new_kv_cache", lambda config, length: _Cache(holder["info"], holder["dtype"], length))
    return holder


@functools.lru_cache(maxsize=None)
def _built_prompt(model_dir: str, image_size: int, question_tokens: int) -> tuple[int, int]:
    """(prompt tokens, image tokens) of a real request as the engine builds it (inputs.build_inputs): a
    random photo-like image of `image_size` pixels and a question of `question_tokens` tokens."""
    import numpy as np
    from PIL import Image

    from vismmoe.inputs import build_inputs, load_processor

    processor = load_processor(Path(model_dir))
    tokenizer = getattr(processor, "tokenizer", processor)
    words = "what is the colour of the shape on the left of the image and how many are there ".split()
    question = ""
    for word in itertools.cycle(words):
        longer = (question + " " + word).strip()
        if len(tokenizer(longer)["input_ids"]) > question_tokens:
            break
        question = longer
    image = Image.fromarray((np.random.RandomState(image_size).rand(image_size, image_size, 3) * 255).astype("uint8"))
    ids = build_inputs(processor, image, question)["input_ids"][0]
    from vismmoe.engine import _load_hf_config

    image_token = _load_hf_config(Path(model_dir), trust_remote_code=False).image_token_id
    return int(ids.numel()), int((ids == image_token).sum())


def _requests(plan):
    """(prompt, new tokens, visual tokens, sampled) inside the plan's envelope: the largest first (built
    by the checkpoint's processor where it has one: the template, an image of the plan's size and a
    question of the plan's question tokens), then shorter ones that leave caches of other lengths in the
    pool, a long answer after short ones (its cache grows), and a sampled request (the generate path next
    to the static caches)."""
    new = plan.max_new_tokens
    if plan.model.processor_dir:
        prompt, visual = _built_prompt(plan.model.processor_dir, plan.image_size, plan.question_tokens)
        assert prompt <= plan.chosen.predicted["prompt_tokens"]  # the envelope covers a real request
        new = min(new, plan.context_tokens - prompt)
    else:
        prompt, visual = plan.chosen.predicted["prompt_tokens"], plan.model.visual_tokens(plan.image_size)
    small = max(1, prompt // 3)
    return [(prompt, new, visual, False), (small, 1, 0, False), (small, max(1, new // 2), 0, False),
            (prompt, 1, visual, False), (small, new, 0, False), (prompt, new, visual, True),
            (prompt, new, visual, False)]


def _check_plan(plan, sized_pool):
    text = plan_yaml(plan)
    config = load_config(yaml.safe_load(text)["engine"])  # what vismmoe.load would read
    assert total({k: v for k, v in plan.chosen.memory.items() if k not in ("gpu_total", "host_store")}) + (
        plan.chosen.memory["host_store"] if plan.profile.kind != "discrete" else 0) <= plan.usable_gpu_bytes
    emulation = Emulation(plan.profile, config.store, plan.model.expert_bytes(plan.dtype), torch.device("cpu"))
    emulation.model = plan.model
    engine = _SizedEngine(plan.model, config, plan, static=plan.chosen.decode_path == "static")
    sized_pool.update(info=plan.model, dtype=engine.dtype)
    emulation.check_engine(engine, engine.num_slots)  # at load
    budget = plan.usable_gpu_bytes - plan.chosen.memory["reserved"]
    for prompt, new, visual, sample in _requests(plan):
        parts = engine.request(emulation, prompt, new, visual, sample)
        assert sum(parts.values()) <= min(emulation.usable_bytes, budget)


def test_grid_every_written_config_passes_the_engines_checks(infos, sized_pool):
    planned = edge = refused = 0
    for (name, info), profile in itertools.product(infos.items(), GPU_PROFILES):
        try:
            full = make_plan(info, profile, image_size=256)
        except BudgetError:
            full = None
        caps = [None, int(profile["reserved_gb"] * 1e9 + 1.2e9)]  # the profile; little room beyond the reserve
        if full is not None:  # a third of the profile's own plan's slots
            caps.append(memory_cap_for(full, max(info.top_k, full.chosen.budget_slots // 3)))
        for cap, image, context, goal in itertools.product(caps, (64, 448), (None, 2048), ("latency", "memory")):
            if goal == "memory" and cap is not None:
                continue
            try:
                plan = make_plan(info, profile, goal=goal, max_gpu_memory=cap, context=context, image_size=image,
                                 max_new_tokens=64)
            except BudgetError as exc:
                assert "cannot fit" in str(exc)
                refused += 1
                continue
            _check_plan(plan, sized_pool)
            planned += 1
            room = plan.usable_gpu_bytes - plan.chosen.memory["gpu_total"]
            edge += room < info.expert_bytes(plan.dtype)  # no further slot would fit: at the edge of memory
    assert planned >= 500 and edge >= 200 and refused >= 40, (planned, edge, refused)


def test_bench_model_on_the_8gb_profiles_fits_the_engines_check_at_the_edge(infos, sized_pool):
    """The GPU failure: the bench model's plans for the Jetson Orin Nano and the RTX 4060 Laptop at the
    default envelope (a 256 px image, 16 new tokens), and the request validate_plan made (141 prompt
    tokens: inside the envelope now), pass the engine's check with less than one expert slot to spare."""
    from vismmoe.deploy.profiles import load_profile

    info = infos["bench-12"]
    for name in ("jetson-orin-nano-8gb", "rtx4060-laptop-8gb"):
        plan = make_plan(info, load_profile(name), image_size=256, max_new_tokens=16)
        assert plan.chosen.predicted["prompt_tokens"] >= 141  # the template and question are counted
        assert plan.usable_gpu_bytes - plan.chosen.memory["gpu_total"] < info.expert_bytes("bfloat16")
        _check_plan(plan, sized_pool)


def test_a_request_beyond_the_envelope_is_refused_with_the_fix(infos, sized_pool):
    """At the edge of memory, a request longer than the plan's envelope is what the check refuses,
    naming the budget that would fit."""
    from vismmoe.deploy.profiles import load_profile

    plan = make_plan(infos["bench-12"], load_profile("jetson-orin-nano-8gb"), image_size=256, max_new_tokens=16)
    config = load_config(yaml.safe_load(plan_yaml(plan))["engine"])
    emulation = Emulation(plan.profile, config.store, plan.model.expert_bytes(plan.dtype), torch.device("cpu"))
    emulation.model = plan.model
    engine = _SizedEngine(plan.model, config, plan, static=plan.chosen.decode_path == "static")
    sized_pool.update(info=plan.model, dtype=engine.dtype)
    with pytest.raises(BudgetError, match="lower expert_budget to"):
        engine.request(emulation, 4 * plan.context_tokens, 512, 4 * plan.model.visual_tokens(plan.image_size))


def test_the_kv_formula_is_what_a_static_cache_holds(qwen_checkpoint):
    """model_info.kv_bytes (the accounting's KV cache) against the bytes transformers' StaticCache
    allocates for the same model and length."""
    from vismmoe.engine import _load_hf_config

    info = model_info(qwen_checkpoint)
    cfg = _load_hf_config(Path(qwen_checkpoint), trust_remote_code=False)
    text = cfg.get_text_config()
    cache = static_decode.new_kv_cache(text, 256)
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    for layer in cache.layers:
        k = torch.zeros(1, kv_heads, 1, head_dim)
        try:
            layer.lazy_initialization(k, k)
        except TypeError:
            layer.lazy_initialization(k)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert held == info.kv_bytes(256, "float32")


def test_the_pool_takes_a_held_cache_that_holds_the_whole_request(infos, sized_pool):
    """DecoderPool.get: a request whose answer will reach a held cache's length takes that cache instead
    of growing a second one to the same length (deploy/memory.kv_bound relies on it)."""
    info = infos["bench-12"]
    sized_pool.update(info=info, dtype=torch.bfloat16)
    runtime = SimpleNamespace(cache=SimpleNamespace(device=torch.device("cpu")), grouped=True)
    pool = static_decode.DecoderPool(SimpleNamespace(config=None), None, runtime, eos_token_id=None,
                                     image_token_id=None, cuda_graphs=False)
    long = pool.get(100, 600, None)  # starts at 512 (prompt + one bucket), grows to 1024
    long.run_request(700, None)
    pool.refile(long, 512)
    assert list(pool.held) == [1024]
    short = pool.get(100, 4, None)  # fits 256: a decoder of its own
    assert short is not long and short.max_cache_len == 256
    again = pool.get(100, 600, None)  # will reach 1024: the held 1024 cache, no growth
    assert again is long and again.max_cache_len == 1024


def test_random_request_sequences_stay_within_the_kv_bound(infos, sized_pool):
    """kv_bound is the most the decoder pool can hold: random sequences of requests inside an envelope
    (prompt and answer lengths, sampled ones on the generate path) through the real pool, the KV cache
    the engine's check counts before each never exceeds the planner's bound."""
    import numpy as np

    from vismmoe.deploy.memory import kv_bound
    from vismmoe.deploy.profiles import load_profile

    info = infos["bench-12"]
    rs = np.random.RandomState(0)
    for context in (300, 700, 1500):
        plan = make_plan(info, load_profile("rtx4090-24gb"), image_size=256, context=context, max_new_tokens=context)
        config = load_config(yaml.safe_load(plan_yaml(plan))["engine"])
        emulation = Emulation(plan.profile, config.store, info.expert_bytes(plan.dtype), torch.device("cpu"))
        emulation.model = info
        engine = _SizedEngine(info, config, plan, static=True)
        sized_pool.update(info=info, dtype=engine.dtype)
        bound = kv_bound(info, plan.dtype, context, static=True)
        prompt_max = plan.chosen.predicted["prompt_tokens"]
        for _ in range(60):
            prompt = int(rs.randint(1, prompt_max + 1))
            new = int(rs.randint(1, context - prompt + 1))
            parts = engine.request(emulation, prompt, new, 0, sample=bool(rs.rand() < 0.15))
            assert parts["kv_cache"] <= bound, (context, prompt, new, parts["kv_cache"], bound)
