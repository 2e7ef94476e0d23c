"""eval/validate_rounds.py: the planner's validation in rounds, each row's ratio summarised by its median."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import import_script

ROOT = Path(__file__).resolve().parents[1]


def _module():
    return import_script(ROOT / "eval" / "validate_rounds.py")


def _report(rows, inputs=None):
    """A validate_plan report's part B: (model, profile, fraction, ttft meas, ttft pred, decode meas, decode pred);
    `inputs`, per row, (its requests' input building ms, the probe's) or None."""
    out = {"rows_b": [dict(model=m, profile=p, fraction=f, measured=dict(ttft_ms=tm, decode_ms_per_token=dm),
                           emulated_prediction=dict(ttft_ms=tp, decode_ms_per_token=dp))
                      for m, p, f, tm, tp, dm, dp in rows]
           + [dict(model="bench", profile="-", fraction="-", error="skipped: past --deadline-s 10")]}
    for row, given in zip(out["rows_b"], inputs or []):
        if given is not None:
            row["measured"]["requests"] = [dict(inputs_ms=x) for x in given[0]]
            row["emulated_prediction"]["ttft_inputs_ms"] = given[1]
    return out


def test_each_row_is_summarised_by_its_median_over_the_rounds():
    vr = _module()
    a = _report([("bundled", "rtx3060-12gb", 1.0, 20.0, 20.0, 0.30, 0.30),
                 ("bundled", "rtx3060-12gb", 0.25, 50.0, 33.0, 0.40, 0.40)])
    b = _report([("bundled", "rtx3060-12gb", 1.0, 26.0, 20.0, 0.30, 0.30),
                 ("bundled", "rtx3060-12gb", 0.25, 33.0, 33.0, 0.20, 0.40)])
    c = _report([("bundled", "rtx3060-12gb", 1.0, 21.0, 20.0, 0.33, 0.30)])  # a round that measured one row
    agg = vr.aggregate([a, b, c])
    first, second = agg["rows"]
    assert first["ttft"] == pytest.approx([1.0, 1.3, 1.05]) and first["ttft_median"] == pytest.approx(1.05)
    assert first["decode_median"] == pytest.approx(1.0)
    assert second["ttft"][2] is None and second["ttft_median"] == pytest.approx((50 / 33 + 1.0) / 2)
    assert second["decode_median"] == pytest.approx(0.75)  # (1.0 + 0.5) / 2: on the band's edge, inside
    assert agg["counts_per_round"] == [dict(rows=2, ttft=1, decode=2, ttft_at_probe_speed=0),
                                       dict(rows=2, ttft=1, decode=1, ttft_at_probe_speed=0),
                                       dict(rows=1, ttft=1, decode=1, ttft_at_probe_speed=0)]
    assert agg["counts_of_medians"] == dict(rows=2, ttft=1, decode=2, ttft_at_probe_speed=0)
    assert first["ttft_at_probe_speed_median"] is None and "probe's host speed" not in vr.markdown(agg, ["a", "b", "c"])
    md = vr.markdown(agg, ["a", "b", "c"])
    assert "| bundled | rtx3060-12gb | 0.25 | **1.52** | 1.00 | - | **1.26** |" in md
    assert "| median over rounds | 2 | 1 | 2 |" in md


def test_the_host_speed_diagnostic_scales_ttft_by_input_building():
    """Beside the acceptance, each round's TTFT ratio over the row's host speed: its requests' median input
    building (pure CPU work) over the probe's. Rows without input building recorded are left out of it."""
    vr = _module()
    a = _report([("bundled", "rtx3060-12gb", 1.0, 30.0, 20.0, 0.30, 0.30),   # 1.5x slower, host 1.5x slower
                 ("bundled", "rtx3060-12gb", 0.25, 40.0, 40.0, 0.40, 0.40)],
                inputs=[([6.0, 6.0, 9.0], 4.0), None])
    b = _report([("bundled", "rtx3060-12gb", 1.0, 20.0, 20.0, 0.30, 0.30)], inputs=[([2.0, 4.0, 4.0], 4.0)])
    agg = vr.aggregate([a, b])
    first, second = agg["rows"]
    assert first["host_speed"] == pytest.approx([1.5, 1.0]) and first["ttft_at_probe_speed"] == pytest.approx([1.0, 1.0])
    assert first["ttft"] == pytest.approx([1.5, 1.0])  # the acceptance's ratios are untouched
    assert second["ttft_at_probe_speed"] == [None, None] and second["ttft_at_probe_speed_median"] is None
    assert [c["ttft_at_probe_speed"] for c in agg["counts_per_round"]] == [1, 1]
    assert agg["counts_of_medians"]["ttft_at_probe_speed"] == 1 and agg["counts_of_medians"]["ttft"] == 2
    md = vr.markdown(agg, ["a", "b"])
    assert "| bundled | rtx3060-12gb | 1.0 | 1.00 (1.50) | 1.00 (1.00) | 1.00 |" in md
    assert "medians: 1 of 2." in md


def test_rounds_run_validate_plan_and_aggregate(tmp_path):
    """One round of the CPU smoke run, end to end, and --aggregate over its report."""
    out = tmp_path / "vr"
    run = subprocess.run([sys.executable, str(ROOT / "eval" / "validate_rounds.py"), "--out", str(out), "--rounds", "1",
                          "--", "--tiny", "--deadline-s", "800"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    agg = json.loads((out / "validate_rounds.json").read_text())
    assert agg["rounds"] == 1 and agg["rows"] and agg["counts_per_round"][0]["rows"] == len(agg["rows"])
    again = subprocess.run([sys.executable, str(ROOT / "eval" / "validate_rounds.py"), "--out", str(tmp_path / "agg"),
                            "--aggregate", str(out / "round_1" / "validate_plan.json")], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((tmp_path / "agg" / "validate_rounds.json").read_text())["rows"] == agg["rows"]
