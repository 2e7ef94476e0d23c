"""Decode-step expert compute for a few tokens (1-16), read straight from the cache's slot pool.

Two launches, both Triton, no grouped GEMM, no sort:
1. `_gate_up_act`: one program per ((token, routed expert) pair, block of I). It reads the pair's
   slot id, streams the gate and up rows of that slot's gate_up weights against the token's hidden
   row in fp32, applies SiLU(gate) * up (transformers' `_apply_gate` with `act_fn = silu`) and writes
   an fp32 intermediate [pairs, I].
2. `_down_sum`: one program per (token, block of H). For each of the token's k pairs, in order j = 0..k-1
   (deterministic), it streams that slot's down weights against the pair's intermediate, scales by the
   routing weight and accumulates in fp32; the sum is stored once in the output dtype.

Token counts are small, so every product is a broadcast multiply plus `tl.sum` (no tensor cores):
the work is bound by reading the weights. Layouts are handled by strides alone: gate_up [S, 2I, H] or
[S, H, 2I] (`is_transposed`), down [S, H, I] or [S, I, H], any (strided) views of the slot pool.
Pointer offsets are int64 (a pool of large experts passes 2^31 elements).

Torch twin: `ops.experts_from_slots_reference` with `ops.silu_mul`; tests `tests/test_fused_moe.py`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

# Block sizes, per launch (first guesses, not yet timed on a GPU). Launch 1: a program owns BLOCK_I
# gate and up rows and walks H in chunks of BLOCK_H. Launch 2: a program owns DOWN_BLOCK_H output rows
# and walks I in chunks of DOWN_BLOCK_I; its rows are few so that one decode token still spreads over
# H / DOWN_BLOCK_H programs (128 at H = 2048), enough to keep the SMs' loads in flight.
BLOCK_I, BLOCK_H = 32, 128
DOWN_BLOCK_H, DOWN_BLOCK_I = 16, 128


@triton.jit
def _gate_up_act(x_p, slot_p, gu_p, inter_p, H, I, top_k,
                 sx_t, sx_h, sg_s, sg_o, sg_i,
                 BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr):
    pair = tl.program_id(0)
    ib = tl.program_id(1)
    token = pair // top_k
    slot = tl.load(slot_p + pair).to(tl.int64)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = offs_i < I
    rows_g = offs_i.to(tl.int64) * sg_o  # gate rows are 0..I-1 of the 2I outputs, up rows I..2I-1
    rows_u = (offs_i + I).to(tl.int64) * sg_o
    base = gu_p + slot * sg_s
    gate = tl.zeros([BLOCK_I], dtype=tl.float32)
    up = tl.zeros([BLOCK_I], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        x = tl.load(x_p + token.to(tl.int64) * sx_t + offs_h * sx_h, mask=in_h, other=0.0).to(tl.float32)
        cols = offs_h.to(tl.int64) * sg_i
        mask = in_i[:, None] & in_h[None, :]
        wg = tl.load(base + rows_g[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wu = tl.load(base + rows_u[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        gate += tl.sum(wg * x[None, :], axis=1)
        up += tl.sum(wu * x[None, :], axis=1)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(inter_p + pair.to(tl.int64) * I + offs_i, act, mask=in_i)


@triton.jit
def _down_sum(inter_p, slot_p, w_p, dn_p, out_p, H, I, top_k,
              sw_t, sw_k, sd_s, sd_o, sd_i, so_t, so_h,
              BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr):
    token = tl.program_id(0)
    hb = tl.program_id(1)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    rows = offs_h.to(tl.int64) * sd_o
    out = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in range(0, top_k):
        pair = token * top_k + j
        slot = tl.load(slot_p + pair).to(tl.int64)
        weight = tl.load(w_p + token.to(tl.int64) * sw_t + j * sw_k).to(tl.float32)
        base = dn_p + slot * sd_s
        acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for i0 in range(0, I, BLOCK_I):
            offs_i = i0 + tl.arange(0, BLOCK_I)
            in_i = offs_i < I
            a = tl.load(inter_p + pair.to(tl.int64) * I + offs_i, mask=in_i, other=0.0)
            mask = in_h[:, None] & in_i[None, :]
            wd = tl.load(base + rows[:, None] + offs_i.to(tl.int64)[None, :] * sd_i, mask=mask,
                         other=0.0).to(tl.float32)
            acc += tl.sum(wd * a[None, :], axis=1)
        out += acc * weight
    tl.store(out_p + token.to(tl.int64) * so_t + offs_h * so_h, out.to(out_p.dtype.element_ty), mask=in_h)


def fused_moe_decode(hidden, top_k_weights, slot_ids, gate_up, down, is_transposed=False,
                     blocks: tuple[int, int, int, int] = (BLOCK_I, BLOCK_H, DOWN_BLOCK_H, DOWN_BLOCK_I)):
    """out[t] = sum_j w[t, j] * down_s(silu(gate_s(x[t])) * up_s(x[t])), s = slot_ids[t, j]; shapes as
    `ops.experts_from_slots`. Inputs are checked by the caller (`ops.fused_moe_decode`). `blocks`:
    (BLOCK_I, BLOCK_H, DOWN_BLOCK_H, DOWN_BLOCK_I), powers of two (tests shrink them to walk the loops)."""
    block_i, block_h, down_block_h, down_block_i = blocks
    num_tokens, top_k = slot_ids.shape
    H = hidden.shape[1]
    if is_transposed:  # gate_up [S, H, 2I], down [S, I, H]
        I = gate_up.shape[2] // 2
        sg_o, sg_i = gate_up.stride(2), gate_up.stride(1)
        sd_o, sd_i = down.stride(2), down.stride(1)
    else:  # gate_up [S, 2I, H], down [S, H, I]
        I = gate_up.shape[1] // 2
        sg_o, sg_i = gate_up.stride(1), gate_up.stride(2)
        sd_o, sd_i = down.stride(1), down.stride(2)
    slots = slot_ids.reshape(-1).contiguous()
    pairs = slots.numel()
    inter = torch.empty(pairs, I, dtype=torch.float32, device=hidden.device)
    out = torch.empty(num_tokens, H, dtype=hidden.dtype, device=hidden.device)
    if pairs == 0:
        return out.zero_()
    ctx = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
    with ctx:  # Triton launches on the current device: make it the pool's
        _gate_up_act[(pairs, triton.cdiv(I, block_i))](
            hidden, slots, gate_up, inter, H, I, top_k,
            hidden.stride(0), hidden.stride(1), gate_up.stride(0), sg_o, sg_i,
            BLOCK_I=block_i, BLOCK_H=block_h)
        _down_sum[(num_tokens, triton.cdiv(H, down_block_h))](
            inter, slots, top_k_weights, down, out, H, I, top_k,
            top_k_weights.stride(0), top_k_weights.stride(1), down.stride(0), sd_o, sd_i,
            out.stride(0), out.stride(1),
            BLOCK_H=down_block_h, BLOCK_I=down_block_i)
    return out
