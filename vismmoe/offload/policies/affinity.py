"""Affinity-aware: separate visual and text use statistics, weighted by the request's modality mix.

Visual and text tokens of a VL-MoE route to different experts (visual-expert affinity), so one
frequency count mixes two populations. This policy keeps two decayed counts per (layer, expert),
as LFRU does (+1 per layer call, halving every `half_life` calls of that layer):
  f_vis[l, e]  for calls where at least one visual token used the expert,
  f_txt[l, e]  for calls where at least one text token used it (no modality info counts as text),
and scores a resident expert by the current request's mix:
  score(slot) = (a_vis * f_vis[l, e] + a_txt * f_txt[l, e]) / weight[l]
  a_vis = (V + 1) / (V + T + 2),  a_txt = (T + 1) / (V + T + 2)
where V, T are the visual / text token-expert pairs this request has routed so far (reset per
request; Laplace prior so a fresh request weighs both evenly). A prefill rich in image tokens keeps
visual experts; as decode emits text tokens the weight shifts to text experts. Lowest score is
evicted, ties by recency.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from .base import (DECAY_FIELDS, SLOT_FIELDS, DecayedCounts, EvictionPolicy, decay_tick_jit,
                   is_better_jit, lowest_score, register_twins)

DEFAULT_HALF_LIFE = 8.0  # forward steps
AffinityState = namedtuple("AffinityState", SLOT_FIELDS + DECAY_FIELDS + ("mix",))
VISUAL, TEXT = 0, 1


class AffinityPolicy(EvictionPolicy):
    name = "affinity"

    def __init__(self, num_slots: int, num_layers: int, num_experts: int, half_life: float = DEFAULT_HALF_LIFE):
        super().__init__(num_slots, num_layers, num_experts)
        self.decayed = DecayedCounts(num_layers, num_experts, half_life, channels=2)
        self.mix = np.zeros(2)  # (visual, text) token-expert pairs of the current request

    def on_access(self, slot, layer, expert, now, n_visual=0, n_text=0):
        self.last_use[slot] = now
        weight = self.decayed.tick(layer, now)
        if n_visual > 0:
            self.decayed.counts[VISUAL, layer, expert] += weight
        if n_text > 0 or n_visual <= 0:
            self.decayed.counts[TEXT, layer, expert] += weight
        self.mix[VISUAL] += n_visual
        self.mix[TEXT] += n_text

    def modality_weights(self) -> tuple[float, float]:
        v, t = float(self.mix[VISUAL]), float(self.mix[TEXT])
        return (v + 1.0) / (v + t + 2.0), (t + 1.0) / (v + t + 2.0)

    def _choose(self, evictable, layer):
        a_vis, a_txt = self.modality_weights()
        counts, sl, se = self.decayed.counts, self.slot_layer, self.slot_expert
        score = (a_vis * counts[VISUAL, sl, se] + a_txt * counts[TEXT, sl, se]) / self.decayed.weight[sl]
        return lowest_score(score, self.last_use, evictable)

    def reset_request(self):
        self.mix[:] = 0.0

    def jit_state(self):
        return AffinityState(mix=self.mix.copy(), **self._slot_fields(), **self.decayed.jit_fields())


# ------------------------------------------------------------------------------------ numba twins
@njit(cache=True)
def affinity_choose_jit(st, evictable, layer):
    """_choose: the evictable slot with the lowest score (the empty-slot rule is applied before)."""
    best = -1
    v = st.mix[VISUAL]
    t = st.mix[TEXT]
    a_vis = (v + 1.0) / (v + t + 2.0)
    a_txt = (t + 1.0) / (v + t + 2.0)
    best_score = 0.0
    best_last_use = 0
    for s in range(evictable.shape[0]):
        if not evictable[s]:
            continue
        ls = st.slot_layer[s]
        es = st.slot_expert[s]
        score = (a_vis * st.counts[VISUAL, ls, es] + a_txt * st.counts[TEXT, ls, es]) / st.weight[ls]
        if best < 0 or is_better_jit(score, st.last_use[s], best_score, best_last_use):
            best = s
            best_score = score
            best_last_use = st.last_use[s]
    return best


@njit(cache=True, inline="always")
def affinity_access_jit(st, slot, layer, expert, now, n_visual, n_text):
    st.last_use[slot] = now
    weight = decay_tick_jit(st, layer, now)
    if n_visual > 0:
        st.counts[VISUAL, layer, expert] += weight
    if n_text > 0 or n_visual <= 0:
        st.counts[TEXT, layer, expert] += weight
    st.mix[VISUAL] += n_visual
    st.mix[TEXT] += n_text


@njit(cache=True, inline="always")
def affinity_reset_jit(st):
    st.mix[:] = 0.0


register_twins(AffinityState, choose=affinity_choose_jit, on_access=affinity_access_jit,
               reset_request=affinity_reset_jit)
