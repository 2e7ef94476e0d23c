"""Put the one-launch rotary kernel (`ops.rotary`) where a model's modeling module applies transformers'
`apply_rotary_pos_emb` to a decode step's queries and keys.

The attention modules call that function by its global name in their modeling module, so the swap
replaces the name there with a dispatcher: the kernel for CUDA decode steps on a device where fused
rotary is on (`rope_kernel`), transformers' own function for everything else (prefill, CPU, other
shapes). A module's function is replaced only after it computed `ops.rotary_reference` bit for bit on a
probe; GLM-4.5V's partial multimodal rotary is another function and stays as it is. Because the kernel
equals transformers' function bit for bit (checked once per device against the twin), the swap changes
speed, not results; it is process-wide per device, so the last engine loaded or reconfigured on a
device decides for every engine there.
"""

from __future__ import annotations

import functools
import sys

import torch
from torch import nn

from .. import ops
from . import kernel_wanted

NAME = "apply_rotary_pos_emb"
_FUSED_DEVICES: set[str] = set()  # devices ("cuda:N") whose decode steps take the kernel


def _key(device: torch.device) -> str:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"{device.type}:{index}"


def _dispatcher(original):
    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, *args, **kwargs):
        unsqueeze_dim = kwargs.get("unsqueeze_dim", args[0] if args else 1)
        if len(args) + len(kwargs) <= 1 and isinstance(q, torch.Tensor) and q.is_cuda and str(q.device) in _FUSED_DEVICES \
                and ops.rotary_fits(q, k, cos, sin, unsqueeze_dim):
            return ops.rotary(q, k, cos, sin, kernel=True)
        return original(q, k, cos, sin, *args, **kwargs)

    apply_rotary_pos_emb.vismmoe_original = original
    return apply_rotary_pos_emb


def computes_rotary(fn, device: torch.device, dtype: torch.dtype) -> bool:
    """Does `fn(q, k, cos, sin)` compute `ops.rotary_reference` exactly (checked on a probe)?"""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 3, 2, 8, generator=gen) * 2).to(device, dtype), torch.randn(1, 2, 2, 8, generator=gen).to(device, dtype)
    cos, sin = torch.randn(1, 2, 8, generator=gen).to(device, dtype), torch.randn(1, 2, 8, generator=gen).to(device, dtype)
    try:
        with torch.no_grad():
            got = fn(q, k, cos, sin)
            return all(torch.equal(a, b) for a, b in zip(got, ops.rotary_reference(q, k, cos, sin), strict=True))
    except Exception:  # noqa: BLE001 - another signature or arithmetic: not this function
        return False


def fuse_rotary(model: nn.Module, device: torch.device, dtype: torch.dtype, setting: str) -> int:
    """Dispatch the rotary embedding of `model`'s decode steps to the kernel on `device` (setting "auto" or
    "fused"), or back to transformers' function ("torch"); returns how many modeling modules dispatch
    (0: the kernel does not serve this model here). "fused" raises ConfigError where it cannot run."""
    usable = kernel_wanted("rope_kernel", setting, ops.rotary_usable, device)
    modules = {type(m).__module__ for m in model.modules()}
    dispatching = 0
    for name in sorted(modules):
        module = sys.modules.get(name)
        fn = getattr(module, NAME, None)
        if not callable(fn):
            continue
        if not hasattr(fn, "vismmoe_original"):
            if not usable or not computes_rotary(fn, device, dtype):
                continue
            setattr(module, NAME, _dispatcher(fn))
        dispatching += 1
    if device.type == "cuda":
        (_FUSED_DEVICES.add if usable and dispatching else _FUSED_DEVICES.discard)(_key(device))
    return dispatching if usable else 0
