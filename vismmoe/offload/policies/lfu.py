"""Least frequently used: evict the expert with the fewest layer calls so far, ties by recency.

Counts are kept per (layer, expert), not per slot, and survive eviction: an expert that was popular,
evicted and reloaded keeps its history instead of restarting at 1 (the classic in-cache LFU flaw
that makes every newcomer the next victim). A count is +1 per layer call that used the expert, not
per token, so a long prefill does not outweigh decode. Counts never decay (see LFRU for that).

As every policy, a setting of the one score in offload/core.py (which the host core, the torch
device reference and the fused kernel all evaluate); ties by (least recently used, lowest slot).
"""

from __future__ import annotations

from .base import Policy


def make() -> Policy:
    return Policy("lfu")  # counts grow by exactly 1 per use (no decay)
