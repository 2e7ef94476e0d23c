"""Cost-aware ("least cost to lose", after HOBBIT / MoE-APEX LCU): keep what is dearest to reload soon.

score(slot) = load_cost[l, e] * p[l, e] / distance(l | layer)
  p        = decayed use frequency of the expert (as LFRU: +1 per layer call that used it, halving
             every `half_life` calls of its layer); an estimate of how likely its layer's next call
             needs it, so it blends frequency and recency;
  load_cost = what a miss of it costs (seconds or bytes; per layer or per expert; uniform by default;
             e.g. larger for experts whose host copy is on NVMe or not quantized);
  distance = layer calls until its layer runs again, seen from the layer being loaded:
             (l - layer) mod L, with 0 -> L (the current layer comes back next step).
The score is the expected reload cost avoided per layer call of slot occupancy; the lowest is evicted,
ties by recency. Layers run in order, so under pure LRU the least recently used expert is exactly the
one needed soonest (the next layer's); the distance term is what fixes that. `victim` must be given
the incoming expert's `layer` for it (without one the distance is 1 for all).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from .base import (DECAY_FIELDS, SLOT_FIELDS, DecayedCounts, EvictionPolicy, decay_tick_jit,
                   is_better_jit, lowest_score, register_twins)

DEFAULT_HALF_LIFE = 8.0  # forward steps
CostState = namedtuple("CostState", SLOT_FIELDS + DECAY_FIELDS + ("cost", "use_distance"))


class CostAwarePolicy(EvictionPolicy):
    name = "cost"

    def __init__(self, num_slots: int, num_layers: int, num_experts: int, load_cost=None,
                 half_life: float = DEFAULT_HALF_LIFE, use_distance: bool = True):
        super().__init__(num_slots, num_layers, num_experts)
        self.decayed = DecayedCounts(num_layers, num_experts, half_life)
        self.cost = _cost_table(load_cost, num_layers, num_experts)
        self.use_distance = bool(use_distance)

    def on_access(self, slot, layer, expert, now, n_visual=0, n_text=0):
        self.last_use[slot] = now
        self.decayed.counts[0, layer, expert] += self.decayed.tick(layer, now)

    def _choose(self, evictable, layer):
        d, sl, se = self.decayed, self.slot_layer, self.slot_expert
        score = self.cost[sl, se] * (d.counts[0, sl, se] / d.weight[sl])
        if self.use_distance and layer is not None:
            distance = (sl - layer) % self.num_layers
            distance[distance == 0] = self.num_layers
            score = score / distance
        return lowest_score(score, self.last_use, evictable)

    def jit_state(self):
        return CostState(cost=self.cost.copy(), use_distance=self.use_distance, **self._slot_fields(),
                         **self.decayed.jit_fields())


def _cost_table(load_cost, num_layers: int, num_experts: int) -> np.ndarray:
    """Scalar, per-layer [L] or per-expert [L, E] reload cost, as a positive [L, E] float table."""
    if load_cost is None:
        return np.ones((num_layers, num_experts))
    cost = np.asarray(load_cost, dtype=np.float64)
    if cost.ndim == 1:
        cost = cost[:, None]
    try:
        cost = np.broadcast_to(cost, (num_layers, num_experts)).copy()
    except ValueError:
        raise ValueError(f"load_cost must be a scalar, [{num_layers}] or [{num_layers}, {num_experts}]; "
                         f"got shape {np.shape(load_cost)}") from None
    if not (cost > 0).all():
        raise ValueError("load_cost must be positive")
    return cost


# ------------------------------------------------------------------------------------ numba twins
@njit(cache=True)
def cost_choose_jit(st, evictable, layer):
    """_choose: the evictable slot with the lowest score (the empty-slot rule is applied before)."""
    best = -1
    num_layers = st.weight.shape[0]
    best_score = 0.0
    best_last_use = 0
    for s in range(evictable.shape[0]):
        if not evictable[s]:
            continue
        ls = st.slot_layer[s]
        es = st.slot_expert[s]
        score = st.cost[ls, es] * (st.counts[0, ls, es] / st.weight[ls])
        if st.use_distance and layer >= 0:
            distance = (ls - layer) % num_layers
            if distance == 0:
                distance = num_layers
            score = score / distance
        if best < 0 or is_better_jit(score, st.last_use[s], best_score, best_last_use):
            best = s
            best_score = score
            best_last_use = st.last_use[s]
    return best


@njit(cache=True, inline="always")
def cost_access_jit(st, slot, layer, expert, now, n_visual, n_text):
    st.last_use[slot] = now
    st.counts[0, layer, expert] += decay_tick_jit(st, layer, now)


register_twins(CostState, choose=cost_choose_jit, on_access=cost_access_jit)
