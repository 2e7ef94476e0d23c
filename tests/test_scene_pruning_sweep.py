"""eval/scene_pruning_sweep.py: retention table over keep x method x merge through run_eval (fake engine),
and a clear stop when the engine has no pruning config keys."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from vismmoe.errors import ConfigError

from .conftest import import_script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "fixtures" / "eval"))
from fake_engine import FakeEngine  # noqa: E402


@pytest.fixture(scope="module")
def script():
    return import_script(ROOT / "eval" / "scene_pruning_sweep.py")


class PruningFake(FakeEngine):
    """Takes the pruning keys; answers every is-question wrongly below keep 0.5 with the random method (so
    retention differs between settings), and reports the kept visual tokens of a 196-token image."""

    built = []

    def __init__(self, model, config=None, **overrides):
        super().__init__(model, config=config, **overrides)
        PruningFake.built.append(overrides)

    def generate(self, image=None, prompt="", max_new_tokens=16):
        result = super().generate(image=image, prompt=prompt, max_new_tokens=max_new_tokens)
        keep = self.overrides.get("visual_keep", 1.0)
        if keep < 0.5 and self.overrides.get("visual_prune") == "random" and prompt.startswith("is"):
            result.text = "maybe"
        result.stats["visual_tokens_kept"] = int(196 * keep)
        return result


def test_retention_table_through_run_eval(script, tmp_path):
    PruningFake.built = []
    out = tmp_path / "sweep"
    rc = script.main(["--out", str(out), "--limit", "14", "--keep", "1.0,0.5,0.25", "--methods", "affinity,random",
                      "--merge", "off,on"], engine_factory=PruningFake, progress=False)
    assert rc == 0
    summary = json.loads((out / "scene_pruning.json").read_text())
    rows = summary["rows"]
    assert len(rows) == 1 + 2 * 2 * 2 and rows[0]["visual_prune"] is None and rows[0]["visual_keep"] == 1.0
    # the keys reach the engine as overrides, exactly as named
    assert {"visual_keep": 0.25, "visual_prune": "random", "visual_merge": True, "expert_budget": 1.0} in PruningFake.built
    assert PruningFake.built[0] == {"expert_budget": 1.0, "visual_keep": 1.0}
    base = summary["unpruned_accuracy"]
    assert base == json.loads((out / "unpruned" / "results.json").read_text())["metrics"]["accuracy"] > 0
    for r in rows[1:]:
        name = f"visual_keep={r['visual_keep']}__visual_prune={r['visual_prune']}__visual_merge={r['visual_merge']}"
        acc = json.loads((out / "pruned" / name / "results.json").read_text())["metrics"]["accuracy"]
        assert r["accuracy"] == acc and r["retention"] == pytest.approx(acc / base)
        assert r["n_samples"] == 14 and set(r["per_type"]) <= set(("count", "color_at", "shape_at", "exist",
                                                                   "relpos", "relsize", "digit"))
    random_low = next(r for r in rows if r["visual_keep"] == 0.25 and r["visual_prune"] == "random")
    affinity_low = next(r for r in rows if r["visual_keep"] == 0.25 and r["visual_prune"] == "affinity")
    assert random_low["retention"] < 1.0 == affinity_low["retention"]
    checks = {c["check"]: c["pass"] for c in summary["checks"]}
    assert checks["affinity retention >= 90% at keep 0.25, merge False"] is True
    assert checks["affinity not below random at any keep, merge True"] is True
    md = (out / "scene_pruning.md").read_text()
    assert "| keep | affinity | random | tokens kept |" in md and "| 0.25 | 100.0% (" in md
    assert (out / "scene_pruning.png").stat().st_size > 1000


def test_an_engine_without_the_pruning_keys_stops_with_a_clear_message(script, tmp_path, capsys):
    with pytest.raises(ConfigError, match="lacks visual_keep, visual_prune, visual_merge.*pruning stage"):
        script.check_engine_knows_pruning(known_keys={"expert_budget", "device"})
    script.check_engine_knows_pruning(known_keys={"visual_keep", "visual_prune", "visual_merge"})

    def old_engine(model, config=None, **overrides):  # what vismmoe.load says about keys it does not know
        raise ConfigError(f"unknown config key(s) {sorted(k for k in overrides if k.startswith('visual'))} in "
                          "keyword overrides; valid keys are: device, expert_budget")

    rc = script.main(["--out", str(tmp_path), "--limit", "2", "--keep", "1.0,0.5"], engine_factory=old_engine,
                     progress=False)
    assert rc == 2
    assert "no visual-token pruning: its configuration lacks visual_keep" in capsys.readouterr().err


def test_bad_arguments(script):
    with pytest.raises(ConfigError, match="--merge"):
        script.parse_args(["--out", "x", "--merge", "maybe"])
    assert script.parse_args(["--out", "x", "--keep", "1.0,0.5,98"]).keep == [1.0, 0.5, 98]


def test_the_real_engine_on_a_tiny_checkpoint(script, request, tmp_path):
    from dataclasses import fields

    from vismmoe.config import EngineConfig

    known = {f.name for f in fields(EngineConfig)}
    if not set(script.PRUNING_KEYS) <= known:
        pytest.skip("this engine has no pruning config keys yet (visual_keep / visual_prune / visual_merge)")
    qwen_checkpoint = request.getfixturevalue("qwen_checkpoint")  # built only when the test can run
    rc = script.main(["--model", str(qwen_checkpoint), "--out", str(tmp_path), "--limit", "2", "--keep", "1.0,0.5",
                      "--methods", "random", "--merge", "off", "--device", "cpu"], progress=False)
    assert rc == 0
    rows = json.loads((tmp_path / "scene_pruning.json").read_text())["rows"]
    assert [r["visual_keep"] for r in rows] == [1.0, 0.5]
    assert rows[1]["visual_tokens_kept_mean"] < rows[0]["visual_tokens_kept_mean"]


def test_a_zero_unpruned_accuracy_leaves_retention_undefined(script):
    rows = [{"visual_keep": 1.0, "visual_prune": None, "visual_merge": False, "accuracy": 0.0, "retention": None,
             "visual_tokens_kept_mean": 196.0},
            {"visual_keep": 0.5, "visual_prune": "random", "visual_merge": False, "accuracy": 0.0, "retention": None,
             "visual_tokens_kept_mean": 98.0}]
    summary = {"task": "scenevqa", "model": "m", "headline": "accuracy", "unpruned_accuracy": 0.0, "n_samples": 2,
               "expert_budget": 1.0, "rows": rows, "checks": script._checks(rows)}
    assert "| 0.5 | n/a (0.000) | 98.0 |" in script.markdown(summary)
