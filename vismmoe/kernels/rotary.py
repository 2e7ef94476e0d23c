"""Rotary position embedding of a decode step's queries and keys in one launch.

transformers applies it as `q * cos + rotate_half(q) * sin` for q and for k: a negation, a concatenation,
two multiplies and an add each, ten small kernels per layer, which a one-token decode step pays in
launches rather than bytes. One program per (token, head) row of q or k does the same element-wise steps,
each rounded to the tensors' dtype as torch rounds every op (fp32 arithmetic, then a cast): the products
x * cos and (±x_other) * sin, then their sum, launched with fp fusion off: the first GPU run (H200) was
one rounding step off in bf16 and fp16 too, since ptxas contracts a half-precision multiply and add
with no rounding modifier into one fused multiply-add, which rounds once where torch rounds twice.
`ops.rotary_fits` keeps fp32 on transformers' function until the fixed kernel has run on a GPU.

Torch twin: `ops.rotary_reference`; op `ops.rotary`; tests `tests/test_rotary.py`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_row(x_p, o_p, cos_p, sin_p, HALF, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    inside = offs < HALF
    x1 = tl.load(x_p + offs, mask=inside, other=0.0)
    x2 = tl.load(x_p + HALF + offs, mask=inside, other=0.0)
    c1 = tl.load(cos_p + offs, mask=inside, other=0.0).to(tl.float32)
    c2 = tl.load(cos_p + HALF + offs, mask=inside, other=0.0).to(tl.float32)
    s1 = tl.load(sin_p + offs, mask=inside, other=0.0).to(tl.float32)
    s2 = tl.load(sin_p + HALF + offs, mask=inside, other=0.0).to(tl.float32)
    dtype = x1.dtype
    a1 = (x1.to(tl.float32) * c1).to(dtype)  # x * cos, rounded as torch rounds each op
    a2 = (x2.to(tl.float32) * c2).to(dtype)
    b1 = (-(x2.to(tl.float32)) * s1).to(dtype)  # rotate_half(x) * sin = (-x2, x1) * sin
    b2 = (x1.to(tl.float32) * s2).to(dtype)
    tl.store(o_p + offs, (a1.to(tl.float32) + b1.to(tl.float32)).to(dtype), mask=inside)
    tl.store(o_p + HALF + offs, (a2.to(tl.float32) + b2.to(tl.float32)).to(dtype), mask=inside)


@triton.jit
def _rotary_rows(q_p, k_p, cos_p, sin_p, qo_p, ko_p, HQ, S, HALF,
                 sqb, sqh, sqs, skb, skh, sks, sob, soh, sos, skob, skoh, skos, scb, scs, ssb, sss,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # within batch b: rows (h, s) of q first, then those of k
    b = tl.program_id(1).to(tl.int64)
    n_q = HQ * S
    rot_cos = cos_p + b * scb
    rot_sin = sin_p + b * ssb
    if row < n_q:
        h = row // S
        s = row % S
        _rotate_row(q_p + b * sqb + h * sqh + s * sqs, qo_p + b * sob + h * soh + s * sos,
                    rot_cos + s * scs, rot_sin + s * sss, HALF, BLOCK)
    else:
        h = (row - n_q) // S
        s = (row - n_q) % S
        _rotate_row(k_p + b * skb + h * skh + s * sks, ko_p + b * skob + h * skoh + s * skos,
                    rot_cos + s * scs, rot_sin + s * sss, HALF, BLOCK)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """(q_embed, k_embed) for q [B, Hq, S, D], k [B, Hk, S, D] (last dim contiguous), cos and sin [B or 1, S, D],
    all of one dtype (inputs checked by `ops.rotary`). Outputs keep q's and k's strides."""
    B, HQ, S, D = q.shape
    HK = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    sb = sin.stride(0) if sin.shape[0] > 1 else 0
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _rotary_rows[((HQ + HK) * S, B)](
            q, k, cos, sin, q_out, k_out, HQ, S, D // 2,
            *q.stride()[:3], *k.stride()[:3], *q_out.stride()[:3], *k_out.stride()[:3],
            cb, cos.stride(1), sb, sin.stride(1), BLOCK=triton.next_power_of_2(D // 2), num_warps=1,
            **({"enable_fp_fusion": False} if q.is_cuda else {}))
    return q_out, k_out
