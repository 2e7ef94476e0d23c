"""Least frequently used: evict the expert with the fewest layer calls so far, ties by recency.

Counts are kept per (layer, expert), not per slot, and survive eviction: an expert that was popular,
evicted and reloaded keeps its history instead of restarting at 1 (the classic in-cache LFU flaw
that makes every newcomer the next victim). A count is +1 per layer call that used the expert, not
per token, so a long prefill does not outweigh decode. Counts never decay (see LFRU for that).
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from .base import SLOT_FIELDS, EvictionPolicy, is_better_jit, lowest_score, register_twins

LFUState = namedtuple("LFUState", SLOT_FIELDS + ("count",))


class LFUPolicy(EvictionPolicy):
    name = "lfu"

    def __init__(self, num_slots: int, num_layers: int, num_experts: int):
        super().__init__(num_slots, num_layers, num_experts)
        self.count = np.zeros((num_layers, num_experts), dtype=np.int64)

    def on_access(self, slot, layer, expert, now, n_visual=0, n_text=0):
        self.last_use[slot] = now
        self.count[layer, expert] += 1

    def _choose(self, evictable, layer):
        score = self.count[self.slot_layer, self.slot_expert]
        return lowest_score(score, self.last_use, evictable)

    def jit_state(self):
        return LFUState(count=self.count.copy(), **self._slot_fields())


# ------------------------------------------------------------------------------------ numba twins
@njit(cache=True)
def lfu_choose_jit(st, evictable, layer):
    """_choose: the evictable slot with the lowest score (the empty-slot rule is applied before)."""
    best = -1
    best_score = 0.0
    best_last_use = 0
    for s in range(evictable.shape[0]):
        if not evictable[s]:
            continue
        score = float(st.count[st.slot_layer[s], st.slot_expert[s]])
        if best < 0 or is_better_jit(score, st.last_use[s], best_score, best_last_use):
            best = s
            best_score = score
            best_last_use = st.last_use[s]
    return best


@njit(cache=True, inline="always")
def lfu_access_jit(st, slot, layer, expert, now, n_visual, n_text):
    st.last_use[slot] = now
    st.count[layer, expert] += 1


register_twins(LFUState, choose=lfu_choose_jit, on_access=lfu_access_jit)
