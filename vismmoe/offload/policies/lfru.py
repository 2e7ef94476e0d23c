"""LFRU: frequency with exponential decay, so recency and frequency both count (LRFU-style).

score(slot) = decayed count of layer calls that used its expert, with a half-life of `half_life`
calls of the expert's own layer (forward steps). Each use adds 1 at the time it happens; the sum
halves every `half_life` calls. Lowest score is evicted; ties by recency. Tiny half-lives approach
LRU, huge ones LFU. Per-layer decay keeps early layers from monopolising a global pool, the failure
vLLM's LFRU expert cache (PR #37190) was made for.
"""

from __future__ import annotations

from collections import namedtuple

from numba import njit

from .base import (DECAY_FIELDS, SLOT_FIELDS, DecayedCounts, EvictionPolicy, decay_tick_jit,
                   is_better_jit, lowest_score, register_twins)

DEFAULT_HALF_LIFE = 8.0  # forward steps
LFRUState = namedtuple("LFRUState", SLOT_FIELDS + DECAY_FIELDS)


class LFRUPolicy(EvictionPolicy):
    name = "lfru"

    def __init__(self, num_slots: int, num_layers: int, num_experts: int, half_life: float = DEFAULT_HALF_LIFE):
        super().__init__(num_slots, num_layers, num_experts)
        self.decayed = DecayedCounts(num_layers, num_experts, half_life)

    def on_access(self, slot, layer, expert, now, n_visual=0, n_text=0):
        self.last_use[slot] = now
        self.decayed.counts[0, layer, expert] += self.decayed.tick(layer, now)

    def _choose(self, evictable, layer):
        d = self.decayed
        score = d.counts[0, self.slot_layer, self.slot_expert] / d.weight[self.slot_layer]
        return lowest_score(score, self.last_use, evictable)

    def jit_state(self):
        return LFRUState(**self._slot_fields(), **self.decayed.jit_fields())


# ------------------------------------------------------------------------------------ numba twins
@njit(cache=True)
def lfru_choose_jit(st, evictable, layer):
    """_choose: the evictable slot with the lowest score (the empty-slot rule is applied before)."""
    best = -1
    best_score = 0.0
    best_last_use = 0
    for s in range(evictable.shape[0]):
        if not evictable[s]:
            continue
        ls = st.slot_layer[s]
        es = st.slot_expert[s]
        score = st.counts[0, ls, es] / st.weight[ls]
        if best < 0 or is_better_jit(score, st.last_use[s], best_score, best_last_use):
            best = s
            best_score = score
            best_last_use = st.last_use[s]
    return best


@njit(cache=True, inline="always")
def lfru_access_jit(st, slot, layer, expert, now, n_visual, n_text):
    st.last_use[slot] = now
    st.counts[0, layer, expert] += decay_tick_jit(st, layer, now)


register_twins(LFRUState, choose=lfru_choose_jit, on_access=lfru_access_jit)
