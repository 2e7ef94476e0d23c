"""Decode-step expert compute for a few tokens (1-16), read straight from the cache's slot pool.

Two launches, both Triton, no grouped GEMM, no sort:
1. `_gate_up_act`: one program per ((token, routed expert) pair, block of I). It reads the pair's
   slot id, streams the gate and up rows of that slot's gate_up weights against the token's hidden
   row in fp32, applies SiLU(gate) * up (transformers' `_apply_gate` with `act_fn = silu`) and writes
   an fp32 intermediate [pairs, I].
2. `_down_sum`: one program per (token, block of H). It streams the down weights of all the token's k
   slots at once (a [k, rows, chunk of I] tile per step) against the pairs' intermediates, then takes
   the routing-weighted sum over k in a fixed order (deterministic); fp32 throughout, stored once in
   the output dtype.

Token counts are small, so every product is a broadcast multiply plus `tl.sum` (no tensor cores):
the work is bound by reading the weights. Layouts are handled by strides alone: gate_up [S, 2I, H] or
[S, H, 2I] (`is_transposed`), down [S, H, I] or [S, I, H], any (strided) views of the slot pool.
Pointer offsets are int64 (a pool of large experts passes 2^31 elements).

Zero-copy reads (issue 12's second miss path): a negative slot id -r-1 names row r of a second pair of
weight tensors (`host_gate_up`, `host_down`: views of the page-locked host slab, same layout as the pool),
which the kernel reads straight over the bus instead of from a slot. Each pair's weights are read through
one pointer chosen per pair (pool or host), so one load per tile as in the pool-only kernels and only the
bytes of the side a pair names move. Without host tensors (`HAS_HOST` off) the kernels are the pool-only
ones.

Installing misses (the copy miss path without a copy launch): with `install` = (fill, src) per pair,
a pair whose fill >= 0 is read from host row src and each tile it reads is also stored into pool slot
fill. The launches tile each pair's weights exactly once between them (launch 1 every gate and up row,
launch 2 every down row of the token's k experts), so when they end the slot holds the whole record,
as `ops.copy_records` would have left it, and the output is the copy-then-compute one bit for bit. A
slot installed here must not be read by another pair of the same call (a decode step's experts are
distinct).

Torch twin: `ops.experts_from_slots_reference` with `ops.silu_mul`; tests `tests/test_fused_moe.py`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import HostTensor


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of the two launches. Launch 1: a program owns `gate_i` gate and up
    rows of one (token, expert) pair and walks H in chunks of `gate_h`. Launch 2: a program owns `down_h`
    output rows of one token for all of its k experts at once (a [k, down_h, down_i] tile per step, so one
    step has k times the bytes in flight) and walks I in chunks of `down_i`. `*_warps`/`*_stages` are
    Triton's num_warps/num_stages (stages > 1 software-pipelines the loads of the chunk loop)."""

    gate_i: int = 16
    gate_h: int = 256
    gate_warps: int = 4
    gate_stages: int = 3
    down_h: int = 8
    down_i: int = 128
    down_warps: int = 4
    down_stages: int = 3


# Timed with eval/bench_fused_moe.py --tune on an H200 (Qwen3-VL-30B-A3B expert shapes H=2048, I=768,
# top-8; BENCHMARKS.md): the fastest tiles of each launch at 1, 4 and 16 tokens, per weight layout.
# Steps of 1-2 tokens take the 1-token tiles, 3-8 the 4-token ones, 9-16 the 16-token ones. Other GPUs and
# shapes run the same tiles: correct everywhere, tuned only there.
TUNED_BLOCKS = {  # (transposed, tokens): Blocks(gate_i, gate_h, gate_warps, gate_stages, down_h, down_i, ...)
    (False, 1): Blocks(8, 512, 4, 2, 4, 256, 8, 2),
    (False, 4): Blocks(8, 512, 4, 4, 16, 64, 8, 4),
    (False, 16): Blocks(64, 128, 4, 4, 16, 64, 8, 2),
    (True, 1): Blocks(16, 512, 8, 2, 8, 256, 4, 2),
    (True, 4): Blocks(32, 128, 4, 2, 16, 128, 4, 2),
    (True, 16): Blocks(32, 256, 4, 4, 128, 16, 4, 4),
}


def blocks_for(num_tokens: int, is_transposed: bool) -> Blocks:
    bucket = 1 if num_tokens <= 2 else 4 if num_tokens <= 8 else 16
    return TUNED_BLOCKS[(bool(is_transposed), bucket)]


@triton.jit
def _gate_up_loop(x_p, base, dst, token, offs_i, in_i, rows_g, rows_u, H, sx_t, sx_h, sg_i,
                  BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, STORE: tl.constexpr):
    """The pair's gate and up rows `offs_i` against x[token], walking H; STORE: also each tile into `dst`."""
    gate = tl.zeros([BLOCK_I], dtype=tl.float32)
    up = tl.zeros([BLOCK_I], dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        in_h = offs_h < H
        x = tl.load(x_p + token.to(tl.int64) * sx_t + offs_h * sx_h, mask=in_h, other=0.0).to(tl.float32)
        cols = offs_h.to(tl.int64) * sg_i
        mask = in_i[:, None] & in_h[None, :]
        offs_g = rows_g[:, None] + cols[None, :]
        offs_u = rows_u[:, None] + cols[None, :]
        wg = tl.load(base + offs_g, mask=mask, other=0.0)
        wu = tl.load(base + offs_u, mask=mask, other=0.0)
        if STORE:
            tl.store(dst + offs_g, wg, mask=mask)
            tl.store(dst + offs_u, wu, mask=mask)
        gate += tl.sum(wg.to(tl.float32) * x[None, :], axis=1)
        up += tl.sum(wu.to(tl.float32) * x[None, :], axis=1)
    return gate, up


@triton.jit
def _gate_up_act(x_p, slot_p, gu_p, hgu_p, inter_p, fill_p, src_p, H, I, top_k,
                 sx_t, sx_h, sg_s, shg_s, sg_o, sg_i,
                 BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, HAS_HOST: tl.constexpr, INSTALL: tl.constexpr):
    pair = tl.program_id(0)
    ib = tl.program_id(1)
    token = pair // top_k
    slot = tl.load(slot_p + pair).to(tl.int64)
    offs_i = ib * BLOCK_I + tl.arange(0, BLOCK_I)
    in_i = offs_i < I
    rows_g = offs_i.to(tl.int64) * sg_o  # gate rows are 0..I-1 of the 2I outputs, up rows I..2I-1
    rows_u = (offs_i + I).to(tl.int64) * sg_o
    base = gu_p + tl.maximum(slot, 0) * sg_s
    fill = slot * 0 - 1
    if HAS_HOST:
        # Zero-copy (slot -r-1) or an install (fill >= 0, host row src): this pair reads host row `row`.
        row = -slot - 1
        if INSTALL:
            fill = tl.load(fill_p + pair).to(tl.int64)
            row = tl.where(fill >= 0, tl.load(src_p + pair).to(tl.int64), row)
        base = tl.where(row >= 0, hgu_p + tl.maximum(row, 0) * shg_s, base)
    dst = gu_p + tl.maximum(fill, 0) * sg_s
    # Two loops, chosen per program: the stores only where this pair installs (a loop with stores in it
    # costs the pairs that install nothing ~5 µs per layer call on an H200).
    if INSTALL:
        if fill >= 0:
            gate, up = _gate_up_loop(x_p, base, dst, token, offs_i, in_i, rows_g, rows_u, H, sx_t, sx_h, sg_i,
                                     BLOCK_I, BLOCK_H, True)
        else:
            gate, up = _gate_up_loop(x_p, base, dst, token, offs_i, in_i, rows_g, rows_u, H, sx_t, sx_h, sg_i,
                                     BLOCK_I, BLOCK_H, False)
    else:
        gate, up = _gate_up_loop(x_p, base, dst, token, offs_i, in_i, rows_g, rows_u, H, sx_t, sx_h, sg_i,
                                 BLOCK_I, BLOCK_H, False)
    act = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(inter_p + pair.to(tl.int64) * I + offs_i, act, mask=in_i)


@triton.jit
def _down_loop(inter_p, pairs, in_k, in_h, ptrs, dst_ptrs, put, I, sd_i,
               BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, STORE: tl.constexpr):
    """acc[k, h] = down rows (ptrs) . inter[pair k], walking I; STORE: also each tile of the pairs `put` to dst."""
    acc = tl.zeros([BLOCK_K, BLOCK_H], dtype=tl.float32)
    for i0 in range(0, I, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        in_i = offs_i < I
        a = tl.load(inter_p + pairs[:, None] * I + offs_i[None, :], mask=in_k[:, None] & in_i[None, :],
                    other=0.0)  # [K, BLOCK_I]
        mask = (in_k[:, None] & in_h[None, :])[:, :, None] & in_i[None, None, :]
        inner = offs_i.to(tl.int64)[None, None, :] * sd_i
        wd = tl.load(ptrs[:, :, None] + inner, mask=mask, other=0.0)  # [K, BLOCK_H, BLOCK_I]
        if STORE:
            tl.store(dst_ptrs[:, :, None] + inner, wd, mask=mask & put[:, None, None])
        acc += tl.sum(wd.to(tl.float32) * a[:, None, :], axis=2)
    return acc


@triton.jit
def _down_sum(inter_p, slot_p, w_p, dn_p, hdn_p, out_p, fill_p, src_p, H, I, top_k,
              sw_t, sw_k, sd_s, shd_s, sd_o, sd_i, so_t, so_h,
              BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_I: tl.constexpr, HAS_HOST: tl.constexpr,
              INSTALL: tl.constexpr):
    token = tl.program_id(0)
    hb = tl.program_id(1)
    offs_k = tl.arange(0, BLOCK_K)
    in_k = offs_k < top_k
    pairs = (token * top_k + offs_k).to(tl.int64)
    slots = tl.load(slot_p + pairs, mask=in_k, other=0).to(tl.int64)
    weights = tl.load(w_p + token.to(tl.int64) * sw_t + offs_k * sw_k, mask=in_k, other=0.0).to(tl.float32)
    offs_h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    in_h = offs_h < H
    cols = offs_h.to(tl.int64)[None, :] * sd_o
    k_base = dn_p + tl.maximum(slots, 0) * sd_s  # [K] pointers: each pair's down weights
    fill = slots * 0 - 1
    if HAS_HOST:
        # Zero-copy pairs (slot -r-1) and installs (fill >= 0, host row src) read host row `row`.
        row = -slots - 1
        if INSTALL:
            fill = tl.load(fill_p + pairs, mask=in_k, other=-1).to(tl.int64)
            row = tl.where(fill >= 0, tl.load(src_p + pairs, mask=in_k, other=0).to(tl.int64), row)
        k_base = tl.where(row >= 0, hdn_p + tl.maximum(row, 0) * shd_s, k_base)
    ptrs = k_base[:, None] + cols  # [K, BLOCK_H]
    dst_ptrs = (dn_p + tl.maximum(fill, 0) * sd_s)[:, None] + cols
    put = fill >= 0
    if INSTALL:
        if tl.max(fill, axis=0) >= 0:  # some pair of this token installs: the loop with stores
            acc = _down_loop(inter_p, pairs, in_k, in_h, ptrs, dst_ptrs, put, I, sd_i, BLOCK_K, BLOCK_H, BLOCK_I, True)
        else:
            acc = _down_loop(inter_p, pairs, in_k, in_h, ptrs, dst_ptrs, put, I, sd_i, BLOCK_K, BLOCK_H, BLOCK_I,
                             False)
    else:
        acc = _down_loop(inter_p, pairs, in_k, in_h, ptrs, dst_ptrs, put, I, sd_i, BLOCK_K, BLOCK_H, BLOCK_I, False)
    # The routing-weighted sum over the k experts: a fixed reduction order, so results are deterministic.
    out = tl.sum(acc * weights[:, None], axis=0)
    tl.store(out_p + token.to(tl.int64) * so_t + offs_h * so_h, out.to(out_p.dtype.element_ty), mask=in_h)


def _gate_up_layout(gate_up, is_transposed):
    """(I, stride over the 2I outputs, stride over H): gate_up is [S, 2I, H], or [S, H, 2I] transposed."""
    if is_transposed:
        return gate_up.shape[2] // 2, gate_up.stride(2), gate_up.stride(1)
    return gate_up.shape[1] // 2, gate_up.stride(1), gate_up.stride(2)


def _pointer(tensor, like):
    """`tensor` as a launch argument beside `like` (the pool): the pool itself when there is no host side;
    a host tensor wrapped when the pool is on a GPU (in the CPU interpreter both are plain tensors)."""
    if tensor is None:
        return like
    return HostTensor(tensor) if like.is_cuda and not tensor.is_cuda else tensor


def gate_up_launch(hidden, slots, gate_up, inter, top_k, is_transposed, blocks: Blocks, host_gate_up=None,
                   install=None):
    """Launch 1: inter[pair] = silu(gate(x)) * up(x) for every (token, expert) pair (fp32); with `install`
    = (fill, src), also the gate and up rows of host row src[pair] into slot fill[pair] where fill >= 0."""
    I, sg_o, sg_i = _gate_up_layout(gate_up, is_transposed)
    host = _pointer(host_gate_up, gate_up)
    fill, src = install if install is not None else (slots, slots)
    _gate_up_act[(slots.numel(), triton.cdiv(I, blocks.gate_i))](
        hidden, slots, gate_up, host, inter, fill, src, hidden.shape[1], I, top_k,
        hidden.stride(0), hidden.stride(1), gate_up.stride(0), host.stride(0), sg_o, sg_i,
        BLOCK_I=blocks.gate_i, BLOCK_H=blocks.gate_h, HAS_HOST=host_gate_up is not None,
        INSTALL=install is not None, num_warps=blocks.gate_warps, num_stages=blocks.gate_stages)


def down_launch(inter, slots, top_k_weights, down, out, is_transposed, blocks: Blocks, host_down=None,
                install=None):
    """Launch 2: out[t] = sum_j w[t, j] * down_s(inter[t, j]) (fp32 accumulation, stored in out's dtype); with
    `install` = (fill, src), also the down rows of host row src[pair] into slot fill[pair] where fill >= 0."""
    num_tokens, top_k = top_k_weights.shape
    H, I = out.shape[1], inter.shape[1]
    # down is [S, H, I], or [S, I, H] transposed: (stride over the H outputs, stride over I)
    sd_o, sd_i = (down.stride(2), down.stride(1)) if is_transposed else (down.stride(1), down.stride(2))
    host = _pointer(host_down, down)
    fill, src = install if install is not None else (slots, slots)
    _down_sum[(num_tokens, triton.cdiv(H, blocks.down_h))](
        inter, slots, top_k_weights, down, host, out, fill, src, H, I, top_k,
        top_k_weights.stride(0), top_k_weights.stride(1), down.stride(0), host.stride(0), sd_o, sd_i,
        out.stride(0), out.stride(1),
        BLOCK_K=max(2, triton.next_power_of_2(top_k)), BLOCK_H=blocks.down_h, BLOCK_I=blocks.down_i,
        HAS_HOST=host_down is not None, INSTALL=install is not None, num_warps=blocks.down_warps,
        num_stages=blocks.down_stages)


def fused_moe_decode(hidden, top_k_weights, slot_ids, gate_up, down, is_transposed=False,
                     blocks: Blocks | None = None, host_gate_up=None, host_down=None, install=None):
    """out[t] = sum_j w[t, j] * down_s(silu(gate_s(x[t])) * up_s(x[t])), s = slot_ids[t, j]; shapes as
    `ops.experts_from_slots`. Inputs are checked by the caller (`ops.fused_moe_decode`). `blocks`:
    tile sizes (powers of two; tests shrink them to walk the loops), default `blocks_for`. With
    `host_gate_up` / `host_down` (the host slab's views, same inner strides as the pool's), a slot id -r-1
    reads host row r directly (zero-copy). `install` = (fill, src), int64 per pair (flattened [T * k]):
    pairs with fill >= 0 read host row src and install it into slot fill (needs the host views)."""
    num_tokens, top_k = slot_ids.shape
    blocks = blocks or blocks_for(num_tokens, is_transposed)
    I = _gate_up_layout(gate_up, is_transposed)[0]
    slots = slot_ids.reshape(-1).contiguous()
    inter = torch.empty(slots.numel(), I, dtype=torch.float32, device=hidden.device)
    out = torch.empty(num_tokens, hidden.shape[1], dtype=hidden.dtype, device=hidden.device)
    if slots.numel() == 0:
        return out.zero_()
    if install is not None:
        if host_gate_up is None or host_down is None:  # the installs read the host rows: without them, stale slots
            raise ValueError("fused_moe_decode: install needs host_gate_up and host_down (the slab's views)")
        install = tuple(t.reshape(-1).contiguous() for t in install)
    ctx = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
    with ctx:  # Triton launches on the current device: make it the pool's
        gate_up_launch(hidden, slots, gate_up, inter, top_k, is_transposed, blocks, host_gate_up, install)
        down_launch(inter, slots, top_k_weights, down, out, is_transposed, blocks, host_down, install)
    return out
