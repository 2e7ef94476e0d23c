"""Routing in one Triton launch: router logits and top-k of one token's state, for two callers.

* Lookahead prediction (`predict_experts`, op `ops.predict_experts`, twin
  `offload.router_stack.predict_experts_reference`): for each of the next D MoE layers, that layer's
  pre-router RMSNorm of the state entering the current layer, its router's logits, and the top-k ids,
  ties to the lowest id. A softmax router's top-k of the softmax is the top-k of the logits (softmax is
  monotonic), so no softmax is computed. The roundings of the transformers modules (normalised state
  cast to the model dtype, times the norm weight in the model dtype, logits in the model dtype) are
  repeated, so the ids are those the modules would pick up to the order of the fp32 sums.
* The router of a decode step (`route_top_k`, op `ops.route_top_k`, twin `ops.route_top_k_reference`):
  for each of T tokens, logits = x @ W^T in the model dtype, softmax in fp32, the top-k of the
  probabilities (ties to the lowest id, as torch.topk's CUDA kernel fills ties in index order), the
  k probabilities renormalised to sum 1 where the router does so, cast to the model dtype. This is the
  softmax top-k router of Qwen3-VL-MoE, Qwen3-MoE and OLMoE (layers/router.py swaps it in), which in
  transformers is six launches (matmul, softmax, top-k, its sort, sum, divide) per layer and token.

The E experts of a row (a layer, or a token) are split over up to ~32 programs (a few router rows each:
a 128 x 2048 bf16 router is 512 KB, which one program streams in ~32 µs on an H200 but 32 programs in
a few): each writes its experts' logits to a scratch row, and the last program of the row to finish
(an atomic count) ranks all E of them and resets the count for the next launch.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024


@triton.jit
def _route_kernel(x_p, norm_p, router_p, ids_p, weights_p, logits_p, scratch_p, count_p, gate_p, H, E, K, eps,
                  x_stride, norm_stride, router_stride, ids_stride, weights_stride, gate_stride,
                  SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr,
                  HAS_GATE: tl.constexpr):
    r = tl.program_id(0)  # the row: a predicted layer (its norm and router) or a token (its x)
    part = tl.program_id(1)
    on = 1
    if HAS_GATE:  # a predicted layer whose prefetch is off: ids -1, its router not read, nothing counted
        on = (tl.load(gate_p + r * gate_stride) > 0).to(tl.int32)
        if (on == 0) & (part == 0):
            offs_k = tl.arange(0, BLOCK_K)
            tl.store(ids_p + r * ids_stride + offs_k, tl.full([BLOCK_K], -1, tl.int64), mask=offs_k < K)
    if on != 0:
        _route_row(x_p, norm_p, router_p, ids_p, weights_p, logits_p, scratch_p, count_p, r, part, H, E, K, eps,
                   x_stride, norm_stride, router_stride, ids_stride, weights_stride,
                   SPLIT, BLOCK_S, BLOCK_E, BLOCK_H, BLOCK_K, HAS_NORM, SOFTMAX, RENORM)


@triton.jit
def _route_row(x_p, norm_p, router_p, ids_p, weights_p, logits_p, scratch_p, count_p, r, part, H, E, K, eps,
               x_stride, norm_stride, router_stride, ids_stride, weights_stride,
               SPLIT: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr,
               BLOCK_K: tl.constexpr, HAS_NORM: tl.constexpr, SOFTMAX: tl.constexpr, RENORM: tl.constexpr):
    dtype = x_p.dtype.element_ty
    x_row = x_p + r * x_stride
    if HAS_NORM:  # the RMS of the token's state (fp32, as the norm module computes it); every program repeats it
        sq = tl.zeros([BLOCK_H], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            x = tl.load(x_row + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
            sq += x * x
        inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / H + eps)
    # -- this program's experts: logits[e] = sum_h router[e, h] * state[h], rounded where the modules round
    offs_s = part * BLOCK_S + tl.arange(0, BLOCK_S)
    in_s = offs_s < E
    acc = tl.zeros([BLOCK_S], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        state = tl.load(x_row + offs_h, mask=in_h, other=0.0).to(tl.float32)
        if HAS_NORM:
            w = tl.load(norm_p + r * norm_stride + offs_h, mask=in_h, other=0.0).to(tl.float32)
            state = (w * (state * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        tile = tl.load(router_p + r * router_stride + offs_s[:, None] * H + offs_h[None, :],
                       mask=in_s[:, None] & in_h[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * state[None, :], axis=1)
    logits = acc.to(dtype)
    if SOFTMAX:  # the router's logits are one of its outputs
        tl.store(logits_p + r * E + offs_s, logits, mask=in_s)
    tl.store(scratch_p + r * E + offs_s, logits.to(tl.float32), mask=in_s)
    # -- the last of the row's SPLIT programs ranks all E: the acq_rel count orders the others' stores
    # before its loads, which bypass L1 (.cg) so no stale line is read
    done = tl.atomic_add(count_p + r, 1, sem="acq_rel")
    if done == SPLIT - 1:
        offs_e = tl.arange(0, BLOCK_E)
        in_e = offs_e < E
        every = tl.load(scratch_p + r * E + offs_e, mask=in_e, other=float("-inf"), cache_modifier=".cg")
        if SOFTMAX:  # fp32 softmax; ranked by probability, as torch.topk of the softmax ranks
            top = tl.max(every, axis=0)
            prob = tl.where(in_e, tl.exp(every - top), 0.0)
            rank = prob / tl.sum(prob, axis=0)
        else:
            rank = every
        rank = tl.where(rank != rank, float("-inf"), rank)  # NaN ranks last (a NaN row names experts 0..k-1)
        # top-k: k rounds of (max, then the lowest id holding it)
        offs_k = tl.arange(0, BLOCK_K)
        ids = tl.zeros([BLOCK_K], tl.int64)
        values = tl.zeros([BLOCK_K], tl.float32)
        taken = ~in_e
        for j in range(0, K):
            best = tl.max(tl.where(taken, float("-inf"), rank), axis=0)
            idx = tl.min(tl.where((~taken) & (rank == best), offs_e, BLOCK_E), axis=0)
            ids = tl.where(offs_k == j, idx.to(tl.int64), ids)
            values = tl.where(offs_k == j, best, values)
            taken = taken | (offs_e == idx)
        tl.store(ids_p + r * ids_stride + offs_k, ids, mask=offs_k < K)
        if SOFTMAX:
            if RENORM:
                values = values / tl.sum(tl.where(offs_k < K, values, 0.0), axis=0)
            tl.store(weights_p + r * weights_stride + offs_k, values.to(dtype), mask=offs_k < K)
        tl.atomic_xchg(count_p + r, 0)  # ready for the next launch (a captured graph replays this one)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _launch(x, norm_w, router_w, top_k, eps, ids, weights, logits, scratch, rows, per_row_x: bool,
            softmax: bool, renormalize: bool, gate=None) -> None:
    E, H = router_w.shape[-2:]
    if E > MAX_EXPERTS or top_k > E:
        raise ValueError(f"routing kernel handles at most {MAX_EXPERTS} experts and top_k <= E ({E}, {top_k})")
    if scratch is None:
        from ..ops import predict_workspace

        scratch = predict_workspace(rows, E, x.device)
    scores, counts = scratch
    if scores.shape[0] < rows or scores.shape[1] != E or counts.numel() < rows:
        raise ValueError(f"routing kernel scratch {tuple(scores.shape)} does not fit {rows} rows of {E} experts")
    # ~32 programs per row, each streaming a few router rows in one tile of <= 8K elements (16 KB bf16).
    block_s = _next_pow2(-(-E // 32))
    split = -(-E // block_s)
    block_h = max(16, min(_next_pow2(H), 8192 // block_s))
    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _route_kernel[(rows, split)](
            x, norm_w if norm_w is not None else x, router_w, ids, weights if weights is not None else ids,
            logits if logits is not None else ids, scores, counts, gate if gate is not None else ids, H, E, top_k,
            float(eps),
            x.stride(0) if per_row_x else 0, norm_w.stride(0) if norm_w is not None else 0,
            router_w.stride(0) if router_w.dim() == 3 else 0, ids.stride(0),
            weights.stride(0) if weights is not None else 0, gate.stride(0) if gate is not None else 0,
            SPLIT=split, BLOCK_S=block_s, BLOCK_E=_next_pow2(max(E, 16)), BLOCK_H=block_h,
            BLOCK_K=_next_pow2(max(top_k, 2)), HAS_NORM=norm_w is not None, SOFTMAX=softmax, RENORM=renormalize,
            HAS_GATE=gate is not None, num_warps=4)


def predict_experts(hidden: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor, eps: float, top_k: int,
                    out: torch.Tensor, scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
                    gate: torch.Tensor | None = None) -> torch.Tensor:
    """out[d, :top_k] = the top-k expert ids of router_w[d] @ rmsnorm(hidden, norm_w[d], eps), ties to the
    lowest id; -1 where gate[d] <= 0 (gate: int64 [D], any stride; that row's router is not read). hidden [H] (contiguous); norm_w [D, H] and router_w [D, E, H] with contiguous rows (views of
    the stacks); out int64 [D, >= top_k] with contiguous rows. `scratch` = ops.predict_workspace(>= D, E,
    device), allocated per call if None (a launch inside a CUDA graph should own one: see RouterStack)."""
    _launch(hidden.reshape(1, -1), norm_w, router_w, top_k, eps, out, None, None, scratch, router_w.shape[0],
            per_row_x=False, softmax=False, renormalize=False, gate=gate)
    return out


def route_top_k(hidden: torch.Tensor, router_w: torch.Tensor, top_k: int, renormalize: bool,
                scratch: tuple[torch.Tensor, torch.Tensor] | None = None):
    """(logits [T, E], weights [T, k], ids [T, k] int64) of a softmax top-k router for T tokens: hidden [T, H]
    and router_w [E, H] contiguous, in the model dtype. `scratch` = ops.predict_workspace(>= T, E, device)."""
    T = hidden.shape[0]
    E = router_w.shape[0]
    logits = torch.empty((T, E), dtype=hidden.dtype, device=hidden.device)
    weights = torch.empty((T, top_k), dtype=hidden.dtype, device=hidden.device)
    ids = torch.empty((T, top_k), dtype=torch.int64, device=hidden.device)
    _launch(hidden, None, router_w, top_k, 0.0, ids, weights, logits, scratch, T, per_row_x=True, softmax=True,
            renormalize=renormalize)
    return logits, weights, ids
