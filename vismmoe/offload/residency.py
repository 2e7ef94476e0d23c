"""The cache's bookkeeping as device tensors, for decode steps that run without the host.

The host path (`ExpertCache.acquire`) decides every load with offload/core.py after one readback per
layer. A static decode step decides on the device instead, with the same state machine on tensors
(`device_core.DeviceState`): one fused kernel per layer call on CUDA (`ops.cache_demand`,
kernels/cache_step.py), its torch twin elsewhere, then one launch of `ops.copy_records` that reads
the chosen records straight from the page-locked host slab. No shape depends on the data, so the
whole step can be captured in a CUDA graph and replayed with no host synchronisation at all.

Every policy runs here (the decisions are the host core's: tests/test_cache_core.py). The prefetch
controls are device tensors too (`prefetch_limits[layer, distance]`, 0 = off), so changing them does
not invalidate a captured graph. Decode steps have one token, whose top-k experts are distinct (and
text): that is the case this path serves.

Miss paths (offload/miss_paths.py): `miss_modes[layer]` (a device scalar per layer, 1 = zerocopy) makes
the decision kernel serve that layer's misses in place (no slot, slot id -r-1 = host row r), which the
decode kernel then reads from the slab; 0 copies them. Changing it needs no new graph capture.
"""

from __future__ import annotations

import torch

from .. import ops
from .device_core import DeviceState, begin_step


class DeviceResidency:
    def __init__(self, cache, top_k: int, depth: int, zero_copy: bool = False):
        self.cache = cache
        S, L, E = cache.num_slots, cache.num_layers, cache.num_experts
        self.num_layers, self.num_experts, self.num_slots = L, E, S
        self.state = DeviceState.empty(S, L, E, cache.slot_table_storage)
        device = cache.device
        i64 = dict(dtype=torch.int64, device=device)
        self.text_tokens = torch.ones(top_k, **i64)  # one decode token: each expert has 1 text token
        self.visual_tokens = torch.zeros(top_k, **i64)
        # Copies per prefetch call, per (target layer, distance): 0 = off. A device tensor, so that
        # reconfigure and per-layer adaptive prefetch need no new graph capture.
        self.prefetch_limits = torch.zeros((L, max(depth, 1)), **i64)
        # The copy list of the prefetches issued after each layer (all its distances), [L, 2, depth * k]:
        # the copy stream reads it after the compute stream has moved on, so it must not be a temporary
        # the allocator could hand to the compute stream again before the copy ran.
        self.prefetch_rows = torch.full((L, 2, max(depth, 1) * top_k), -1, **i64)
        # Per-layer slot quotas (the cache's slot plan) or None: the same caps as the host core's.
        self.quota = torch.from_numpy(cache.quota).to(device) if len(cache.quota) else None
        # Per layer: 1 = misses served in place (zerocopy), 0 = copied. None where zero-copy cannot run here
        # (the decision kernel is then launched without it).
        self.miss_modes = torch.zeros(L, **i64) if zero_copy else None

    def set_miss_modes(self, in_place) -> None:
        """in_place [L] (bools or 0/1): copied into the device tensor the captured steps read."""
        self.miss_modes.copy_(torch.as_tensor(in_place, dtype=torch.int64))

    def set_prefetch_limits(self, limits) -> None:
        """limits [L, depth] (ints, 0 = off): copied into the device tensor the captured steps read."""
        self.prefetch_limits.copy_(torch.as_tensor(limits, dtype=torch.int64))

    # -- host <-> device -------------------------------------------------------------------------

    def load_from_host(self) -> None:
        """Take over the host cache's state (after a prefill on the host path)."""
        self.state.load(self.cache.state)

    def store_to_host(self) -> None:
        """Hand the state back to the host cache and fold the device counters into its counters."""
        st, cache = self.state, self.cache
        hits, misses, pf = st.hits.cpu().numpy(), st.misses.cpu().numpy(), st.pf[:, :-1].sum(1).cpu().numpy()
        in_place = st.in_place.cpu().numpy()
        st.store(cache.state)
        rb = cache.store.record_bytes
        c = cache.counters
        c.hits += hits
        c.misses += misses
        c.zero_copy += in_place
        c.bytes_h2d += int(misses.sum() - in_place.sum() + pf[0]) * rb
        c.prefetch_issued_bytes += int(pf[0]) * rb
        c.prefetch_used_bytes += int(pf[1]) * rb
        c.prefetch_wasted_bytes += int(pf[2]) * rb
        cache.mark_device_work_done()
        return hits, misses

    # -- one step ----------------------------------------------------------------------------------

    def begin_step(self) -> None:
        begin_step(self.state)  # prefetch pins last until their layer has run within this step

    def demand(self, layer: int, experts: torch.Tensor, score=None, install: bool = False):
        """Make `experts` (distinct ids, int64 [n]) of `layer` resident; return their slots [n]. `score`:
        the ledger's `scoring(...)`, counted by the same launch.

        Copies of misses run on the current stream, so the compute queued after this reads landed data.
        `install`: copy nothing, return (slots, (fill, src)) instead: the copy list, which the fused decode
        kernel executes as it computes (ops.fused_moe_decode's `install`), one launch fewer per layer.
        """
        n = experts.numel()
        in_place = None if self.miss_modes is None else self.miss_modes[layer]
        slots, fill, src = ops.cache_demand(self.state, layer, experts, self.visual_tokens[:n], self.text_tokens[:n],
                                            score=score, quota=self.quota, in_place=in_place)
        if not install:
            ops.copy_records(self.cache.store.slab_rows, self.cache.slots, src, fill)
        if self.cache.pacer is not None:  # an emulated device's slower link (deploy/emulate.py)
            self.cache.pacer.pace_device(fill)
            if in_place is not None:  # in-place reads cross the same link: the same delay per record, before
                self.cache.pacer.pace_device(-1 - slots)  # the kernel that reads them (>= 0: a host row)
        return (slots, (fill, src)) if install else slots

    def prefetch(self, running: int, predicted: torch.Tensor) -> None:
        """Queued after layer `running`'s compute: load the predicted experts of the next layers —
        predicted[d - 1] (int64 [k], -1 = none) for layer running + d, at most prefetch_limits[running + d,
        d - 1] of them, within the layer's slot quota — never evicting an expert pinned for a layer that
        has not run yet. One decision launch per distance writes the copy list straight into
        `prefetch_rows[running]`, one copy launch moves them all (then the emulated link's pacing), on the
        current stream (the device path runs this on the copy stream)."""
        depth, k = predicted.shape
        rows = self.prefetch_rows[running, :, : depth * k]
        for d in range(1, depth + 1):
            part = slice((d - 1) * k, d * k)
            ops.cache_prefetch(self.state, running + d, predicted[d - 1], None, running,
                               self.prefetch_limits[running + d, d - 1], out=(rows[0, part], rows[1, part]),
                               quota=self.quota)
        ops.copy_records(self.cache.store.slab_rows, self.cache.slots, rows[0], rows[1])
        if self.cache.pacer is not None:  # an emulated device's slower link (deploy/emulate.py)
            self.cache.pacer.pace_device(rows[1])
