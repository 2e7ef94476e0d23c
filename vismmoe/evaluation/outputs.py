"""What a run writes: samples.jsonl (one scored record per question), results.json and summary.md."""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Per-request engine statistics lifted to the top level of each record; the rest stays under "stats".
STAT_KEYS = ("ttft_s", "decode_s", "new_tokens", "peak_gpu_bytes", "visual_tokens_kept", "visual_tokens_total", "pruning_s",
             "expert_hits", "expert_misses", "bytes_h2d")
_RECORD_ORDER = ("question_id", "score", "prediction", "parsed", "references", "prompt", "image", "latency_s",
                 *STAT_KEYS, "fields", "stats")


def ordered(record: dict) -> dict:
    """A record with its keys in a stable, readable order."""
    head = {k: record[k] for k in _RECORD_ORDER if k in record}
    return {**head, **{k: v for k, v in record.items() if k not in head}}


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines of a JSONL file; a last line cut short by a crash is ignored."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique: data-parallel processes may race
    tmp.write_text(text)
    os.replace(tmp, path)


def write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(ordered(r), default=str) + "\n" for r in records))


def efficiency(records: list[dict]) -> dict:
    """Latency, memory and expert-cache totals over the records that carry engine statistics."""
    timed = [r for r in records if r.get("latency_s") is not None]
    if not timed:
        return {}

    def values(key):
        return [r[key] for r in timed if isinstance(r.get(key), (int, float))]

    def mean(key):
        v = values(key)
        return sum(v) / len(v) if v else None

    latencies = sorted(values("latency_s"))
    decode_s, tokens = sum(values("decode_s")), sum(max(n - 1, 0) for n in values("new_tokens"))
    hits, misses = sum(values("expert_hits")), sum(values("expert_misses"))
    peaks = values("peak_gpu_bytes")
    return {
        "n_timed": len(timed),
        "latency_s_mean": sum(latencies) / len(latencies),
        "latency_s_p50": _percentile(latencies, 0.5),
        "latency_s_p90": _percentile(latencies, 0.9),
        "ttft_s_mean": mean("ttft_s"),
        "decode_s_mean": mean("decode_s"),
        "decode_tokens_per_s": tokens / decode_s if decode_s > 0 else None,
        "new_tokens_mean": mean("new_tokens"),
        "peak_gpu_bytes_max": max(peaks) if peaks else None,
        "visual_tokens_kept_mean": mean("visual_tokens_kept"),
        "expert_hit_rate": hits / (hits + misses) if hits + misses else None,
        "bytes_h2d_mean": mean("bytes_h2d"),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def provenance(device: str | None) -> dict:
    versions = {"python": platform.python_version()}
    for package in ("vismmoe", "torch", "transformers", "accelerate", "pillow", "pyarrow", "numpy", "easy-vqa"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "versions": versions, "git_revision": _git_revision(), "device": device,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "host": platform.node(),
    }


def _git_revision() -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")


# ---- summary.md ---------------------------------------------------------------------------------------------

_POINTS = ("perception", "cognition", "total", "score")  # MME keeps its points scale
_COUNTS = ("n", "questions", "images")


def flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def format_metric(name: str, value) -> str:
    leaf = name.rsplit("/", 1)[-1]
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    if leaf in _COUNTS or leaf.startswith("n_"):
        return str(int(value))
    if leaf in _POINTS:
        return f"{value:.2f}"
    return f"{100 * value:.2f}"


def summary_markdown(results: dict) -> str:
    lines = [f"# {results['task']} ({results['split']})", ""]
    if results.get("model"):
        lines.append(f"model `{results['model']}`, overrides `{results.get('overrides') or {}}`  ")
    lines += [f"samples: {results['n_samples']}, skipped bad records: {results['skipped']['count']}, "
              f"normalize: {results['normalize']['mode']}  ",
              "percentages except counts and MME points", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {format_metric(k, v)} |" for k, v in flatten(results["metrics"]).items()]
    if results.get("efficiency"):
        lines += ["", "| efficiency | value |", "|---|---|"]
        lines += [f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |"
                  for k, v in results["efficiency"].items()]
    return "\n".join(lines) + "\n"


def write_results(out_dir: Path, results: dict, records: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "samples.jsonl", records)
    write_atomic(out_dir / "results.json", json.dumps(results, indent=2, default=str) + "\n")
    write_atomic(out_dir / "summary.md", summary_markdown(results))
