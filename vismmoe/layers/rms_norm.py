"""Swap transformers' RMSNorm modules to the one-launch kernel (`ops.rms_norm`), where it is the same math.

Which modules qualify is decided by what they compute, not by their class name: a module with a 1-D
`weight` and an epsilon (`variance_epsilon` or `eps`) whose own forward equals `ops.rms_norm_reference`
bit for bit on a probe input, on the engine's device and dtype. Variants with other arithmetic (Gemma's
`1 + weight`, a weight applied before the cast, LayerNorm) fail the probe and stay as they are. The swap
sets an instance `forward`, so the module, its parameters and its state dict are unchanged.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .. import ops
from . import kernel_wanted


def _epsilon(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float) and not isinstance(value, bool):
            return value
    return None


def computes_rms_norm(module: nn.Module) -> bool:
    """Does this module's forward compute `ops.rms_norm_reference` exactly (checked on a probe)?"""
    weight, eps = getattr(module, "weight", None), _epsilon(module)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or eps is None or weight.device.type == "meta":
        return False
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randn(3, weight.shape[0], generator=gen) * 2).to(weight.device, weight.dtype)
    try:
        with torch.no_grad():
            return torch.equal(module(probe), ops.rms_norm_reference(probe, weight, eps))
    except Exception:  # noqa: BLE001 - a forward that cannot take [3, H] is not this norm
        return False


def _fused_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return ops.rms_norm(hidden_states, self.weight, self.fused_norm_eps)


def fuse_rms_norms(model: nn.Module, device: torch.device, setting: str) -> int:
    """Swap every qualifying RMSNorm module of `model` to the fused kernel (undoing an earlier swap first,
    so that a reconfigure can switch back); returns how many run it now.

    setting: "torch" swaps none; "auto" swaps where the kernel runs on `device` (CUDA, triton, a kernel
    that matched its twin there); "fused" also swaps, and raises ConfigError where it cannot run."""
    usable = kernel_wanted("norm_kernel", setting, ops.rms_norm_usable, device)
    swapped = 0
    for module in model.modules():
        if hasattr(module, "fused_norm_eps"):  # swapped before: back to the class's forward
            del module.forward, module.fused_norm_eps
        if usable and "forward" not in vars(module) and computes_rms_norm(module):
            module.fused_norm_eps = _epsilon(module)
            module.forward = types.MethodType(_fused_forward, module)
            swapped += 1
    return swapped
