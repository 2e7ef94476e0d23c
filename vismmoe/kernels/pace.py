"""A device-side delay proportional to the experts just copied: emulation of a slower host link.

`pace(fill, extra_iters, iters_per_record, out)` spins `count(fill >= 0) * iters_per_record +
extra_iters` iterations of a dependent multiply-add chain in one program, on the stream it is launched on. The
count is read on the device, so the static decode path (whose misses are decided on the device) is
paced without a host sync, and the launch has fixed shapes: it can be captured in a CUDA graph.
deploy/emulate.py calibrates iterations per second on the GPU once and turns the profile's missing
link time per record into `iters_per_record`. The loop's result is stored, so it cannot be dropped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _pace_kernel(fill_p, n, extra_iters, iters_per_record, out_p, COUNT_FILL: tl.constexpr, BLOCK: tl.constexpr):
    total = tl.load(out_p + 1).to(tl.int64) * 0 + extra_iters  # an int64 tensor scalar: a dynamic loop bound
    if COUNT_FILL:
        offs = tl.arange(0, BLOCK)
        fill = tl.load(fill_p + offs, mask=offs < n, other=-1)
        total = total + tl.sum((fill >= 0).to(tl.int64), axis=0) * iters_per_record
    acc = tl.load(out_p)
    for _ in range(0, total):
        acc = acc * 0.5 + 1.0  # a dependent chain: each iteration waits for the last
    tl.store(out_p, acc)
    tl.store(out_p + 1, total.to(tl.float32))  # iterations spun by this launch (read by tests)


def pace(fill: torch.Tensor | None, extra_iters: int, iters_per_record: int, out: torch.Tensor) -> None:
    """Spin `count(fill >= 0) * iters_per_record + extra_iters` iterations on the current stream.
    `out`: float32 [2] scratch on the device (out[1] = the iterations of the last launch)."""
    n = 0 if fill is None else fill.numel()
    _pace_kernel[(1,)](out if fill is None else fill, n, int(extra_iters), int(iters_per_record), out,
                       COUNT_FILL=fill is not None, BLOCK=max(16, 1 << max(0, (n - 1).bit_length())), num_warps=1)
