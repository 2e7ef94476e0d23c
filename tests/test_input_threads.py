"""Input building runs the processor with inputs.INPUT_THREADS intra-op threads, and gives the count back."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vismmoe
from vismmoe import InputError
from vismmoe.inputs import INPUT_THREADS

from .conftest import random_requests


class CountingProcessor:
    """The engine's processor, recording torch's intra-op thread count inside each call."""

    def __init__(self, inner):
        self.inner, self.threads = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, *args, **kwargs):
        self.threads.append(torch.get_num_threads())
        return self.inner(*args, **kwargs)


@pytest.fixture
def engine(qwen_checkpoint):
    engine = vismmoe.load(qwen_checkpoint, expert_budget=1.0, max_new_tokens=2)
    engine.processor = CountingProcessor(engine.processor)
    before = torch.get_num_threads()
    torch.set_num_threads(INPUT_THREADS + 1)
    yield engine
    torch.set_num_threads(before)
    engine.close()


def test_generate_builds_inputs_with_few_threads_and_restores_the_count(engine):
    (image, prompt), = random_requests(1, seed=3)
    result = engine.generate(image=image, prompt=prompt)
    assert engine.processor.threads == [INPUT_THREADS]
    assert torch.get_num_threads() == INPUT_THREADS + 1  # the model's own compute keeps every thread
    assert result.stats.new_tokens >= 1


def test_a_refused_image_restores_the_thread_count(engine):
    with pytest.raises(InputError, match="image processor"):
        engine.generate(image=Image.new("RGB", (1, 5000)), prompt="what is this?")
    assert engine.processor.threads == [INPUT_THREADS]
    assert torch.get_num_threads() == INPUT_THREADS + 1
