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
