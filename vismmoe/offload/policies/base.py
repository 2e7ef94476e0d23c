"""The interface every cache eviction policy implements.

The GPU expert cache (offload/cache.py) owns the slots and calls these hooks; a policy only keeps
per-slot bookkeeping in numpy arrays and picks a victim. The trace simulator drives the very same
objects, so a policy measured offline behaves identically online.
"""

from __future__ import annotations

import numpy as np


class EvictionPolicy:
    name = "base"

    def __init__(self, num_slots: int, num_layers: int, num_experts: int):
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_experts = num_experts

    def on_insert(self, slot: int, layer: int, expert: int, now: int) -> None:
        """A new expert was copied into `slot` (its previous owner, if any, is gone)."""

    def on_access(self, slot: int, layer: int, expert: int, now: int, n_visual: int = 0, n_text: int = 0) -> None:
        """The expert in `slot` was used by a layer call at clock `now`, by that many visual / text tokens."""

    def victim(self, evictable: np.ndarray) -> int:
        """Index of the slot to overwrite, among those where `evictable` is True (at least one is)."""
        raise NotImplementedError

    def reset_request(self) -> None:
        """Called between requests; frequency-based policies may decay their counts here."""
