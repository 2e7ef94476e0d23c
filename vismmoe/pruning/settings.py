"""Validation of the pruning settings of EngineConfig (visual_keep, visual_prune, ...).

Kept apart from config.py so that the engine configuration only calls one function per key.
"""

from __future__ import annotations

from ..errors import ConfigError

METHODS = ("affinity", "diversity", "importance", "pool", "random")
DEFAULT_METHOD = "affinity"
# The affinity method's score weights (see vismmoe/pruning/affinity.py), chosen by measurement
# (eval/affinity_weight_sweep.py; the table is in BENCHMARKS.md): diversity weighted 4x kept the most
# accuracy on both bundled models (scene-VQA keep 0.5 and 0.25, easy-VQA keep 0.25); a larger
# concentration weight cost accuracy on both. Every key may be overridden, unknown keys are errors.
DEFAULT_AFFINITY_WEIGHTS = {"importance": 1.0, "concentration": 1.0, "diversity": 4.0, "routing": 0.5}


def check_keep(value) -> None:
    """visual_keep: a ratio in (0, 1] (float) or a token count >= 1 (int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"visual_keep must be a ratio in (0, 1] or an integer token count >= 1, got {value!r}")
    if isinstance(value, int):
        if value < 1:
            raise ConfigError(f"visual_keep as a token count must be >= 1, got {value}")
    elif not 0 < value <= 1:
        raise ConfigError(f"visual_keep as a ratio must be in (0, 1] (1.0 = no pruning), got {value}; "
                          "pass an integer for a token count")


def check_method(value) -> None:
    if value is not None and value not in METHODS:
        raise ConfigError(f"unknown visual_prune method {value!r}; choose one of {', '.join(METHODS)}")


def check_weights(value) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConfigError(f"visual_affinity_weights must be a mapping such as {DEFAULT_AFFINITY_WEIGHTS}, got {value!r}")
    unknown = sorted(set(value) - set(DEFAULT_AFFINITY_WEIGHTS))
    if unknown:
        raise ConfigError(f"unknown visual_affinity_weights key(s) {unknown}; valid: {', '.join(DEFAULT_AFFINITY_WEIGHTS)}")
    for key, weight in value.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
            raise ConfigError(f"visual_affinity_weights[{key!r}] must be a non-negative number, got {weight!r}")


def affinity_weights(value) -> dict:
    return {**DEFAULT_AFFINITY_WEIGHTS, **(value or {})}


def keep_count(keep, total: int) -> int:
    """How many of `total` visual tokens to keep (never more than total, never fewer than 1)."""
    if isinstance(keep, int):
        return min(keep, total)
    return min(total, max(1, round(keep * total)))


def is_off(keep) -> bool:
    return not isinstance(keep, int) and keep == 1.0
