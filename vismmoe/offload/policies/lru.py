"""Least recently used: evict the slot whose expert was used longest ago."""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

from .base import INT64_MAX, SLOT_FIELDS, EvictionPolicy, register_twins

LRUState = namedtuple("LRUState", SLOT_FIELDS)


class LRUPolicy(EvictionPolicy):
    name = "lru"

    def _choose(self, evictable, layer):
        return int(np.argmin(np.where(evictable, self.last_use, INT64_MAX)))

    def jit_state(self):
        return LRUState(**self._slot_fields())


# ------------------------------------------------------------------------------------ numba twins
@njit(cache=True)
def lru_choose_jit(st, evictable, layer):
    best = -1
    best_last_use = INT64_MAX
    for s in range(evictable.shape[0]):
        if evictable[s] and (best < 0 or st.last_use[s] < best_last_use):
            best = s
            best_last_use = st.last_use[s]
    return best


@njit(cache=True, inline="always")
def lru_access_jit(st, slot, layer, expert, now, n_visual, n_text):
    st.last_use[slot] = now


register_twins(LRUState, choose=lru_choose_jit, on_access=lru_access_jit)
