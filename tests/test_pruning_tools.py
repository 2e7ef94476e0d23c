"""The `vismmoe affinity` report and eval/bench_pruning.py, on tiny inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from vismmoe.offload.trace import TraceRecorder
from vismmoe.pruning.analysis import routing_stats

from .conftest import import_script

ROOT = Path(__file__).resolve().parents[1]


def test_routing_stats_by_hand():
    rec = TraceRecorder(num_layers=2, num_experts=10, top_k=2)
    rec.begin_request("a")
    # Layer 0: visual tokens use experts {0,1} three times and {2,3} once; text uses {5,6} twice.
    rec.record(0, 0, [[0, 1], [0, 1], [0, 1], [2, 3], [5, 6], [5, 6]], visual=[1, 1, 1, 1, 0, 0])
    rec.record(1, 0, [[4, 5], [4, 5], [4, 5], [4, 5], [7, 8], [7, 9]], visual=[1, 1, 1, 1, 0, 0])
    rec.end_request()
    stats = routing_stats(rec.to_trace())
    v, t = stats["visual"], stats["text"]
    assert v["distinct_experts"] == [4, 2] and t["distinct_experts"] == [2, 3]
    p = np.array([3, 3, 1, 1]) / 8
    assert v["perplexity"][0] == pytest.approx(math.exp(-(p * np.log(p)).sum()))
    assert v["perplexity"][1] == pytest.approx(2.0) and t["perplexity"][0] == pytest.approx(2.0)
    # Top 20% of 10 experts = 2 experts.
    assert v["top20_share"] == [pytest.approx(6 / 8), 1.0] and t["top20_share"][1] == pytest.approx(3 / 4)
    assert v["usage"][0][:4] == [3, 3, 1, 1]


def test_affinity_command_on_the_demo_model(tmp_path, capsys):
    from vismmoe.cli import main

    out = tmp_path / "aff"
    assert main(["affinity", "--model", str(ROOT / "models" / "easyvqa-qwen3vlmoe"), "--task", "easyvqa",
                 "--limit", "2", "--keep", "1,0.25", "--prune", "affinity,random", "--max-new-tokens", "4",
                 "--output", str(out)]) == 0
    report = json.loads((out / "affinity.json").read_text())
    rows = {(s["keep"], s["method"]): s for s in report["settings"]}
    assert set(rows) == {(1.0, "none"), (0.25, "affinity"), (0.25, "random")}
    full, pruned = rows[(1.0, "none")], rows[(0.25, "affinity")]
    assert pruned["visual_tokens_kept"] == round(0.25 * full["visual_tokens_total"])
    assert full["visual_tokens_kept"] == full["visual_tokens_total"] == 49
    for s in report["settings"]:
        assert len(s["routing"]["visual"]["distinct_experts"]) == report["layers"] == 4
        assert [c["budget"] for c in s["cache"]] == [0.125, 0.25, 0.5]
        assert all(0 <= c["decode_hit_rate"] <= 1 for c in s["cache"])
        assert any(r is not None for r in s["next_layer_recall"]["decode"])
    assert "| 0.25 | affinity | 12/49 |" in (out / "summary.md").read_text()
    for png in ("working_set_vs_keep.png", "expert_use_keep1.0_none.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_affinity_command_rejects_bad_settings(tmp_path, capsys):
    from vismmoe.cli import main

    assert main(["affinity", "--model", str(ROOT / "models" / "easyvqa-qwen3vlmoe"), "--task", "easyvqa",
                 "--keep", "1,1.5", "--output", str(tmp_path)]) == 2
    assert "ratio must be in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a JSON object
        main(["affinity", "--model", "m", "--task", "easyvqa", "--affinity-weights", "[1]", "--output", str(tmp_path)])
    assert "--affinity-weights takes a JSON object" in capsys.readouterr().err
    assert main(["affinity", "--model", str(ROOT / "models" / "easyvqa-qwen3vlmoe"), "--task", "easyvqa",
                 "--affinity-weights", '{"concentraton": 2}', "--output", str(tmp_path)]) == 2
    assert "unknown visual_affinity_weights key(s) ['concentraton']" in capsys.readouterr().err


def test_bench_pruning_tiny(tmp_path):
    bench = import_script(ROOT / "eval" / "bench_pruning.py")
    assert bench.main(["--out", str(tmp_path), "--tiny", "--layers", "2", "--image-px", "128", "--new-tokens", "3",
                       "--repeats", "1", "--keeps", "1.0", "0.5", "--methods", "affinity", "random",
                       "--root", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench_pruning.json").read_text())
    rows = report["rows"]
    assert [(r["keep"], r["method"]) for r in rows] == [(1.0, "none"), (0.5, "affinity"), (0.5, "random")]
    total = rows[0]["visual_tokens_total"]
    assert total == 16 and [r["visual_tokens_kept"] for r in rows] == [16, 8, 8]
    assert all(r["prefill_tokens"] == rows[0]["prefill_tokens"] - (total - r["visual_tokens_kept"]) for r in rows)
    assert all(r["ttft_ms"] > 0 and r["new_tokens"] == 3 for r in rows)
    assert "| 0.5 | affinity | 8/16 |" in (tmp_path / "bench_pruning.md").read_text()


def test_run_command_prunes(capsys):
    from vismmoe.cli import main

    assert main(["run", "--keep", "0.25", "--prune", "diversity", "--merge", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "(12/49 visual kept)" in out and "visual token pruning" in out
    assert main(["run", "--keep", "0", "--max-new-tokens", "3"]) == 2
    assert "visual_keep as a token count must be >= 1, got 0" in capsys.readouterr().err
