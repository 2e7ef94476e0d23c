"""Least recently used: evict the slot whose expert was used longest ago.

As every policy, a setting of the one score in offload/core.py (which the host core, the torch
device reference and the fused kernel all evaluate); ties by (least recently used, lowest slot).
"""

from __future__ import annotations

from .base import Policy


def make() -> Policy:
    return Policy("lru", counting=False)  # every score is 0: the key's last use decides
