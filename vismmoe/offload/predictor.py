"""Lookahead expert prediction: guess the experts of layers l+1..l+d from the hidden state entering l.

The guess applies those layers' own routers, each after the norm that precedes it in the model
(`post_attention_layernorm`), to the current residual stream. Calling the router modules themselves
keeps every family's routing rule (softmax top-k, sigmoid with bias correction, group-limited) without
re-implementing it. Predictions only drive loading; the real router always decides what computes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import MoeLayout


def _router(block: nn.Module) -> nn.Module | None:
    for name in ("gate", "router"):
        module = getattr(block, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _pre_router_norm(decoder_layer: nn.Module) -> nn.Module | None:
    for name in ("post_attention_layernorm", "pre_feedforward_layernorm", "ffn_norm"):
        module = getattr(decoder_layer, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


class LookaheadPredictor:
    def __init__(self, layout: MoeLayout, depth: int):
        self.depth = depth
        self.num_experts = layout.num_experts
        self.targets = []  # per MoE layer: (router, norm) pairs, or None if the layer cannot be predicted
        for layer in layout.layers:
            router, norm = _router(layer.block), _pre_router_norm(layer.decoder_layer)
            self.targets.append((router, norm) if router is not None and norm is not None else None)

    def predict(self, position: int, hidden: torch.Tensor) -> torch.Tensor:
        """Mask [depth, E] (int32, 1 = predicted) of the experts of MoE layers position+1..position+depth.

        A row for a layer past the last one, or one without a usable router, is all zeros.
        """
        hidden = hidden.reshape(-1, hidden.shape[-1])
        masks = torch.zeros((self.depth, self.num_experts), dtype=torch.int32, device=hidden.device)
        for d in range(self.depth):
            target = position + 1 + d
            if target >= len(self.targets) or self.targets[target] is None:
                continue
            router, norm = self.targets[target]
            out = router(norm(hidden))
            indices = out[-1] if isinstance(out, tuple) else out
            masks[d].index_fill_(0, indices.reshape(-1).to(torch.int64), 1)
        return masks

    def predict_into(self, position: int, hidden: torch.Tensor, out: torch.Tensor, gate=None) -> None:
        """The device path's form: out[d] (int64 [top_k]) = the experts predicted for MoE layer
        position + 1 + d, -1 where that layer cannot be predicted or where gate[d] <= 0 (its prefetch is
        off: the modules still run, their ids are dropped); one decode token."""
        hidden = hidden.reshape(-1, hidden.shape[-1])
        for d in range(out.shape[0]):
            target = position + 1 + d
            if target >= len(self.targets) or self.targets[target] is None:
                out[d].fill_(-1)
                continue
            router, norm = self.targets[target]
            result = router(norm(hidden))
            indices = result[-1] if isinstance(result, tuple) else result
            ids = indices.reshape(-1)[: out.shape[1]]
            out[d].copy_(ids if gate is None else torch.where(gate[d] > 0, ids, -1))
