"""The lookahead prediction of static decode: the stacked-router kernel (vismmoe/kernels/route_predict.py)
against its torch twin (offload/router_stack.py), the twin against the transformers modules, and which
routers may be stacked.

The kernel runs natively on a GPU and in Triton's interpreter on the CPU (TRITON_INTERPRET=1); those
tests are skipped where triton is not installed (CI), where the op always runs the twin.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

import vismmoe
from vismmoe import ops
from vismmoe.offload import router_stack
from vismmoe.offload.router_stack import RouterStack, predict_experts_reference, random_case, top_k_ids

from .conftest import random_requests


def test_top_k_ids_break_ties_to_the_lowest_id_and_rank_nan_last():
    logits = torch.tensor([[1.0, 3.0, 3.0, float("nan"), 3.0, 0.5]])
    assert top_k_ids(logits, 4).tolist() == [[1, 2, 4, 0]]
    assert top_k_ids(torch.full((1, 5), float("nan")), 2).tolist() == [[0, 1]]


SHAPES = [(1, 8, 1, 24), (2, 16, 2, 40), (3, 64, 8, 72), (2, 128, 8, 96), (1, 128, 4, 33), (3, 100, 5, 130)]


@pytest.mark.parametrize("depth,num_experts,top_k,hidden", SHAPES)
def test_kernel_matches_twin_fp32(kernel_device, depth, num_experts, top_k, hidden):
    gen = torch.Generator().manual_seed(depth * 1000 + num_experts + hidden)
    for ties in (False, True):
        x, norm_w, router_w, eps = random_case(gen, depth, num_experts, hidden, ties)
        want = predict_experts_reference(x, norm_w, router_w, eps, top_k)
        got = ops.predict_experts(*(t.to(kernel_device) for t in (x, norm_w, router_w)), eps, top_k, kernel=True)
        assert torch.equal(got.cpu(), want), ties
        if ties:  # the case does tie: some top-k boundary sits inside a run of equal logits
            logits = torch.stack([router_w[d] @ norm_w[d] for d in range(depth)])
            assert any(len(set(row.tolist())) < num_experts for row in logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_twin_half(kernel_device, dtype):
    # The modules round the normalised state, the weighted state and the logits to the model dtype; the
    # kernel does too. fp32 sums in another order may still move a logit by one ulp of the half type,
    # which reorders near-equal logits inside the top-k (the order does not matter: loads are decided by
    # the set) and, rarely, at its boundary: these seeds have no such boundary.
    gen = torch.Generator().manual_seed(7)
    for depth, num_experts, top_k, hidden in SHAPES:
        x, norm_w, router_w, eps = (t.to(dtype) if torch.is_tensor(t) else t
                                    for t in random_case(gen, depth, num_experts, hidden))
        want = predict_experts_reference(x, norm_w, router_w, eps, top_k)
        got = ops.predict_experts(*(t.to(kernel_device) for t in (x, norm_w, router_w)), eps, top_k, kernel=True)
        assert torch.equal(got.cpu().sort(-1).values, want.sort(-1).values), (depth, num_experts, top_k, hidden)


def test_kernel_writes_into_strided_rows_and_leaves_the_rest(kernel_device):
    # The device path hands over a view of the ledger's buffer [L, depth, k] (rows of a larger tensor).
    gen = torch.Generator().manual_seed(3)
    x, norm_w, router_w, eps = random_case(gen, 2, 32, 48)
    buffer = torch.full((4, 3, 4), -7, dtype=torch.int64, device=kernel_device)
    out = buffer[1, :2]
    ops.predict_experts(*(t.to(kernel_device) for t in (x, norm_w, router_w)), eps, 4, out=out, kernel=True)
    assert torch.equal(out.cpu(), predict_experts_reference(x, norm_w, router_w, eps, 4))
    untouched = torch.ones_like(buffer, dtype=torch.bool)
    untouched[1, :2] = False
    assert (buffer[untouched] == -7).all()


def test_kernel_reuses_its_workspace_and_leaves_the_counts_at_zero(kernel_device):
    # The experts of a layer are split over programs; the last one to finish (an atomic count) ranks
    # them and resets the count, so one workspace serves launch after launch (a replayed CUDA graph).
    gen = torch.Generator().manual_seed(11)
    scratch = ops.predict_workspace(4, 100, kernel_device)
    for depth in (3, 1, 4, 2):
        x, norm_w, router_w, eps = random_case(gen, depth, 100, 130)
        got = ops.predict_experts(*(t.to(kernel_device) for t in (x, norm_w, router_w)), eps, 5, kernel=True,
                                  scratch=(scratch[0][:depth], scratch[1][:depth]))
        assert torch.equal(got.cpu(), predict_experts_reference(x, norm_w, router_w, eps, 5)), depth
        assert not scratch[1].any()
    with pytest.raises(ValueError, match="scratch"):
        ops.predict_experts(*(t.to(kernel_device) for t in (x, norm_w, router_w)), eps, 5, kernel=True,
                            scratch=ops.predict_workspace(1, 100, kernel_device))


def test_self_check_passes_and_catches_a_disagreement(kernel_device, monkeypatch):
    device = torch.device(kernel_device)
    assert router_stack.compare_predict_kernel(device)
    real = router_stack.predict_experts_reference
    monkeypatch.setattr(router_stack, "predict_experts_reference",
                        lambda *a: real(*a).flip(-1))  # the ranking reversed
    assert not router_stack.compare_predict_kernel(device)
    monkeypatch.setattr(ops, "_PREDICT_CHECKED", {})
    with pytest.warns(UserWarning, match="fused prediction kernel is not used"):
        assert not ops._predict_kernel_checked(device)


def test_default_dispatch_on_cpu_is_the_twin(monkeypatch):
    def no_kernel(*a, **k):
        raise AssertionError("the kernel must not run on the CPU by default")

    monkeypatch.setattr(ops, "_predict_kernel_checked", no_kernel)
    gen = torch.Generator().manual_seed(5)
    x, norm_w, router_w, eps = random_case(gen, 2, 16, 32)
    assert torch.equal(ops.predict_experts(x, norm_w, router_w, eps, 3),
                       predict_experts_reference(x, norm_w, router_w, eps, 3))


# -- the stack against the model's own modules ----------------------------------------------------


@pytest.mark.parametrize("family", ["qwen3_vl_moe", "internvl_qwen3_moe", "llava_onevision_olmoe"])
def test_stacked_prediction_names_the_routers_experts(tiny_checkpoints, family):
    """From any state, the stack (twin; and the kernel where it runs) predicts exactly the experts the
    module predictor gets from the same layers' norm and router modules, for every layer and depth,
    up to the last layer."""
    engine = vismmoe.load(tiny_checkpoints[family], expert_budget=0.5, prefetch=True, prefetch_depth=3)
    predictor, k = engine.runtime.predictor, engine.layout.top_k
    stack, why = RouterStack.build(predictor, k)
    assert stack is not None, why
    L = stack.num_layers
    gen = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        for layer in range(L - 1):
            depth = min(3, L - 1 - layer)
            # On the engine's device (a GPU when there is one), in its dtype.
            hidden = torch.randn(1, 1, engine.layout.hidden_size, generator=gen).to(engine.device, engine.dtype)
            got = torch.full((depth, k), -1, dtype=torch.int64, device=engine.device)
            stack.predict_into(layer, hidden, got)
            want = torch.full((depth, k), -1, dtype=torch.int64, device=engine.device)
            predictor.predict_into(layer, hidden, want)
            assert torch.equal(got.sort(-1).values, want.sort(-1).values), layer
            mask = predictor.predict(layer, hidden)[:depth]  # the host path's form names the same sets
            assert all(set(np.flatnonzero(mask[d].cpu().numpy())) == set(want[d].tolist()) for d in range(depth))


def test_glm_routers_are_not_stacked_and_their_reason_is_kept(tiny_checkpoints):
    engine = vismmoe.load(tiny_checkpoints["glm4v_moe"], expert_budget=0.5, prefetch=True)
    assert engine.runtime.device.lookahead is engine.runtime.predictor
    assert "bias" in engine.runtime.lookahead_kind


def test_a_router_that_is_not_top_k_of_its_logits_is_refused(qwen_checkpoint, monkeypatch):
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, prefetch=True)
    predictor = engine.runtime.predictor
    router, norm = predictor.targets[1]
    forward = type(router).forward

    def bottom_k(self, hidden):  # a router whose choice the stack would get wrong
        logits, weights, indices = forward(self, hidden)
        return logits, weights, torch.topk(-logits, indices.shape[-1]).indices

    monkeypatch.setattr(type(router), "forward", bottom_k)
    stack, why = RouterStack.build(predictor, engine.layout.top_k)
    assert stack is None and "top-k of its logits" in why
    monkeypatch.undo()
    monkeypatch.setattr(norm, "variance_epsilon", 0.5)  # one layer's norm differs from the others'
    stack, why = RouterStack.build(predictor, engine.layout.top_k)
    assert stack is None and "different eps" in why


def test_static_decode_through_the_kernels_matches_the_twins(kernel_device, qwen_checkpoint, monkeypatch):
    """The whole static path with every fused kernel forced on (prediction, cache decisions with the
    ledger, in Triton's interpreter on the CPU) against the same path on the torch twins: same tokens,
    same per-layer hits and misses, same prefetch bytes, same prediction counters."""
    if kernel_device != "cpu":
        pytest.skip("the GPU runs the kernels by default: tests/test_static_decode.py covers it there")
    from vismmoe.kernels import cache_step, route_predict

    (image, prompt), = random_requests(1, seed=23)
    runs, launches = [], []

    def counted(module, name):
        real = getattr(module, name)

        def launch(*a, **k):
            if name == "predict_experts":
                launches.append("predict")
            elif a[1] == cache_step.PREFETCH:
                launches.append("prefetch")
            else:
                launches.append("demand+ledger" if k.get("score") is not None else "demand")
            return real(*a, **k)

        monkeypatch.setattr(module, name, launch)

    for forced in (False, True):
        if forced:
            monkeypatch.setattr(ops, "_use_kernel", lambda experts, kernel: True if kernel is None else kernel)
            real = ops.predict_experts
            monkeypatch.setattr(ops, "predict_experts", lambda *a, kernel=None, **k: real(*a, kernel=True, **k))
            counted(cache_step, "cache_step")
            counted(route_predict, "predict_experts")
        engine = vismmoe.load(qwen_checkpoint, expert_budget="min", prefetch=True, prefetch_depth=2, decode="static")
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=4, min_new_tokens=4)
        c = engine.runtime.prediction_counters
        runs.append((result.token_ids, result.stats.hits_per_layer, result.stats.misses_per_layer,
                     result.stats.prefetch_issued_bytes, c.true_pos.tolist(), c.actual.tolist(), c.predicted.tolist()))
    assert runs[0] == runs[1]
    # The kernels did run: predictions, prefetch decisions, and demand decisions that scored the ledger.
    assert {"predict", "prefetch", "demand+ledger", "demand"} <= set(launches)
    assert runs[1][3] > 0 and sum(map(sum, runs[1][5])) > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_replays_decide_like_eager_steps_with_the_lookahead_on_the_copy_stream(qwen_checkpoint):
    """On a GPU the lookahead (prediction kernel, prefetch decisions, copy) runs on the copy stream and
    joins before the next layer's lookup. Captured in CUDA graphs it must make the decisions the same
    steps make eagerly: a missing join or a buffer the allocator reused would show as other loads."""
    (image, prompt), = random_requests(1, seed=24)
    runs = []
    for graphs in (True, False):
        engine = vismmoe.load(qwen_checkpoint, expert_budget="min", prefetch=True, prefetch_depth=2, decode="static",
                              cuda_graphs=graphs, device="cuda", dtype="bfloat16")
        assert engine.runtime.lookahead_kind == "stacked"
        result = engine.generate(image=image, prompt=prompt, max_new_tokens=40, min_new_tokens=40)
        c = engine.runtime.prediction_counters
        runs.append((result.token_ids, result.stats.hits_per_layer, result.stats.misses_per_layer,
                     result.stats.prefetch_issued_bytes, c.true_pos.tolist(), c.actual.tolist(), c.predicted.tolist()))
        (decoder,) = engine.decoders.held.values()
        assert decoder.mode == ("graph" if graphs else "eager")
    assert ops._PREDICT_CHECKED.get(str(torch.device("cuda", torch.cuda.current_device())))  # the kernel ran
    assert runs[0] == runs[1]
    assert runs[0][3] > 0


def test_a_norm_swapped_to_a_fused_stand_in_still_stacks(qwen_checkpoint, monkeypatch):
    # An instance forward of the same math (as a fused RMSNorm kernel swapped into the module) whose last
    # bits differ: the stack is judged by the class's own forward, so it is still used.
    engine = vismmoe.load(qwen_checkpoint, expert_budget=0.5, prefetch=True)
    predictor = engine.runtime.predictor
    for _, norm in predictor.targets:
        own = type(norm).forward
        monkeypatch.setattr(norm, "forward", lambda x, norm=norm, own=own: torch.nextafter(
            own(norm, x), torch.tensor(float("inf"), dtype=x.dtype)), raising=False)
    stack, why = RouterStack.build(predictor, engine.layout.top_k)
    assert stack is not None, why


def test_is_a_top_k_accepts_either_side_of_a_tie_and_nothing_else():
    from vismmoe.offload.router_stack import is_a_top_k

    logits = torch.tensor([[0.5, 2.0, 1.0, 1.0, -1.0]])
    assert is_a_top_k(logits, torch.tensor([[1, 2]]), 2) and is_a_top_k(logits, torch.tensor([[3, 1]]), 2)
    assert not is_a_top_k(logits, torch.tensor([[1, 0]]), 2)  # 0.5 chosen over a 1.0 left out
    assert not is_a_top_k(logits, torch.tensor([[1, 1]]), 2)  # not distinct
    assert not is_a_top_k(logits, torch.tensor([[1, 2, 3]]), 2)


def test_kernel_gate_skips_rows_and_leaves_the_counts_at_zero(kernel_device):
    # prefetch: auto switches a layer's prediction off with a device scalar: that row is -1, its router unread.
    gen = torch.Generator().manual_seed(13)
    x, norm_w, router_w, eps = random_case(gen, 3, 64, 72)
    gate = torch.tensor([2, 0, 5])
    scratch = ops.predict_workspace(3, 64, kernel_device)
    got = ops.predict_experts(*(t.to(kernel_device) for t in (x, norm_w, router_w)), eps, 4, kernel=True,
                              scratch=scratch, gate=gate.to(kernel_device))
    want = predict_experts_reference(x, norm_w, router_w, eps, 4, gate)
    assert torch.equal(got.cpu(), want) and (want[1] == -1).all() and (want[[0, 2]] >= 0).all()
    assert not scratch[1].any()


@pytest.mark.parametrize("kernel", [False, True])
def test_gate_skips_switched_off_layers(request, kernel):
    """A gate entry <= 0 (that layer's prefetch is off, e.g. under prefetch: auto) gives a -1 row; the other
    rows are the ungated prediction. The gate is read with any stride (the device path passes a diagonal of
    the [L, depth] limits)."""
    device = request.getfixturevalue("kernel_device") if kernel else "cpu"
    gen = torch.Generator().manual_seed(11)
    depth, num_experts, top_k, hidden = 3, 64, 8, 72
    x, norm_w, router_w, eps = random_case(gen, depth, num_experts, hidden)
    want = predict_experts_reference(x, norm_w, router_w, eps, top_k)
    limits = torch.tensor([[4, 0, 0], [0, 5, 0], [0, 2, 0], [0, 0, 1]])  # [L, depth]; targets at rows 1..3
    gate = torch.diagonal(limits[1:, :])  # stride depth + 1: (layer 1, d1) = 0, (2, d2) = 2, (3, d3) = 1
    assert gate.tolist() == [0, 2, 1] and gate.stride(0) == 4
    for g in (gate, torch.tensor([3, 0, 0]), torch.zeros(3, dtype=torch.int64)):
        got = ops.predict_experts(*(t.to(device) for t in (x, norm_w, router_w)), eps, top_k, kernel=kernel,
                                  gate=g.to(device))
        expect = torch.where(g.reshape(-1, 1) > 0, want, -1)
        assert torch.equal(got.cpu(), expect), g
