"""Affinity-aware: separate visual and text use statistics, weighted by the request's modality mix.

Visual and text tokens of a VL-MoE route to different experts (visual-expert affinity), so one
frequency count mixes two populations. This policy keeps two decayed counts per (layer, expert),
as LFRU does (+1 per layer call, halving every `half_life` calls of that layer):
  f_vis[l, e]  for calls where at least one visual token used the expert,
  f_txt[l, e]  for calls where at least one text token used it (no modality info counts as text),
and scores a resident expert by the current request's mix:
  score(slot) = (a_vis * f_vis[l, e] + a_txt * f_txt[l, e]) / weight[l]
  a_vis = (V + 1) / (V + T + 2),  a_txt = (T + 1) / (V + T + 2)
where V, T are the visual / text token-expert pairs this request has routed so far (reset per
request; Laplace prior so a fresh request weighs both evenly). A prefill rich in image tokens keeps
visual experts; as decode emits text tokens the weight shifts to text experts. Lowest score is
evicted, ties by recency.

As every policy, a setting of the one score in offload/core.py (which the host core, the torch
device reference and the fused kernel all evaluate); ties by (least recently used, lowest slot).
"""

from __future__ import annotations

from .base import Policy


DEFAULT_HALF_LIFE = 8.0  # forward steps


def make(half_life: float = DEFAULT_HALF_LIFE) -> Policy:
    return Policy("affinity", half_life=half_life, modal=True)
