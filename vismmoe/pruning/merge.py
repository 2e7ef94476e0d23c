"""visual_merge: fold each pruned visual token into its most similar kept token instead of dropping it."""

from __future__ import annotations

import torch

from .methods import unit


def merge_assignment(embeds: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """[N] slot in `kept` of each visual token: itself for kept tokens, else the kept token of highest
    cosine similarity (one [N, k] product)."""
    points = unit(embeds)
    assign = (points @ points[kept].T).argmax(-1)
    assign[kept] = torch.arange(len(kept), device=assign.device)
    return assign


def merge_rows(rows: torch.Tensor, assign: torch.Tensor, k: int) -> torch.Tensor:
    """[k, D]: the mean of the rows assigned to each slot (computed in float32, returned in rows' dtype)."""
    sums = torch.zeros((k, rows.shape[-1]), dtype=torch.float32, device=rows.device)
    sums.index_add_(0, assign.to(rows.device), rows.float())
    counts = torch.bincount(assign.to(rows.device), minlength=k).clamp(min=1).unsqueeze(1)
    return (sums / counts).to(rows.dtype)
