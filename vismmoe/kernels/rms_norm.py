"""RMSNorm in one launch: transformers' RMSNorm arithmetic for every row of a [rows, H] input.

transformers' RMSNorm (Qwen3-VL-MoE, GLM-4.5V, Qwen2/3-MoE...) runs as eight small kernels in eager mode
(cast, pow, mean, add, rsqrt, mul, cast, weight mul). A decoder layer has four or five of them (input
and post-attention norms, per-head q/k norms), so a one-token decode step, which is bound by launches
rather than bytes, spends a large share of each layer there. One program per row does the same steps in
the same order and precision: fp32 mean of squares, x * rsqrt(mean + eps), cast to the input dtype, then
the weight multiply in the promoted dtype. Only the order of the sum differs, so results agree with the
module to the last bit almost always and to one rounding step otherwise.

Torch twin: `ops.rms_norm_reference`; tests `tests/test_rms_norm.py`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_rows(x_p, w_p, out_p, H, sx, so, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    inside = offs < H
    x = tl.load(x_p + row * sx + offs, mask=inside, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / H
    y = (x * tl.math.rsqrt(var + eps)).to(x_p.dtype.element_ty)  # transformers casts back before the weight
    w = tl.load(w_p + offs, mask=inside, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_p + row * so + offs, out.to(out_p.dtype.element_ty), mask=inside)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)).to(x.dtype) over the last dim; x [..., H], weight [H]
    (inputs checked by `ops.rms_norm`)."""
    H = x.shape[-1]
    rows = x.reshape(-1, H)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if rows.shape[0]:
        block = triton.next_power_of_2(H)
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():  # launch on x's GPU
            _rms_norm_rows[(rows.shape[0],)](rows, weight, out, H, rows.stride(0), out.stride(0), float(eps),
                                             BLOCK=block, num_warps=4 if block <= 2048 else 8)
    return out.view(*x.shape[:-1], H)
