"""A cache policy is a setting of the one score in offload/core.py; this is that setting.

Each policy file says what its score means and returns a `Policy`; nothing else is written per
policy. The host core (numba), the device reference (torch) and the fused kernel (Triton) evaluate
the same `core.score` from the arrays `params()` and `cost_table()` give.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import core


@dataclass(frozen=True)
class Policy:
    name: str
    counting: bool = True  # keeps per-(layer, expert) use counts (LRU does not: every score is 0)
    half_life: float | None = None  # counts halve every this many calls of their layer; None: no decay
    modal: bool = False  # separate visual / text counts, weighed by the request's mix
    use_distance: bool = False  # divide by the layer calls until the slot's layer runs again
    load_cost: object = None  # scalar, [L] or [L, E] reload cost (None: uniform)

    def __post_init__(self):
        if self.half_life is not None and not self.half_life > 0:
            raise ValueError(f"half_life must be positive, got {self.half_life}")

    def params(self) -> np.ndarray:
        p = np.zeros(4)
        p[core.GROWTH] = 1.0 if self.half_life is None else 2.0 ** (1.0 / self.half_life)
        p[core.COUNTING], p[core.MODAL], p[core.USE_DISTANCE] = self.counting, self.modal, self.use_distance
        return p

    def cost_table(self, num_layers: int, num_experts: int) -> np.ndarray:
        """The reload cost as a positive [L, E] float table."""
        if self.load_cost is None:
            return np.ones((num_layers, num_experts))
        cost = np.asarray(self.load_cost, dtype=np.float64)
        if cost.ndim == 1:
            cost = cost[:, None]
        try:
            cost = np.broadcast_to(cost, (num_layers, num_experts)).copy()
        except ValueError:
            raise ValueError(f"load_cost must be a scalar, [{num_layers}] or [{num_layers}, {num_experts}]; "
                             f"got shape {np.shape(self.load_cost)}") from None
        if not (cost > 0).all():
            raise ValueError("load_cost must be positive")
        return cost

    def new_state(self, num_slots: int, num_layers: int, num_experts: int) -> core.CacheState:
        return core.new_state(num_slots, num_layers, num_experts, self.params(),
                              self.cost_table(num_layers, num_experts))
