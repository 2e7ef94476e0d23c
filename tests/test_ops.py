"""Fast expert ops against their plain torch reference twins, on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from vismmoe import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def silu_gate(h):
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_tokens,top_k,num_slots", [(1, 8, 24), (5, 2, 4), (37, 4, 16)])
@pytest.mark.parametrize("transposed", [False, True])
def test_experts_from_slots_matches_reference(device, num_tokens, top_k, num_slots, transposed):
    torch.manual_seed(num_tokens * 100 + top_k)
    hidden, inter = 64, 32
    dtype = torch.bfloat16
    x = torch.randn(num_tokens, hidden, device=device, dtype=dtype)
    gate_up = torch.randn(num_slots, 2 * inter, hidden, device=device, dtype=dtype) / hidden**0.5
    down = torch.randn(num_slots, hidden, inter, device=device, dtype=dtype) / inter**0.5
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    # Distinct slots per token, as a router's top-k experts are distinct.
    slot_ids = torch.stack([torch.randperm(num_slots, device=device)[:top_k] for _ in range(num_tokens)])
    weights = torch.softmax(torch.randn(num_tokens, top_k, device=device), -1).to(dtype)
    fast = ops.experts_from_slots(x, weights, slot_ids, gate_up, down, silu_gate, transposed)
    ref = ops.experts_from_slots_reference(x, weights, slot_ids, gate_up, down, silu_gate, transposed)
    assert fast.shape == ref.shape == x.shape
    torch.testing.assert_close(fast.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_experts_from_slots_on_strided_pool_views():
    # The cache hands out views of one [S, record] pool, not contiguous [S, 2I, H] tensors.
    torch.manual_seed(0)
    hidden, inter, num_slots = 32, 16, 6
    record = 2 * inter * hidden + hidden * inter
    pool = torch.randn(num_slots, record, dtype=torch.bfloat16) / hidden**0.5
    gate_up = pool[:, : 2 * inter * hidden].view(num_slots, 2 * inter, hidden)
    down = pool[:, 2 * inter * hidden :].view(num_slots, hidden, inter)
    x = torch.randn(3, hidden, dtype=torch.bfloat16)
    slot_ids = torch.tensor([[0, 5], [2, 3], [5, 1]])
    weights = torch.full((3, 2), 0.5, dtype=torch.bfloat16)
    fast = ops.experts_from_slots(x, weights, slot_ids, gate_up, down, silu_gate)
    ref = ops.experts_from_slots_reference(x, weights, slot_ids, gate_up.contiguous(), down.contiguous(), silu_gate)
    torch.testing.assert_close(fast.float(), ref.float(), atol=3e-2, rtol=3e-2)


def test_copy_records_reference_copies_only_marked_rows():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(12, 40, generator=gen)
    dst = torch.randn(5, 40, generator=gen)
    before = dst.clone()
    src_rows = torch.tensor([3, 7, 11, 0])
    dst_rows = torch.tensor([4, -1, 0, -1])
    ops.copy_records(src, dst, src_rows, dst_rows)
    assert torch.equal(dst[4], src[3]) and torch.equal(dst[0], src[11])
    assert torch.equal(dst[1:4], before[1:4])


@pytest.mark.parametrize("programs", [1, 3, 64])
def test_persistent_copy_kernel_matches_reference(kernel_device, programs):
    # Any number of programs splits the chunks of each marked row between them; unmarked rows are skipped.
    for trial in range(3):
        gen = torch.Generator().manual_seed(trial)
        numel = int(torch.randint(1, 3 * ops._COPY_BLOCK, (1,), generator=gen))
        src = torch.randn(9, numel, generator=gen)
        dst = torch.randn(5, numel, generator=gen).to(kernel_device)
        expected = dst.clone()
        src_rows = torch.randperm(9, generator=gen)[:5]
        dst_rows = torch.randperm(5, generator=gen)
        dst_rows[torch.rand(5, generator=gen) < 0.4] = -1
        ops.copy_records_reference(src, expected, src_rows, dst_rows.to(kernel_device))
        ops.launch_copy_kernel(src.to(kernel_device), dst, src_rows.to(kernel_device), dst_rows.to(kernel_device),
                               programs)
        assert torch.equal(dst.cpu(), expected.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy kernel reads page-locked host memory from a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_copy_records_kernel_matches_reference_from_registered_host_memory(dtype):
    from vismmoe.offload.store import _pin_in_place, _unpin

    for trial in range(3):
        gen = torch.Generator().manual_seed(trial)
        numel = int(torch.randint(1, 50_000, (1,), generator=gen))
        src = torch.randn(20, numel, generator=gen).to(dtype)
        assert _pin_in_place(src)
        try:
            dst = torch.randn(6, numel, device="cuda").to(dtype)
            expected = dst.clone()
            src_rows = torch.randperm(20, generator=gen)[:6]
            dst_rows = torch.randperm(6, generator=gen)
            dst_rows[torch.rand(6, generator=gen) < 0.4] = -1
            ops.copy_records_reference(src, expected, src_rows, dst_rows.cuda())
            ops.copy_records(src, dst, src_rows.cuda(), dst_rows.cuda())
            torch.cuda.synchronize()
            assert torch.equal(dst, expected)
        finally:
            _unpin(src, torch.device("cuda"))
