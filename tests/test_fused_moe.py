"""The fused decode MoE kernel (vismmoe/kernels/fused_moe.py) against its torch twin
`ops.experts_from_slots_reference` with `ops.silu_mul`, on fresh random inputs.

Natively on a GPU; on the CPU in Triton's interpreter (TRITON_INTERPRET=1, small shapes). Skipped
where triton is not installed (CI): the op then always runs the twin, which tests/test_ops.py covers.
"""

from __future__ import annotations


import pytest
import torch

from vismmoe import ops
from vismmoe.errors import InputError


def _inputs(device, dtype, num_tokens, top_k, num_slots, hidden, inter, transposed, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    gate_up = torch.randn(num_slots, 2 * inter, hidden, generator=gen) / hidden**0.5
    down = torch.randn(num_slots, hidden, inter, generator=gen) / inter**0.5
    if transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    # Distinct slots within a token (a router's top-k experts are distinct), shared across tokens.
    slot_ids = torch.stack([torch.randperm(num_slots, generator=gen)[:top_k] for _ in range(num_tokens)])
    weights = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), -1)
    cast = lambda t: t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(weights), slot_ids.to(device), cast(gate_up), cast(down)


CASES = [(1, 1), (1, 8), (3, 2), (3, 8), (16, 1), (16, 2), (16, 8)]


@pytest.mark.parametrize("num_tokens,top_k", CASES)
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_moe_matches_twin_fp32(kernel_device, num_tokens, top_k, transposed):
    # H = 72, I = 40: not multiples of the blocks (masked tails). 10 slots for 16 tokens x top-8: every
    # slot is read by several tokens.
    args = _inputs(kernel_device, torch.float32, num_tokens, top_k, 10, 72, 40, transposed,
                   seed=num_tokens * 10 + top_k)
    fused = ops.fused_moe_decode(*args, is_transposed=transposed, kernel=True)
    twin = ops.fused_moe_decode(*args, is_transposed=transposed, kernel=False)
    assert fused.dtype == torch.float32 and fused.shape == twin.shape
    torch.testing.assert_close(fused, twin, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens,top_k", [(1, 8), (3, 2), (16, 8)])
@pytest.mark.parametrize("transposed", [False, True])
def test_fused_moe_matches_twin_half(kernel_device, dtype, num_tokens, top_k, transposed):
    args = _inputs(kernel_device, dtype, num_tokens, top_k, 9, 56, 24, transposed, seed=7 + num_tokens + top_k)
    fused = ops.fused_moe_decode(*args, is_transposed=transposed, kernel=True)
    assert fused.dtype == dtype
    # The twin rounds its intermediates to the half dtype; the kernel keeps fp32 until the store. Compare
    # both against the twin on the same (half-valued) inputs in fp32: the kernel must be the closer one.
    exact = ops.experts_from_slots_reference(*(t.float() if t.is_floating_point() else t for t in args),
                                             ops.silu_mul, transposed)
    twin = ops.fused_moe_decode(*args, is_transposed=transposed, kernel=False)
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    torch.testing.assert_close(fused.float(), twin.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(fused.float(), exact, atol=tol / 2, rtol=tol / 2)


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_moe_small_blocks_walk_every_loop(kernel_device, transposed):
    # With the default blocks the small shapes above fit one chunk of I in launch 2 and of H in launch 1;
    # blocks of 16 make every loop take several masked steps (H = 72, I = 40).
    from vismmoe.kernels import fused_moe

    args = _inputs(kernel_device, torch.float32, 3, 8, 10, 72, 40, transposed, seed=11)
    fused = fused_moe.fused_moe_decode(*args, transposed, blocks=fused_moe.Blocks(gate_i=16, gate_h=16, down_h=16, down_i=16))
    twin = ops.experts_from_slots_reference(*args, ops.silu_mul, transposed)
    torch.testing.assert_close(fused, twin, atol=2e-5, rtol=2e-5)


def test_fused_moe_on_strided_pool_views_and_int32_slots(kernel_device):
    # The cache hands out views of one [S, record] pool, not contiguous [S, 2I, H] tensors.
    gen = torch.Generator().manual_seed(3)
    hidden, inter, num_slots = 40, 24, 6
    record = 2 * inter * hidden + hidden * inter
    pool = (torch.randn(num_slots, record, generator=gen) / hidden**0.5).to(kernel_device)
    gate_up = pool[:, : 2 * inter * hidden].view(num_slots, 2 * inter, hidden)
    down = pool[:, 2 * inter * hidden :].view(num_slots, hidden, inter)
    x = torch.randn(3, hidden, generator=gen).to(kernel_device)
    slot_ids = torch.tensor([[0, 5], [2, 3], [5, 0]], dtype=torch.int32, device=kernel_device)
    weights = torch.softmax(torch.randn(3, 2, generator=gen), -1).to(kernel_device)
    fused = ops.fused_moe_decode(x, weights, slot_ids, gate_up, down, kernel=True)
    twin = ops.experts_from_slots_reference(x, weights, slot_ids, gate_up.contiguous(), down.contiguous(),
                                            ops.silu_mul)
    torch.testing.assert_close(fused, twin, atol=2e-5, rtol=2e-5)


def test_fused_moe_self_check_passes(kernel_device):
    # The one-time check that gates the kernel on a GPU must accept a correct kernel.
    assert ops._compare_fused_moe(torch.device(kernel_device))


def test_silu_mul_is_transformers_apply_gate():
    from transformers.activations import ACT2FN
    from transformers.integrations import moe

    holder = type("Experts", (), {"act_fn": ACT2FN["silu"]})()
    h = torch.randn(4, 2 * 12)
    torch.testing.assert_close(ops.silu_mul(h), moe._default_apply_gate(holder, h))


def test_fused_moe_bad_shapes_are_input_errors():
    x, w = torch.randn(2, 8), torch.ones(2, 1)
    slots = torch.zeros(2, 1, dtype=torch.int64)
    gate_up, down = torch.randn(3, 10, 8), torch.randn(3, 8, 5)
    ops.fused_moe_decode(x, w, slots, gate_up, down, kernel=False)  # well-formed: runs the twin
    with pytest.raises(InputError, match="H = 8"):
        ops.fused_moe_decode(x, w, slots, gate_up, down, is_transposed=True, kernel=False)
    with pytest.raises(InputError, match="at most 16 tokens"):
        ops.fused_moe_decode(torch.randn(17, 8), torch.ones(17, 1), torch.zeros(17, 1, dtype=torch.int64),
                             gate_up, down, kernel=False)
    with pytest.raises(InputError, match="one device"):
        ops.fused_moe_decode(x, w, slots.to("meta"), gate_up, down, kernel=False)
    with pytest.raises(InputError, match="int32 or int64"):
        ops.fused_moe_decode(x, w, slots.float(), gate_up, down, kernel=False)


def test_default_dispatch_on_cpu_is_the_twin():
    args = _inputs("cpu", torch.float32, 3, 2, 5, 24, 8, False, seed=1)
    out = ops.fused_moe_decode(*args)
    assert torch.equal(out, ops.experts_from_slots_reference(*args, ops.silu_mul))


def test_failed_self_check_keeps_the_twin_with_one_warning(monkeypatch):
    def broken(device):
        raise RuntimeError("no build")

    monkeypatch.setattr(ops, "_compare_fused_moe", broken)
    monkeypatch.setattr(ops, "_FUSED_MOE_CHECKED", {})
    with pytest.warns(UserWarning, match="fused decode MoE kernel is not used.*no build"):
        assert ops._fused_moe_checked(torch.device("cuda", 5)) is False
    assert ops._fused_moe_checked(torch.device("cuda", 5)) is False  # remembered: no second check


def test_experts_kernel_fused_needs_what_it_runs_on(qwen_checkpoint):
    import vismmoe
    from vismmoe.errors import ConfigError

    with pytest.raises(ConfigError, match="experts_kernel: fused needs a CUDA device"):
        vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.5, experts_kernel="fused")
    engine = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.5)  # auto: no fused kernel on the CPU
    assert engine.runtime.fused_decode is False
    assert not ops.fused_moe_usable(engine.layout.layers[0].experts, torch.device("cpu"))


def test_fused_moe_usable_only_for_silu_gates(monkeypatch):
    from transformers.activations import ACT2FN

    monkeypatch.setattr(ops, "cache_kernel_available", lambda: True)
    monkeypatch.setattr(ops, "_fused_moe_checked", lambda device: True)
    silu = type("Experts", (), {"act_fn": ACT2FN["silu"], "_apply_gate": lambda self, h: ops.silu_mul(h)})()
    gelu = type("Experts", (), {"act_fn": ACT2FN["gelu"],
                                "_apply_gate": lambda self, h: ACT2FN["gelu"](h.chunk(2, -1)[0]) * h.chunk(2, -1)[1]})()
    assert ops.fused_moe_usable(silu, torch.device("cuda", 0))
    assert not ops.fused_moe_usable(gelu, torch.device("cuda", 0))
    assert not ops.fused_moe_usable(silu, torch.device("cpu"))


@pytest.mark.parametrize("decode", ["static", "generate"])
def test_decode_steps_through_the_fused_op_give_the_same_tokens(qwen_checkpoint, decode):
    # The runtime's fused branch (the kernel on a GPU, its twin here) against the default expert compute.
    import vismmoe

    from .conftest import random_requests

    device = "cuda" if torch.cuda.is_available() else "cpu"
    engine = vismmoe.load(qwen_checkpoint, device=device, dtype="float32", expert_budget=0.5, decode=decode,
                          experts_kernel="loop")
    requests = random_requests(3, seed=5)
    plain = [engine.generate(image=i, prompt=p, max_new_tokens=6).token_ids for i, p in requests]
    calls = []
    original = ops.fused_moe_decode

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return original(*args, **kwargs)

    engine.runtime.fused_decode = True
    try:
        ops.fused_moe_decode = counted
        fused = [engine.generate(image=i, prompt=p, max_new_tokens=6).token_ids for i, p in requests]
    finally:
        ops.fused_moe_decode = original
    assert fused == plain
    assert calls and max(calls) <= ops.FUSED_MAX_TOKENS


def test_first_use_of_a_kernel_is_timed_and_logged_once(monkeypatch, caplog):
    import logging

    calls = []

    def fine(device):
        calls.append(device)
        return True

    monkeypatch.setattr(ops, "KERNEL_FIRST_USE_S", {})
    verdicts = {}
    with caplog.at_level(logging.INFO, logger="vismmoe"):
        for _ in range(3):
            assert ops._checked_once(verdicts, torch.device("cuda", 3), fine, "test kernel", "the twin runs")
    assert len(calls) == 1 and list(ops.KERNEL_FIRST_USE_S) == [("test kernel", "cuda:3")]
    notes = [r.getMessage() for r in caplog.records if "test kernel ready on cuda:3" in r.getMessage()]
    assert len(notes) == 1 and "Triton's cache" in notes[0]


def _pool_and_slab(device, dtype, num_slots, num_rows, hidden, inter, transposed, gen):
    """A slot pool and a host slab, both [N, record] with gate_up then down, viewed as the cache does."""
    gu = 2 * inter * hidden
    def views(flat, n):  # noqa: E306
        if transposed:
            return flat[:, :gu].view(n, hidden, 2 * inter), flat[:, gu:].view(n, inter, hidden)
        return flat[:, :gu].view(n, 2 * inter, hidden), flat[:, gu:].view(n, hidden, inter)
    pool = (torch.randn(num_slots, gu + hidden * inter, generator=gen) / hidden**0.5).to(device, dtype)
    slab = (torch.randn(num_rows, gu + hidden * inter, generator=gen) / hidden**0.5).to(dtype)
    if device == "cuda":
        slab = slab.pin_memory()
    return pool, slab, views(pool, num_slots), views(slab, num_rows)


@pytest.mark.parametrize("num_tokens,top_k", [(1, 8), (3, 2), (4, 4)])
@pytest.mark.parametrize("transposed", [False, True])
def test_zero_copy_reads_host_rows_as_if_copied(kernel_device, num_tokens, top_k, transposed):
    """Slot id -r-1 reads host row r in place: the same result as copying row r into a slot first."""
    gen = torch.Generator().manual_seed(20 + num_tokens + top_k)
    hidden, inter, num_slots, num_rows = 72, 40, 6, 12
    pool, slab, (gate_up, down), (host_gu, host_dn) = _pool_and_slab(
        kernel_device, torch.float32, num_slots, num_rows, hidden, inter, transposed, gen)
    # Each token: some experts from the pool, the rest straight from host rows (distinct per token).
    ids = []
    for _ in range(num_tokens):
        from_pool = torch.randperm(num_slots, generator=gen)[: top_k // 2]
        from_host = -1 - torch.randperm(num_rows, generator=gen)[: top_k - len(from_pool)]
        ids.append(torch.cat([from_pool, from_host])[torch.randperm(top_k, generator=gen)])
    slot_ids = torch.stack(ids).to(kernel_device)
    x = torch.randn(num_tokens, hidden, generator=gen).to(kernel_device)
    w = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), -1).to(kernel_device)
    fused = ops.fused_moe_decode(x, w, slot_ids, gate_up, down, transposed, kernel=True,
                                 host_gate_up=host_gu, host_down=host_dn)
    # The copy path: every host row a token names copied into extra slots, then the pool-only kernel.
    copied = torch.cat([pool, slab.to(kernel_device)])
    gu = 2 * inter * hidden
    n = copied.shape[0]
    if transposed:
        all_gu, all_dn = copied[:, :gu].view(n, hidden, 2 * inter), copied[:, gu:].view(n, inter, hidden)
    else:
        all_gu, all_dn = copied[:, :gu].view(n, 2 * inter, hidden), copied[:, gu:].view(n, hidden, inter)
    as_slots = torch.where(slot_ids >= 0, slot_ids, num_slots - 1 - slot_ids)
    via_copy = ops.fused_moe_decode(x, w, as_slots, all_gu, all_dn, transposed, kernel=True)
    twin = ops.fused_moe_decode(x, w, slot_ids, gate_up, down, transposed, kernel=False,
                                host_gate_up=host_gu, host_down=host_dn)
    torch.testing.assert_close(fused, via_copy, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(fused, twin, atol=2e-5, rtol=2e-5)


def test_zero_copy_bad_host_weights_are_input_errors():
    gen = torch.Generator().manual_seed(4)
    _, _, (gate_up, down), (host_gu, host_dn) = _pool_and_slab("cpu", torch.float32, 3, 5, 8, 4, False, gen)
    x, w, ids = torch.randn(1, 8), torch.ones(1, 2) / 2, torch.tensor([[0, -1]])
    ops.fused_moe_decode(x, w, ids, gate_up, down, kernel=False, host_gate_up=host_gu, host_down=host_dn)
    with pytest.raises(InputError, match="needs both host_gate_up and host_down"):
        ops.fused_moe_decode(x, w, ids, gate_up, down, kernel=False, host_gate_up=host_gu)
    with pytest.raises(InputError, match="host_down must have the pool's record layout"):
        ops.fused_moe_decode(x, w, ids, gate_up, down, kernel=False, host_gate_up=host_gu,
                             host_down=host_dn.contiguous().transpose(1, 2))


@pytest.mark.parametrize("num_tokens,top_k", [(1, 8), (1, 3), (2, 4)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_install_is_the_copy_then_the_compute(kernel_device, num_tokens, top_k, transposed, dtype):
    """install = (fill, src): each pair with fill >= 0 reads host row src and leaves it in slot fill. The
    output and the whole pool must equal ops.copy_records of that copy list followed by the pool-only
    kernel, bit for bit; slots not installed keep their bytes. Pairs mix hits, installs and zero-copy reads."""
    gen = torch.Generator().manual_seed(50 + num_tokens * 7 + top_k + transposed)
    hidden, inter, num_slots, num_rows = 72, 40, 2 * 8 * num_tokens + 2, 12
    pool, slab, (gate_up, down), (host_gu, host_dn) = _pool_and_slab(
        kernel_device, dtype, num_slots, num_rows, hidden, inter, transposed, gen)
    order = torch.randperm(num_slots, generator=gen)  # distinct slots over all pairs: none is read and installed
    slot_ids = order[: num_tokens * top_k].view(num_tokens, top_k).clone()
    kind = torch.randint(0, 3, (num_tokens, top_k), generator=gen)  # 0 hit, 1 install, 2 zero-copy
    kind.view(-1)[0] = 1  # at least one install
    src = torch.randint(0, num_rows, (num_tokens, top_k), generator=gen)
    fill = torch.where(kind == 1, slot_ids, -1)
    slot_ids = torch.where(kind == 2, -1 - src, slot_ids)
    x = torch.randn(num_tokens, hidden, generator=gen).to(kernel_device, dtype)
    w = torch.softmax(torch.randn(num_tokens, top_k, generator=gen), -1).to(kernel_device, dtype)
    to = lambda t: t.to(kernel_device)  # noqa: E731
    before = pool.clone()
    got = ops.fused_moe_decode(x, w, to(slot_ids), gate_up, down, transposed, kernel=True, host_gate_up=host_gu,
                               host_down=host_dn, install=(to(fill), to(src)))
    installed = pool.clone()
    pool.copy_(before)
    ops.copy_records(slab, pool, to(src.view(-1)), to(fill.view(-1)))
    want = ops.fused_moe_decode(x, w, to(slot_ids), gate_up, down, transposed, kernel=True, host_gate_up=host_gu,
                                host_down=host_dn)
    assert torch.equal(installed, pool), "the installed slots differ from copy_records' (or others changed)"
    assert torch.equal(got, want)
    assert not torch.equal(installed, before)  # something was installed
    pool.copy_(before)  # the twin does the same
    twin = ops.fused_moe_decode(x, w, to(slot_ids), gate_up, down, transposed, kernel=False, host_gate_up=host_gu,
                                host_down=host_dn, install=(to(fill), to(src)))
    assert torch.equal(pool, installed)
    torch.testing.assert_close(twin.float(), got.float(), atol=2e-5 if dtype == torch.float32 else 2e-2, rtol=1e-2)


def test_install_bad_copy_lists_are_input_errors():
    gen = torch.Generator().manual_seed(5)
    _, _, (gate_up, down), (host_gu, host_dn) = _pool_and_slab("cpu", torch.float32, 3, 5, 8, 4, False, gen)
    x, w, ids = torch.randn(1, 8), torch.ones(1, 2) / 2, torch.tensor([[0, 1]])
    fill, src = torch.tensor([[-1, 1]]), torch.tensor([[0, 4]])
    with pytest.raises(InputError, match="needs both host_gate_up and host_down"):
        ops.fused_moe_decode(x, w, ids, gate_up, down, kernel=False, install=(fill, src))
    with pytest.raises(InputError, match="install's src must be an integer tensor of one entry per"):
        ops.fused_moe_decode(x, w, ids, gate_up, down, kernel=False, host_gate_up=host_gu, host_down=host_dn,
                             install=(fill, src[:, :1]))
    with pytest.raises(InputError, match=r"install must be \(fill, src\)"):
        ops.fused_moe_decode(x, w, ids, gate_up, down, kernel=False, host_gate_up=host_gu, host_down=host_dn,
                             install=fill)


@pytest.mark.parametrize("miss_path", ["copy", "zerocopy"])
def test_static_decode_installs_misses_in_the_kernel_as_the_copy_would(qwen_checkpoint, miss_path):
    """DevicePath.install_misses (the default): a static step's copied misses are installed by the fused decode
    op as it computes, with no copy launch. Against the copy launch then the compute, over several requests
    with prefetch on (its copies still run on their own): the same tokens, slot pool bytes, cache state and
    counters. On the CPU the op is its twin; on a GPU the kernel."""
    import numpy as np

    import vismmoe

    from .conftest import random_requests

    device = "cuda" if torch.cuda.is_available() else "cpu"
    requests = random_requests(3, seed=9)
    runs = {}
    for install in (True, False):
        engine = vismmoe.load(qwen_checkpoint, device=device, dtype="float32", expert_budget=0.3, decode="static",
                              prefetch=True, miss_path=miss_path)
        engine.runtime.fused_decode = True
        engine.runtime.device.install_misses = install
        calls = []
        original = ops.fused_moe_decode

        def counted(*args, **kwargs):
            calls.append(kwargs.get("install") is not None)
            return original(*args, **kwargs)

        ops.fused_moe_decode = counted
        try:
            results = [engine.generate(image=i, prompt=p, max_new_tokens=6, min_new_tokens=6) for i, p in requests]
        finally:
            ops.fused_moe_decode = original
        cache = engine.runtime.cache
        runs[install] = ([r.token_ids for r in results], cache.slots.cpu().clone(), cache.state.owner.copy(),
                         [(r.stats.expert_misses, r.stats.bytes_h2d, r.stats.misses_by_path) for r in results], calls)
    (tok_i, pool_i, owner_i, stats_i, calls_i), (tok_c, pool_c, owner_c, stats_c, calls_c) = runs[True], runs[False]
    assert tok_i == tok_c and stats_i == stats_c
    assert np.array_equal(owner_i, owner_c) and torch.equal(pool_i, pool_c)
    assert any(calls_i) and not any(calls_c)  # the install ran, and only where asked for
    assert sum(s[0] for s in stats_i) > 0  # there were misses to install
