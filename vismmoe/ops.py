"""Expert compute from cache slots: each fast op beside the plain torch reference it must match.

`experts_from_slots` runs every (token, expert) pair of a layer in two grouped GEMMs over the whole
slot pool (`torch.nn.functional.grouped_mm`, the op transformers' own `grouped_mm` experts use), with
the per-pair slot ids looked up on the device: no per-expert Python loop, no host sync, a fixed
number of launches per layer. `experts_from_slots_reference` computes the same thing pair by pair.
"""

from __future__ import annotations

import torch


# torch's grouped_mm handles at most this many groups (weight matrices) per call.
MAX_GROUPS = 1024


def grouped_mm_available(device: torch.device, dtype: torch.dtype) -> bool:
    """grouped_mm runs on CUDA (sm90 kernels) in bfloat16; elsewhere the per-expert loop is used."""
    return (
        device.type == "cuda" and dtype == torch.bfloat16
        and (hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm"))
    )


def _grouped_mm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    fn = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm
    return fn(x, w, offs=offsets)


def experts_from_slots(hidden, top_k_weights, slot_ids, gate_up, down, apply_gate, is_transposed=False):
    """out[t] = sum_j w[t, j] * down_s(apply_gate(gate_up_s(x[t]))) with s = slot_ids[t, j].

    hidden [T, H]; top_k_weights, slot_ids [T, k]; gate_up [S, 2I, H] and down [S, H, I] (or their
    transposes when `is_transposed`), views of the slot pool. Pairs are sorted by slot, each slot's
    rows multiply its weights in one grouped GEMM, and the weighted rows are summed per token in a
    fixed order (deterministic, as transformers' grouped_mm path does).
    """
    num_tokens, top_k = slot_ids.shape
    num_slots = gate_up.shape[0]
    slot_sorted, perm = torch.sort(slot_ids.reshape(-1))
    x = hidden[perm // top_k]
    # histc, not bincount: its output size does not depend on the data (no sync, graph-capturable).
    # CUDA histc takes integers; the CPU one only floats.
    binned = slot_sorted.int() if slot_sorted.is_cuda else slot_sorted.float()
    counts = torch.histc(binned, bins=num_slots, min=0, max=num_slots - 1)
    offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
    h = _grouped_mm(x, gate_up if is_transposed else gate_up.transpose(-2, -1), offsets)
    h = apply_gate(h)
    h = _grouped_mm(h, down if is_transposed else down.transpose(-2, -1), offsets)
    h = h * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    out = h[inverse].view(num_tokens, top_k, -1).sum(dim=1)
    return out.to(hidden.dtype)


def experts_from_slots_reference(hidden, top_k_weights, slot_ids, gate_up, down, apply_gate, is_transposed=False):
    """The same computation, one (token, expert) pair at a time."""
    num_tokens, top_k = slot_ids.shape
    rows = []
    for t in range(num_tokens):
        acc = []
        for j in range(top_k):
            s = int(slot_ids[t, j])
            x = hidden[t : t + 1]
            h = x @ gate_up[s] if is_transposed else x @ gate_up[s].t()
            h = apply_gate(h)
            h = h @ down[s] if is_transposed else h @ down[s].t()
            acc.append(h * top_k_weights[t, j])
        rows.append(torch.cat(acc).sum(dim=0, keepdim=True))
    return torch.cat(rows).to(hidden.dtype)
