"""Model families: how vismmoe finds the MoE layers of a transformers model and its checkpoint.

transformers 5 gives every modern MoE the same shape (a router `gate`, an `experts` module with fused
3-D `gate_up_proj`/`down_proj` parameters decorated with `use_experts_implementation`), so discovery
is generic. The families verified end to end against transformers are README's "Supported models"
(tests/test_families.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ModelLoadError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class MoeLayer:
    position: int  # index among MoE layers, in execution order: the cache's layer id
    decoder_index: int  # index of the decoder layer that holds it
    name: str  # module path of the experts module
    experts: nn.Module
    block: nn.Module  # the sparse MoE block (parent of experts): holds the router
    decoder_layer: nn.Module


@dataclass
class MoeLayout:
    model_type: str
    layers: list[MoeLayer]
    num_experts: int
    top_k: int
    hidden_size: int
    gate_up_shape: tuple[int, int]  # one expert's gate_up block, as the model holds it
    down_shape: tuple[int, int]
    is_transposed: bool
    dtype: torch.dtype

    @property
    def record_numel(self) -> int:
        return self.gate_up_shape[0] * self.gate_up_shape[1] + self.down_shape[0] * self.down_shape[1]


def _is_experts_module(module: nn.Module) -> bool:
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3 and down.dim() == 3 and hasattr(module, "is_transposed")
    )


def discover(model: nn.Module) -> MoeLayout:
    """Find every routed-experts module of `model` (built from its config, weights not needed)."""
    modules = dict(model.named_modules())
    found = []
    for name, module in modules.items():
        if not _is_experts_module(module):
            continue
        match = None
        for match in _LAYER_RE.finditer(name):
            pass
        if match is None:
            raise ModelLoadError(f"cannot tell which decoder layer the experts module {name!r} belongs to")
        parent_name = name.rsplit(".", 1)[0]
        decoder_name = name[: match.end() - 1]
        found.append((int(match.group(1)), name, module, modules[parent_name], modules[decoder_name]))
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if not found:
        raise ModelLoadError(
            f"{model_type!r} is a dense model: it has no routed MoE experts for vismmoe to offload. "
            "Run it with transformers directly, or pick a Mixture-of-Experts checkpoint."
        )
    found.sort(key=lambda item: item[0])
    first = found[0][2]
    if getattr(first, "has_bias", False) or not getattr(first, "is_concatenated", True):
        raise ModelLoadError(
            f"{model_type!r} uses experts with biases or split gate/up projections (gpt-oss style), "
            "which vismmoe does not support yet"
        )
    text_cfg = model.config.get_text_config()
    top_k = int(getattr(text_cfg, "num_experts_per_tok", 0) or getattr(text_cfg, "moe_topk", 0))
    if top_k <= 0:
        raise ModelLoadError(f"cannot read the number of experts per token (num_experts_per_tok) of {model_type!r}")
    layers = [
        MoeLayer(position=i, decoder_index=idx, name=name, experts=mod, block=block, decoder_layer=dec)
        for i, (idx, name, mod, block, dec) in enumerate(found)
    ]
    return MoeLayout(
        model_type=model_type,
        layers=layers,
        num_experts=int(first.gate_up_proj.shape[0]),
        top_k=top_k,
        hidden_size=int(text_cfg.hidden_size),
        gate_up_shape=tuple(first.gate_up_proj.shape[1:]),
        down_shape=tuple(first.down_proj.shape[1:]),
        is_transposed=bool(first.is_transposed),
        dtype=first.gate_up_proj.dtype,
    )


def image_token_id(config) -> int | None:
    """The id of the placeholder token that visual features replace, if the model has one."""
    for key in ("image_token_id", "image_token_index"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None
