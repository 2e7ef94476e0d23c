"""`--sweep key=v1,v2 ...`: the grid of engine overrides, and the accuracy-vs-latency plot of its rows."""

from __future__ import annotations

import itertools
from pathlib import Path

from ..errors import ConfigError

# Short sweep names for the engine's config keys; other keys must be EngineConfig keys.
KEY_ALIASES = {"budget": "expert_budget"}


def parse_value(text: str):
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_sweep(spec) -> dict[str, list]:
    """["budget=0.25,0.5", "visual_keep=1.0,0.5"] or {"budget": [0.25, 0.5]} -> {"expert_budget": [0.25, 0.5], ...}."""
    if not spec:
        return {}
    if isinstance(spec, dict):
        items = spec.items()
    else:
        items = []
        for entry in spec:
            key, sep, values = entry.partition("=")
            if not sep or not key.strip() or not values.strip():
                raise ConfigError(f"--sweep entries look like key=v1,v2; got {entry!r}")
            items.append((key.strip(), [parse_value(v) for v in values.split(",")]))
    from dataclasses import fields

    from ..config import EngineConfig

    valid = {f.name for f in fields(EngineConfig)}
    grid = {}
    for key, values in items:
        name = KEY_ALIASES.get(key, key)
        if name not in valid:
            raise ConfigError(f"unknown sweep key {key!r}; valid keys are: "
                              f"{', '.join(sorted(valid | set(KEY_ALIASES)))}")
        if name in grid:
            raise ConfigError(f"sweep key {key!r} given twice")
        grid[name] = list(values) if isinstance(values, (list, tuple)) else [values]
    return grid


def settings(grid: dict[str, list]) -> list[dict]:
    """Every combination, the first key varying slowest; [{}] without a sweep."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def setting_name(setting: dict) -> str:
    return "__".join(f"{k}={v}" for k, v in setting.items()).replace("/", "_") or "default"


def plot(rows: list[dict], headline: str, path: Path) -> Path | None:
    """Headline metric against mean per-sample latency, one labelled point per setting."""
    points = [r for r in rows if r.get("latency_s_mean") is not None and r.get(headline) is not None]
    if not points:
        return None
    from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot([r["latency_s_mean"] for r in points], [r[headline] for r in points], "o")
    for r in points:
        ax.annotate(r["setting"], (r["latency_s_mean"], r[headline]), fontsize=7,
                    textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("mean latency per sample (s)")
    ax.set_ylabel(headline)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
