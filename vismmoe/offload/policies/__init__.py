"""Cache eviction policies, one per file, all behind `EvictionPolicy`."""

from __future__ import annotations

from .base import EvictionPolicy
from .lru import LRUPolicy

POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRUPolicy}


def make_policy(name: str, num_slots: int, num_layers: int, num_experts: int) -> EvictionPolicy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None
    return cls(num_slots, num_layers, num_experts)
