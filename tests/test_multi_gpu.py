"""Engines on any GPU, not just the first (needs >= 2 CUDA devices; skipped elsewhere).

The calling thread's current device stays cuda:0 throughout, as it is for a user who picks `cuda:1`:
everything an engine creates (slot pool, streams, events, the page-locked slab's mapping, Triton launches,
CUDA graphs) must follow the engine's device, not the caller's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

import vismmoe
from vismmoe import ops
from vismmoe.offload.store import _pin_in_place, _unpin

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                       reason="needs two CUDA devices"),
]

DEMO = Path(__file__).resolve().parents[1] / "models" / "easyvqa-qwen3vlmoe"
LAST = f"cuda:{torch.cuda.device_count() - 1}" if torch.cuda.is_available() else "cuda:1"


def _shape_image(kind: str, colour: str) -> Image.Image:
    image = Image.new("RGB", (64, 64), "white")
    draw = ImageDraw.Draw(image)
    if kind == "circle":
        draw.ellipse((14, 14, 50, 50), fill=colour)
    elif kind == "rectangle":
        draw.rectangle((10, 18, 54, 46), fill=colour)
    else:
        draw.polygon([(32, 8), (56, 54), (8, 54)], fill=colour)
    return image


def _requests():
    questions = json.loads((DEMO / "examples" / "questions.json").read_text())
    reqs = [(str(DEMO / "examples" / name), q["question"]) for name, q in sorted(questions.items())]
    drawn = [("circle", "blue"), ("rectangle", "green"), ("triangle", "yellow"), ("circle", "red")]
    asks = ["what shape is in the image?", "what color is the shape?", "is there a circle in the image?",
            "does the image not contain a triangle?"]
    return reqs + [(_shape_image(*d), q) for d, q in zip(drawn, asks)]


def _answers(engine):
    out = []
    for image, prompt in _requests():
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=8)
        out.append((result.token_ids, result.stats.hits_per_layer, result.stats.misses_per_layer,
                    result.stats.decode_path))
    return out


@pytest.fixture(scope="module")
def engines():
    torch.cuda.set_device(0)
    first = vismmoe.load(DEMO, device="cuda:0", dtype="bfloat16", expert_budget="min")
    last = vismmoe.load(DEMO, device=LAST, dtype="bfloat16", expert_budget="min")
    yield first, last
    first.close()
    last.close()


@pytest.mark.parametrize("budget", ["min", 0.25, 1.0])
@pytest.mark.parametrize("decode,graphs", [("static", True), ("static", False), ("generate", True)])
def test_last_gpu_matches_first(engines, budget, decode, graphs):
    first, last = engines
    settings = dict(expert_budget=budget, decode=decode, cuda_graphs=graphs)
    first.reconfigure(**settings)
    last.reconfigure(**settings)
    assert torch.cuda.current_device() == 0
    assert last.cache.slots.device == torch.device(LAST)
    expected, got = _answers(first), _answers(last)
    assert torch.cuda.current_device() == 0  # the engine restored the caller's device
    assert got == expected
    paths = {path for *_, path in got}
    if decode == "static":
        assert paths == {"static-graph" if graphs else "static-eager"}
    else:
        assert paths == {"generate"}
    if budget != 1.0:
        assert sum(sum(misses) for _, _, misses, _ in got) > 0  # experts really were copied to the last GPU


def test_two_engines_answer_alternately(engines):
    first, last = engines
    for engine in engines:
        engine.reconfigure(expert_budget=0.25, decode="auto", cuda_graphs=True)
    alone = [_answers(first), _answers(last)]
    mixed = [[], []]
    for request in _requests():
        for i, engine in enumerate(engines):
            result = engine.generate(image=request[0], prompt=request[1], max_new_tokens=8)
            mixed[i].append(result.token_ids)
    assert mixed[0] == [tokens for tokens, *_ in alone[0]]
    assert mixed[1] == [tokens for tokens, *_ in alone[1]]
    assert mixed[0] == mixed[1]


def test_copy_kernel_on_last_gpu_matches_twin():
    torch.cuda.set_device(0)
    device = torch.device(LAST)
    slab = torch.randn(64, 5000, dtype=torch.bfloat16)
    assert _pin_in_place(slab)
    try:
        for seed in range(3):
            gen = torch.Generator().manual_seed(seed)
            src_rows = torch.randperm(64, generator=gen)[:12].to(device)
            dst_rows = torch.randperm(16, generator=gen)[:12]
            dst_rows[torch.rand(12, generator=gen) < 0.3] = -1  # skipped rows
            dst_rows = dst_rows.to(device)
            fast = torch.zeros(16, 5000, dtype=torch.bfloat16, device=device)
            twin = fast.clone()
            ops.copy_records(slab, fast, src_rows, dst_rows)
            ops.copy_records_reference(slab, twin, src_rows, dst_rows)
            torch.cuda.synchronize(device)
            assert torch.equal(fast, twin)
            assert torch.cuda.current_device() == 0
    finally:
        _unpin(slab, device)
