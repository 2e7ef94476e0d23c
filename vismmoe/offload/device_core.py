"""The cache's state machine (offload/core.py) on device tensors: the torch reference of the device path.

One layer call at a time, with fixed-shape tensor ops only (no host sync, capturable in a CUDA
graph), making exactly the decisions core.py specifies: each miss, in ascending expert id, takes the
next slot in the order of the key (pinned, score, last_use, slot index). Where the host core scans
the slots once per miss, this ranks them once per call (three stable sorts) and gives the n-th miss
the n-th slot; the key is unique, so the two agree (tests/test_cache_core.py replays traces through
both). The fused kernel (kernels/cache_step.py, `ops.cache_step`) is the fast twin of `demand` and
`prefetch` here.

Every per-slot and per-(layer, expert) tensor has one spare trailing entry (a "dummy") that writes
for hits and untaken rows are sent to, so no shape depends on how many experts missed.

Slot quotas (`quota`, int64 [L] on the device, or None: one global pool) follow core.victim: while
the layer holds fewer slots than its quota, misses take the next slots of the global order; each
one that was not the layer's own adds one to what it holds; once it holds its quota, the remaining
misses take the layer's own slots in the same order. Both lists are prefixes of one ranking, so the
n-th miss's slot is found with cumulative sums, no loop and no data-dependent shape.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from . import core


COUNTERS = ("hits", "misses", "pf", "in_place")  # start at zero on the device, added to the host's at the end


@dataclass
class DeviceState:
    table: torch.Tensor       # int32 [L*E + 1]  (the cache's slot_table_storage)
    owner: torch.Tensor       # int64 [S + 1]
    last_use: torch.Tensor    # int64 [S + 1]
    pin: torch.Tensor         # int64 [S + 1]
    prefetched: torch.Tensor  # bool [S + 1]
    counts: torch.Tensor      # float64 [2, L*E + 1]
    weight: torch.Tensor      # float64 [L]
    layer_now: torch.Tensor   # int64 [L]
    mix: torch.Tensor         # float64 [2]
    cost: torch.Tensor        # float64 [L*E + 1]
    params: torch.Tensor      # float64 [4]
    clock: torch.Tensor       # int64 [1]
    hits: torch.Tensor        # int64 [L]
    misses: torch.Tensor      # int64 [L]
    pf: torch.Tensor          # int64 [3, L + 1]  issued, used, wasted (the last column is the dummy)
    in_place: torch.Tensor    # int64 [L]  misses served in place (zero-copy / CPU miss paths)

    @classmethod
    def empty(cls, num_slots: int, num_layers: int, num_experts: int, table: torch.Tensor) -> "DeviceState":
        S, L, LE = num_slots, num_layers, num_layers * num_experts
        i64 = dict(dtype=torch.int64, device=table.device)
        f64 = dict(dtype=torch.float64, device=table.device)
        return cls(table=table, owner=torch.full((S + 1,), -1, **i64), last_use=torch.full((S + 1,), -1, **i64),
                   pin=torch.full((S + 1,), -1, **i64), prefetched=torch.zeros(S + 1, dtype=torch.bool, device=table.device),
                   counts=torch.zeros((2, LE + 1), **f64), weight=torch.ones(L, **f64),
                   layer_now=torch.full((L,), -1, **i64), mix=torch.zeros(2, **f64), cost=torch.ones(LE + 1, **f64),
                   params=torch.zeros(4, **f64), clock=torch.zeros(1, **i64), hits=torch.zeros(L, **i64),
                   misses=torch.zeros(L, **i64), pf=torch.zeros((3, L + 1), **i64), in_place=torch.zeros(L, **i64))

    @property
    def shape(self) -> tuple[int, int, int]:
        """(S, L, E)"""
        S, L = self.owner.numel() - 1, self.weight.numel()
        return S, L, (self.table.numel() - 1) // L

    def load(self, host: core.CacheState) -> None:
        """Take over the host state (counters start at zero)."""
        for f in fields(self):
            if f.name in COUNTERS:
                getattr(self, f.name).zero_()
                continue
            value = torch.from_numpy(np.ascontiguousarray(getattr(host, f.name)))
            dst = getattr(self, f.name)
            if dst.ndim == 2:  # counts: [2, L, E] -> [2, L*E] (+ dummy)
                dst[:, :-1].copy_(value.reshape(2, -1))
            elif dst.numel() == value.numel() + 1:
                dst[:-1].copy_(value.reshape(-1))
            else:
                dst.copy_(value.reshape(-1))

    def store(self, host: core.CacheState) -> None:
        """Hand the state back to the host and add the device counters to the host's."""
        for f in fields(self):
            src = getattr(self, f.name).cpu()
            dst = getattr(host, f.name)
            if f.name in ("hits", "misses", "in_place"):
                dst += src.numpy()
            elif f.name == "pf":
                dst += src[:, :-1].numpy()
            elif f.name == "counts":
                dst[:] = src[:, :-1].reshape(dst.shape).numpy()
            elif src.numel() == dst.size + 1:
                dst[:] = src[:-1].reshape(dst.shape).numpy()
            else:
                dst[:] = src.reshape(dst.shape).numpy()


def ranked_slots(st: DeviceState, layer: int, running: int, protected: torch.Tensor, allow_pinned: bool,
                 n: int, quota: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots the first n misses take, in order, and whether each may be taken (not protected, and
    not pinned unless allow_pinned; within the layer's quota). Rows past the slot count are (-1, False)."""
    S, L, E = st.shape
    owner = st.owner[:S]
    occupied = owner >= 0
    entry = torch.where(occupied, owner, L * E)
    slot_layer = torch.where(occupied, owner // E, 0)
    a_vis, a_txt = core.mix_weights(st.mix[0], st.mix[1], st.params[core.MODAL])
    dist = core.layer_distance(slot_layer.to(torch.float64), float(layer), float(L), st.params[core.USE_DISTANCE])
    score = core.score(st.cost[entry], st.counts[0, entry], st.counts[1, entry], a_vis, a_txt,
                       st.weight[slot_layer], dist)
    score = torch.where(occupied, score, 0.0)
    pinned = st.pin[:S] > running
    excluded = protected[:S] if allow_pinned else protected[:S] | pinned
    klass = pinned.to(torch.int64) + 2 * excluded.to(torch.int64)
    # Lexicographic (class, score, last_use, slot): sort by the last keys first, then stable sorts.
    order = torch.argsort((st.last_use[:S] + 1) * S + torch.arange(S, device=owner.device))
    order = order[torch.sort(score[order], stable=True).indices]
    order = order[torch.sort(klass[order], stable=True).indices]
    if quota is not None:
        return _within_quota(order, klass < 2, occupied & (slot_layer == layer), quota[layer], n)
    victims = order[:n]
    usable = klass[victims] < 2
    if n > S:
        victims = torch.cat([victims, victims.new_full((n - S,), -1)])
        usable = torch.cat([usable, usable.new_zeros(n - S)])
    return victims, usable


def _within_quota(order: torch.Tensor, takeable: torch.Tensor, own: torch.Tensor, quota: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ranked_slots under a quota: `order` all S slots in victim order, `takeable` / `own` per slot."""
    S = order.numel()
    pad = max(n - S, 0)
    g = torch.cat([order, order.new_full((pad,), S)])[:n]  # global order, S = none
    ok_g = torch.cat([takeable, takeable.new_zeros(1)])[g]
    own_g = torch.cat([own, own.new_zeros(1)])[g]
    foreign = (ok_g & ~own_g).to(torch.int64)
    held = own.sum()
    # Global takes while what the layer holds (its own slots + the foreign slots taken so far) < quota.
    first = ok_g & (held + torch.cumsum(foreign, 0) - foreign < quota)  # a prefix
    k = first.sum()
    own_taken = (first & own_g).sum()
    # Then its own slots, in the same order, past those the global takes already used.
    own_order = order[torch.sort((~own[order]).to(torch.int64), stable=True).indices]
    own_ok = own[own_order] & takeable[own_order]
    r = torch.arange(n, device=order.device)
    j = own_taken + r - k
    j_c = j.clamp(0, S - 1)
    later_ok = (j < S) & own_ok[j_c]
    victims = torch.where(first, g, torch.where(later_ok, own_order[j_c], -1))
    usable = first | (~first & later_ok)
    return torch.where(usable, victims, -1), usable


def _install(st: DeviceState, layer: int, flat: torch.Tensor, fill: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
    """Evict the slots `fill[take]` and install experts `flat[take]` in them (last_use = clock).
    Returns the slot index per row, S (the dummy) where not taken."""
    S, L, E = st.shape
    target = torch.where(take, fill, S)
    old = st.owner[target]
    evicts = take & (old >= 0)
    # A prefetched slot evicted before any use is wasted, counted to its owner's layer.
    st.pf[2].index_add_(0, torch.where(evicts, old // E, L), (st.prefetched[target] & evicts).to(torch.int64))
    st.table.index_fill_(0, torch.where(evicts, old, L * E), -1)
    st.table[torch.where(take, flat, L * E)] = target.to(torch.int32)
    st.owner[target] = flat
    st.last_use[target] = st.clock.expand_as(target)
    st.pin.index_fill_(0, target, -1)
    st.prefetched.index_fill_(0, target, False)
    _reset_dummies(st)
    return target


def _reset_dummies(st: DeviceState) -> None:
    # (In-place fills, not `x[i] = scalar`: that copies a host scalar, which graph capture forbids.)
    st.table[-1:].fill_(-1)
    st.owner[-1:].fill_(-1)
    st.last_use[-1:].fill_(-1)
    st.pin[-1:].fill_(-1)
    st.prefetched[-1:].fill_(False)


def demand(st: DeviceState, layer: int, experts: torch.Tensor, n_visual: torch.Tensor,
           n_text: torch.Tensor, quota: torch.Tensor | None = None,
           in_place: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """core.demand for `experts` (distinct, any order, at most S, at most the layer's quota): returns
    (slots, fill) in the order given, fill[i] the slot to copy expert i into, -1 for a hit. `in_place`
    (a device scalar, nonzero = on, or None = off): misses take no slot, slots[i] = -(flat row) - 1."""
    S, L, E = st.shape
    n = experts.numel()
    st.clock.add_(1)
    ex, order = torch.sort(experts)
    nv, nt = n_visual[order].to(torch.int64), n_text[order].to(torch.int64)
    flat = layer * E + ex
    slots = st.table[flat].to(torch.int64)
    miss = slots < 0
    place = miss if in_place is None else miss & (in_place == 0)
    protected = torch.zeros(S + 1, dtype=torch.bool, device=experts.device)
    protected.index_fill_(0, torch.where(miss, S, slots), True)
    victims, _ = ranked_slots(st, layer, layer, protected, True, n, quota)
    rank = (torch.cumsum(miss.to(torch.int64), 0) - 1).clamp(min=0)
    fill = torch.where(place, victims[rank], -1)
    _install(st, layer, flat, fill, place)
    slots = torch.where(place, fill, torch.where(miss, -flat - 1, slots))
    # Use: a prefetched slot counts used; last use; the policy's counts (in-place misses: counts only).
    held = torch.where(slots >= 0, slots, S)
    st.pf[1, layer] += st.prefetched[held].sum()
    st.prefetched.index_fill_(0, held, False)
    st.last_use[held] = st.clock.expand_as(held)
    _reset_dummies(st)
    _count_use(st, layer, flat, nv, nt)
    st.hits[layer] += (~miss).sum()
    st.misses[layer] += miss.sum()
    st.in_place[layer] += (miss & ~place).sum()
    out_slots, out_fill = torch.empty_like(slots), torch.empty_like(fill)
    out_slots[order], out_fill[order] = slots, fill
    return out_slots, out_fill


def _count_use(st: DeviceState, layer: int, flat: torch.Tensor, nv: torch.Tensor, nt: torch.Tensor) -> None:
    S, L, E = st.shape
    now = st.clock
    tick = st.layer_now[layer : layer + 1] != now
    st.layer_now[layer : layer + 1].copy_(now)
    weight = st.weight[layer : layer + 1]
    weight.mul_(torch.where(tick, st.params[core.GROWTH], 1.0))
    renorm = weight > core.RENORMALIZE_ABOVE
    row = st.counts[:, layer * E : (layer + 1) * E]
    row.copy_(torch.where(renorm, row / weight, row))
    weight.copy_(torch.where(renorm, 1.0, weight))
    st.mix[0] += nv.sum()
    st.mix[1] += nt.sum()
    w = weight * st.params[core.COUNTING]  # LRU: adds exactly 0
    modal = st.params[core.MODAL] != 0
    first = ~modal | (nv > 0)
    second = modal & ((nt > 0) | (nv <= 0))
    st.counts[0].index_add_(0, flat, torch.where(first, w, 0.0))
    st.counts[1].index_add_(0, flat, torch.where(second, w, 0.0))


def prefetch(st: DeviceState, layer: int, experts: torch.Tensor, valid: torch.Tensor, running: int,
             limit, quota: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """core.prefetch for the predicted `experts[valid]` (distinct) of `layer`, at most `limit` (an int
    or a device scalar) copies. Returns (flat source rows, fill) for ops.copy_records."""
    S, L, E = st.shape
    n = experts.numel()
    key, order = torch.sort(torch.where(valid, experts, E + experts.clamp(min=0)))  # valid ones first, ascending
    ex, ok = experts[order].clamp(min=0), valid[order]  # (an invalid id may be -1: "no prediction")
    flat = layer * E + ex
    slots = st.table[flat].to(torch.int64)
    on = torch.as_tensor(limit, device=experts.device) > 0  # off: no copies and no pins
    ok = ok & on
    resident = ok & (slots >= 0)
    held = torch.where(resident, slots, S)
    protected = torch.zeros(S + 1, dtype=torch.bool, device=experts.device)
    protected.index_fill_(0, held, True)
    st.pin[held] = torch.maximum(st.pin[held], torch.full_like(held, layer))
    miss = ok & (slots < 0)
    victims, usable = ranked_slots(st, layer, running, protected, False, n, quota)
    rank = torch.cumsum(miss.to(torch.int64), 0) - 1
    rank_c = rank.clamp(min=0)
    take = miss & usable[rank_c] & (rank < limit)
    fill = torch.where(take, victims[rank_c], -1)
    target = _install(st, layer, flat, fill, take)
    st.prefetched.index_fill_(0, target, True)
    st.pin.index_fill_(0, target, layer)
    _reset_dummies(st)
    st.pf[0, layer] += take.sum()
    return flat, fill


def begin_step(st: DeviceState) -> None:
    st.pin.fill_(-1)
