"""Swap transformers' softmax top-k routers to the one-launch kernel (`ops.route_top_k`) for decode steps.

Which routers qualify is decided by what they compute, not by their class name: a module with a 2-D
`weight` [experts, hidden], an integer `top_k` and no score-correction bias, whose own forward returns
exactly `ops.route_top_k_reference` (with or without renormalising the k weights) on a probe input, on
the engine's device and dtype. Qwen3-VL-MoE's, Qwen3-MoE's and OLMoE's routers pass; GLM-4.5V's
(sigmoid scores, a correction bias and expert groups) fails and stays as it is. A swapped router runs
the kernel for steps of up to `ops.ROUTE_MAX_TOKENS` tokens (decode) and its class's forward beyond
(prefill). The swap sets an instance `forward`, so the module, its parameters and its state dict are
unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .. import ops
from . import kernel_wanted


def softmax_top_k_form(module: nn.Module) -> bool | None:
    """Does this module's forward compute `ops.route_top_k_reference`? None if not; else whether it
    renormalises the top-k weights (checked on a probe, both ways)."""
    weight, top_k = getattr(module, "weight", None), getattr(module, "top_k", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.device.type == "meta" \
            or not isinstance(top_k, int) or not 0 < top_k <= weight.shape[0] \
            or getattr(module, "bias", None) is not None or hasattr(module, "e_score_correction_bias"):
        return None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(3, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            out = type(module).forward(module, probe)
            if not (isinstance(out, tuple) and len(out) == 3):
                return None
            for renormalize in (True, False):
                want = ops.route_top_k_reference(probe, weight, top_k, renormalize)
                if all(torch.equal(a, b) for a, b in zip(out, want)):
                    return renormalize
    except Exception:  # noqa: BLE001 - a forward that cannot take [3, H] is not this router
        return None
    return None


def _fused_forward(self, hidden_states: torch.Tensor):
    x = hidden_states.reshape(-1, self.weight.shape[1])
    if x.shape[0] > ops.ROUTE_MAX_TOKENS:
        return type(self).forward(self, hidden_states)
    return ops.route_top_k(x, self.weight, self.top_k, self.fused_router_renormalize, kernel=True,
                           scratch=self.fused_router_scratch)


def fuse_routers(model: nn.Module, device: torch.device, setting: str) -> int:
    """Swap every qualifying router of `model` to the fused kernel (undoing an earlier swap first, so that
    a reconfigure can switch back); returns how many run it now.

    setting: "torch" swaps none; "auto" swaps where the kernel runs on `device` (CUDA, triton, a kernel
    that matched its twin there); "fused" also swaps, and raises ConfigError where it cannot run."""
    usable = kernel_wanted("router_kernel", setting, ops.route_kernel_usable, device)
    swapped = 0
    for module in model.modules():
        if hasattr(module, "fused_router_renormalize"):  # swapped before: back to the class's forward
            del module.forward, module.fused_router_renormalize, module.fused_router_scratch
        if not usable or "forward" in vars(module):
            continue
        renormalize = softmax_top_k_form(module)
        if renormalize is not None:
            module.fused_router_renormalize = renormalize
            # Each router owns its kernel scratch: a captured decode step replays with these buffers.
            module.fused_router_scratch = ops.predict_workspace(ops.ROUTE_MAX_TOKENS, module.weight.shape[0],
                                                                module.weight.device)
            module.forward = types.MethodType(_fused_forward, module)
            swapped += 1
    return swapped
