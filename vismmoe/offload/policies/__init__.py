"""Cache eviction policies, one per file, all behind `EvictionPolicy`; per-layer slot plans."""

from __future__ import annotations

from .affinity import AffinityPolicy
from .base import EvictionPolicy
from .cost_aware import CostAwarePolicy
from .lfru import LFRUPolicy
from .lfu import LFUPolicy
from .lru import LRUPolicy
from .slot_plan import SlotPlan, evictable_mask

POLICIES: dict[str, type[EvictionPolicy]] = {
    cls.name: cls for cls in (LRUPolicy, LFUPolicy, LFRUPolicy, CostAwarePolicy, AffinityPolicy)
}

__all__ = [
    "POLICIES", "make_policy", "EvictionPolicy", "SlotPlan", "evictable_mask",
    "LRUPolicy", "LFUPolicy", "LFRUPolicy", "CostAwarePolicy", "AffinityPolicy",
]


def make_policy(name: str, num_slots: int, num_layers: int, num_experts: int, **options) -> EvictionPolicy:
    """`options` go to the policy's constructor (e.g. half_life=, load_cost=, use_distance=)."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None
    return cls(num_slots, num_layers, num_experts, **options)
