"""The device-decided path: static decode steps whose cache decisions never leave the device.

A static decode step (static_decode.py) has one token and must not read anything back to the host,
so that it can be captured as a CUDA graph: each layer call asks `DeviceResidency` (offload/
residency.py) for its experts' slots (misses copied from the page-locked host slab by one kernel,
the prediction ledger scored by the same decision kernel), then computes from the slot pool. With a
complete cache (every expert resident) it reads each layer's experts directly. The host cache's
state is handed over at `begin` (after the host-path prefill) and back at `end`.

Lookahead prefetch runs beside the compute, on the copy stream: after layer l's compute the copy
stream forks off, predicts the next layers' experts from the token's state entering l (one launch with
stacked routers, router_stack.py; the module predictor where the routers cannot be stacked), decides
their loads (one cache-kernel launch per distance, copy list written in place) and copies them (one
launch); the compute stream goes on with layer l + 1's attention and joins the copy stream only before
layer l + 1's lookup. So the only prefetch work on the compute stream's path is that fork and join.

Zero-copy (offload/miss_paths.py): layers in `host_layers` compute with the slab's views beside the slot
pool, so that the misses their decision serves in place (slot id -r-1) are read from host row r. The
set only grows: a layer captured that way may switch between copy and zerocopy by its device scalar
(`DeviceResidency.miss_modes`) with no new capture. Where the fused decode kernel installs copied misses
(`installs`, the default), every layer of a step already computes with the slab's views, so a layer
joining `host_layers` changes nothing captured; otherwise it needs a new capture (`Runtime.set_miss_paths`).

A target layer whose prefetch limit is 0 (switched off, or off under `prefetch: auto`) is skipped by the
prediction kernel (its ids are -1: no router read, nothing copied, nothing scored). Under auto, one
launch at the start of each step (`ops.prefetch_gate`) decides the limits on the device, and a step may
be taken without the lookahead at all (`begin_step(lookahead=False)`: the decoder's second captured step,
chosen by autoprefetch.LookaheadChoice where every limit is 0 and no decision falls due).
"""

from __future__ import annotations

import contextlib
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
        self.lookahead = None  # RouterStack or LookaheadPredictor: predict_into(layer, hidden, out [D, k])
        self._hidden: dict = {}  # layer -> the decode token's state entering it (from the predict hook)
        self._predicted_at: set = set()  # layers whose lookahead ran in this step: later layers score it
        self.lookahead_on = True  # this step runs the lookahead (begin_step)
        self._pending = None  # the state the copy stream may still read; joined before the next lookup
        self.host_layers = set()  # layers whose compute may read in-place misses from the slab
        self.auto = None  # autoprefetch.AutoPrefetch under `prefetch: auto`
        self.auto_base = None  # its device copy of the configured limits [L, depth]
        # Copied misses are installed by the fused decode kernel as it reads them from the slab (one launch
        # per layer fewer than the copy kernel, and the layer's compute starts without waiting for it);
        # False: the copy kernel, then the compute (eval/profile_static.py times both). A captured step bakes
        # it in: set it before the step is captured (a new runtime).
        self.install_misses = True

    def installs(self, num_tokens: int) -> bool:
        """Does a static step of `num_tokens` tokens have the fused decode kernel install its copied misses?
        Such a step hands the kernel the slab's views in every layer (the install reads host rows), whether
        the layer's misses are copied or read in place: `host_layers` then changes nothing it runs."""
        return self.install_misses and self.compute.fused_for(num_tokens)

    def use_residency(self, top_k: int, depth: int, prefetch_limits, lookahead=None, zero_copy: bool = False) -> None:
        self.residency = DeviceResidency(self.cache, top_k, depth, zero_copy)
        self.residency.set_prefetch_limits(prefetch_limits)
        self.lookahead = lookahead
        if lookahead is not None:
            self.ledger.use_device_predictions(top_k)

    def use_auto(self, auto, base) -> None:
        """`prefetch: auto`: each step starts with the gate that sets the residency's limits from `base`."""
        self.auto = auto
        self.auto_base = torch.as_tensor(base, dtype=torch.int64).to(self.cache.device).clone()

    def begin(self) -> None:
        self.ledger.begin_device()
        if self.residency is not None:
            self.residency.load_from_host()

    def end(self):
        """Hand the state back; returns the decode steps' (hits, misses) per layer, or None (complete cache)."""
        self.ledger.end_device()
        if self.residency is not None:
            return self.residency.store_to_host()
        self.cache.collect_device_hits()
        return None

    def begin_step(self, limits_on: torch.Tensor | None = None, lookahead: bool = True) -> None:
        """A static step starts. Under auto the gate runs first, writing its count of limits on into
        `limits_on` (an int64 element of the decoder's readback buffer) where given. `lookahead`: False takes
        the step without any lookahead launch (only ever where it would predict and copy nothing)."""
        self.ledger.begin_step()
        self._hidden.clear()
        self._predicted_at.clear()
        self.lookahead_on = lookahead
        if self.residency is not None:
            self.residency.begin_step()
            if self.auto is not None:
                st = self.residency.state
                self.auto.device_step_ops(st.pf, st.misses, self.ledger.device_counts[0], self.auto_base,
                                          self.residency.prefetch_limits, limits_on)

    def note_hidden(self, layer: int, hidden: torch.Tensor) -> None:
        """The state entering MoE layer `layer`, to predict the next layers from once `layer` has computed."""
        self._hidden[layer] = hidden

    def run_layer(self, layer: int, module, hidden_states, top_k_index, top_k_weights):
        cache, compute = self.cache, self.compute
        if self._pending is not None:  # the prefetches queued at the previous layer land before any lookup
            if cache.cuda:
                torch.cuda.current_stream(cache.device).wait_stream(cache.copy_stream)
            self._pending = None
        hidden = self._hidden.pop(layer, None)
        experts = top_k_index.reshape(-1)
        install = None  # the copy list the fused decode kernel executes (install_misses)
        if cache.complete:
            cache.count_resident_use(layer, top_k_index)
            gate_up, down = cache.layer_views(layer)
            slot_ids = top_k_index
        else:
            # Score the predictions made 1..n layers ago for this layer, in the decision kernel's launch.
            n_dist = 0
            while n_dist < self.ledger.depth and layer - 1 - n_dist in self._predicted_at:
                n_dist += 1
            score = self.ledger.scoring(n_dist) if n_dist else None
            if self.installs(hidden_states.shape[0]):
                slot_ids, install = self.residency.demand(layer, experts, score, install=True)
                slot_ids = slot_ids.view_as(top_k_index)
            else:
                slot_ids = self.residency.demand(layer, experts, score).view_as(top_k_index)
            gate_up, down = cache.gate_up_view, cache.down_view
        host = cache.store.host_views() if (layer in self.host_layers or install is not None) \
            and not cache.complete else None
        if compute.from_slots(hidden_states.shape[0]):
            out = compute.run(module, hidden_states, top_k_weights, slot_ids, gate_up, down, host=host, install=install)
        else:
            out = compute.loop(module, hidden_states, top_k_index, top_k_weights, slot_ids, gate_up, down, host=host)
        if hidden is not None and self.lookahead is not None and self.lookahead_on and not cache.complete \
                and layer + 1 < cache.num_layers:
            # Forked after this layer's compute, as on the host path: this layer has read its slots, so
            # any slot not pinned may take a predicted expert.
            self._lookahead(layer, hidden)
        return out

    def _lookahead(self, layer: int, hidden: torch.Tensor) -> None:
        depth = min(self.ledger.depth, self.cache.num_layers - 1 - layer)
        predicted = self.ledger.predicted[layer, :depth]
        stream = self.cache.copy_stream if self.cache.cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.cache.device))
        # The limit of each (target layer + 1 + d, distance d + 1): 0 = skip that prediction.
        # (No host-side skip where every gate is 0, on the CPU either: eager steps run what the captured step
        # runs, so that the CPU tests see a full step with every limit 0 change nothing; under auto such steps
        # skip the lookahead as a whole, begin_step(lookahead=False).)
        gate = torch.diagonal(self.residency.prefetch_limits[layer + 1: layer + 1 + depth, :depth])
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            self.lookahead.predict_into(layer, hidden, predicted, gate)
            self.residency.prefetch(layer, predicted)
        self._predicted_at.add(layer)
        # Held until the join: the allocator must not hand `hidden` to the compute stream while the
        # copy stream may still read it.
        self._pending = hidden


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
