"""One Triton launch for the lookahead prediction of a decode token: RMSNorm, router logits, top-k ids.

For each of the next D MoE layers (one program each) the kernel applies that layer's pre-router
RMSNorm to the hidden state of the token entering the current layer, multiplies by that layer's router
weights and keeps the top-k expert ids, ties to the lowest id. A softmax router's top-k of the softmax
is the top-k of the logits (softmax is monotonic), so no softmax is computed. The roundings of the
transformers modules (normalised state cast to the model dtype, times the norm weight in the model
dtype, logits in the model dtype) are repeated, so the ids are those the modules would pick up to
the order of the fp32 sums. Its torch twin is `offload.router_stack.predict_experts_reference`; the op
is `ops.predict_experts`.

One program holds all E logits (E <= MAX_EXPERTS) and reads one layer's router (E x H) in tiles. It
runs on the copy stream beside the next layer's attention (offload/device_path.py), so one program per
predicted layer is enough; splitting E over programs would need a second pass for the top-k.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

MAX_EXPERTS = 1024


@triton.jit
def _predict_kernel(x_p, norm_p, router_p, out_p, gate_p, H, E, K, eps, norm_stride, router_stride, out_stride,
                    gate_stride, BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr, HAS_GATE: tl.constexpr):
    d = tl.program_id(0)
    if HAS_GATE:
        go = tl.load(gate_p + d * gate_stride) > 0
    else:
        go = d >= 0
    if go:
        _predict_one(x_p, norm_p, router_p, out_p, d, H, E, K, eps, norm_stride, router_stride, out_stride,
                     BLOCK_E, BLOCK_H)
    else:  # this layer's prefetch is off: no prediction, and nothing to score
        for j in range(0, K):
            tl.store(out_p + d * out_stride + j, tl.full([], -1, tl.int64))


@triton.jit
def _predict_one(x_p, norm_p, router_p, out_p, d, H, E, K, eps, norm_stride, router_stride, out_stride,
                 BLOCK_E: tl.constexpr, BLOCK_H: tl.constexpr):
    dtype = x_p.dtype.element_ty
    # -- the RMS of the token's state (fp32, as the norm module computes it)
    sq = tl.zeros([BLOCK_H], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(x_p + offs_h, mask=offs_h < H, other=0.0).to(tl.float32)
        sq += x * x
    inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / H + eps)
    # -- logits[e] = sum_h router[e, h] * norm_w[h] * x[h] * inv, rounded where the modules round
    offs_e = tl.arange(0, BLOCK_E)
    in_e = offs_e < E
    acc = tl.zeros([BLOCK_E], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        x = tl.load(x_p + offs_h, mask=in_h, other=0.0).to(tl.float32)
        w = tl.load(norm_p + d * norm_stride + offs_h, mask=in_h, other=0.0).to(tl.float32)
        normed = (w * (x * inv).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        tile = tl.load(router_p + d * router_stride + offs_e[:, None] * H + offs_h[None, :],
                       mask=in_e[:, None] & in_h[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * normed[None, :], axis=1)
    logits = acc.to(dtype).to(tl.float32)
    logits = tl.where(logits != logits, float("-inf"), logits)  # NaN ranks last (a NaN row names experts 0..k-1)
    # -- top-k: k rounds of (max, then the lowest id holding it)
    taken = ~in_e
    for j in range(0, K):
        best = tl.max(tl.where(taken, float("-inf"), logits), axis=0)
        idx = tl.min(tl.where((~taken) & (logits == best), offs_e, BLOCK_E), axis=0)
        tl.store(out_p + d * out_stride + j, idx.to(tl.int64))
        taken = taken | (offs_e == idx)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def predict_experts(hidden: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor, eps: float, top_k: int,
                    out: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """out[d, :top_k] = the top-k expert ids of router_w[d] @ rmsnorm(hidden, norm_w[d], eps), ties to the
    lowest id; -1 where gate[d] <= 0 (gate: int64 [D], any stride; that program reads no router). hidden
    [H] (contiguous); norm_w [D, H] and router_w [D, E, H] with contiguous rows (views of the stacks); out
    int64 [D, >= top_k] with contiguous rows."""
    D, E, H = router_w.shape
    if E > MAX_EXPERTS or top_k > E:
        raise ValueError(f"predict_experts handles at most {MAX_EXPERTS} experts and top_k <= E ({E}, {top_k})")
    # One program streams a whole router (E x H: 512 KB for 128 x 2048 bf16): tiles of 16K elements keep
    # 32 KB of loads in flight per iteration (64 per thread at 8 warps) without spilling.
    block_e = _next_pow2(max(E, 16))
    block_h = max(16, min(_next_pow2(H), 16384 // block_e))
    with torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext():
        _predict_kernel[(D,)](hidden, norm_w, router_w, out, out if gate is None else gate, H, E, top_k, float(eps),
                              norm_w.stride(0), router_w.stride(0), out.stride(0),
                              0 if gate is None else gate.stride(0), BLOCK_E=block_e, BLOCK_H=block_h,
                              HAS_GATE=gate is not None, num_warps=8 if block_e * block_h >= 8192 else 4)
    return out

