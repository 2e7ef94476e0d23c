"""GPU expert cache: a preallocated pool of expert slots filled from the host store.

Static buffers so decode can be captured in CUDA graphs:
  * `slots [num_slots, record_numel]` on the compute device, allocated once;
  * `slot_table [num_layers, num_experts]` int32 on the device (expert -> slot, -1 if absent), with a
    host mirror that the host-side bookkeeping reads without syncing.
Copies run on a dedicated copy stream, ordered with events, never host syncs:
  * before a slot is overwritten, the copy stream waits for the compute work that last read it;
  * before compute reads a slot, the compute stream waits for the copy that filled it.
Demand loads are issued before any prefetch of a later layer (one FIFO copy stream: whatever is
issued first lands first), prefetched experts are pinned until their layer has run, and a ledger
counts prefetch bytes issued, used and wasted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .policies import make_policy
from .store import ExpertStore


@dataclass
class CacheCounters:
    hits: np.ndarray  # [num_layers] demand lookups found resident
    misses: np.ndarray  # [num_layers] demand lookups copied on the critical path
    bytes_h2d: int = 0  # all expert bytes copied (demand + prefetch)
    waves: int = 0  # layer calls that needed more distinct experts than there are slots
    prefetch_issued_bytes: int = 0
    prefetch_used_bytes: int = 0  # prefetched experts later used by their layer
    prefetch_wasted_bytes: int = 0  # prefetched experts evicted unused
    stall_events: list = field(default_factory=list)  # (start, end) CUDA events around waits on copies

    @classmethod
    def zeros(cls, num_layers: int) -> "CacheCounters":
        return cls(np.zeros(num_layers, np.int64), np.zeros(num_layers, np.int64))

    def stall_s(self) -> float:
        return sum(a.elapsed_time(b) for a, b in self.stall_events) / 1e3


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy: str = "lru"):
        self.store = store
        self.device = device
        self.num_slots = num_slots
        self.num_layers, self.num_experts = store.num_layers, store.num_experts
        self.slots = torch.empty((num_slots, store.record_numel), dtype=store.dtype, device=device)
        # One spare entry past the table: device-side updates send the writes of hits there (see residency.py).
        self.slot_table_storage = torch.full((self.num_layers * self.num_experts + 1,), -1, dtype=torch.int32,
                                             device=device)
        self.slot_table = self.slot_table_storage[:-1].view(self.num_layers, self.num_experts)
        self.host_table = np.full((self.num_layers, self.num_experts), -1, dtype=np.int32)
        self.slot_owner = np.full((num_slots, 2), -1, dtype=np.int64)  # (layer, expert) held by each slot
        self.pinned_for = np.full(num_slots, -1, dtype=np.int64)  # layer a prefetched slot waits for
        self.prefetched_unused = np.zeros(num_slots, dtype=bool)
        self.policy = make_policy(policy, num_slots, self.num_layers, self.num_experts)
        self.clock = 0
        self.counters = CacheCounters.zeros(self.num_layers)
        self._table_updates: list[tuple[int, int, int]] = []
        # The slot pool viewed as the model's per-expert matrices, for grouped GEMMs over all slots.
        gu = store.gate_up_numel
        self.gate_up_view = self.slots[:, :gu].view(num_slots, *store.layout.gate_up_shape)
        self.down_view = self.slots[:, gu:].view(num_slots, *store.layout.down_shape)
        # When every expert fits, all are loaded up front and never evicted: layers then run with no
        # host sync at all, and hits are counted on the device.
        self.complete = False
        self.device_hits = torch.zeros(self.num_layers, dtype=torch.int64, device=device)
        self.cuda = device.type == "cuda"
        self.measure_stalls = False
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=device)
            self.ready: list[torch.cuda.Event | None] = [None] * num_slots  # copy that filled the slot
            self.released: list[torch.cuda.Event | None] = [None] * num_slots  # compute that last read it
            if store.slab is None:  # mmap store: reads land in a small ring of pinned staging buffers
                self._staging = [torch.empty(store.record_numel, dtype=store.dtype, pin_memory=True) for _ in range(4)]
                self._staging_done: list[torch.cuda.Event | None] = [None] * 4
                self._staging_next = 0

    @property
    def budget_bytes(self) -> int:
        return self.num_slots * self.store.record_bytes

    def reset_counters(self) -> CacheCounters:
        old, self.counters = self.counters, CacheCounters.zeros(self.num_layers)
        self.device_hits.zero_()
        return old

    def collect_device_hits(self) -> None:
        """Fold the hits counted on the device (complete cache) into the host counters: one sync."""
        if self.complete:
            self.counters.hits += self.device_hits.cpu().numpy()
            self.device_hits.zero_()

    def load_all(self) -> None:
        """Fill every slot (budget >= all experts): the cache is complete from then on."""
        assert self.num_slots >= self.num_layers * self.num_experts
        assert not (self.host_table >= 0).any(), "load_all expects an empty cache"
        # Layer-major, so that layer l's experts are the contiguous slots [l*E, (l+1)*E).
        for layer in range(self.num_layers):
            for expert in range(self.num_experts):
                self._fill(layer, expert, layer * self.num_experts + expert, 0)
        self._flush_table()
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)
        self.complete = True

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete cache: layer `layer`'s experts as [E, ...] views, indexed by expert id."""
        lo = layer * self.num_experts
        return self.gate_up_view[lo : lo + self.num_experts], self.down_view[lo : lo + self.num_experts]

    def count_resident_use(self, layer: int, top_k_index: torch.Tensor) -> None:
        used = torch.zeros(self.num_experts, dtype=torch.int64, device=top_k_index.device)
        used.index_fill_(0, top_k_index.reshape(-1), 1)
        self.device_hits[layer] += used.sum()

    # -- demand path -----------------------------------------------------------------------------

    def acquire(self, layer: int, experts: np.ndarray, n_visual: np.ndarray | None = None,
                n_text: np.ndarray | None = None) -> np.ndarray:
        """Make `experts` (distinct ids, at most num_slots of them) resident; return their slots.

        Misses are copied on the copy stream; the current (compute) stream waits for them. None of the
        returned slots is evicted by this call, so they stay valid until `release`.
        """
        assert len(experts) <= self.num_slots
        self.clock += 1
        now = self.clock
        slots = self.host_table[layer, experts].astype(np.int64)
        protected = np.zeros(self.num_slots, dtype=bool)
        protected[slots[slots >= 0]] = True
        missing = np.flatnonzero(slots < 0)
        self.counters.hits[layer] += len(experts) - len(missing)
        self.counters.misses[layer] += len(missing)
        for i in missing:
            slot = self._victim(protected, allow_pinned=True, layer=layer)
            self._fill(layer, int(experts[i]), slot, now)
            protected[slot] = True
            slots[i] = slot
        used = slots[self.prefetched_unused[slots]]
        self.counters.prefetch_used_bytes += len(used) * self.store.record_bytes
        self.prefetched_unused[used] = False
        for i, expert in enumerate(experts):
            nv = int(n_visual[i]) if n_visual is not None else 0
            nt = int(n_text[i]) if n_text is not None else 0
            self.policy.on_access(int(slots[i]), layer, int(expert), now, nv, nt)
        self._flush_table()
        if self.cuda:
            self._wait_ready(slots)
        return slots

    def mark_device_work_done(self) -> None:
        """Slots were filled and read by device-decided work on the compute stream (a static decode
        step): later host-path copies into any slot must wait for that work."""
        if not self.cuda:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self.released = [event] * self.num_slots
        self.ready = [None] * self.num_slots

    def release(self, slots: np.ndarray) -> None:
        """Mark the end of the compute that reads `slots` (queued on the current stream)."""
        if not self.cuda:
            return
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        for slot in slots:
            self.released[slot] = event

    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.split(self.slots[slot])

    # -- prefetch path ---------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: np.ndarray, limit: int) -> int:
        """Load up to `limit` of `experts` (predicted for `layer`) that are not resident, and pin them
        (and the predicted ones already resident) until `layer` has run. Returns copies issued."""
        issued = 0
        protected = np.zeros(self.num_slots, dtype=bool)
        resident = self.host_table[layer, experts]
        held = resident[resident >= 0]
        protected[held] = True
        self.pinned_for[held] = np.maximum(self.pinned_for[held], layer)
        for expert in experts[resident < 0]:
            if issued >= limit:
                break
            slot = self._victim(protected, allow_pinned=False, layer=layer)
            if slot < 0:
                break  # every slot is in use or pinned for a nearer layer: demand keeps priority
            self._fill(layer, int(expert), slot, self.clock)
            self.prefetched_unused[slot] = True
            self.pinned_for[slot] = layer
            protected[slot] = True
            issued += 1
        self.counters.prefetch_issued_bytes += issued * self.store.record_bytes
        self._flush_table()
        return issued

    def unpin_through(self, layer: int) -> None:
        """Layers up to `layer` have run: their prefetched slots may be evicted again."""
        self.pinned_for[self.pinned_for <= layer] = -1

    # -- internals -------------------------------------------------------------------------------

    def _victim(self, protected: np.ndarray, allow_pinned: bool, layer: int) -> int:
        evictable = ~protected & (self.pinned_for < 0)
        if not evictable.any():
            if not allow_pinned or not (~protected).any():
                return -1
            evictable = ~protected  # a demand load outranks any prefetch pin
        slot = self.policy.victim(evictable, layer=layer)
        if self.prefetched_unused[slot]:
            self.counters.prefetch_wasted_bytes += self.store.record_bytes
            self.prefetched_unused[slot] = False
        self.pinned_for[slot] = -1
        old_layer, old_expert = self.slot_owner[slot]
        if old_layer >= 0:
            self.host_table[old_layer, old_expert] = -1
            self._table_updates.append((int(old_layer), int(old_expert), -1))
        return int(slot)

    def _fill(self, layer: int, expert: int, slot: int, now: int) -> None:
        self._copy(layer, expert, slot)
        self.host_table[layer, expert] = slot
        self.slot_owner[slot] = (layer, expert)
        self._table_updates.append((layer, expert, slot))
        self.policy.on_insert(slot, layer, expert, now)

    def _flush_table(self) -> None:
        # One small copy per call updates the device-side expert -> slot table.
        if self._table_updates:
            upd = torch.tensor(self._table_updates, dtype=torch.int64).to(self.device, non_blocking=True)
            self.slot_table.index_put_((upd[:, 0], upd[:, 1]), upd[:, 2].to(torch.int32))
            self._table_updates.clear()

    def _wait_ready(self, slots) -> None:
        compute = torch.cuda.current_stream(self.device)
        pending = [self.ready[s] for s in slots if self.ready[s] is not None and not self.ready[s].query()]
        if not pending:
            return
        if self.measure_stalls:
            start = torch.cuda.Event(enable_timing=True)
            start.record(compute)
        for event in pending:
            compute.wait_event(event)
        if self.measure_stalls:
            end = torch.cuda.Event(enable_timing=True)
            end.record(compute)
            self.counters.stall_events.append((start, end))

    def _copy(self, layer: int, expert: int, slot: int) -> None:
        dst = self.slots[slot]
        self.counters.bytes_h2d += self.store.record_bytes
        if not self.cuda:
            dst.copy_(self.store.record(layer, expert))
            return
        staging = None
        with torch.cuda.stream(self.copy_stream):
            if self.released[slot] is not None:
                self.copy_stream.wait_event(self.released[slot])
            if self.store.slab is not None:
                dst.copy_(self.store.record(layer, expert), non_blocking=True)
            else:
                staging = self._next_staging()
                dst.copy_(self.store.record(layer, expert, staging=self._staging[staging]), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self.ready[slot] = event
        if staging is not None:
            self._staging_done[staging] = event

    def _next_staging(self) -> int:
        i = self._staging_next
        self._staging_next = (i + 1) % len(self._staging)
        if self._staging_done[i] is not None:
            self._staging_done[i].synchronize()  # the buffer's previous copy must have left before reuse
        return i
