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
counts prefetch bytes issued, used and wasted. Which expert goes where is decided by the
cache's state machine, offload/core.py (its docstring is the specification). With a per-layer slot
plan (`slot_plan`, policies/slot_plan.py) a layer at its quota replaces only its own experts, and a
layer call loads at most `wave_size(layer)` experts at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from . import core
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
    # [num_layers] of the misses, those served in place by the zero-copy and the CPU miss paths (the
    # rest were copied into slots): offload/miss_paths.py
    zero_copy: np.ndarray | None = None  # (None: zeros)
    cpu: np.ndarray | None = None

    def __post_init__(self):
        for name in ("zero_copy", "cpu"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros_like(self.misses))

    @classmethod
    def zeros(cls, num_layers: int) -> "CacheCounters":
        return cls(np.zeros(num_layers, np.int64), np.zeros(num_layers, np.int64))

    def stall_s(self) -> float:
        return sum(a.elapsed_time(b) for a, b in self.stall_events) / 1e3


class ExpertCache:
    def __init__(self, store: ExpertStore, num_slots: int, device: torch.device, policy: str = "lru",
                 policy_options: dict | None = None, slot_plan=None):
        self.store = store
        self.device = device
        self.num_slots = num_slots
        self.num_layers, self.num_experts = store.num_layers, store.num_experts
        self.slots = torch.empty((num_slots, store.record_numel), dtype=store.dtype, device=device)
        # One spare entry past the table: device-side updates send the writes of hits there (see device_core.py).
        self.slot_table_storage = torch.full((self.num_layers * self.num_experts + 1,), -1, dtype=torch.int32,
                                             device=device)
        self.slot_table = self.slot_table_storage[:-1].view(self.num_layers, self.num_experts)
        self.policy = make_policy(policy, **(policy_options or {}))
        # Per-layer quotas (int64 [L]) or core.NO_PLAN (one global pool).
        self.quota = core.NO_PLAN if slot_plan is None else np.asarray(
            getattr(slot_plan, "quota", slot_plan), np.int64).copy()
        if len(self.quota) and (len(self.quota) != self.num_layers or (self.quota < 1).any()):
            raise ValueError(f"slot plan {self.quota.tolist()} needs one positive quota per layer "
                             f"({self.num_layers} layers)")
        # The cache's bookkeeping: offload/core.py's state, driven by its host transitions here.
        self.state = self.policy.new_state(num_slots, self.num_layers, self.num_experts)
        self.counters = CacheCounters.zeros(self.num_layers)
        self.last_missed = 0  # misses of the last acquire
        # Scratch for the core's outputs (it does not bounds-check): a call has at most S or E experts.
        self._fill = np.empty(max(num_slots, self.num_experts), np.int64)
        self._slots = np.empty(num_slots, np.int64)
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
        self.pacer = None  # deploy.emulate.Emulation: slows each copy wave to an emulated device's link
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=device)
            self.ready: list[torch.cuda.Event | None] = [None] * num_slots  # copy that filled the slot
            self.released: list[torch.cuda.Event | None] = [None] * num_slots  # compute that last read it
            if store.slab is None:  # mmap store: reads land in a small ring of pinned staging buffers
                self._staging = [torch.empty(store.record_numel, dtype=store.dtype, pin_memory=True) for _ in range(4)]
                self._staging_done: list[torch.cuda.Event | None] = [None] * 4
                self._staging_next = 0

    def wave_size(self, layer: int) -> int:
        """The most experts one `acquire` of `layer` may load: all slots, or the layer's quota."""
        return self.num_slots if not len(self.quota) else int(min(self.num_slots, self.quota[layer]))

    @property
    def host_table(self) -> np.ndarray:
        """[L, E] expert -> slot (-1 if absent), the host side of `slot_table`."""
        return self.state.table

    @property
    def clock(self) -> int:
        return int(self.state.clock[0])

    def begin_request(self) -> None:
        """A new request: the modality mix restarts and leftover prefetches are neither used nor wasted."""
        core.begin_request(self.state)

    def begin_step(self) -> None:
        """A new forward step: every prefetch pin drops."""
        core.begin_step(self.state)

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
                slot = layer * self.num_experts + expert
                core.install(self.state, slot, layer, expert, 0)
                self._copy(layer, expert, slot)
        self.slot_table.copy_(torch.from_numpy(self.host_table))
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
                n_text: np.ndarray | None = None, in_place: bool = False) -> np.ndarray:
        """Make `experts` (distinct ids, ascending, at most num_slots of them) resident; return their slots.

        Misses are copied on the copy stream; the current (compute) stream waits for them. None of the
        returned slots is evicted by this call, so they stay valid until `release`. `in_place`: misses
        take no slot and are not copied; their slot is -(layer * E + expert) - 1 (the miss path reads
        them where they are: zero-copy or the CPU).
        """
        n = len(experts)
        assert n <= self.wave_size(layer)
        experts = np.asarray(experts, np.int64)
        zeros = np.zeros(n, np.int64)
        n_visual = zeros if n_visual is None else np.asarray(n_visual, np.int64)
        n_text = zeros if n_text is None else np.asarray(n_text, np.int64)
        slots, fill = self._slots[:n], self._fill[:n]
        used, wasted = self.state.pf[1].sum(), self.state.pf[2].sum()
        old_owner = self.state.owner.copy()
        missed = core.demand(self.state, layer, experts, n_visual, n_text, self.quota, slots, fill, in_place)
        self.last_missed = missed
        self.counters.hits[layer] += n - missed
        self.counters.misses[layer] += missed
        rb = self.store.record_bytes
        self.counters.prefetch_used_bytes += int(self.state.pf[1].sum() - used) * rb
        self.counters.prefetch_wasted_bytes += int(self.state.pf[2].sum() - wasted) * rb
        self._load(layer, experts, fill, old_owner)
        slots = slots.copy()
        if self.cuda:
            self._wait_ready(slots[slots >= 0])
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
            if slot >= 0:  # (a negative slot is a miss served in place: no slot was read)
                self.released[slot] = event

    def weights(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.store.split(self.slots[slot])

    # -- prefetch path ---------------------------------------------------------------------------

    def prefetch(self, layer: int, experts: np.ndarray, limit: int, running: int | None = None) -> int:
        """Load up to `limit` of `experts` (predicted for `layer`, ascending) that are not resident, and pin
        them (and the predicted ones already resident) until `layer` has run; issued after layer
        `running` ran (default layer - 1). Returns copies issued."""
        experts = np.asarray(experts, np.int64)
        fill = self._fill[:len(experts)]
        wasted = self.state.pf[2].sum()
        running = layer - 1 if running is None else running
        old_owner = self.state.owner.copy()
        issued = core.prefetch(self.state, layer, experts, running, limit, self.quota, fill)
        rb = self.store.record_bytes
        self.counters.prefetch_issued_bytes += issued * rb
        self.counters.prefetch_wasted_bytes += int(self.state.pf[2].sum() - wasted) * rb
        self._load(layer, experts, fill, old_owner)
        return issued

    # -- internals -------------------------------------------------------------------------------

    def _load(self, layer: int, experts: np.ndarray, fill: np.ndarray, old_owner: np.ndarray) -> None:
        """Copy the records the core placed (fill[i] >= 0) and update the device table in one small copy."""
        placed = np.flatnonzero(fill >= 0)
        if not len(placed):
            return
        slots = fill[placed]
        for i in placed:
            self._copy(layer, int(experts[i]), int(fill[i]))
        if self.pacer is not None:
            self._pace(slots)
        evicted = old_owner[slots]
        evicted = evicted[evicted >= 0]
        flat = np.concatenate([evicted, layer * self.num_experts + experts[placed]])
        value = np.concatenate([np.full(len(evicted), -1), slots])
        upd = torch.from_numpy(np.stack([flat, value])).to(self.device, non_blocking=True)
        # No index repeats: what a call installs was absent, and what it installs it protects.
        self.slot_table_storage.index_put_((upd[0],), upd[1].to(torch.int32))

    def _pace(self, slots: np.ndarray) -> None:
        """Emulation: the wave's copies take the emulated link's time; on CUDA a delay queued on the copy
        stream, and the slots count as ready only after it."""
        self.pacer.pace_host(len(slots), self.copy_stream if self.cuda else None)
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.copy_stream)
            for slot in slots:
                self.ready[int(slot)] = event

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
