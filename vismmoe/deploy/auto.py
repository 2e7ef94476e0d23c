"""`expert_budget: auto`: size the GPU expert cache for the machine the engine is loading on."""

from __future__ import annotations

from pathlib import Path

import torch

from .model_info import model_info
from .planner import fit_budget_bytes


def auto_budget_bytes(model_dir: Path, device: torch.device, dtype: torch.dtype, config) -> int:
    """The largest expert budget that fits free memory now next to the planner's other parts
    (deploy/memory.py: non-expert weights, a KV cache for one 448 px image, a 64-token question in the
    chat template and max_new_tokens, the prefill's activations, graph pool, cuBLAS workspaces, ...). On a
    unified-memory GPU or the CPU, a non-mmap store lives in the same memory and is counted too."""
    from .probe import _meminfo

    info = model_info(model_dir)
    name = str(dtype).replace("torch.", "")
    capability = "9.0"
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        available = free - int(0.05 * total)  # allocator slack and fragmentation
        props = torch.cuda.get_device_properties(device)
        shared = getattr(props, "is_integrated", False)
        capability = f"{props.major}.{props.minor}"
    else:
        available = _meminfo()[1] - 2**30  # keep 1 GiB for everything else on the machine
        shared = True
    return fit_budget_bytes(info, name, available, shared and config.store != "mmap", config.max_new_tokens,
                            gpu=device.type == "cuda", compute_capability=capability, store=config.store,
                            unified=bool(shared))
