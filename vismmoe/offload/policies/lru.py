"""Least recently used: evict the slot whose expert was used longest ago."""

from __future__ import annotations

import numpy as np

from .base import EvictionPolicy


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def __init__(self, num_slots: int, num_layers: int, num_experts: int):
        super().__init__(num_slots, num_layers, num_experts)
        # Empty slots get -1 so they are filled before anything is evicted.
        self.last_use = np.full(num_slots, -1, dtype=np.int64)

    def on_insert(self, slot, layer, expert, now):
        self.last_use[slot] = now

    def on_access(self, slot, layer, expert, now, n_visual=0, n_text=0):
        self.last_use[slot] = now

    def victim(self, evictable):
        masked = np.where(evictable, self.last_use, np.iinfo(np.int64).max)
        return int(np.argmin(masked))
