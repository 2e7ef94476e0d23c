"""Optional xformers attention backend, registered with transformers' AttentionInterface.

torch SDPA is the default. With `attn_implementation: xformers` and the xformers package installed,
attention runs through `xformers.ops.memory_efficient_attention`; without the package, loading
stops with a ConfigError that says how to install it.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

NAME = "vismmoe_xformers"


def _aligned_bias(mask: torch.Tensor, shape, dtype) -> torch.Tensor:
    # xformers wants an additive bias whose last dimension is stored with a stride multiple of 8.
    batch, heads, queries, keys = shape
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    padded = torch.empty((batch, heads, queries, (keys + 7) // 8 * 8), dtype=dtype, device=mask.device)
    bias = padded[..., :keys]
    bias.copy_(mask[..., :keys].expand(batch, heads, queries, keys))
    return bias


def xformers_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                               is_causal=None, **kwargs):
    """Same contract as transformers' sdpa_attention_forward: [B, H, S, D] in, ([B, S, H, D], None) out."""
    import xformers.ops as xops

    repeats = query.shape[1] // key.shape[1]  # grouped-query attention: expand the key/value heads
    if repeats > 1:
        key, value = key.repeat_interleave(repeats, dim=1), value.repeat_interleave(repeats, dim=1)
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # xformers layout: [B, S, H, D]
    if attention_mask is not None:
        bias = _aligned_bias(attention_mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]), q.dtype)
    elif is_causal and q.shape[1] > 1:
        # transformers drops the mask only where SDPA's is_causal (aligned top-left) is exact.
        bias = xops.LowerTriangularMask()
    else:
        bias = None
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, p=dropout if module.training else 0.0,
                                          scale=scaling)
    return out, None


def register_xformers() -> str:
    """Register the backend; returns the name to pass as attn_implementation."""
    try:
        import xformers.ops  # noqa: F401
    except ImportError:
        raise ConfigError(
            "attn_implementation: xformers needs the xformers package (pip install 'vismmoe[xformers]'); "
            "or use the default, sdpa"
        ) from None
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, xformers_attention_forward)
    # Masks as for SDPA (boolean, or None where a plain causal mask suffices): without a registered mask
    # function transformers passes no mask at all to a custom backend, which is wrong for padded or
    # static KV caches.
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
