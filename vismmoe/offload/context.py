"""The state of the forward step being run, with one owner: the decode loop.

As in nano-vllm's `Context`: a tiny object that the decode loop sets at the start of every forward
step (transformers' `generate` through the step hook in generate_decode.py, the static decoder in
static_decode.py) and resets at the end of a request; the MoE layers and the lookahead hook only get
it. Each step gets a fresh `StepContext`, so nothing of one step's predictions leaks into the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepContext:
    index: int = -1  # 0 = prefill, then one per decode step (static steps keep the prefill's)
    visual_mask: torch.Tensor | None = None  # [T] bool: which tokens of this step are visual
    predictions: dict = field(default_factory=dict)  # host path: layer -> device mask [depth, E] made entering it


class Context:
    """The current step's context (one per runtime, so that engines in one process stay apart)."""

    def __init__(self):
        self._step = StepContext()

    def set(self, index: int, visual_mask: torch.Tensor | None = None) -> StepContext:
        self._step = StepContext(index, visual_mask)
        return self._step

    def get(self) -> StepContext:
        return self._step

    def reset(self) -> None:
        self._step = StepContext()
