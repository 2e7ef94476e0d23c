"""Device selection and the data-parallel throughput record (CPU side; GPU side: tests/test_multi_gpu.py)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from vismmoe.engine import _resolve_device
from vismmoe.errors import ModelLoadError
from vismmoe.evaluation import run_eval

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
sys.path.insert(0, str(FIXTURES))
from fake_engine import FakeEngine  # noqa: E402


def test_cpu_and_auto_resolve_without_cuda():
    assert _resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert _resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_without_cuda_names_the_fix():
    with pytest.raises(ModelLoadError, match="CUDA is not available; use device: cpu or auto"):
        _resolve_device("cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_gets_an_index_and_out_of_range_is_refused():
    assert _resolve_device("cuda").index == torch.cuda.current_device()
    count = torch.cuda.device_count()
    with pytest.raises(ModelLoadError, match=f"only {count} CUDA device"):
        _resolve_device(f"cuda:{count}")


class WarmEngine(FakeEngine):
    """A fake engine that offers warm_up, as vismmoe's does."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.warm_ups = 0

    def warm_up(self, **kwargs):
        self.warm_ups += 1


def test_results_record_throughput_and_warm_up_is_not_recorded(tmp_path):
    engines = []

    def factory(model, config=None, **overrides):
        engines.append(WarmEngine(model, config=config, **overrides))
        return engines[-1]

    results = run_eval("m", "pope", FIXTURES / "pope", limit=5, output=tmp_path, engine_factory=factory,
                       progress=False)
    assert results["throughput"]["evaluated"] == 5 and results["throughput"]["processes"] == 1
    assert results["throughput"]["wall_s"] > 0 and results["throughput"]["samples_per_s"] > 0
    assert [e.warm_ups for e in engines] == [1] and engines[0].calls == 5
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 5
