"""The experts implementation vismmoe registers with transformers' experts interface.

transformers 5 dispatches every decorated experts module's forward through `ExpertsInterface`; the
function gets the module, `hidden_states [T, H]`, `top_k_index [T, k]` and `top_k_weights [T, k]`
and owns execution. The model's own router has already run, so every router type works unchanged.
Per layer: one small readback (per-expert token counts, plus the lookahead predictions made entering
the layer), demand loads, compute from the cache slots (in waves when a layer needs more distinct
experts than there are slots), then prefetch of the next layers' predicted experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .. import ops
from .cache import ExpertCache
from .residency import DeviceResidency

IMPLEMENTATION = "vismmoe_offload"


@dataclass
class StepContext:
    """Per-forward state: set by a pre-forward hook on the top model, read by every MoE layer."""

    index: int = -1  # 0 = prefill, then one per decode step
    visual_mask: torch.Tensor | None = None  # [T] bool: which tokens of this step are visual
    observers: list = field(default_factory=list)  # callables(layer, step, top_k_index, visual_mask, predicted)
    predictions: dict = field(default_factory=dict)  # layer -> device mask [depth, E] made entering it
    predicted: dict = field(default_factory=dict)  # layer -> {distance: host array of predicted experts}


@dataclass
class PredictionCounters:
    """Per lookahead distance and layer: true positives, actual and predicted set sizes."""

    true_pos: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray

    @classmethod
    def zeros(cls, depth: int, num_layers: int) -> "PredictionCounters":
        return cls(*(np.zeros((depth, num_layers), np.int64) for _ in range(3)))

    def recall(self) -> np.ndarray:
        return np.divide(self.true_pos, self.actual, out=np.full(self.actual.shape, np.nan), where=self.actual > 0)

    def precision(self) -> np.ndarray:
        return np.divide(self.true_pos, self.predicted, out=np.full(self.predicted.shape, np.nan),
                         where=self.predicted > 0)


class OffloadRuntime:
    """Binds the cache (and the optional lookahead predictor) to the model's experts modules."""

    def __init__(self, cache: ExpertCache, is_transposed: bool, predictor=None, prefetch_limit: int = 0,
                 grouped: bool = False, prefetch_prefill: bool = False):
        self.cache = cache
        self.is_transposed = is_transposed
        self.grouped = grouped  # compute with grouped GEMMs over the slot pool (ops.experts_from_slots)
        # Steps of <= ops.FUSED_MAX_TOKENS tokens (decode) run ops.fused_moe_decode; set by the engine.
        self.fused_decode = False
        self.predictor = predictor
        self.prefetch_prefill = prefetch_prefill
        self.step = StepContext()
        self.depth = predictor.depth if predictor is not None else 1
        # Copies per prefetch call, per (target layer, distance); 0 = off. The static path reads a
        # device copy (residency.prefetch_limits), so changing them needs no new graph capture.
        self.prefetch_limits = np.zeros((cache.num_layers, self.depth), np.int64)
        if predictor is not None:
            self.prefetch_limits[:] = prefetch_limit
        self.prediction_counters = PredictionCounters.zeros(self.depth, cache.num_layers)
        # Static decode (see static_decode.py): layers decide on the device, never on the host.
        self.static = False
        self.residency = None  # DeviceResidency, when the budget does not hold every expert
        self._static_predicted: dict = {}  # target layer -> {distance: predicted mask [E]}
        self._prefetch_pending = False
        self.static_prediction_counts = torch.zeros((3, self.depth, cache.num_layers), dtype=torch.int64,
                                                    device=cache.device)

    def use_device_residency(self, top_k: int) -> None:
        """Let static decode steps decide loads on the device (DeviceResidency)."""
        self.residency = DeviceResidency(self.cache, top_k, self.depth)
        self.residency.set_prefetch_limits(self.prefetch_limits)

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
        if self.residency is not None:
            self.residency.set_prefetch_limits(self.prefetch_limits)

    def begin_request(self) -> None:
        self.step.index = -1
        self.prediction_counters = PredictionCounters.zeros(self.depth, self.cache.num_layers)

    def begin_step(self) -> None:
        self.step.predictions.clear()
        self.step.predicted.clear()
        self.cache.begin_step()

    def predict(self, layer: int, hidden_states: torch.Tensor) -> None:
        """Called entering MoE layer `layer`: guess the experts of the next layers (on the device)."""
        if self.predictor is None or (self.cache.complete and not self.step.observers):
            return  # nothing to prefetch into a complete cache, unless a trace wants the predictions
        if not self.prefetch_limits[layer + 1:].any() and not self.step.observers and not self.static:
            return  # switched off for every later layer
        if self.step.index == 0 and not self.prefetch_prefill and not self.static:
            return
        self.step.predictions[layer] = self.predictor.predict(layer, hidden_states)

    def _grouped(self, layer, module, hidden_states, top_k_index, top_k_weights):
        if self.cache.complete:
            gate_up, down = self.cache.layer_views(layer)
            slot_ids = top_k_index
        else:
            gate_up, down = self.cache.gate_up_view, self.cache.down_view
            slot_ids = self.cache.slot_table[layer][top_k_index].to(torch.int64)
        return self._compute(module, hidden_states, top_k_weights, slot_ids, gate_up, down)

    def _compute(self, module, hidden_states, top_k_weights, slot_ids, gate_up, down):
        """The routed experts' output from their slots: the fused kernel for decode-sized steps, else grouped GEMMs."""
        if self.fused_decode and hidden_states.shape[0] <= ops.FUSED_MAX_TOKENS:
            return ops.fused_moe_decode(hidden_states, top_k_weights, slot_ids, gate_up, down, self.is_transposed)
        return ops.experts_from_slots(hidden_states, top_k_weights, slot_ids, gate_up, down, module._apply_gate,
                                      self.is_transposed)

    def _from_slots(self, num_tokens: int) -> bool:
        """Compute from the slot pool in one op (`_compute`) rather than expert by expert."""
        return self.grouped or (self.fused_decode and num_tokens <= ops.FUSED_MAX_TOKENS)

    def run_layer(self, layer: int, module, hidden_states, top_k_index, top_k_weights):
        cache = self.cache
        if self.static:
            return self._run_layer_static(layer, module, hidden_states, top_k_index, top_k_weights)
        if cache.complete and self._from_slots(hidden_states.shape[0]) and not self.step.observers:
            # Every expert is resident and nothing is ever evicted: no host decision, no sync.
            cache.count_resident_use(layer, top_k_index)
            return self._grouped(layer, module, hidden_states, top_k_index, top_k_weights)
        num_tokens, top_k = top_k_index.shape
        num_experts = cache.num_experts
        # Pairs (token, slot) ordered slot-major, as transformers' eager loop visits them, so that the
        # per-expert rows (and hence the arithmetic) are identical to the reference implementation.
        flat = top_k_index.t().reshape(-1)
        visual = self.step.visual_mask
        if visual is not None and visual.numel() == num_tokens:
            modality = (~visual).to(torch.int64).repeat(top_k)  # 0 visual, 1 text
        else:
            visual = None
            modality = torch.ones_like(flat)
        counts = torch.zeros(2 * num_experts, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, modality * num_experts + flat, torch.ones_like(flat))
        prediction = self.step.predictions.pop(layer, None)
        if prediction is not None:
            counts = torch.cat([counts, prediction.reshape(-1).to(torch.int64)])
        host = counts.cpu().numpy()  # the one readback of this layer: counts and lookahead predictions
        n_visual, n_text = host[:num_experts], host[num_experts : 2 * num_experts]
        masks = host[2 * num_experts :].reshape(-1, num_experts) if prediction is not None else None
        per_expert = n_visual + n_text
        experts = np.flatnonzero(per_expert)
        predicted_here = self.step.predicted.pop(layer, {})
        self._score_predictions(layer, experts, predicted_here)
        for observer in self.step.observers:
            observer(layer, self.step.index, top_k_index, visual, predicted_here.get(1))

        if self._from_slots(num_tokens) and len(experts) <= cache.num_slots and \
                (cache.complete or cache.num_slots <= ops.MAX_GROUPS):
            slots = cache.acquire(layer, experts, n_visual[experts], n_text[experts])
            out = self._grouped(layer, module, hidden_states, top_k_index, top_k_weights)
            cache.release(slots)
            return self._after_layer(layer, masks, out)

        offsets = np.concatenate([[0], np.cumsum(per_expert[experts])])
        order = torch.argsort(flat, stable=True)
        token_idx = order % num_tokens
        pair_weights = top_k_weights.t().reshape(-1)[order]
        out = torch.zeros_like(hidden_states)
        for start in range(0, len(experts), cache.num_slots):
            wave = slice(start, start + cache.num_slots)
            wave_experts = experts[wave]
            slots = cache.acquire(layer, wave_experts, n_visual[wave_experts], n_text[wave_experts])
            for j, slot in enumerate(slots):
                lo, hi = int(offsets[start + j]), int(offsets[start + j + 1])
                tokens = token_idx[lo:hi]
                gate_up, down = cache.weights(int(slot))
                h = _matmul(hidden_states[tokens], gate_up, self.is_transposed)
                h = _matmul(module._apply_gate(h), down, self.is_transposed)
                h = h * pair_weights[lo:hi, None]
                out.index_add_(0, tokens, h.to(out.dtype))
            cache.release(slots)
        if len(experts) > cache.num_slots:
            cache.counters.waves += 1
        return self._after_layer(layer, masks, out)

    # -- static decode: every decision on the device -------------------------------------------------

    def begin_static(self) -> None:
        self.static = True
        self.static_prediction_counts.zero_()
        if self.residency is not None:
            self.residency.load_from_host()

    def end_static(self) -> None:
        self.static = False
        self.step.predictions.clear()
        self._static_predicted.clear()
        counts = self.static_prediction_counts.cpu().numpy()
        c = self.prediction_counters
        c.true_pos += counts[0]
        c.actual += counts[1]
        c.predicted += counts[2]
        if self.residency is not None:
            self.residency.store_to_host()
        else:
            self.cache.collect_device_hits()

    def begin_static_step(self) -> None:
        self.step.predictions.clear()
        self._static_predicted.clear()
        if self.residency is not None:
            self.residency.begin_step()

    def _run_layer_static(self, layer, module, hidden_states, top_k_index, top_k_weights):
        cache = self.cache
        if self._prefetch_pending:  # the prefetches queued at the previous layer land before any lookup
            torch.cuda.current_stream(cache.device).wait_stream(cache.copy_stream)
            self._prefetch_pending = False
        experts = top_k_index.reshape(-1)
        self._score_static_predictions(layer, experts)
        masks = self.step.predictions.pop(layer, None)
        if cache.complete:
            cache.count_resident_use(layer, top_k_index)
            gate_up, down = cache.layer_views(layer)
            slot_ids = top_k_index
        else:
            slot_ids = self.residency.demand(layer, experts).view_as(top_k_index)
            gate_up, down = cache.gate_up_view, cache.down_view
        if self._from_slots(hidden_states.shape[0]):
            out = self._compute(module, hidden_states, top_k_weights, slot_ids, gate_up, down)
        else:
            out = _loop_from_slots(hidden_states, top_k_index, top_k_weights, slot_ids, gate_up, down,
                                   module._apply_gate, self.is_transposed)
        if masks is not None and not cache.complete:
            # Queued after this layer's compute, as on the host path: the copy stream starts once the
            # layer has read its slots, so any slot not pinned may take a predicted expert.
            self._prefetch_static(layer, masks, top_k_index.shape[1])
        return out

    def _prefetch_static(self, layer: int, masks: torch.Tensor, top_k: int) -> None:
        for distance in range(1, masks.shape[0] + 1):
            target = layer + distance
            if target >= self.cache.num_layers:
                break
            mask = masks[distance - 1]
            self._static_predicted.setdefault(target, {})[distance] = mask
            predicted = torch.topk(mask.to(torch.float32), top_k).indices
            valid = mask[predicted] > 0
            stream = self.cache.copy_stream if self.cache.cuda else None
            self.residency.prefetch(target, predicted, valid, running=layer, copy_stream=stream, distance=distance)
            self._prefetch_pending = self.cache.cuda

    def _score_static_predictions(self, layer: int, experts: torch.Tensor) -> None:
        for distance, mask in self._static_predicted.pop(layer, {}).items():
            counts = self.static_prediction_counts[:, distance - 1, layer]
            counts[0] += mask[experts].sum()
            counts[1] += experts.numel()
            counts[2] += mask.sum()

    def _after_layer(self, layer, masks, out):
        if masks is not None:
            self._prefetch(layer, masks)
        return out

    def _prefetch(self, layer: int, masks: np.ndarray) -> None:
        # Issued after this layer's demand loads, nearest layer first: demand never queues behind them.
        for distance, mask in enumerate(masks, start=1):
            target = layer + distance
            if target >= self.cache.num_layers:
                break
            predicted = np.flatnonzero(mask)
            self.step.predicted.setdefault(target, {})[distance] = predicted
            self.cache.prefetch(target, predicted, int(self.prefetch_limits[target, distance - 1]), running=layer)

    def _score_predictions(self, layer: int, actual: np.ndarray, predicted_here: dict) -> None:
        c = self.prediction_counters
        for distance, predicted in predicted_here.items():
            c.true_pos[distance - 1, layer] += len(np.intersect1d(actual, predicted, assume_unique=True))
            c.actual[distance - 1, layer] += len(actual)
            c.predicted[distance - 1, layer] += len(predicted)


def _loop_from_slots(hidden, top_k_index, top_k_weights, slot_ids, gate_up, down, apply_gate, transposed):
    """One expert at a time, in transformers' eager order (experts ascending, pairs by (k, token)), so
    the arithmetic is the reference's; weights come from the slots in `slot_ids`."""
    out = torch.zeros_like(hidden)
    by_k = top_k_index.t()
    slots_by_k = slot_ids.t()
    for expert in torch.unique(top_k_index).tolist():
        pos, tokens = torch.where(by_k == expert)
        slot = int(slots_by_k[pos[0], tokens[0]])
        h = _matmul(hidden[tokens], gate_up[slot], transposed)
        h = _matmul(apply_gate(h), down[slot], transposed)
        h = h * top_k_weights[tokens, pos, None]
        out.index_add_(0, tokens, h.to(out.dtype))
    return out


def _matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    # transformers' default layout is nn.Linear's ([out, in]); "transposed" families store [in, out].
    return x @ w if transposed else F.linear(x, w)


def offload_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    runtime, layer = self._vismmoe
    return runtime.run_layer(layer, self, hidden_states, top_k_index, top_k_weights)


def register() -> None:
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(IMPLEMENTATION, offload_experts_forward)
