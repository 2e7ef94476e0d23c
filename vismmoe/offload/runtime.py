"""The offload runtime: the one handle the engine holds on the cache, the two decode paths and the ledger.

transformers calls every MoE layer's experts through glue.py, which lands in `run_layer` here; the
call goes to the host-decided path (host_path.py: prefills, and decode steps of transformers'
`generate`) or, between `begin_static` and `end_static`, to the device-decided path (device_path.py:
static decode steps, no host sync). Both compute with the same `ExpertCompute` (compute.py), read the
step's context (context.py, set by the decode loop through `begin_step` / `begin_static_step`) and
score the lookahead predictor in one `PredictionLedger` (ledger.py).
"""

from __future__ import annotations

import numpy as np
import torch

from .autoprefetch import AutoPrefetch, LookaheadChoice, measure_costs, prior_costs
from .cache import ExpertCache
from .compute import ExpertCompute
from .context import Context
from .device_path import DevicePath
from . import miss_paths
from .host_path import HostPath
from .ledger import PredictionCounters, PredictionLedger
from .router_stack import RouterStack


class OffloadRuntime:
    """Binds the cache (and the optional lookahead predictor) to the model's experts modules."""

    def __init__(self, cache: ExpertCache, is_transposed: bool, predictor=None, prefetch_limit: int = 0,
                 grouped: bool = False, prefetch_prefill: bool = False, fused_decode: bool = False,
                 auto_prefetch: bool = False):
        self.cache = cache
        self.predictor = predictor
        self.prefetch_prefill = prefetch_prefill
        self.depth = predictor.depth if predictor is not None else 1
        # Copies per prefetch call, per (target layer, distance); 0 = off. The static path reads a
        # device copy (residency.prefetch_limits), so changing them needs no new graph capture.
        self.prefetch_limits = np.zeros((cache.num_layers, self.depth), np.int64)
        if predictor is not None:
            self.prefetch_limits[:] = prefetch_limit
        # `prefetch: auto` (autoprefetch.py): the limits in force are prefetch_limits where a layer's
        # prefetch pays, else 0 (`active_limits`, what the host path reads); without auto they are one array.
        self.auto = None
        self.active_limits = self.prefetch_limits
        if auto_prefetch and predictor is not None:
            self.auto = AutoPrefetch(cache.num_layers, *prior_costs(cache.store.record_bytes), cache.device)
            self.active_limits = self.prefetch_limits.copy()
        self.context = Context()
        self.observers: list = []  # callables(layer, step, top_k_index, visual_mask, predicted): traces
        self.compute = ExpertCompute(is_transposed, grouped, fused_decode)
        self.ledger = PredictionLedger(self.depth, cache.num_layers, cache.device)
        self.host = HostPath(cache, self.compute, self.ledger, self.context, self.active_limits, self.observers)
        self.device = DevicePath(cache, self.compute, self.ledger, self.context)
        self.static = False  # between begin_static and end_static: layers decide on the device
        # Under auto on the static path: which captured step each decode step takes (begin_static), or None
        # (one step: the lookahead in it, if any, always runs). `lean_steps` False keeps one step under auto too.
        self.lookahead_choice: LookaheadChoice | None = None
        self.lean_steps = True
        self.lookahead_kind = "none"  # static path's predictor: "stacked" (one launch), else why not

    # The expert compute's switches, settable here (tests and profiles flip them on a built runtime).
    grouped = property(lambda self: self.compute.grouped, lambda self, v: setattr(self.compute, "grouped", v))
    fused_decode = property(lambda self: self.compute.fused_decode,
                            lambda self, v: setattr(self.compute, "fused_decode", v))

    @property
    def residency(self):
        """The device-side cache state (DeviceResidency) static decode steps decide with, or None."""
        return self.device.residency

    @property
    def prediction_counters(self) -> PredictionCounters:
        return self.ledger.counters

    def use_device_residency(self, top_k: int, zero_copy: bool = False) -> None:
        """Let static decode steps decide loads on the device (DeviceResidency), predicting with the stacked
        routers (one launch per layer) where every layer's router allows it, else with the modules.
        `zero_copy`: layers may serve misses in place (their device scalar, `set_miss_paths`)."""
        lookahead = None
        if self.predictor is not None:
            stack, self.lookahead_kind = RouterStack.build(self.predictor, top_k)
            lookahead = stack if stack is not None else self.predictor
        self.device.use_residency(top_k, self.depth, self.active_limits, lookahead,
                                  zero_copy and self.compute.reads_host(1))
        if self.auto is not None and lookahead is not None:
            if self.cache.cuda and self.cache.num_layers > 1:  # the rule's costs, timed once (the cache is empty)
                self.auto.set_costs(*measure_costs(self.cache, lookahead, top_k))
            self.device.use_auto(self.auto, self.prefetch_limits)

    @property
    def miss_paths(self) -> np.ndarray:
        """Per layer, the decode steps' miss path (offload/miss_paths.py codes)."""
        return self.host.miss_paths

    def set_miss_paths(self, paths) -> bool:
        """Set each layer's miss path (codes: copy, zerocopy, cpu) for the next decode steps, in place: the
        host path reads them per layer call, the static path through a device scalar per layer. Returns
        True when captured static steps must be captured again: a layer newly computes with the host slab's
        views (which a captured step bakes in). A switch between copy and zerocopy of a layer that already
        does needs nothing, and where the fused decode kernel installs copied misses (DevicePath.installs:
        static steps have one token) every layer already does, so no switch needs a new capture."""
        paths = np.asarray(paths, np.int64)
        self.host.miss_paths[:] = paths
        residency = self.residency
        if residency is None or residency.miss_modes is None:
            return False
        zero_copy = paths == miss_paths.ZEROCOPY
        residency.set_miss_modes(zero_copy)
        new = set(np.flatnonzero(zero_copy).tolist()) - self.device.host_layers
        self.device.host_layers |= new  # kept either way: a runtime whose steps do not install reads it
        return bool(new) and not self.device.installs(1)

    def set_prefetch(self, limit: int | None = None, depth: int | None = None, layers=None) -> None:
        """Change prefetching without rebuilding anything: `limit` copies per call (0 = off) for the
        target `layers` (default all), at lookahead distances 1..`depth` (the rest off)."""
        if self.predictor is None:
            raise ValueError("prefetch controls need a runtime built with prefetch on")
        rows = slice(None) if layers is None else np.asarray(layers, np.int64)
        if limit is not None:
            self.prefetch_limits[rows] = int(limit)
        if depth is not None:
            self.prefetch_limits[rows, depth:] = 0
        if self.auto is not None:
            self.auto.apply(self.prefetch_limits, self.active_limits)
        if self.residency is not None:
            self.residency.set_prefetch_limits(self.active_limits)
            if self.device.auto is not None:
                self.device.auto_base.copy_(torch.from_numpy(self.prefetch_limits))

    def add_observer(self, observer) -> None:
        self.observers.append(observer)

    def remove_observer(self, observer) -> None:
        self.observers.remove(observer)

    # -- the decode loop's calls -------------------------------------------------------------------

    def begin_request(self) -> None:
        """A request starts: counters from zero; the prefetch ledger's leftovers of the last request are
        neither used nor wasted in this one."""
        self.context.reset()
        self.ledger.begin_request()
        self.cache.reset_counters()
        self.cache.begin_request()
        if self.auto is not None:
            self.auto.begin_request()

    def end_request(self) -> None:
        self.context.reset()

    def begin_step(self, index: int, visual_mask: torch.Tensor | None = None) -> None:
        """A forward step of the whole model (0 = prefill) starts: a fresh context, prefetch pins drop."""
        self.context.set(index, visual_mask)
        self.host.begin_step()
        if self.auto is not None and index > 0:  # a decode step of the host path: auto decides here
            self.auto.host_step(self.cache.state.pf, self.host.decode_calls[1], self.ledger.decode_true_pos,
                                self.prefetch_limits, self.active_limits)

    def begin_static(self) -> None:
        self.static = True
        self.device.begin()
        self.lookahead_choice = None
        if self.device.auto is not None:  # after the residency's load (its prefetch counters restart)
            self.auto.to_device()
            if self.lean_steps and self.device.lookahead is not None:
                self.lookahead_choice = LookaheadChoice(self.auto, self.prefetch_limits)

    def end_static(self) -> None:
        self.static = False
        calls = self.device.end()  # the decode steps' hits and misses per layer: the auto miss paths' input
        if calls is not None:
            self.host.decode_calls[0] += calls[0]
            self.host.decode_calls[1] += calls[1]
        if self.device.auto is not None:  # after the residency folded its counters into the host's
            self.auto.from_device(self.cache.state.pf, self.host.decode_calls[1], self.ledger.decode_true_pos)
            self.auto.apply(self.prefetch_limits, self.active_limits)

    def begin_static_step(self, limits_on: torch.Tensor | None = None, lookahead: bool = True) -> None:
        """A static decode step starts (on CUDA: once, at capture; its graph replays the device work).
        Its context says "a decode step" (index 1): a captured step cannot count, and nothing reads it.
        `limits_on`, `lookahead`: see DevicePath.begin_step."""
        self.context.set(1)
        self.device.begin_step(limits_on, lookahead)

    # -- called from the model's forward -----------------------------------------------------------

    def predict(self, layer: int, hidden_states: torch.Tensor) -> None:
        """Called entering MoE layer `layer`: guess the experts of the next layers (on the device)."""
        step = self.context.get()
        if self.predictor is None or (self.cache.complete and not self.observers):
            return  # nothing to prefetch into a complete cache, unless a trace wants the predictions
        if not self.active_limits[layer + 1:].any() and not self.observers and not self.static:
            return  # switched off for every later layer
        if self.static:  # predicted beside the compute once this layer has run (device_path.py)
            self.device.note_hidden(layer, hidden_states)
            return
        if step.index == 0 and not self.prefetch_prefill:
            return
        step.predictions[layer] = self.predictor.predict(layer, hidden_states)

    def run_layer(self, layer: int, module, hidden_states, top_k_index, top_k_weights):
        path = self.device if self.static else self.host
        return path.run_layer(layer, module, hidden_states, top_k_index, top_k_weights)

    def request_counters(self):
        """(cache counters, prediction counters) of the request so far; folds in the hits a complete
        cache counted on the device (one readback)."""
        self.cache.collect_device_hits()
        if self.auto is not None:
            self.ledger.counters.on_fraction = self.auto.on_fraction()
        return self.cache.counters, self.ledger.counters
