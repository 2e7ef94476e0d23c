"""The interface every cache eviction policy implements, and what the policies share.

The GPU expert cache (offload/cache.py) owns the slots and calls these hooks; a policy only keeps
bookkeeping in numpy arrays and picks a victim. Call order per layer call (one `acquire`):
  1. `victim(evictable, layer)` for each missing expert, then `on_insert(slot, layer, expert, now)`;
  2. `on_access(...)` for every expert of the call (hits and fresh inserts), in the call's order.
`now` is the cache clock: +1 per layer call (per wave), so it is monotonic and layer-ordered.
Prefetches call `victim` and `on_insert` only. `reset_request()` runs at the start of every request.

Every policy file holds the Python class (what the live cache runs) and, next to it, numba twins of
its hooks over a state namedtuple (what the trace simulator runs). The twins must make exactly the
same decisions; tests/test_trace_sim.py replays random traces through both and compares every count.
Tie-break rule everywhere: empty slots first (lowest index), then the policy's score, then least
recently used, then lowest slot index. Scores use only + - * / in a fixed order (no exp/log/pow), so
numpy and numba round identically.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

INT64_MAX = np.iinfo(np.int64).max
# Decayed counters grow by `growth` per layer call; fold the scale back in before it nears overflow.
RENORMALIZE_ABOVE = 1e100

# Each policy's twins get its state as a namedtuple of its own class, starting with SLOT_FIELDS.
SLOT_FIELDS = (
    "last_use",     # int64 [S]  clock of the slot's latest insert or access (-1: empty)
    "slot_layer",   # int64 [S]  layer of the expert held (-1: empty)
    "slot_expert",  # int64 [S]
)
DECAY_FIELDS = ("counts", "weight", "layer_now", "growth")  # a DecayedCounts, see below


class EvictionPolicy:
    name = "base"

    def __init__(self, num_slots: int, num_layers: int, num_experts: int):
        self.num_slots = num_slots
        self.num_layers = num_layers
        self.num_experts = num_experts
        # Empty slots hold layer -1 and last use -1 so they are filled before anything is evicted.
        self.slot_layer = np.full(num_slots, -1, dtype=np.int64)
        self.slot_expert = np.full(num_slots, -1, dtype=np.int64)
        self.last_use = np.full(num_slots, -1, dtype=np.int64)

    def on_insert(self, slot: int, layer: int, expert: int, now: int) -> None:
        """A new expert was copied into `slot` (its previous owner, if any, is gone)."""
        self.slot_layer[slot] = layer
        self.slot_expert[slot] = expert
        self.last_use[slot] = now

    def on_access(self, slot: int, layer: int, expert: int, now: int, n_visual: int = 0, n_text: int = 0) -> None:
        """The expert in `slot` was used by a layer call at clock `now`, by that many visual / text tokens."""
        self.last_use[slot] = now

    def victim(self, evictable: np.ndarray, layer: int | None = None) -> int:
        """Index of the slot to overwrite, among those where `evictable` is True (at least one is).

        `layer` is the layer the incoming expert belongs to (cost-aware uses it; pass it always).
        """
        empty = evictable & (self.slot_layer < 0)
        if empty.any():
            return int(np.argmax(empty))
        return self._choose(evictable, layer)

    def _choose(self, evictable: np.ndarray, layer: int | None) -> int:
        raise NotImplementedError

    def reset_request(self) -> None:
        """Called at the start of every request."""

    def jit_state(self):
        """A copy of this policy's state, as the namedtuple its numba twins take."""
        raise NotImplementedError

    def _slot_fields(self) -> dict:
        return dict(last_use=self.last_use.copy(), slot_layer=self.slot_layer.copy(),
                    slot_expert=self.slot_expert.copy())


def lowest_score(score: np.ndarray, last_use: np.ndarray, evictable: np.ndarray) -> int:
    """Evictable slot with the lowest score; ties go to the least recently used, then the lowest index."""
    masked = np.where(evictable, score, np.inf)
    tied = masked == masked.min()
    return int(np.argmin(np.where(tied, last_use, INT64_MAX)))


class DecayedCounts:
    """Exponentially decayed per-(layer, expert) counters, decayed per call of their own layer.

    Decaying every counter on every call would cost O(E) per call; instead each layer's increment
    weight grows by `growth` per call of that layer, and a counter's decayed value is
    `counts[c, layer, e] / weight[layer]` (the LRFU "inflation" trick). Decaying per call of the
    counter's own layer, not per global tick, keeps layers comparable in one global pool: a layer
    run 3 calls ago is not "older" than the one just run.
    """

    def __init__(self, num_layers: int, num_experts: int, half_life: float, channels: int = 1):
        if half_life <= 0:
            raise ValueError(f"half_life must be positive, got {half_life}")
        self.growth = float(2.0 ** (1.0 / half_life))
        self.counts = np.zeros((channels, num_layers, num_experts))
        self.weight = np.ones(num_layers)
        self.layer_now = np.full(num_layers, -1, dtype=np.int64)

    def tick(self, layer: int, now: int) -> float:
        """Advance `layer` to the call at clock `now` (once per call) and return its increment weight."""
        if self.layer_now[layer] != now:
            self.layer_now[layer] = now
            self.weight[layer] *= self.growth
            if self.weight[layer] > RENORMALIZE_ABOVE:
                self.counts[:, layer] /= self.weight[layer]
                self.weight[layer] = 1.0
        return self.weight[layer]

    def jit_fields(self) -> dict:
        return dict(counts=self.counts.copy(), weight=self.weight.copy(), layer_now=self.layer_now.copy(),
                    growth=self.growth)


# -------------------------------------------------------------------------------- numba twins (shared)
# The simulator calls victim_jit / on_insert_jit / on_access_jit / reset_request_jit; numba resolves
# them from the class of the state namedtuple at compile time, so each policy gets its own kernel with
# no per-call branching. on_access / on_insert twins are inlined (they run once per expert access);
# the scanning ones (choose, first_empty) are plain calls. Write twins with a single exit and no
# tuple assignments: the shape numba's inliner handles without SSA warnings.
_TWINS: dict[type, tuple] = {}  # state namedtuple class -> (choose, on_insert, on_access, reset_request)


def register_twins(state_class: type, choose, on_access, on_insert=None, reset_request=None) -> None:
    """Declare a policy's numba twins: `choose` mirrors `_choose` (victim among non-empty slots);
    on_insert defaults to the base bookkeeping, reset_request to nothing."""
    _TWINS[state_class] = (choose, on_insert or touch_jit, on_access, reset_request or _no_reset_jit)


def victim_jit(st, evictable, layer):
    """In numba code: EvictionPolicy.victim for st's policy (empty slots first, then its choose twin)."""


def on_insert_jit(st, slot, layer, expert, now):
    """In numba code: the on_insert twin of st's policy."""


def on_access_jit(st, slot, layer, expert, now, n_visual, n_text):
    """In numba code: the on_access twin of st's policy."""


def reset_request_jit(st):
    """In numba code: the reset_request twin of st's policy."""


def _twin(st_type, which: int):
    try:
        return _TWINS[st_type.instance_class][which]
    except (AttributeError, KeyError):
        raise TypeError(f"no policy twins registered for {st_type}") from None


@overload(victim_jit)  # not inlined: runs once per miss, and inlining its branch trips numba's SSA check
def _victim_overload(st, evictable, layer):
    choose = _twin(st, 0)

    def victim(st, evictable, layer):
        slot = first_empty_jit(st, evictable)
        if slot < 0:
            slot = choose(st, evictable, layer)
        return slot
    return victim


@overload(on_insert_jit, inline="always")
def _insert_overload(st, slot, layer, expert, now):
    fn = _twin(st, 1)
    return lambda st, slot, layer, expert, now: fn(st, slot, layer, expert, now)


@overload(on_access_jit, inline="always")
def _access_overload(st, slot, layer, expert, now, n_visual, n_text):
    fn = _twin(st, 2)
    return lambda st, slot, layer, expert, now, n_visual, n_text: fn(st, slot, layer, expert, now, n_visual, n_text)


@overload(reset_request_jit, inline="always")
def _reset_overload(st):
    fn = _twin(st, 3)
    return lambda st: fn(st)


@njit(cache=True, inline="always")
def _no_reset_jit(st):
    pass


@njit(cache=True, inline="always")
def touch_jit(st, slot, layer, expert, now):
    """The base class's on_insert bookkeeping."""
    st.slot_layer[slot] = layer
    st.slot_expert[slot] = expert
    st.last_use[slot] = now


@njit(cache=True)
def first_empty_jit(st, evictable):
    found = -1
    for s in range(evictable.shape[0]):
        if found < 0 and evictable[s] and st.slot_layer[s] < 0:
            found = s
    return found


@njit(cache=True, inline="always")
def is_better_jit(score, last_use, best_score, best_last_use):
    """Same order as `lowest_score`: lower score, then older last use; callers scan slots upwards."""
    return score < best_score or (score == best_score and last_use < best_last_use)


@njit(cache=True, inline="always")
def decay_tick_jit(st, layer, now):
    """DecayedCounts.tick over a state with DECAY_FIELDS."""
    if st.layer_now[layer] != now:
        st.layer_now[layer] = now
        st.weight[layer] *= st.growth
        if st.weight[layer] > RENORMALIZE_ABOVE:
            w = st.weight[layer]
            for c in range(st.counts.shape[0]):
                for e in range(st.counts.shape[2]):
                    st.counts[c, layer, e] /= w
            st.weight[layer] = 1.0
    return st.weight[layer]
