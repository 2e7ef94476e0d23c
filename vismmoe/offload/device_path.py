"""The device-decided path: static decode steps whose cache decisions never leave the device.

A static decode step (static_decode.py) has one token and must not read anything back to the host,
so that it can be captured as a CUDA graph: each layer call asks `DeviceResidency` (offload/
residency.py) for its experts' slots (misses copied from the page-locked host slab by one kernel),
computes from the slot pool, then queues the prefetch of the next layers' predicted experts on the
copy stream. With a complete cache (every expert resident) it reads each layer's experts directly.
The host cache's state is handed over at `begin` (after the host-path prefill) and back at `end`.
"""

from __future__ import annotations

import warnings

import torch

from .. import ops
from .cache import ExpertCache
from .compute import ExpertCompute
from .context import Context
from .ledger import PredictionLedger
from .residency import DeviceResidency


class DevicePath:
    def __init__(self, cache: ExpertCache, compute: ExpertCompute, ledger: PredictionLedger, context: Context):
        self.cache = cache
        self.compute = compute
        self.ledger = ledger
        self.context = context
        self.residency: DeviceResidency | None = None  # when the budget does not hold every expert
        self._prefetch_pending = False  # prefetches queued on the copy stream that the next layer must join

    def use_residency(self, top_k: int, depth: int, prefetch_limits) -> None:
        self.residency = DeviceResidency(self.cache, top_k, depth)
        self.residency.set_prefetch_limits(prefetch_limits)

    def begin(self) -> None:
        self.ledger.begin_device()
        if self.residency is not None:
            self.residency.load_from_host()

    def end(self) -> None:
        self.ledger.end_device()
        if self.residency is not None:
            self.residency.store_to_host()
        else:
            self.cache.collect_device_hits()

    def begin_step(self) -> None:
        self.ledger.begin_step()
        if self.residency is not None:
            self.residency.begin_step()

    def run_layer(self, layer: int, module, hidden_states, top_k_index, top_k_weights):
        cache, compute = self.cache, self.compute
        if self._prefetch_pending:  # the prefetches queued at the previous layer land before any lookup
            torch.cuda.current_stream(cache.device).wait_stream(cache.copy_stream)
            self._prefetch_pending = False
        experts = top_k_index.reshape(-1)
        self.ledger.score_on_device(layer, experts)
        masks = self.context.get().predictions.pop(layer, None)
        if cache.complete:
            cache.count_resident_use(layer, top_k_index)
            gate_up, down = cache.layer_views(layer)
            slot_ids = top_k_index
        else:
            slot_ids = self.residency.demand(layer, experts).view_as(top_k_index)
            gate_up, down = cache.gate_up_view, cache.down_view
        if compute.from_slots(hidden_states.shape[0]):
            out = compute.run(module, hidden_states, top_k_weights, slot_ids, gate_up, down)
        else:
            out = compute.loop(module, hidden_states, top_k_index, top_k_weights, slot_ids, gate_up, down)
        if masks is not None and not cache.complete:
            # Queued after this layer's compute, as on the host path: the copy stream starts once the
            # layer has read its slots, so any slot not pinned may take a predicted expert.
            self._prefetch(layer, masks, top_k_index.shape[1])
        return out

    def _prefetch(self, layer: int, masks: torch.Tensor, top_k: int) -> None:
        for distance in range(1, masks.shape[0] + 1):
            target = layer + distance
            if target >= self.cache.num_layers:
                break
            mask = masks[distance - 1]
            self.ledger.expect(target, distance, mask)
            predicted = torch.topk(mask.to(torch.float32), top_k).indices
            valid = mask[predicted] > 0
            stream = self.cache.copy_stream if self.cache.cuda else None
            self.residency.prefetch(target, predicted, valid, running=layer, copy_stream=stream, distance=distance)
            self._prefetch_pending = self.cache.cuda


def device_copies_work(store, device: torch.device, dtype: torch.dtype) -> bool:
    """Can misses be copied by device-decided work (static decode)? On CUDA this needs the page-locked
    slab and triton, and is checked against a plain copy (call once per store)."""
    if store.slab is None:
        return False  # mmap store: records must be read by the host first
    if device.type != "cuda":
        return True
    if not (store.pinned and ops.device_copy_available(store.slab)):
        return False
    try:
        rows = torch.tensor([len(store.slab_rows) - 1], device=device)
        probe = torch.empty((1, store.record_numel), dtype=dtype, device=device)
        ops.copy_records(store.slab_rows, probe, rows, torch.zeros(1, dtype=torch.int64, device=device))
        return torch.equal(probe[0].cpu(), store.slab_rows[-1])
    except Exception as exc:  # noqa: BLE001 - any failure: keep the host-decided path, say why
        warnings.warn(f"device-side expert copies unavailable ({exc}); decode uses transformers' "
                      "generate with host-decided loads", stacklevel=3)
        return False
