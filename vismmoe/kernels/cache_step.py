"""One fused Triton kernel per layer call: the cache's state machine (offload/core.py) on the GPU.

`cache_step` does what `device_core.demand` / `device_core.prefetch` (its torch twins) do, in one
launch of one program: look the experts up, rank the slots by the key (pinned, score, last_use,
slot index) only as far as there are misses, evict and install (table, owner, last use, pins,
prefetch ledger), count the use (decay tick, counts, modality mix) and write the copy list that one
`ops.copy_records` launch then executes. The slot state is loaded once as [BLOCK_S] vectors, updated
in registers and stored once; the score is `core.score` itself, compiled by Triton. Launched with
fp fusion off so the float64 score rounds as numba and torch do.

Slot quotas (`quota`: int64 [L], one per layer; HAS_QUOTA): as core.victim, each victim is taken
from all slots while the layer holds fewer than its quota, else from its own slots only (demand, and
a prefetch that scans).

In place (`in_place`, demand only: a device scalar per layer, the layer's miss path): misses take no
slot and evict nothing; their slot ids name their host rows (-(layer * E + expert) - 1), which the
fused decode kernel reads over the bus (zero-copy). A scalar on the device, so a captured step follows
it without a new capture.

Limits: one program holds every slot, so S <= MAX_SLOTS (the static path already keeps S within
ops.MAX_GROUPS); n (experts per call) <= 64.
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from ..offload import core

MAX_SLOTS = 4096
DEMAND, PREFETCH = 0, 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _jit(fn):
    """The spec's formula `fn` itself, compiled by Triton (which wants triton.language among its globals)."""
    return triton.jit(types.FunctionType(fn.__code__, {"tl": tl, "triton": triton, "__name__": __name__}, fn.__name__))


score = _jit(core.score)
mix_weights = _jit(core.mix_weights)
layer_distance = _jit(core.layer_distance)


@triton.jit
def _cache_step_kernel(table, owner_p, last_p, pin_p, pref_p, counts, weight_p, layer_now_p, mix_p, cost_p, params_p,
               clock_p, hits_p, misses_p, pf_p, in_place_p, experts_p, nv_p, nt_p, valid_p, limit_p,
               out_slots, out_fill, out_src, pred_p, ledger_p, quota_p, mode_p,
               layer, running, n, S, L, E, LE1, PF_STRIDE, n_dist, DEPTH, KP,
               MODE: tl.constexpr, HAS_VALID: tl.constexpr, SCORE: tl.constexpr, HAS_QUOTA: tl.constexpr,
               HAS_MODE: tl.constexpr,
               BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    # -- the call's experts, and which of them miss
    offs_n = tl.arange(0, BLOCK_N)
    in_n = offs_n < n
    zero_n = offs_n * 0  # scalars are broadcast into vectors first: the interpreter mixes them badly
    ex = tl.load(experts_p + offs_n, mask=in_n, other=0)
    ok = in_n
    limit = n + 0
    if MODE == 1:
        if HAS_VALID:
            ok = ok & (tl.load(valid_p + offs_n, mask=in_n, other=0) != 0)
        else:
            ok = ok & (ex >= 0)  # predicted id rows mark "no prediction" with -1
        limit = tl.load(limit_p)
        ok = ok & ((zero_n + limit) > 0)
    ex = tl.maximum(ex, 0)
    flat = layer * E + ex
    slots_n = tl.load(table + flat, mask=ok, other=-1).to(tl.int64)
    hit = ok & (slots_n >= 0)
    miss = ok & (slots_n < 0)
    # rank of each miss in ascending expert id
    before = (ex[None, :] < ex[:, None]) & miss[None, :]
    rank = tl.sum(before.to(tl.int64), axis=1)
    n_miss = tl.sum(miss.to(tl.int64), axis=0)
    now = tl.load(clock_p)
    if MODE == 0:
        now = now + 1

    # A call with nothing to load skips the slot scan, which is most of the kernel's time (it grows with
    # the slots: ~26 µs per call at 768 slots on an H200): a demand whose experts are all resident only
    # touches their slots (last use, the prefetch ledger); a prefetch whose predictions are all resident
    # (or that is off) only pins what it found. Either way the scan would change nothing else.
    # In place (demand: the layer's miss path reads misses where they are), misses need no slot either.
    placed = n_miss * 0 + 1
    if MODE == 0:
        if HAS_MODE:
            placed = (tl.load(mode_p) == 0).to(tl.int64)
    full = n_miss * placed > 0
    if full:
        # -- the slots: state vectors and the victim key
        offs_s = tl.arange(0, BLOCK_S)
        in_s = offs_s < S
        owner = tl.load(owner_p + offs_s, mask=in_s, other=-1)
        last = tl.load(last_p + offs_s, mask=in_s, other=-1)
        pin = tl.load(pin_p + offs_s, mask=in_s, other=-1)
        pref = tl.load(pref_p + offs_s, mask=in_s, other=0) != 0
        held = tl.sum(((slots_n[None, :] == offs_s[:, None]) & hit[None, :]).to(tl.int32), axis=1) > 0
        if MODE == 1:
            pin = tl.where(held, tl.maximum(pin, layer), pin)
        occupied = owner >= 0
        entry = tl.where(occupied, owner, LE1 - 1)
        slot_layer = tl.where(occupied, owner // E, 0)
        params_modal = tl.load(params_p + 2)
        a_vis, a_txt = mix_weights(tl.load(mix_p), tl.load(mix_p + 1), params_modal)
        zero = slot_layer * 0  # (layer and L as float64 vectors: an int argument may arrive as a constant)
        dist = layer_distance(slot_layer.to(tl.float64), (zero + layer).to(tl.float64), (zero + L).to(tl.float64),
                              tl.load(params_p + 3))
        sc = score(tl.load(cost_p + entry), tl.load(counts + entry), tl.load(counts + LE1 + entry), a_vis, a_txt,
                   tl.load(weight_p + slot_layer), dist)
        sc = tl.where(occupied, sc, 0.0)
        pinned = pin > running
        excluded = held | (~in_s)
        if MODE == 1:
            excluded = excluded | pinned
        klass = pinned.to(tl.int32) + 2 * excluded.to(tl.int32)
        tiebreak = (last + 1) * BLOCK_S + offs_s

        # -- victims, in key order, only as many as there are misses
        want = n_miss * placed
        if MODE == 1:
            want = tl.minimum(n_miss, limit)
        victims = tl.full([BLOCK_N], -1, tl.int64)
        avail = klass < 2
        own = occupied & (slot_layer == (zero + layer))
        held_l = tl.sum(own.to(tl.int64), axis=0)  # slots the layer holds (quota plans)
        quota = held_l + 1
        if HAS_QUOTA:
            quota = tl.load(quota_p + layer)
        for r in range(0, want):
            cand = avail
            if HAS_QUOTA:  # at its quota, the layer takes only its own slots
                cand = avail & (own | ((zero + held_l) < quota))
            k1 = tl.min(tl.where(cand, klass, 3), axis=0)
            c1 = cand & (klass == k1)
            k2 = tl.min(tl.where(c1, sc, float("inf")), axis=0)
            c2 = c1 & (sc == k2)
            k3 = tl.min(tl.where(c2, tiebreak, 9223372036854775807), axis=0)
            v = k3 % BLOCK_S
            victims = tl.where((offs_n == r) & (k1 < 3), v, victims)
            avail = avail & (offs_s != v)
            if HAS_QUOTA:
                held_l = held_l + tl.sum(((offs_s == v) & ~own & (k1 < 3)).to(tl.int64), axis=0)
        # fill[i] = victims[rank[i]] for the misses that get one
        pick = tl.sum(tl.where(rank[:, None] == offs_n[None, :], victims[None, :], 0), axis=1)
        has = tl.sum(((rank[:, None] == offs_n[None, :]) & (victims[None, :] >= 0)).to(tl.int32), axis=1) > 0
        take = miss & has & (rank < want)
        fill = tl.where(take, pick, -1)

        # -- evict and install, in the slot vectors
        is_target = (fill[None, :] == offs_s[:, None]) & take[None, :]          # [S, N]
        targeted = tl.sum(is_target.to(tl.int32), axis=1) > 0
        new_owner = tl.sum(tl.where(is_target, flat[None, :], 0), axis=1)
        evicts = targeted & occupied
        wasted = evicts & pref
        old_layer = tl.where(evicts, owner // E, L)
        final_n = tl.where(take, fill, slots_n)
        if MODE == 0:  # a miss served in place names its host row: -(layer * E + expert) - 1
            final_n = tl.where(miss & ~take, -flat - 1, final_n)
        used_here = tl.sum(((final_n[None, :] == offs_s[:, None]) & ok[None, :]).to(tl.int32), axis=1) > 0
        owner = tl.where(targeted, new_owner, owner)
        last = tl.where(targeted, now, last)
        if MODE == 0:
            pin = tl.where(targeted, -1, pin)
            n_used = tl.sum((used_here & pref & ~targeted).to(tl.int64), axis=0)
            pref = pref & ~targeted & ~used_here
            last = tl.where(used_here, now, last)
        else:
            pin = tl.where(targeted, layer, pin)
            pref = pref | targeted

        tl.debug_barrier()  # every read of the old state is done before anything is written
        tl.store(owner_p + offs_s, owner, mask=in_s)
        tl.store(last_p + offs_s, last, mask=in_s)
        tl.store(pin_p + offs_s, pin, mask=in_s)
        tl.store(pref_p + offs_s, pref.to(tl.int8), mask=in_s)
        tl.store(table + entry, tl.full([BLOCK_S], -1, tl.int32), mask=evicts)
        tl.store(table + flat, fill.to(tl.int32), mask=take)
        tl.atomic_add(pf_p + 2 * PF_STRIDE + old_layer, wasted.to(tl.int64), mask=wasted)
        tl.store(out_fill + offs_n, fill, mask=in_n)
        tl.store(out_src + offs_n, flat, mask=in_n)
        if MODE == 0:
            tl.store(out_slots + offs_n, final_n, mask=in_n)
            _demand_tail(clock_p, now, hits_p, misses_p, pf_p, in_place_p, PF_STRIDE, layer, n, n_miss, placed, n_used,
                         experts_p, nv_p, nt_p, weight_p, layer_now_p, params_p, counts, mix_p, pred_p, ledger_p, LE1, E,
                         L, n_dist, DEPTH, KP, SCORE, HAS_MODE, BLOCK_N, BLOCK_E)
        else:
            tl.store(pf_p + layer, tl.load(pf_p + layer) + tl.sum(take.to(tl.int64), axis=0))
    else:
        slot_c = tl.maximum(slots_n, 0)
        tl.store(out_fill + offs_n, zero_n - 1, mask=in_n)
        tl.store(out_src + offs_n, flat, mask=in_n)
        if MODE == 0:  # every expert resident or read in place: what the scan would do, to the used slots only
            # a slot named twice in the call counts once, as the scan's per-slot view does
            earlier = tl.sum(((slots_n[None, :] == slots_n[:, None]) & (offs_n[None, :] < offs_n[:, None])
                              & hit[None, :]).to(tl.int32), axis=1) > 0
            first = hit & ~earlier
            was_pref = tl.load(pref_p + slot_c, mask=first, other=0) != 0
            n_used = tl.sum((was_pref & first).to(tl.int64), axis=0)
            tl.debug_barrier()  # the ledger is read before it is cleared
            tl.store(pref_p + slot_c, tl.zeros([BLOCK_N], tl.int8), mask=first)
            tl.store(last_p + slot_c, zero_n + now, mask=first)
            tl.store(out_slots + offs_n, tl.where(miss, -flat - 1, slots_n), mask=in_n)  # in place: the host row
            _demand_tail(clock_p, now, hits_p, misses_p, pf_p, in_place_p, PF_STRIDE, layer, n, n_miss, placed, n_used,
                         experts_p, nv_p, nt_p, weight_p, layer_now_p, params_p, counts, mix_p, pred_p, ledger_p, LE1, E,
                         L, n_dist, DEPTH, KP, SCORE, HAS_MODE, BLOCK_N, BLOCK_E)
        else:
            old_pin = tl.load(pin_p + slot_c, mask=hit, other=-1)
            tl.store(pin_p + slot_c, tl.maximum(old_pin, layer), mask=hit)



@triton.jit
def _demand_tail(clock_p, now, hits_p, misses_p, pf_p, in_place_p, PF_STRIDE, layer, n, n_miss, placed, n_used,
                 experts_p, nv_p, nt_p, weight_p, layer_now_p, params_p, counts, mix_p, pred_p, ledger_p, LE1, E, L,
                 n_dist, DEPTH, KP, SCORE: tl.constexpr, HAS_MODE: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    """A demand call's counters, after the slots are settled: clock, hits and misses (and those served in
    place), prefetched entries used, the decayed use counts of the layer's row, the modality mix, and the
    prediction ledger."""
    offs_n = tl.arange(0, BLOCK_N)
    in_n = offs_n < n
    zero_n = offs_n * 0
    ex = tl.maximum(tl.load(experts_p + offs_n, mask=in_n, other=0), 0)
    params_modal = tl.load(params_p + 2)
    tl.store(clock_p, now)
    tl.store(hits_p + layer, tl.load(hits_p + layer) + (n - n_miss))
    tl.store(misses_p + layer, tl.load(misses_p + layer) + n_miss)
    if HAS_MODE:
        tl.store(in_place_p + layer, tl.load(in_place_p + layer) + n_miss * (1 - placed))
    tl.store(pf_p + PF_STRIDE + layer, tl.load(pf_p + PF_STRIDE + layer) + n_used)
    # use: decay tick, renormalisation and counts of this layer's row, in one pass over it
    nv = tl.load(nv_p + offs_n, mask=in_n, other=0)
    nt = tl.load(nt_p + offs_n, mask=in_n, other=0)
    w = tl.load(weight_p + layer)
    tick = tl.load(layer_now_p + layer) != now
    w = tl.where(tick, w * tl.load(params_p + 0), w)
    renorm = w > 1e100
    offs_e = tl.arange(0, BLOCK_E)
    in_e = offs_e < E
    row0 = tl.load(counts + layer * E + offs_e, mask=in_e, other=0.0)
    row1 = tl.load(counts + LE1 + layer * E + offs_e, mask=in_e, other=0.0)
    row0 = tl.where(renorm, row0 / w, row0)
    row1 = tl.where(renorm, row1 / w, row1)
    w = tl.where(renorm, 1.0, w)
    inc = w * tl.load(params_p + 1)
    modal = (zero_n + params_modal) != 0
    first = ((nv > 0) | ~modal) & in_n
    second = ((nt > 0) | (nv <= 0)) & modal & in_n
    mine = ex[None, :] == offs_e[:, None]                               # [E, N]
    row0 = row0 + tl.sum(tl.where(mine & first[None, :], inc, 0.0), axis=1)
    row1 = row1 + tl.sum(tl.where(mine & second[None, :], inc, 0.0), axis=1)
    tl.store(counts + layer * E + offs_e, row0, mask=in_e)
    tl.store(counts + LE1 + layer * E + offs_e, row1, mask=in_e)
    tl.store(weight_p + layer, w)
    tl.store(layer_now_p + layer, now)
    tl.store(mix_p, tl.load(mix_p) + tl.sum(nv, axis=0).to(tl.float64))
    tl.store(mix_p + 1, tl.load(mix_p + 1) + tl.sum(nt, axis=0).to(tl.float64))
    if SCORE:
        # The prediction ledger (offload/ledger.py): this layer's experts against what layer
        # layer - d predicted for it, d = 1..n_dist; pred [L, DEPTH, KP], -1 = no prediction.
        in_p = offs_n < KP
        for dd in range(0, n_dist):
            p = tl.load(pred_p + ((layer - 1 - dd) * DEPTH + dd) * KP + offs_n, mask=in_p, other=-1)
            match = (p[:, None] == ex[None, :]) & in_n[None, :] & (p[:, None] >= 0)
            tp = tl.sum(tl.sum(match.to(tl.int64), axis=1), axis=0)
            n_pred = tl.sum((in_p & (p >= 0)).to(tl.int64), axis=0)
            base = ledger_p + dd * L + layer
            tl.store(base, tl.load(base) + tp)
            # A skipped prediction (all -1: that layer's prefetch was off) scores nothing.
            tl.store(base + DEPTH * L, tl.load(base + DEPTH * L) + n * (n_pred > 0).to(tl.int64))
            tl.store(base + 2 * DEPTH * L, tl.load(base + 2 * DEPTH * L) + n_pred)


def cache_step(st, mode: int, layer: int, experts: torch.Tensor, n_visual=None, n_text=None, valid=None,
               limit=None, running: int | None = None, out=None, score=None, quota: torch.Tensor | None = None,
               in_place: torch.Tensor | None = None):
    """Launch the kernel on `st` (a device_core.DeviceState). Returns (slots, fill, src_rows): slots
    only for demand; fill[i] the slot expert i is copied into (-1: none); src_rows its flat row.

    Prefetch: `valid` None means every id >= 0 is a prediction; `out` = (src_rows, fill) writes the copy
    list into those (persistent) rows instead of new tensors. Demand: `score` = (pred [L, depth, k],
    ledger counts [3, depth, L], n_dist) also scores this layer's experts against the predictions made
    1..n_dist layers before (offload/ledger.py). `quota`: int64 [L] on the device (per-layer slot plan),
    or None (one global pool). `in_place` (demand): an int64 device scalar, nonzero = misses take no slot
    and their slots are -(flat row) - 1 (zero-copy / CPU miss paths), or None (off)."""
    S, L, E = st.shape
    n = experts.numel()
    if S > MAX_SLOTS or n > 64:
        raise ValueError(f"cache_step handles at most {MAX_SLOTS} slots and 64 experts per call ({S}, {n})")
    device = experts.device
    slots = torch.empty(n, dtype=torch.int64, device=device) if mode == DEMAND else experts
    src, fill = out if out is not None else (torch.empty(n, dtype=torch.int64, device=device),
                                             torch.empty(n, dtype=torch.int64, device=device))
    dummy = experts  # for the pointers a mode does not read (no allocation: graph capture forbids host copies)
    if limit is None:
        limit = dummy
    elif not torch.is_tensor(limit):
        limit = torch.tensor(int(limit), dtype=torch.int64, device=device)
    pred, ledger, n_dist = score if score is not None and score[2] > 0 else (dummy, dummy, 0)
    depth, kp = (pred.shape[1], pred.shape[2]) if n_dist else (1, 1)
    running = layer if running is None else running
    prefetched = st.prefetched.view(torch.int8)
    extra = {} if device.type != "cuda" else {"enable_fp_fusion": False}
    _cache_step_kernel[(1,)](
        st.table, st.owner, st.last_use, st.pin, prefetched, st.counts, st.weight, st.layer_now, st.mix, st.cost,
        st.params, st.clock, st.hits, st.misses, st.pf, st.in_place, experts.to(torch.int64),
        dummy if n_visual is None else n_visual.to(torch.int64), dummy if n_text is None else n_text.to(torch.int64),
        dummy if valid is None else valid.to(torch.int8), limit,
        slots, fill, src, pred, ledger, dummy if quota is None else quota, dummy if in_place is None else in_place,
        layer, running, n, S, L, E, L * E + 1, L + 1, n_dist, depth, kp,
        MODE=mode, HAS_VALID=valid is not None, SCORE=n_dist > 0, HAS_QUOTA=quota is not None,
        HAS_MODE=in_place is not None and mode == DEMAND,
        BLOCK_S=_next_pow2(max(S, 16)), BLOCK_N=_next_pow2(max(n, kp, 16)), BLOCK_E=_next_pow2(max(E, 16)),
        num_warps=4 if S <= 256 else 8 if S <= 1024 else 16, **extra)
    return (slots if mode == DEMAND else None), fill, src
