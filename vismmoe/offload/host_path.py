"""The host-decided path: every layer call's cache decisions made on the host after one readback.

Per layer call: one small readback (per-expert token counts by modality, plus the lookahead
predictions made entering the layer), demand loads through `ExpertCache.acquire` (offload/core.py
decides), compute from the cache slots (in waves when a layer needs more distinct experts than there
are slots), then prefetch of the next layers' predicted experts. Prefills always run here; decode
steps too when they go through transformers' `generate`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import ops
from .cache import ExpertCache
from .compute import ExpertCompute, matmul
from .context import Context
from .ledger import PredictionLedger


class HostPath:
    def __init__(self, cache: ExpertCache, compute: ExpertCompute, ledger: PredictionLedger, context: Context,
                 prefetch_limits: np.ndarray, observers: list):
        self.cache = cache
        self.compute = compute
        self.ledger = ledger
        self.context = context
        self.prefetch_limits = prefetch_limits  # [L, depth] copies per prefetch call (shared, set in place)
        self.observers = observers  # callables(layer, step, top_k_index, visual_mask, predicted), e.g. a trace

    def begin_step(self) -> None:
        self.ledger.begin_step()
        self.cache.begin_step()

    def _grouped(self, layer, module, hidden_states, top_k_index, top_k_weights):
        cache = self.cache
        if cache.complete:
            gate_up, down = cache.layer_views(layer)
            slot_ids = top_k_index
        else:
            gate_up, down = cache.gate_up_view, cache.down_view
            slot_ids = cache.slot_table[layer][top_k_index].to(torch.int64)
        return self.compute.run(module, hidden_states, top_k_weights, slot_ids, gate_up, down)

    def run_layer(self, layer: int, module, hidden_states, top_k_index, top_k_weights):
        cache, compute, step = self.cache, self.compute, self.context.get()
        if cache.complete and compute.from_slots(hidden_states.shape[0]) and not self.observers:
            # Every expert is resident and nothing is ever evicted: no host decision, no sync.
            cache.count_resident_use(layer, top_k_index)
            return self._grouped(layer, module, hidden_states, top_k_index, top_k_weights)
        num_tokens, top_k = top_k_index.shape
        num_experts = cache.num_experts
        # Pairs (token, slot) ordered slot-major, as transformers' eager loop visits them, so that the
        # per-expert rows (and hence the arithmetic) are identical to the reference implementation.
        flat = top_k_index.t().reshape(-1)
        visual = step.visual_mask
        if visual is not None and visual.numel() == num_tokens:
            modality = (~visual).to(torch.int64).repeat(top_k)  # 0 visual, 1 text
        else:
            visual = None
            modality = torch.ones_like(flat)
        counts = torch.zeros(2 * num_experts, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, modality * num_experts + flat, torch.ones_like(flat))
        prediction = step.predictions.pop(layer, None)
        if prediction is not None:
            counts = torch.cat([counts, prediction.reshape(-1).to(torch.int64)])
        host = counts.cpu().numpy()  # the one readback of this layer: counts and lookahead predictions
        n_visual, n_text = host[:num_experts], host[num_experts : 2 * num_experts]
        masks = host[2 * num_experts :].reshape(-1, num_experts) if prediction is not None else None
        per_expert = n_visual + n_text
        experts = np.flatnonzero(per_expert)
        predicted_here = self.ledger.score(layer, experts)
        for observer in self.observers:
            observer(layer, step.index, top_k_index, visual, predicted_here.get(1))

        wave_size = cache.wave_size(layer)
        if compute.from_slots(num_tokens) and len(experts) <= wave_size and \
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
        for start in range(0, len(experts), wave_size):
            wave = slice(start, start + wave_size)
            wave_experts = experts[wave]
            slots = cache.acquire(layer, wave_experts, n_visual[wave_experts], n_text[wave_experts])
            for j, slot in enumerate(slots):
                lo, hi = int(offsets[start + j]), int(offsets[start + j + 1])
                tokens = token_idx[lo:hi]
                gate_up, down = cache.weights(int(slot))
                h = matmul(hidden_states[tokens], gate_up, compute.is_transposed)
                h = matmul(module._apply_gate(h), down, compute.is_transposed)
                h = h * pair_weights[lo:hi, None]
                out.index_add_(0, tokens, h.to(out.dtype))
            cache.release(slots)
        if len(experts) > wave_size:
            cache.counters.waves += 1
        return self._after_layer(layer, masks, out)

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
            self.ledger.expect(target, distance, predicted)
            self.cache.prefetch(target, predicted, int(self.prefetch_limits[target, distance - 1]), running=layer)
