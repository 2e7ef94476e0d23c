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
one needed soonest (the next layer's); the distance term is what fixes that. The distance is seen from
the incoming expert's layer.

As every policy, a setting of the one score in offload/core.py (which the host core, the torch
device reference and the fused kernel all evaluate); ties by (least recently used, lowest slot).
"""

from __future__ import annotations

from .base import Policy


DEFAULT_HALF_LIFE = 8.0  # forward steps


def make(load_cost=None, half_life: float = DEFAULT_HALF_LIFE, use_distance: bool = True) -> Policy:
    return Policy("cost", half_life=half_life, use_distance=bool(use_distance), load_cost=load_cost)
