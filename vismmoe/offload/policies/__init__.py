"""Cache eviction policies, one per file, each a setting of the one score in offload/core.py."""

from __future__ import annotations

from . import affinity, cost_aware, lfru, lfu, lru
from .base import Policy
from .slot_plan import SlotPlan

_MAKERS = {"lru": lru.make, "lfu": lfu.make, "lfru": lfru.make, "cost": cost_aware.make, "affinity": affinity.make}
POLICIES = tuple(_MAKERS)

__all__ = ["POLICIES", "Policy", "SlotPlan", "make_policy"]


def make_policy(name: str, **options) -> Policy:
    """`options` go to the policy's maker (e.g. half_life=, load_cost=, use_distance=)."""
    if name not in _MAKERS:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICIES)}")
    return _MAKERS[name](**options)
