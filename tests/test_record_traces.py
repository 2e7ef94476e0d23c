"""eval/record_traces.py: routing traces of a model over a task's test split (easy-VQA and scene-VQA)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from vismmoe.offload.trace import load_trace

from .conftest import import_script

SCRIPT = Path(__file__).resolve().parents[1] / "eval" / "record_traces.py"


@pytest.fixture(scope="module")
def record():
    return import_script(SCRIPT).main


@pytest.mark.slow  # loads the bundled demo model and decodes three requests
def test_the_demo_model_on_easyvqa_by_default(record, tmp_path):
    pytest.importorskip("easy_vqa")
    out = tmp_path / "easy.npz"
    summary = record(["--limit", "3", "--out", str(out), "--device", "cpu"])
    trace = load_trace(out)
    assert summary["requests"] == 3 and list(trace.request_ids) == ["test-0", "test-1", "test-2"]
    assert (trace.meta.num_layers, trace.meta.num_experts, trace.meta.top_k) == (4, 16, 2)
    assert trace.meta.model == "easyvqa-qwen3vlmoe"
    # the prefill of every request routes its 49 visual tokens through every layer
    prefill = [g for g in trace.groups() if g.step == 0]
    assert len(prefill) == 3 * 4 and all(int(g.visual.sum()) == 49 for g in prefill)


def test_scene_questions_through_any_checkpoint(record, qwen_checkpoint, tmp_path):
    from vismmoe.evaluation import scenevqa

    out = tmp_path / "scene.npz"
    summary = record(["--task", "scenevqa", "--model", str(qwen_checkpoint), "--limit", "2", "--out", str(out),
                      "--max-new-tokens", "3", "--device", "cpu"])
    trace = load_trace(out)
    assert summary["requests"] == 2 and list(trace.request_ids) == ["test-0", "test-1"]
    assert trace.meta.model == qwen_checkpoint.name
    assert np.any(trace.visual) and not np.all(trace.visual)  # image and question tokens both routed
    assert scenevqa.split_items("test", 0, 1)[0].questions  # the split the script read
