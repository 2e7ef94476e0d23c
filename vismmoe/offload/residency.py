"""The cache's bookkeeping as device tensors, for decode steps that run without the host.

The host path (`ExpertCache.acquire`) decides every load in Python after one readback per layer. A
static decode step instead decides on the device, with fixed-shape tensor ops only, so the whole step
can be captured in a CUDA graph and replayed with no host synchronisation at all:

  * `slot_table` (shared with the host cache) maps (layer, expert) -> slot, -1 if absent;
  * `owner[slot]` is the flat (layer * E + expert) id a slot holds, -1 if empty;
  * `last_use[slot]` is the cache clock of its last use; LFU also keeps per-(layer, expert) counts;
  * a miss takes the slot with the lowest score (empty first, then the policy's order) among those
    the current layer does not use, and its record is copied from the page-locked host slab by a
    kernel that reads host memory directly (`ops.copy_records`);
  * prefetched experts are pinned for their target layer within the step, counted as issued / used /
    wasted exactly as on the host path.

Every index tensor has one spare trailing entry (a "dummy" row) that writes for hits are sent to, so
that no operation's shape depends on how many experts missed. Decode steps have one token, whose
top-k experts are distinct: that is the case this path serves.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .. import ops

# Policies with a device twin here; others keep the host path for decode.
DEVICE_POLICIES = ("lru", "lfu")

_PINNED = 1 << 61  # score penalty: a slot prefetched for a later layer (evicted only if nothing else is free)
_PROTECTED = 1 << 62  # never chosen: the current layer reads it
_COUNT_SHIFT = 1 << 40  # LFU: count * this + last use (clocks stay far below 2**40)


class DeviceResidency:
    def __init__(self, cache, policy: str, top_k: int, depth: int):
        if policy not in DEVICE_POLICIES:
            raise ValueError(f"policy {policy!r} has no device twin; choose one of {DEVICE_POLICIES}")
        self.cache = cache
        self.policy = policy
        device = cache.device
        L, E, S = cache.num_layers, cache.num_experts, cache.num_slots
        self.num_layers, self.num_experts, self.num_slots = L, E, S
        self.table_flat = cache.slot_table_storage  # [L*E + 1], the last entry is the dummy
        self.dummy_entry = L * E
        i64 = dict(dtype=torch.int64, device=device)
        self.owner = torch.full((S + 1,), -1, **i64)
        self.last_use = torch.full((S + 1,), -1, **i64)
        self.count = torch.zeros(L * E + 1, **i64)  # LFU counts per (layer, expert), as on the host
        self.pin_layer = torch.full((S + 1,), -1, **i64)
        self.prefetched = torch.zeros(S + 1, dtype=torch.bool, device=device)
        self.clock = torch.zeros((), **i64)
        self.hits = torch.zeros(L, **i64)
        self.misses = torch.zeros(L, **i64)
        self.prefetch_counts = torch.zeros(3, **i64)  # issued, used, wasted (records)
        # Row lists of the prefetch copies, per (target layer, distance): the copy stream reads them
        # after the compute stream has moved on, so they must not be temporaries the allocator could
        # hand to the compute stream again before the copy ran.
        self.prefetch_rows = torch.zeros((L, depth, 2, top_k), **i64)

    # -- host <-> device -------------------------------------------------------------------------

    def load_from_host(self) -> None:
        """Take over the host cache's state (after a prefill on the host path)."""
        cache, pol = self.cache, self.cache.policy
        owner = np.where(cache.slot_owner[:, 0] >= 0, cache.slot_owner[:, 0] * self.num_experts + cache.slot_owner[:, 1], -1)
        self.owner[:-1].copy_(torch.from_numpy(owner))
        self.last_use[:-1].copy_(torch.from_numpy(pol.last_use))
        if self.policy == "lfu":
            self.count[:-1].copy_(torch.from_numpy(pol.count.reshape(-1)))
        self.clock.fill_(cache.clock)
        self.pin_layer.fill_(-1)
        self.prefetched[:-1].copy_(torch.from_numpy(cache.prefetched_unused))
        self.hits.zero_()
        self.misses.zero_()
        self.prefetch_counts.zero_()

    def store_to_host(self) -> None:
        """Hand the state back to the host cache and fold the device counters into its counters."""
        cache, pol = self.cache, self.cache.policy
        owner = self.owner[:-1].cpu().numpy()
        last_use = self.last_use[:-1].cpu().numpy()
        hits, misses, prefetch = self.hits.cpu().numpy(), self.misses.cpu().numpy(), self.prefetch_counts.cpu().numpy()
        cache.host_table[:] = self.table_flat[:-1].view(self.num_layers, self.num_experts).cpu().numpy()
        layer = np.where(owner >= 0, owner // self.num_experts, -1)
        expert = np.where(owner >= 0, owner % self.num_experts, -1)
        cache.slot_owner[:, 0], cache.slot_owner[:, 1] = layer, expert
        pol.slot_layer[:], pol.slot_expert[:], pol.last_use[:] = layer, expert, last_use
        if self.policy == "lfu":
            pol.count[:] = self.count[:-1].view(self.num_layers, self.num_experts).cpu().numpy()
        cache.clock = int(self.clock)
        cache.prefetched_unused[:] = self.prefetched[:-1].cpu().numpy()
        cache.pinned_for[:] = -1
        rb = cache.store.record_bytes
        c = cache.counters
        c.hits += hits
        c.misses += misses
        c.bytes_h2d += int(misses.sum() + prefetch[0]) * rb
        c.prefetch_issued_bytes += int(prefetch[0]) * rb
        c.prefetch_used_bytes += int(prefetch[1]) * rb
        c.prefetch_wasted_bytes += int(prefetch[2]) * rb
        cache.mark_device_work_done()

    # -- one step ----------------------------------------------------------------------------------

    def begin_step(self) -> None:
        self.pin_layer.fill_(-1)  # prefetch pins last until their layer has run within this step

    def demand(self, layer: int, experts: torch.Tensor) -> torch.Tensor:
        """Make `experts` (distinct ids, int64 [n]) of `layer` resident; return their slots [n].

        Copies of misses run on the current stream, so the compute queued after this reads landed data.
        """
        self.clock.add_(1)
        slots, fill = self._place(layer, experts, running=layer, valid=None, for_prefetch=False, limit=None)
        hit = fill < 0
        self.hits[layer] += hit.sum()
        self.misses[layer] += (~hit).sum()
        used_prefetch = self.prefetched[slots] & hit
        self.prefetch_counts[1] += used_prefetch.sum()
        self.prefetched.index_fill_(0, slots, False)
        self.last_use[slots] = self.clock
        if self.policy == "lfu":
            self.count.index_add_(0, layer * self.num_experts + experts, torch.ones_like(experts))
        self._copy(layer, experts, fill)
        return slots

    def prefetch(self, layer: int, experts: torch.Tensor, valid: torch.Tensor, running: int, limit: int,
                 copy_stream, distance: int = 1) -> None:
        """Load the predicted `experts[valid]` of `layer` (at most `limit`) on `copy_stream`, queued after
        layer `running`'s compute: never evict an expert pinned for a layer that has not run yet."""
        slots, fill = self._place(layer, experts, running=running, valid=valid, for_prefetch=True, limit=limit)
        resident = valid & (fill < 0) & (slots >= 0)
        pin = torch.where(resident | (fill >= 0), slots, self.num_slots)
        self.pin_layer[pin] = torch.maximum(self.pin_layer[pin], torch.full_like(pin, layer))
        filled = torch.where(fill >= 0, fill, self.num_slots)
        self.prefetched.index_fill_(0, filled, True)
        self.prefetched[-1:].fill_(False)
        self.last_use[filled] = self.clock
        self.prefetch_counts[0] += (fill >= 0).sum()
        rows = self.prefetch_rows[layer, distance - 1]
        rows[0].copy_(layer * self.num_experts + experts)
        rows[1].copy_(fill)
        if copy_stream is not None:
            copy_stream.wait_stream(torch.cuda.current_stream(experts.device))
        with torch.cuda.stream(copy_stream) if copy_stream is not None else contextlib.nullcontext():
            ops.copy_records(self.cache.store.slab_rows, self.cache.slots, rows[0], rows[1])

    # -- internals -------------------------------------------------------------------------------

    def _score(self, running: int) -> torch.Tensor:
        score = self.last_use[:-1].clone()
        if self.policy == "lfu":
            owner = self.owner[:-1]
            count = self.count[torch.where(owner >= 0, owner, self.dummy_entry)]
            score = torch.where(owner >= 0, count * _COUNT_SHIFT + score + 1, -1)
        pinned = self.pin_layer[:-1] > running  # prefetched for a layer of this step that has not run yet
        return score + pinned.to(torch.int64) * _PINNED

    def _place(self, layer, experts, running, valid, for_prefetch, limit, protect=None):
        """Slots for `experts`: resident ones as they are, misses get victims. Returns (slots, fill)
        where fill[i] is the slot to copy expert i into, or -1 (resident, invalid or not taken)."""
        n = experts.numel()
        flat = layer * self.num_experts + experts
        slots = self.table_flat[flat].to(torch.int64)
        miss = slots < 0
        if valid is not None:
            miss = miss & valid
        if protect is None:
            protect = torch.zeros(self.num_slots + 1, dtype=torch.bool, device=experts.device)
        protect.index_fill_(0, torch.where(slots >= 0, slots, self.num_slots), True)
        score = self._score(running) + protect[:-1].to(torch.int64) * _PROTECTED
        victim_score, victims = torch.topk(score, n, largest=False, sorted=True)
        rank = torch.cumsum(miss.to(torch.int64), 0) - 1
        rank_c = rank.clamp(min=0)
        take = miss & (victim_score[rank_c] < (_PINNED if for_prefetch else _PROTECTED))
        if limit is not None:
            take = take & (rank < limit)
        fill = torch.where(take, victims[rank_c], -1)
        target = torch.where(take, fill, self.num_slots)
        # A prefetched expert evicted before any use is wasted bytes.
        self.prefetch_counts[2] += (self.prefetched[target] & take).sum()
        self.prefetched.index_fill_(0, target, False)
        old = self.owner[target]
        # (In-place fills, not `x[i] = scalar`: that copies a host scalar, which graph capture forbids.)
        self.table_flat.index_fill_(0, torch.where(take & (old >= 0), old, self.dummy_entry), -1)
        self.table_flat[torch.where(take, flat, self.dummy_entry)] = target.to(torch.int32)
        self.owner[target] = flat
        self.owner[-1:].fill_(-1)
        self.table_flat[-1:].fill_(-1)
        return torch.where(take, fill, slots), fill

    def _copy(self, layer: int, experts: torch.Tensor, fill: torch.Tensor) -> None:
        src_rows = layer * self.num_experts + experts
        ops.copy_records(self.cache.store.slab_rows, self.cache.slots, src_rows, fill)
