"""The routed experts' arithmetic, from weights that sit in the cache's slot pool.

Both decode paths (host-decided, offload/host_path.py; device-decided, offload/device_path.py) end
here once every expert of the layer call has a slot: one op over the slot pool (the fused decode
kernel for steps of <= ops.FUSED_MAX_TOKENS tokens, grouped GEMMs otherwise), or expert by expert in
transformers' eager order when neither runs on this device.

Misses served in place (the zero-copy and CPU miss paths, offload/miss_paths.py) have negative slot
ids, -r-1 = row r of the host store's slab (`host` = its (gate_up, down) views): the fused kernel and
the loop read those rows where they are; grouped GEMMs cannot (the miss paths then keep copies). The
loop also takes experts computed elsewhere (`external`: the CPU miss path's results), added in the
same order, so its sums are the copy path's.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import ops


class ExpertCompute:
    def __init__(self, is_transposed: bool, grouped: bool = False, fused_decode: bool = False):
        self.is_transposed = is_transposed
        self.grouped = grouped  # grouped GEMMs over the slot pool (ops.experts_from_slots)
        self.fused_decode = fused_decode  # steps of <= ops.FUSED_MAX_TOKENS tokens run ops.fused_moe_decode

    def from_slots(self, num_tokens: int) -> bool:
        """Compute from the slot pool in one op (`run`) rather than expert by expert."""
        return self.grouped or self.fused_for(num_tokens)

    def fused_for(self, num_tokens: int) -> bool:
        """Does a step of `num_tokens` run the fused decode kernel (which also reads host rows)?"""
        return self.fused_decode and num_tokens <= ops.FUSED_MAX_TOKENS

    def reads_host(self, num_tokens: int) -> bool:
        """Can a step of `num_tokens` read in-place misses (negative slot ids): the fused kernel or the loop."""
        return self.fused_for(num_tokens) or not self.grouped

    def run(self, module, hidden_states, top_k_weights, slot_ids, gate_up, down, host=None, install=None):
        """The routed experts' output from their slots: the fused kernel for decode-sized steps, else grouped
        GEMMs. `host`: the slab's (gate_up, down) views, for slot ids -r-1 and for `install` = (fill, src),
        a copy list the fused kernel executes as it reads (fused kernel only)."""
        if self.fused_for(hidden_states.shape[0]):
            return ops.fused_moe_decode(hidden_states, top_k_weights, slot_ids, gate_up, down, self.is_transposed,
                                        host_gate_up=None if host is None else host[0],
                                        host_down=None if host is None else host[1], install=install)
        assert host is None and install is None, "grouped GEMMs read only the slot pool"
        return ops.experts_from_slots(hidden_states, top_k_weights, slot_ids, gate_up, down, module._apply_gate,
                                      self.is_transposed)

    def loop(self, module, hidden, top_k_index, top_k_weights, slot_ids, gate_up, down, host=None, external=None):
        """One expert at a time, in transformers' eager order (experts ascending, pairs by (k, token)), so
        the arithmetic is the reference's; weights come from the slots in `slot_ids` (-r-1: row r of the
        `host` views). `external`: {expert: weighted output rows [tokens, H] on any device} computed
        elsewhere (the CPU miss path), added in its turn instead of being computed here."""
        out = torch.zeros_like(hidden)
        by_k = top_k_index.t()
        slots_by_k = slot_ids.t()
        for expert in torch.unique(top_k_index).tolist():
            pos, tokens = torch.where(by_k == expert)
            if external is not None and expert in external:
                out.index_add_(0, tokens, external[expert].to(out.device, out.dtype))
                continue
            slot = int(slots_by_k[pos[0], tokens[0]])
            if slot >= 0:
                w_gate_up, w_down = gate_up[slot], down[slot]
            elif host is not None:
                w_gate_up, w_down = host[0][-slot - 1].to(hidden.device), host[1][-slot - 1].to(hidden.device)
            else:
                raise RuntimeError(f"expert {expert} has no slot and no host row to read it from")
            out.index_add_(0, tokens, expert_output(module, hidden[tokens], w_gate_up, w_down,
                                                    top_k_weights[tokens, pos, None], self.is_transposed))
        return out


def expert_output(module, x, gate_up, down, weights, is_transposed: bool) -> torch.Tensor:
    """One expert's routing-weighted output rows, transformers' eager arithmetic (the loop's and the CPU
    miss path's: the same ops on the same device give the same bits)."""
    h = matmul(x, gate_up, is_transposed)
    h = matmul(module._apply_gate(h), down, is_transposed)
    return (h * weights).to(x.dtype)


def matmul(x: torch.Tensor, w: torch.Tensor, transposed: bool) -> torch.Tensor:
    # transformers' default layout is nn.Linear's ([out, in]); "transposed" families store [in, out].
    return x @ w if transposed else F.linear(x, w)
