"""Per-layer slot allocation: how many cache slots each layer may hold.

`quota[l]` caps layer l. A layer below its cap competes for any unpinned slot (empty ones first);
a layer at its cap must evict one of its own. So:
  * no plan (None)          -> one global pool, the policy alone decides;
  * quotas summing to S     -> a fixed partition (per-layer caches, like mixtral-offloading);
  * quotas summing above S  -> a shared pool with caps, so early layers cannot monopolise it.
A call into layer l loads at most `wave_size` experts at once (the rest wait for the next wave), so
the layer's own unpinned slots never run out while it is at its cap. The host core (offload/core.py,
`victim`) applies the caps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SlotPlan:
    quota: np.ndarray  # int64 [num_layers], each >= 1

    def __post_init__(self):
        quota = np.asarray(self.quota, dtype=np.int64)
        if quota.ndim != 1 or len(quota) == 0 or (quota < 1).any():
            raise ValueError(f"a slot plan needs a positive quota per layer, got {self.quota!r}")
        object.__setattr__(self, "quota", quota)

    @classmethod
    def uniform(cls, num_slots: int, num_layers: int) -> "SlotPlan":
        return cls.from_budget(num_slots, num_layers)

    @classmethod
    def from_budget(cls, num_slots: int, num_layers: int, weights=None) -> "SlotPlan":
        """Split `num_slots` over layers in proportion to `weights` (uniform by default), at least 1 each.

        Largest-remainder rounding, so quotas sum to exactly `num_slots` (a partition).
        """
        if num_slots < num_layers:
            raise ValueError(f"{num_slots} slots cannot give each of {num_layers} layers one")
        w = np.ones(num_layers) if weights is None else np.asarray(weights, dtype=np.float64)
        if w.shape != (num_layers,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {num_layers} non-negative numbers, not all zero")
        spare = num_slots - num_layers  # every layer gets 1; the rest goes by weight
        share = spare * w / w.sum()
        quota = 1 + np.floor(share).astype(np.int64)
        remainder = spare - int(quota.sum() - num_layers)
        quota[np.argsort(-(share - np.floor(share)), kind="stable")[:remainder]] += 1
        return cls(quota)

    def wave_size(self, layer: int, num_slots: int) -> int:
        return int(min(num_slots, self.quota[layer]))


def resolve_slot_plan(value, num_slots: int, num_layers: int, top_k: int) -> "SlotPlan | None":
    """The engine's `slot_plan` key for a cache of `num_slots` slots: None / "global" -> None (one global
    pool), "uniform" -> an even partition, a list -> those quotas. Raises ConfigError naming the fix.

    Each quota must hold a decode step's top-k experts (static decode loads them in one call), and a
    list must partition the budget exactly (sum = slots), as `vismmoe plan` writes it."""
    from ...errors import ConfigError

    if value is None or value == "global":
        return None
    if value == "uniform":
        if num_slots < num_layers * top_k:
            raise ConfigError(f"slot_plan: uniform needs at least top-k = {top_k} slots per MoE layer "
                              f"({num_layers * top_k} slots); the budget gives {num_slots}: raise expert_budget "
                              "or use slot_plan: global")
        return SlotPlan.uniform(num_slots, num_layers)
    quota = list(value)
    if len(quota) != num_layers:
        raise ConfigError(f"slot_plan has {len(quota)} quotas but the model has {num_layers} MoE layers: give one "
                          "per MoE layer (`vismmoe plan` writes them), or use uniform / global")
    small = [i for i, q in enumerate(quota) if q < top_k]
    if small:
        raise ConfigError(f"slot_plan: layers {small} have quotas below the model's top-k = {top_k} "
                          f"({[quota[i] for i in small]}); every layer needs at least {top_k}")
    if sum(quota) != num_slots:
        raise ConfigError(f"slot_plan sums to {sum(quota)} slots but expert_budget gives {num_slots}: set "
                          f"expert_budget to {sum(quota)} experts' bytes, or quotas summing to {num_slots}")
    return SlotPlan(np.asarray(quota, np.int64))
