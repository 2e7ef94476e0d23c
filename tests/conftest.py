"""Shared fixtures: tiny random checkpoints of every verified family, built once per session, offline."""

from __future__ import annotations

import importlib.util
import os
import random
import sys

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from vismmoe.testing.tiny_models import FAMILIES, build_checkpoint  # noqa: E402

# Larger-than-default router and weight scale: random models at std 0.02 have near-tied logits,
# which would make "same greedy tokens" a test of float noise instead of the engine.
INIT_STD = 0.2


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for i, family in enumerate(FAMILIES):
        paths[family] = root / family
        build_checkpoint(family, paths[family], seed=i, init_std=INIT_STD)
    return paths


@pytest.fixture(scope="session")
def qwen_checkpoint(tiny_checkpoints):
    return tiny_checkpoints["qwen3_vl_moe"]


def random_image(rng: np.random.RandomState) -> Image.Image:
    h, w = rng.randint(32, 129), rng.randint(32, 129)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


_WORDS = "what is the color shape of this object left right top how many red blue circle square is there a".split()


def random_prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 9))) + "?"


def random_requests(n: int, seed: int):
    rng_np, rng = np.random.RandomState(seed), random.Random(seed)
    return [(random_image(rng_np), random_prompt(rng)) for _ in range(n)]


def import_script(path, register: bool = False):
    """A script that is not part of the package (eval/*.py, models/train_*.py) imported as a module named
    after its file; `register` puts it in sys.modules (for code that looks itself up there, e.g. pickling)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe(request):
    """The training recipe at the test module's RECIPE path (models/train_*.py), imported as a module."""
    return import_script(request.module.RECIPE, register=True)


@pytest.fixture(scope="module")
def kernel_device():
    """Where a Triton kernel's tests run: 'cuda' on a GPU, 'cpu' in Triton's interpreter (TRITON_INTERPRET=1,
    switched on here while triton is not imported yet); skipped where triton is not installed (CI), where
    the ops always run their torch twins."""
    try:
        import triton  # noqa: F401
    except ImportError:
        pytest.skip("triton is not installed: the kernel cannot be built or interpreted here")
    import torch

    if torch.cuda.is_available():
        return "cuda"
    if "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and triton was imported without TRITON_INTERPRET=1, so its interpreter is off")
    return "cpu"


def rewrite_predictions(trace, choose):
    """Replace a trace's recorded predictions group by group: `choose(group, predicted)` returns the new ids
    (none in the prefill, as the engine's default, is the caller's choice)."""
    sets = [np.asarray(choose(g, trace.predicted[trace.predicted_offsets[g]:trace.predicted_offsets[g + 1]]),
                       dtype=trace.predicted.dtype) for g in range(trace.num_groups)]
    trace.predicted = np.concatenate(sets)
    trace.predicted_offsets = np.concatenate([[0], np.cumsum([len(p) for p in sets])]).astype(np.int64)
    return trace
