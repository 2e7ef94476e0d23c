"""The experts implementation vismmoe registers with transformers' experts interface.

transformers 5 dispatches every decorated experts module's forward through `ExpertsInterface`; the
function gets the module, `hidden_states [T, H]`, `top_k_index [T, k]` and `top_k_weights [T, k]`
and owns execution. The model's own router has already run, so every router type works unchanged.
Here: one small readback of per-expert token counts, cache lookup and demand loads, then compute
from the cache slots (in waves when a layer needs more distinct experts than there are slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional as F

from .cache import ExpertCache

IMPLEMENTATION = "vismmoe_offload"


@dataclass
class StepContext:
    """Per-forward state: set by a pre-forward hook on the top model, read by every MoE layer."""

    index: int = -1  # 0 = prefill, then one per decode step
    visual_mask: torch.Tensor | None = None  # [T] bool: which tokens of this step are visual
    observers: list = field(default_factory=list)  # callables(layer, step, top_k_index, visual_mask)


class OffloadRuntime:
    """Binds the cache to the model's experts modules and runs them."""

    def __init__(self, cache: ExpertCache, is_transposed: bool):
        self.cache = cache
        self.is_transposed = is_transposed
        self.step = StepContext()

    def run_layer(self, layer: int, module, hidden_states, top_k_index, top_k_weights):
        cache = self.cache
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
        for observer in self.step.observers:
            observer(layer, self.step.index, top_k_index, visual)
        counts = torch.zeros(2 * num_experts, dtype=torch.int64, device=flat.device)
        counts.scatter_add_(0, modality * num_experts + flat, torch.ones_like(flat))
        counts = counts.cpu().numpy()  # the one readback of this layer
        n_visual, n_text = counts[:num_experts], counts[num_experts:]
        per_expert = n_visual + n_text
        experts = np.flatnonzero(per_expert)
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
