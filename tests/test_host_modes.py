"""eval/profile_host_modes.py: engines loaded one after another, each request timed beside what the host did;
with --variants, the probe's and the validation rows' engine configurations side by side."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import import_script

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "easyvqa-qwen3vlmoe"


@pytest.mark.skipif(not (MODEL / "model.safetensors").is_file(), reason="the bundled model is not built")
def test_variants_cycle_the_engines_and_time_both_request_sets(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "eval" / "profile_host_modes.py"), "--out", str(tmp_path),
                          "--model", str(MODEL), "--variants", "probe", "row-25", "--instances", "3", "--requests", "1",
                          "--warmup", "1", "--new-tokens", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "host_modes.json").read_text())
    rows = report["rows"]
    assert [r["variant"] for r in rows] == ["probe", "row-25", "probe"]
    assert rows[1]["config"]["expert_budget"] == 0.25 and rows[1]["config"]["emulate"] == "rtx4090-24gb"
    assert "emulate" not in rows[0]["config"] and rows[0]["config"]["store"] == "pinned"
    for r in rows:  # both request sets served by every engine, each timed apart
        assert set(r["ttft_minus_inputs_ms"]) == {"probe", "rows"}
        assert all(len(v) == 1 for v in r["requests_by_set"].values())
        got = r["requests_by_set"]["probe"][0]
        assert r["ttft_minus_inputs_ms"]["probe"] == pytest.approx(got["ttft_ms"] - got["inputs_ms"])
    md = (tmp_path / "host_modes.md").read_text()
    assert "| probe | 2 |" in md and "| row-25 | 1 |" in md


def test_an_unknown_variant_is_refused_by_name():
    module = import_script(ROOT / "eval" / "profile_host_modes.py")
    with pytest.raises(SystemExit, match="unknown variant 'rows': choose from probe, row, row-plain, row-25"):
        module.variant_config("rows", None, "auto")
    assert module.variant_config("row-plain", "jetson-orin-nano-8gb", "bfloat16").get("emulate") is None
    assert module.variant_config("row", "jetson-orin-nano-8gb", "bfloat16")["emulate"] == "jetson-orin-nano-8gb"
