"""LFRU: frequency with exponential decay, so recency and frequency both count (LRFU-style).

score(slot) = decayed count of layer calls that used its expert, with a half-life of `half_life`
calls of the expert's own layer (forward steps). Each use adds 1 at the time it happens; the sum
halves every `half_life` calls. Lowest score is evicted; ties by recency. Tiny half-lives approach
LRU, huge ones LFU. Per-layer decay keeps early layers from monopolising a global pool, the failure
vLLM's LFRU expert cache (PR #37190) was made for.

As every policy, a setting of the one score in offload/core.py (which the host core, the torch
device reference and the fused kernel all evaluate); ties by (least recently used, lowest slot).
"""

from __future__ import annotations

from .base import Policy


DEFAULT_HALF_LIFE = 8.0  # forward steps


def make(half_life: float = DEFAULT_HALF_LIFE) -> Policy:
    return Policy("lfru", half_life=half_life)
