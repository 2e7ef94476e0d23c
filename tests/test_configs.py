"""Every shipped configuration file is valid, and the CPU demo profile runs."""

from __future__ import annotations

from pathlib import Path

import pytest

import vismmoe
from vismmoe.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "deploy").glob("*.yaml"))  # devices/: tests/test_deploy.py


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_is_valid(path):
    config = load_config(path)
    assert config.to_dict()["expert_budget"] is not None


def test_cpu_demo_profile_answers(qwen_checkpoint):
    path = next(p for p in CONFIGS if p.name == "cpu-demo.yaml")
    engine = vismmoe.load(qwen_checkpoint, config=path)
    assert engine.config.policy == "lfu" and engine.num_slots < engine.layout.num_experts * len(engine.layout.layers)
    assert engine.generate(image=None, prompt="hello", max_new_tokens=3).token_ids
