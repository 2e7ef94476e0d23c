"""One Triton launch per static decode step: `prefetch: auto`'s decision as device scalars.

At the start of each captured decode step: step += 1; where a decision falls due, the per-layer
rule (`offload.autoprefetch.fold`, the same source compiled by Triton) folds the period's prefetch
counts, decode misses and true positives from the cache state's pf and misses counters and the
prediction ledger's; then the prefetch limits the step's kernels read become base where the layer is
on, 0 where it is off, and (where given) the count of the limits a lookahead acts on that are on: the
static decoder reads it back with the step's token to choose its next captured step. One program over all layers (L <= MAX_LAYERS). Its torch twin is `offload.autoprefetch.tick_torch`; the op is `ops.prefetch_gate`.
"""

from __future__ import annotations

import types

import torch
import triton
import triton.language as tl

from ..offload import autoprefetch as ap

MAX_LAYERS = 4096

fold = triton.jit(types.FunctionType(ap.fold.__code__, {"tl": tl, "triton": triton, "__name__": __name__}, "fold"))
# The state's rows, as the kernel's compile-time constants.
(USED, ISSUED, STEPS, ON, DEMAND, DEMAND_STEPS, ON_DEMAND, LAST_USED, LAST_ISSUED, LAST_MISSED, LAST_TRUE,
 ON_STEPS) = (tl.constexpr(getattr(ap, name)) for name in
              ("USED", "ISSUED", "STEPS", "ON", "DEMAND", "DEMAND_STEPS", "ON_DEMAND", "LAST_USED", "LAST_ISSUED",
               "LAST_MISSED", "LAST_TRUE", "ON_STEPS"))
COPY_S, PREDICT_S, WRONG_COST, DECAY_P, PERIOD_P = (
    tl.constexpr(getattr(ap, name)) for name in ("COPY_S", "PREDICT_S", "WRONG_COST", "DECAY_P", "PERIOD_P"))


@triton.jit
def _gate_kernel(state_p, step_p, params_p, pf_p, missed_p, true_p, base_p, limits_p, count_p, L, D, PF_STRIDE, TD,
                 TRUE_STRIDE, HAS_COUNT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_TD: tl.constexpr):
    offs = tl.arange(0, BLOCK_L)
    in_l = offs < L
    step = tl.load(step_p) + 1
    tl.store(step_p, step)
    period = tl.load(params_p + PERIOD_P)
    due = (step > 1) & ((step - 1) % period.to(tl.int64) == 0)
    used = tl.load(state_p + USED * L + offs, mask=in_l, other=0.0)
    issued = tl.load(state_p + ISSUED * L + offs, mask=in_l, other=0.0)
    steps = tl.load(state_p + STEPS * L + offs, mask=in_l, other=0.0)
    on = tl.load(state_p + ON * L + offs, mask=in_l, other=0.0)
    demand = tl.load(state_p + DEMAND * L + offs, mask=in_l, other=0.0)
    demand_steps = tl.load(state_p + DEMAND_STEPS * L + offs, mask=in_l, other=0.0)
    on_demand = tl.load(state_p + ON_DEMAND * L + offs, mask=in_l, other=0.0)
    last_used = tl.load(state_p + LAST_USED * L + offs, mask=in_l, other=0.0)
    last_issued = tl.load(state_p + LAST_ISSUED * L + offs, mask=in_l, other=0.0)
    last_missed = tl.load(state_p + LAST_MISSED * L + offs, mask=in_l, other=0.0)
    last_true = tl.load(state_p + LAST_TRUE * L + offs, mask=in_l, other=0.0)
    on_steps = tl.load(state_p + ON_STEPS * L + offs, mask=in_l, other=0.0)
    now_issued = tl.load(pf_p + offs, mask=in_l, other=0).to(tl.float64)
    now_used = tl.load(pf_p + PF_STRIDE + offs, mask=in_l, other=0).to(tl.float64)
    now_missed = tl.load(missed_p + offs, mask=in_l, other=0).to(tl.float64)
    rows_t = tl.arange(0, BLOCK_TD)
    in_t = (rows_t[:, None] < TD) & in_l[None, :]
    now_true = tl.sum(tl.load(true_p + rows_t[:, None] * TRUE_STRIDE + offs[None, :], mask=in_t, other=0), axis=0)
    now_true = now_true.to(tl.float64)
    n_used, n_issued, n_steps, n_on, n_demand, n_demand_steps, n_on_demand = fold(
        used, issued, steps, on, demand, demand_steps, on_demand, now_used - last_used, now_issued - last_issued,
        now_missed - last_missed, now_true - last_true, tl.load(params_p + COPY_S), tl.load(params_p + PREDICT_S),
        tl.load(params_p + WRONG_COST), tl.load(params_p + DECAY_P), period)
    tl.store(state_p + USED * L + offs, tl.where(due, n_used, used), mask=in_l)
    tl.store(state_p + ISSUED * L + offs, tl.where(due, n_issued, issued), mask=in_l)
    tl.store(state_p + STEPS * L + offs, tl.where(due, n_steps, steps), mask=in_l)
    on = tl.where(due, n_on, on)
    tl.store(state_p + ON * L + offs, on, mask=in_l)
    tl.store(state_p + DEMAND * L + offs, tl.where(due, n_demand, demand), mask=in_l)
    tl.store(state_p + DEMAND_STEPS * L + offs, tl.where(due, n_demand_steps, demand_steps), mask=in_l)
    tl.store(state_p + ON_DEMAND * L + offs, tl.where(due, n_on_demand, on_demand), mask=in_l)
    tl.store(state_p + LAST_USED * L + offs, tl.where(due, now_used, last_used), mask=in_l)
    tl.store(state_p + LAST_ISSUED * L + offs, tl.where(due, now_issued, last_issued), mask=in_l)
    tl.store(state_p + LAST_MISSED * L + offs, tl.where(due, now_missed, last_missed), mask=in_l)
    tl.store(state_p + LAST_TRUE * L + offs, tl.where(due, now_true, last_true), mask=in_l)
    tl.store(state_p + ON_STEPS * L + offs, on_steps + on, mask=in_l)
    offs_d = tl.arange(0, BLOCK_D)
    cell = offs[:, None] * D + offs_d[None, :]
    in_c = in_l[:, None] & (offs_d[None, :] < D)
    base = tl.load(base_p + cell, mask=in_c, other=0)
    limits = tl.where(on[:, None] > 0.5, base, 0)
    tl.store(limits_p + cell, limits, mask=in_c)
    if HAS_COUNT:  # autoprefetch.limits_on: the cells a lookahead acts on (target layer > distance - 1)
        acts = in_c & (limits > 0) & (offs[:, None] > offs_d[None, :])
        tl.store(count_p, tl.sum(tl.sum(acts.to(tl.int64), axis=1), axis=0))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def prefetch_gate(state: torch.Tensor, step: torch.Tensor, params: torch.Tensor, pf: torch.Tensor,
                  missed: torch.Tensor, true_pos: torch.Tensor, base: torch.Tensor, limits: torch.Tensor,
                  count: torch.Tensor | None = None) -> None:
    """See `offload.autoprefetch.tick_torch` (same arguments, same effect). All contiguous; pf [>= 2, P]
    and true_pos [TD, L] with contiguous rows; missed [>= L]; count: one int64 element, or None."""
    L, D = base.shape
    if L > MAX_LAYERS or state.shape != (ap.ROWS, L):
        raise ValueError(f"prefetch_gate wants state [{ap.ROWS}, L <= {MAX_LAYERS}] for base [L, D]; "
                         f"got {tuple(state.shape)} and {tuple(base.shape)}")
    extra = {} if state.device.type != "cuda" else {"enable_fp_fusion": False}  # round as numpy and torch do
    if true_pos.shape[1] != L or true_pos.stride(1) != 1:
        raise ValueError(f"prefetch_gate wants true_pos [depth, {L}] with contiguous rows; got {tuple(true_pos.shape)}")
    _gate_kernel[(1,)](state, step, params, pf, missed, true_pos, base, limits, step if count is None else count, L, D,
                       pf.stride(0), true_pos.shape[0], true_pos.stride(0), HAS_COUNT=count is not None,
                       BLOCK_L=_next_pow2(max(L, 16)), BLOCK_D=_next_pow2(max(D, 1)),
                       BLOCK_TD=_next_pow2(max(true_pos.shape[0], 1)), num_warps=1, **extra)
