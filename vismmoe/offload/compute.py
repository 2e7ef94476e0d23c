"""The routed experts' arithmetic, from weights that sit in the cache's slot pool.

Both decode paths (host-decided, offload/host_path.py; device-decided, offload/device_path.py) end
here once every expert of the layer call has a slot: one op over the slot pool (the fused decode
kernel for steps of <= ops.FUSED_MAX_TOKENS tokens, grouped GEMMs otherwise), or expert by expert in
transformers' eager order when neither runs on this device.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import ops


class ExpertCompute:
    def __init__(self, is_transposed: bool, grouped: bool = False, fused_decode: bool = False):
        self.is_transposed = is_transposed
        self.grouped = grouped  # grouped GEMMs over the slot pool (ops.experts_from_slots)
        self.fused_decode = fused_decode  # steps of <= ops.FUSED_MAX_TOKENS tokens run ops.fused_moe_decode

    def from_slots(self, num_tokens: int) -> bool:
        """Compute from the slot pool in one op (`run`) rather than expert by expert."""
        return self.grouped or (self.fused_decode and num_tokens <= ops.FUSED_MAX_TOKENS)

    def run(self, module, hidden_states, top_k_weights, slot_ids, gate_up, down):
        """The routed experts' output from their slots: the fused kernel for decode-sized steps, else grouped GEMMs."""
        if self.fused_decode and hidden_states.shape[0] <= ops.FUSED_MAX_TOKENS:
            return ops.fused_moe_decode(hidden_states, top_k_weights, slot_ids, gate_up, down, self.is_transposed)
        return ops.experts_from_slots(hidden_states, top_k_weights, slot_ids, gate_up, down, module._apply_gate,
                                      self.is_transposed)

    def loop(self, module, hidden, top_k_index, top_k_weights, slot_ids, gate_up, down):
        """One expert at a time, in transformers' eager order (experts ascending, pairs by (k, token)), so
        the arithmetic is the reference's; weights come from the slots in `slot_ids`."""
        out = torch.zeros_like(hidden)
        by_k = top_k_index.t()
        slots_by_k = slot_ids.t()
        for expert in torch.unique(top_k_index).tolist():
            pos, tokens = torch.where(by_k == expert)
            slot = int(slots_by_k[pos[0], tokens[0]])
            h = matmul(hidden[tokens], gate_up[slot], self.is_transposed)
            h = matmul(module._apply_gate(h), down[slot], self.is_transposed)
            h = h * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out


def matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    # transformers' default layout is nn.Linear's ([out, in]); "transposed" families store [in, out].
    return x @ w if transposed else F.linear(x, w)
