"""The eval loop with a fake engine: outputs, resume, sweeps, the CLI, runtime bad data, data parallelism."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import vismmoe
from vismmoe.errors import ConfigError
from vismmoe.evaluation import EvalDataError, run_eval
from vismmoe.evaluation.cli import main as eval_cli

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
REPO = Path(__file__).resolve().parents[1]

sys.path.insert(0, str(FIXTURES))
from fake_engine import FakeEngine  # noqa: E402


class Factory:
    """Counts engines built; each engine counts its generate calls."""

    def __init__(self, engine_class=FakeEngine):
        self.engine_class, self.engines = engine_class, []

    def __call__(self, model, config=None, **overrides):
        self.engines.append(self.engine_class(model, config=config, **overrides))
        return self.engines[-1]

    @property
    def calls(self):
        return sum(e.calls for e in self.engines)


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_timing(rows):
    """Records minus what differs between runs: wall time, and the process that produced them."""
    return [{**{k: v for k, v in r.items() if k != "latency_s"},
             "stats": {k: v for k, v in r.get("stats", {}).items() if k != "rank"}} for r in rows]


def test_outputs_of_an_eval(tmp_path):
    factory = Factory()
    results = run_eval("models/fake", "mmbench", FIXTURES / "mmbench", output=tmp_path, engine_factory=factory,
                       progress=False)
    rows = records(tmp_path / "samples.jsonl")
    assert len(rows) == 6 and factory.calls == 6
    for key in ("question_id", "prompt", "prediction", "references", "score", "ttft_s", "decode_s", "new_tokens",
                "peak_gpu_bytes", "visual_tokens_kept", "expert_hits", "expert_misses", "bytes_h2d", "latency_s"):
        assert key in rows[0]
    assert rows[0]["stats"]["hits_per_layer"] == [1, 2]
    # The fake always answers "A": right on the two rows whose answer is A, so no question survives rotation.
    assert results["metrics"]["vanilla_accuracy"] == pytest.approx(2 / 6)
    assert results["metrics"]["circular_accuracy"] == 0.0
    assert results["config"] == {"model": "models/fake", "max_new_tokens": 16}  # the length this run used
    assert results["efficiency"]["expert_hit_rate"] == 0.75
    assert results["provenance"]["versions"]["torch"] and "cpu" in results["provenance"]["device"]
    assert results["prompt_template"].endswith("Answer with the option's letter from the given choices directly.")
    assert (tmp_path / "summary.md").read_text().startswith("# mmbench (dev)")
    assert not list(tmp_path.glob("*.partial.jsonl"))


class CrashingEngine(FakeEngine):
    def generate(self, **kwargs):
        if self.calls == 3:
            raise RuntimeError("simulated crash")
        return super().generate(**kwargs)


def test_resume_after_a_crash_gives_the_uninterrupted_result(tmp_path):
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval("m", "pope", FIXTURES / "pope", output=tmp_path / "run", engine_factory=Factory(CrashingEngine),
                 progress=False)
    assert len(records(tmp_path / "run" / "samples.rank0.partial.jsonl")) == 3
    resumed = Factory()
    run_eval("m", "pope", FIXTURES / "pope", output=tmp_path / "run", engine_factory=resumed, progress=False)
    assert resumed.calls == 5
    run_eval("m", "pope", FIXTURES / "pope", output=tmp_path / "fresh", engine_factory=Factory(), progress=False)
    assert without_timing(records(tmp_path / "run" / "samples.jsonl")) == without_timing(
        records(tmp_path / "fresh" / "samples.jsonl"))
    again = Factory()
    run_eval("m", "pope", FIXTURES / "pope", output=tmp_path / "run", engine_factory=again, progress=False)
    assert again.engines == []  # nothing left to do: no engine is even built


def test_a_larger_limit_extends_a_finished_run(tmp_path):
    first, second = Factory(), Factory()
    run_eval("m", "pope", FIXTURES / "pope", limit=3, output=tmp_path, engine_factory=first, progress=False)
    results = run_eval("m", "pope", FIXTURES / "pope", limit=8, output=tmp_path, engine_factory=second,
                       progress=False)
    assert (first.calls, second.calls, results["n_samples"]) == (3, 5, 8)


def test_resume_refuses_a_different_run(tmp_path):
    run_eval("m", "pope", FIXTURES / "pope", limit=1, output=tmp_path, engine_factory=Factory(), progress=False)
    with pytest.raises(ConfigError, match="different prompt_template"):
        run_eval("m", "pope", FIXTURES / "pope", limit=1, output=tmp_path, engine_factory=Factory(),
                 prompt_template="{question}", progress=False)


def test_sweep_builds_one_engine_per_setting_and_plots(tmp_path):
    factory = Factory()
    table = run_eval("m", "pope", FIXTURES / "pope", output=tmp_path, engine_factory=factory, progress=False,
                     sweep=["budget=0.25,0.5", "visual_keep=1.0,0.5"])
    assert [e.overrides for e in factory.engines] == [
        {"expert_budget": 0.25, "visual_keep": 1.0}, {"expert_budget": 0.25, "visual_keep": 0.5},
        {"expert_budget": 0.5, "visual_keep": 1.0}, {"expert_budget": 0.5, "visual_keep": 0.5}]
    assert [r["setting"] for r in table["rows"]][:2] == ["expert_budget=0.25 visual_keep=1.0",
                                                        "expert_budget=0.25 visual_keep=0.5"]
    assert [r["visual_tokens_kept_mean"] for r in table["rows"]] == [16, 8, 16, 8]
    assert (tmp_path / "expert_budget=0.5__visual_keep=0.5" / "results.json").is_file()
    assert (tmp_path / "accuracy_vs_latency.png").read_bytes()[:4] == b"\x89PNG"
    assert "| expert_budget=0.5 visual_keep=0.5 |" in (tmp_path / "summary.md").read_text()


def test_unknown_sweep_key_lists_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown sweep key 'keep'; valid keys are: .*budget.*policy"):
        run_eval("m", "pope", FIXTURES / "pope", output=tmp_path, engine_factory=Factory(), progress=False,
                 sweep=["keep=1.0,0.5"])


class ReconfigurableEngine(FakeEngine):
    def reconfigure(self, **overrides):
        if "dtype" in overrides:
            raise ConfigError("dtype cannot change on a loaded engine")
        self.overrides.update(overrides)


def test_sweep_reuses_an_engine_that_can_reconfigure(tmp_path):
    factory = Factory(ReconfigurableEngine)
    table = run_eval("m", "pope", FIXTURES / "pope", output=tmp_path, engine_factory=factory, progress=False,
                     sweep={"budget": [1.0, 0.25]})
    assert len(factory.engines) == 1 and factory.calls == 16
    assert [r["ttft_s_mean"] for r in table["rows"]] == pytest.approx([0.01, 0.04])


def test_cli_eval_on_easyvqa_with_progress(tmp_path, monkeypatch, capsys):
    factory = Factory()
    monkeypatch.setattr(vismmoe, "load", factory)
    assert eval_cli(["eval", "--model", "demo", "--task", "easy-vqa", "--limit", "40",
                     "--output", str(tmp_path), "--max-new-tokens", "4"]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    rows = records(tmp_path / "samples.jsonl")
    expected = sum(r["references"] == [r["prediction"]] for r in rows) / 40
    assert results["metrics"]["accuracy"] == pytest.approx(expected) and 0 < expected < 1
    assert results["max_new_tokens"] == 4 and results["split"] == "test"
    assert rows[0]["prompt"] == "what is the red shape?"  # the plain question the demo model was trained on
    captured = capsys.readouterr()
    assert "acc=" in captured.err and "easyvqa: accuracy =" in captured.out


def test_unreadable_image_stops_or_is_skipped_and_counted(tmp_path):
    data = tmp_path / "docvqa"
    shutil.copytree(FIXTURES / "docvqa", data)
    file = data / "DocVQA" / "validation-00000-of-00001.parquet"
    table = pq.read_table(file)
    rows = table.to_pylist()
    rows[1]["image"] = {"bytes": b"not an image", "path": None}
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), file)
    with pytest.raises(EvalDataError, match="record 1, question_id 'd2'"):
        run_eval("m", "docvqa", data, output=tmp_path / "a", engine_factory=Factory(), progress=False)
    results = run_eval("m", "docvqa", data, output=tmp_path / "b", engine_factory=Factory(), progress=False,
                       skip_bad=True)
    assert results["skipped"]["count"] == 1 and results["n_samples"] == 2
    assert records(tmp_path / "b" / "skipped.jsonl")[0]["question_id"] == "d2"


DP_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[3])
from fake_engine import FakeEngine
from vismmoe.evaluation import run_eval
run_eval("m", "easyvqa", limit=30, output=sys.argv[1], engine_factory=FakeEngine, progress=False)
run_eval("m", "mme", sys.argv[2], output=sys.argv[1] + "-mme", engine_factory=FakeEngine, progress=False)
"""


def test_data_parallel_two_processes_equal_one(tmp_path):
    script = tmp_path / "dp.py"
    script.write_text(DP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    subprocess.run([sys.executable, str(script), str(tmp_path / "one"), str(FIXTURES / "mme"), str(FIXTURES)],
                   check=True, env=env, cwd=tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    launched = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", str(script),
                               str(tmp_path / "two"), str(FIXTURES / "mme"), str(FIXTURES)],
                              env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert launched.returncode == 0, launched.stderr[-3000:]
    for name in ("one", "one-mme"):
        other = name.replace("one", "two")
        assert without_timing(records(tmp_path / name / "samples.jsonl")) == without_timing(
            records(tmp_path / other / "samples.jsonl"))
        single, merged = (json.loads((tmp_path / n / "results.json").read_text()) for n in (name, other))
        assert single["metrics"] == merged["metrics"] and merged["world_size"] == 2
    assert json.loads((tmp_path / "two" / "results.json").read_text())["n_samples"] == 30
    assert {r["stats"]["rank"] for r in records(tmp_path / "two" / "samples.jsonl")} == {0, 1}  # both worked


def test_sweep_reloads_when_reconfigure_refuses_a_setting(tmp_path):
    factory = Factory(ReconfigurableEngine)
    run_eval("m", "pope", FIXTURES / "pope", limit=2, output=tmp_path, engine_factory=factory, progress=False,
             sweep=["dtype=float32,bfloat16"])
    assert [e.overrides for e in factory.engines] == [{"dtype": "float32"}, {"dtype": "bfloat16"}]


def test_cpu_ranks_of_a_mixed_run_load_on_the_cpu_and_record_it(tmp_path, monkeypatch):
    """VISMMOE_EVAL_GPU_RANKS=0: this (only) rank is past the GPU ranks, so its engine gets device cpu and
    every record names the device that answered it."""
    monkeypatch.setenv("VISMMOE_EVAL_GPU_RANKS", "0")
    factory = Factory()
    run_eval("m", "pope", FIXTURES / "pope", output=tmp_path, engine_factory=factory, progress=False)
    assert [e.overrides.get("device") for e in factory.engines] == ["cpu"]
    rows = records(tmp_path / "samples.jsonl")
    assert rows and all("device" in r for r in rows)


def test_gpu_ranks_must_be_a_count(tmp_path, monkeypatch):
    monkeypatch.setenv("VISMMOE_EVAL_GPU_RANKS", "two")
    with pytest.raises(ConfigError, match="VISMMOE_EVAL_GPU_RANKS must be a whole number"):
        run_eval("m", "pope", FIXTURES / "pope", output=tmp_path, engine_factory=Factory(), progress=False)
