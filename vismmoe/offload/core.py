"""The expert cache's state and its transitions: the one specification, and its host implementation.

Three implementations make exactly the decisions written here, on the same arrays:
  * this module (numba): what the live host path (`ExpertCache`) and the trace simulator both drive;
  * `device_core.py` (torch): the reference of the device path, vectorised, for one layer call;
  * `kernels/cache_step.py` (Triton): the same layer call as one fused GPU kernel.
tests/test_cache_core.py replays traces through all of them and compares every slot table and every
hit / miss, layer by layer, step by step.

State (S slots, L layers, E experts per layer; `CacheState`):
  table[l, e]    slot holding expert e of layer l, or -1;   owner[s] = l * E + e it holds, or -1
  last_use[s]    clock of its last insert or use (-1: empty) pin[s] = layer a prefetch holds it for, or -1
  prefetched[s]  prefetched and not used yet                  clock = +1 per demand call (per wave)
  counts[c, l, e], weight[l], layer_now[l], mix[2]: the policy's use statistics (below)

Score (`score`, the one formula every policy is a setting of; policies/ declare the settings):
  score(s) = cost[l, e] * (a_vis * counts[0, l, e] + a_txt * counts[1, l, e]) / weight[l] / distance
  where (l, e) = owner[s]; an empty slot scores 0. a_vis = (V+1)/(V+T+2), a_txt = (T+1)/(V+T+2)
  from mix = (V, T) for modality-aware policies, (1, 0) otherwise; distance = (l - layer) mod L with
  0 -> L when the policy uses it (layer = the incoming expert's), else 1. Only + - * / in this
  order, so numpy, numba, torch and Triton (fp fusion off) round identically.

Victim order: the allowed slot with the smallest key (pinned, score, last_use, slot index), where
  pinned = pin[s] > running. Empty slots (score 0, last_use -1) therefore go first, lowest index
  first; then the policy's score; then least recently used; then the lowest slot index. The key is
  unique, so "each miss in turn takes the smallest key left" equals "the n smallest keys, in order".

Transitions:
  demand(layer, experts)   experts distinct and ascending (a wave: at most S). clock += 1. Resident
      ones are hits and protected. Each miss, in ascending expert id, takes the smallest-key slot that
      is not protected (running = layer: a pin for this layer or an earlier one no longer holds; a
      pinned slot is taken only when no unpinned one is left), evicts it and installs the expert
      (last_use = clock); it is then protected. Then every expert of the call is used: a prefetched
      slot counts "used"; last_use = clock; the policy counts the use (below).
      In place (`in_place`: the layer's miss path is zero-copy or the CPU): misses take no slot and
      evict nothing; their slot is -(layer * E + expert) - 1 (the host row the compute reads them
      from); they count as misses and in `in_place[layer]`, and the policy still counts their use
      (counts are per expert, not per slot). Hits are used as above.
  prefetch(layer, experts, running, limit)   experts distinct and ascending, predicted for `layer`,
      issued after layer `running` ran. Resident ones are protected and pinned (pin = max(pin, layer)).
      Each missing one, in ascending id, while fewer than `limit` were issued, takes the smallest-key
      slot neither protected nor pinned (none left: stop), evicts it and installs the expert with
      last_use = clock (no use counted), prefetched, pinned for `layer`. limit <= 0 does nothing at
      all (prefetch switched off for that layer and distance: no pins either).
  evict(s)   the owner's table entry becomes -1; a prefetched slot counts "wasted" (to the owner's
      layer); pin[s] = -1.
  use: once per (layer, clock), weight[layer] *= growth (and when it passes 1e100,
      counts[:, layer] /= weight[layer] and weight[layer] = 1); mix += (visual, text) token counts;
      for policies with counts, the expert's counts gain weight[layer]: channel 0 only, or by
      modality (visual tokens -> 0; text tokens, or no visual ones -> 1).
  begin_step: every pin drops. begin_request: mix = 0, no slot counts as prefetched.

Slot quotas (`quota`, SlotPlan; empty = one global pool): a layer holding its quota of slots (what
its experts occupy, pinned or not) may only replace its own; below it, it takes from every slot, and
each slot it takes from another layer (or empty) counts towards its quota. A call loads at most
min(S, quota[layer]) experts (a wave). device_core.py and the kernel apply the same caps.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit

RENORMALIZE_ABOVE = 1e100  # decayed counters: fold the weight back in before it nears overflow

# params[]: what a policy sets (policies/base.py builds it).
GROWTH, COUNTING, MODAL, USE_DISTANCE = range(4)

CacheState = namedtuple("CacheState", (
    "table",       # int32 [L, E]
    "owner",       # int64 [S]
    "last_use",    # int64 [S]
    "pin",         # int64 [S]
    "prefetched",  # bool [S]
    "counts",      # float64 [2, L, E]
    "weight",      # float64 [L]
    "layer_now",   # int64 [L]
    "mix",         # float64 [2]  (visual, text) token-expert pairs of this request
    "cost",        # float64 [L, E]
    "params",      # float64 [4]  growth, counting, modal, use_distance
    "clock",       # int64 [1]
    "hits",        # int64 [L]
    "misses",      # int64 [L]
    "pf",          # int64 [3, L]  prefetch issued, used, wasted
    "in_place",    # int64 [L]  misses served in place (no slot: zero-copy or CPU miss paths)
    "protected",   # bool [S]  scratch, all False between calls
))


def new_state(num_slots: int, num_layers: int, num_experts: int, params: np.ndarray,
              cost: np.ndarray | None = None) -> CacheState:
    S, L, E = num_slots, num_layers, num_experts
    return CacheState(
        table=np.full((L, E), -1, np.int32), owner=np.full(S, -1, np.int64), last_use=np.full(S, -1, np.int64),
        pin=np.full(S, -1, np.int64), prefetched=np.zeros(S, np.bool_), counts=np.zeros((2, L, E)),
        weight=np.ones(L), layer_now=np.full(L, -1, np.int64), mix=np.zeros(2),
        cost=np.ones((L, E)) if cost is None else np.asarray(cost, np.float64).copy(),
        params=np.asarray(params, np.float64).copy(), clock=np.zeros(1, np.int64),
        hits=np.zeros(L, np.int64), misses=np.zeros(L, np.int64), pf=np.zeros((3, L), np.int64),
        in_place=np.zeros(L, np.int64), protected=np.zeros(S, np.bool_))


# ------------------------------------------------------------------ the formulas, one definition each
# Plain arithmetic on scalars or arrays: numba compiles these, torch and Triton call them on tensors.
def score(cost, count_vis, count_txt, a_vis, a_txt, weight, distance):
    return cost * (a_vis * count_vis + a_txt * count_txt) / weight / distance


def mix_weights(visual, text, modal):
    """(a_vis, a_txt): the request's mix when `modal` is 1.0, (1, 0) when it is 0.0 (exactly)."""
    a_vis = modal * ((visual + 1.0) / (visual + text + 2.0)) + (1.0 - modal)
    a_txt = modal * ((text + 1.0) / (visual + text + 2.0))
    return a_vis, a_txt


def layer_distance(slot_layer, layer, num_layers, use_distance):
    """Layer calls until `slot_layer` runs again, seen from `layer` (0 -> L); 1 when not used."""
    d = (slot_layer - layer + num_layers) % num_layers
    d = d + (d == 0) * num_layers
    return use_distance * d + (1.0 - use_distance)


score_jit = njit(cache=True, inline="always")(score)
mix_weights_jit = njit(cache=True, inline="always")(mix_weights)
layer_distance_jit = njit(cache=True, inline="always")(layer_distance)


# ------------------------------------------------------------------------------- host implementation
@njit(cache=True)
def slot_score(st, s, layer, a_vis, a_txt):
    o = st.owner[s]
    if o < 0:
        return 0.0
    num_layers, num_experts = st.cost.shape
    sl = o // num_experts
    se = o % num_experts
    dist = 1.0  # what layer_distance gives without the distance term (skipping its float mod)
    if st.params[USE_DISTANCE] != 0.0:
        dist = layer_distance_jit(float(sl), float(layer), float(num_layers), st.params[USE_DISTANCE])
    return score_jit(st.cost[sl, se], st.counts[0, sl, se], st.counts[1, sl, se], a_vis, a_txt, st.weight[sl], dist)


@njit(cache=True)
def victim(st, layer, running, quota, allow_pinned):
    """The smallest-key slot not protected (nor pinned unless allow_pinned), within the layer's quota
    (an empty `quota` array: no plan). -1 if there is none."""
    num_slots = st.owner.shape[0]
    num_experts = st.cost.shape[1]
    own_only = False
    if quota.shape[0] > 0:
        held = 0
        for s in range(num_slots):
            if st.owner[s] >= 0 and st.owner[s] // num_experts == layer:
                held += 1
        own_only = held >= quota[layer]
    a_vis, a_txt = mix_weights_jit(st.mix[0], st.mix[1], st.params[MODAL])
    counting = st.params[COUNTING] != 0.0
    best = -1
    best_pinned = True
    best_score = 0.0
    best_last = 0
    for s in range(num_slots):
        if st.protected[s]:
            continue
        if own_only and (st.owner[s] < 0 or st.owner[s] // num_experts != layer):
            continue
        pinned = st.pin[s] > running
        if pinned and not allow_pinned:
            continue
        sc = slot_score(st, s, layer, a_vis, a_txt) if counting else 0.0  # no counts: every score is 0
        last = st.last_use[s]
        if (best < 0 or (best_pinned and not pinned)
                or (pinned == best_pinned and (sc < best_score or (sc == best_score and last < best_last)))):
            best, best_pinned, best_score, best_last = s, pinned, sc, last
    return best


@njit(cache=True)
def evict(st, s):
    o = st.owner[s]
    if o >= 0:
        num_experts = st.cost.shape[1]
        st.table[o // num_experts, o % num_experts] = -1
        if st.prefetched[s]:
            st.pf[2, o // num_experts] += 1
    st.prefetched[s] = False
    st.pin[s] = -1


@njit(cache=True)
def install(st, s, layer, expert, now):
    evict(st, s)
    st.table[layer, expert] = s
    st.owner[s] = layer * st.cost.shape[1] + expert
    st.last_use[s] = now


@njit(cache=True)
def use(st, s, layer, expert, now, n_visual, n_text):
    st.last_use[s] = now
    count_use(st, layer, expert, now, n_visual, n_text)


@njit(cache=True)
def count_use(st, layer, expert, now, n_visual, n_text):
    """The policy's side of a use: decay tick, modality mix, counts (per expert, not per slot)."""
    if st.layer_now[layer] != now:  # one decay tick per call of the layer
        st.layer_now[layer] = now
        st.weight[layer] *= st.params[GROWTH]
        if st.weight[layer] > RENORMALIZE_ABOVE:
            w = st.weight[layer]
            for c in range(2):
                for e in range(st.counts.shape[2]):
                    st.counts[c, layer, e] /= w
            st.weight[layer] = 1.0
    st.mix[0] += n_visual
    st.mix[1] += n_text
    if st.params[COUNTING] == 0.0:
        return
    w = st.weight[layer]
    if st.params[MODAL] == 0.0:
        st.counts[0, layer, expert] += w
    else:
        if n_visual > 0:
            st.counts[0, layer, expert] += w
        if n_text > 0 or n_visual <= 0:
            st.counts[1, layer, expert] += w


@njit(cache=True)
def demand(st, layer, experts, n_visual, n_text, quota, slots, fill, in_place):
    """Make `experts` (ascending, distinct, at most S) resident. Writes their slots and, for misses,
    the slot to copy into (`fill`, -1 for hits). Returns the number of misses. `in_place`: misses take
    no slot (slots[i] = -(layer * E + expert) - 1, fill -1)."""
    st.clock[0] += 1
    now = st.clock[0]
    n = experts.shape[0]
    num_experts = st.cost.shape[1]
    for i in range(n):
        s = st.table[layer, experts[i]]
        slots[i] = s
        fill[i] = -1
        if s >= 0:
            st.protected[s] = True
    missed = 0
    for i in range(n):
        if slots[i] >= 0:
            continue
        missed += 1
        if in_place:
            slots[i] = -(layer * num_experts + experts[i]) - 1
            continue
        s = victim(st, layer, layer, quota, True)
        if s < 0:
            raise RuntimeError("no slot can take a demand load")
        install(st, s, layer, experts[i], now)
        st.protected[s] = True
        slots[i] = s
        fill[i] = s
    for i in range(n):
        s = slots[i]
        if s < 0:  # served in place: the policy counts the use, no slot is touched
            count_use(st, layer, experts[i], now, n_visual[i], n_text[i])
            continue
        st.protected[s] = False
        if st.prefetched[s]:
            st.prefetched[s] = False
            st.pf[1, layer] += 1
        use(st, s, layer, experts[i], now, n_visual[i], n_text[i])
    st.hits[layer] += n - missed
    st.misses[layer] += missed
    if in_place:
        st.in_place[layer] += missed
    return missed


@njit(cache=True)
def prefetch(st, layer, experts, running, limit, quota, fill):
    """Load up to `limit` of the predicted `experts` (ascending, distinct) of `layer`. Writes `fill`
    (the slot to copy into, -1 if none). Returns the number issued."""
    n = experts.shape[0]
    for i in range(n):
        fill[i] = -1
    if limit <= 0:
        return 0  # prefetch off for this layer: no copies and no pins
    for i in range(n):
        s = st.table[layer, experts[i]]
        if s >= 0:
            st.protected[s] = True
            st.pin[s] = max(st.pin[s], layer)
    issued = 0
    for i in range(n):
        if st.table[layer, experts[i]] >= 0 or issued >= limit:
            continue
        s = victim(st, layer, running, quota, False)
        if s < 0:
            break  # everything left is in use or pinned for a nearer layer: demand keeps priority
        install(st, s, layer, experts[i], st.clock[0])
        st.prefetched[s] = True
        st.pin[s] = layer
        st.protected[s] = True
        fill[i] = s
        issued += 1
    for i in range(n):
        s = st.table[layer, experts[i]]
        if s >= 0:
            st.protected[s] = False
    st.pf[0, layer] += issued
    return issued


@njit(cache=True)
def begin_step(st):
    st.pin[:] = -1


@njit(cache=True)
def begin_request(st):
    st.mix[:] = 0.0
    st.prefetched[:] = False


NO_PLAN = np.zeros(0, np.int64)
