"""GPU expert cache: a preallocated pool of expert slots filled from the host store on demand.

Static buffers so decode can later be captured in a CUDA graph:
  * `slots [num_slots, record_numel]` on the compute device, allocated once;
  * `slot_table [num_layers, num_experts]` int32 on the device (expert -> slot, -1 if absent), with a
    host mirror that the host-side bookkeeping reads without syncing.
Copies run on a dedicated copy stream. Ordering is expressed with events, never host syncs:
  * before a slot is overwritten, the copy stream waits for the compute work that last read it;
  * before compute reads a slot, the compute stream waits for the copy that filled it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .policies import make_policy
from .store import ExpertStore


@dataclass
class CacheCounters:
    hits: np.ndarray  # [num_layers]
    misses: np.ndarray  # [num_layers]
    bytes_h2d: int = 0
    waves: int = 0  # layer calls that needed more distinct experts than there are slots
    extra: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, num_layers: int) -> "CacheCounters":
        return cls(np.zeros(num_layers, np.int64), np.zeros(num_layers, np.int64))


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy: str = "lru"):
        self.store = store
        self.device = device
        self.num_slots = num_slots
        self.num_layers, self.num_experts = store.num_layers, store.num_experts
        self.slots = torch.empty((num_slots, store.record_numel), dtype=store.dtype, device=device)
        self.slot_table = torch.full((self.num_layers, self.num_experts), -1, dtype=torch.int32, device=device)
        self.host_table = np.full((self.num_layers, self.num_experts), -1, dtype=np.int32)
        self.slot_owner = np.full((num_slots, 2), -1, dtype=np.int64)  # (layer, expert) held by each slot
        self.policy = make_policy(policy, num_slots, self.num_layers, self.num_experts)
        self.clock = 0
        self.counters = CacheCounters.zeros(self.num_layers)
        self.cuda = device.type == "cuda"
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
        return old

    def resident(self, layer: int) -> np.ndarray:
        return np.flatnonzero(self.host_table[layer] >= 0)

    def acquire(self, layer: int, experts: np.ndarray, n_visual: np.ndarray | None = None,
                n_text: np.ndarray | None = None) -> np.ndarray:
        """Make `experts` (distinct ids, at most num_slots of them) resident; return their slots.

        Misses are copied on the copy stream; the current (compute) stream is made to wait for them.
        None of the returned slots may be evicted by this call, so they stay valid until `release`.
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
        table_updates = []  # (layer, expert, slot or -1), applied to the device table in one copy
        for i in missing:
            slot = self.policy.victim(~protected)
            old_layer, old_expert = self.slot_owner[slot]
            if old_layer >= 0:
                self.host_table[old_layer, old_expert] = -1
                table_updates.append((old_layer, old_expert, -1))
            self._load(layer, int(experts[i]), slot)
            table_updates.append((layer, int(experts[i]), slot))
            self.policy.on_insert(slot, layer, int(experts[i]), now)
            protected[slot] = True
            slots[i] = slot
        for i, expert in enumerate(experts):
            nv = int(n_visual[i]) if n_visual is not None else 0
            nt = int(n_text[i]) if n_text is not None else 0
            self.policy.on_access(int(slots[i]), layer, int(expert), now, nv, nt)
        if table_updates:
            upd = torch.tensor(table_updates, dtype=torch.int64).to(self.device, non_blocking=True)
            self.slot_table.index_put_((upd[:, 0], upd[:, 1]), upd[:, 2].to(torch.int32))
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            for slot in slots:
                event = self.ready[slot]
                if event is not None:
                    compute.wait_event(event)
        return slots

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

    def _load(self, layer: int, expert: int, slot: int) -> None:
        dst = self.slots[slot]
        self.counters.bytes_h2d += self.store.record_bytes
        self.host_table[layer, expert] = slot
        self.slot_owner[slot] = (layer, expert)
        if not self.cuda:
            dst.copy_(self.store.record(layer, expert))
            return
        with torch.cuda.stream(self.copy_stream):
            if self.released[slot] is not None:
                self.copy_stream.wait_event(self.released[slot])
            if self.store.slab is not None:
                dst.copy_(self.store.record(layer, expert), non_blocking=True)
                staging = None
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
