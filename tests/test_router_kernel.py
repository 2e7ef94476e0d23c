"""The fused router of decode steps (kernels/route_predict.py, `ops.route_top_k`) against its torch twin,
the twin against transformers' router modules, and which routers are swapped (layers/router.py).

The kernel runs natively on a GPU and in Triton's interpreter on the CPU (TRITON_INTERPRET=1); those
tests are skipped where triton is not installed (CI), where the routers keep transformers' forward.
"""

from __future__ import annotations

import pytest
import torch

import vismmoe
from vismmoe import ops
from vismmoe.errors import ConfigError
from vismmoe.layers.router import softmax_top_k_form


@pytest.mark.parametrize("tokens,experts,top_k,hidden", [(1, 8, 2, 24), (3, 60, 8, 72), (16, 128, 8, 130),
                                                         (2, 33, 5, 40)])
@pytest.mark.parametrize("renormalize", [True, False])
def test_kernel_matches_twin_fp32(kernel_device, tokens, experts, top_k, hidden, renormalize):
    gen = torch.Generator().manual_seed(tokens * 100 + experts + hidden)
    for _ in range(2):  # fresh random inputs each round; the same workspace reused
        x = torch.randn(tokens, hidden, generator=gen) * 2
        w = torch.randn(experts, hidden, generator=gen) / hidden**0.5
        scratch = ops.predict_workspace(ops.ROUTE_MAX_TOKENS, experts, kernel_device)
        logits, weights, ids = ops.route_top_k(x.to(kernel_device), w.to(kernel_device), top_k, renormalize,
                                               kernel=True, scratch=scratch)
        ref_logits, ref_weights, ref_ids = ops.route_top_k_reference(x, w, top_k, renormalize)
        torch.testing.assert_close(logits.cpu(), ref_logits, atol=1e-5, rtol=1e-5)
        # Random fp32 probabilities do not tie: the same experts in the same (descending) order.
        assert torch.equal(ids.cpu(), ref_ids)
        torch.testing.assert_close(weights.cpu(), ref_weights, atol=1e-6, rtol=1e-5)
        if renormalize:
            torch.testing.assert_close(weights.sum(-1).cpu(), torch.ones(tokens), atol=1e-5, rtol=0)
        assert not scratch[1].any()  # the completion counts are left at zero for the next launch


def test_kernel_breaks_ties_to_the_lowest_id(kernel_device):
    # Two experts with identical rows tie exactly; with k = 1 only the lower id may be chosen.
    w = torch.randn(6, 16)
    w[4] = w[1]
    x = torch.zeros(1, 16)
    x[0] = w[1] * 10  # experts 1 and 4 lead, tied
    _, weights, ids = ops.route_top_k(x.to(kernel_device), w.to(kernel_device), 1, False, kernel=True)
    assert ids.tolist() == [[1]]
    _, weights, ids = ops.route_top_k(x.to(kernel_device), w.to(kernel_device), 2, True, kernel=True)
    assert ids.tolist() == [[1, 4]] and torch.allclose(weights.cpu(), torch.tensor([[0.5, 0.5]]))


def test_self_check_passes_and_catches_a_disagreement(kernel_device, monkeypatch):
    device = torch.device(kernel_device)
    assert ops.compare_route_kernel(device)
    real = ops.route_top_k_reference
    monkeypatch.setattr(ops, "route_top_k_reference", lambda x, w, k, renorm: real(x, w, k, not renorm))
    assert not ops.compare_route_kernel(device)


@pytest.mark.parametrize("family,renormalize", [("qwen3_vl_moe", True), ("internvl_qwen3_moe", None),
                                                ("llava_onevision_olmoe", None), ("glm4v_moe", "refused")])
def test_which_routers_compute_the_twin(tiny_checkpoints, family, renormalize):
    engine = vismmoe.load(tiny_checkpoints[family], device="cpu")
    routers = [layer.block.gate if hasattr(layer.block, "gate") else layer.block.router
               for layer in engine.layout.layers]
    forms = {softmax_top_k_form(r) for r in routers}
    if renormalize == "refused":  # sigmoid scores with a correction bias and groups
        assert forms == {None}
    else:
        assert len(forms) == 1 and None not in forms
        config_flag = getattr(routers[0], "norm_topk_prob", True)
        assert forms == {bool(config_flag)}


def test_router_kernel_setting_on_cpu(qwen_checkpoint):
    with pytest.raises(ConfigError, match="router_kernel: fused needs a CUDA device"):
        vismmoe.load(qwen_checkpoint, device="cpu", router_kernel="fused")
    with pytest.raises(ConfigError, match="router_kernel must be auto, fused or torch"):
        vismmoe.load(qwen_checkpoint, device="cpu", router_kernel="triton")
    engine = vismmoe.load(qwen_checkpoint, device="cpu")
    assert engine.info().fused_routers == 0 and engine.info().router_kernel == "auto"


def test_swapped_routers_keep_the_tokens_in_the_interpreter(kernel_device, qwen_checkpoint, monkeypatch):
    """With the swap forced on the CPU (the kernel in Triton's interpreter), generation gives the same
    tokens as transformers' routers, on both decode paths; prefill keeps the class forward."""
    if kernel_device != "cpu":
        pytest.skip("the GPU variant is test_fused_routers_on_the_gpu_keep_the_tokens")
    from vismmoe.layers import router as router_module

    monkeypatch.setattr(ops, "route_kernel_usable", lambda device: True)
    from .conftest import random_requests

    (image, prompt), = random_requests(1, seed=4)
    for decode in ("static", "generate"):
        plain = vismmoe.load(qwen_checkpoint, device="cpu", dtype="float32", expert_budget=0.5, decode=decode,
                             router_kernel="torch")
        fused = vismmoe.load(qwen_checkpoint, device="cpu", dtype="float32", expert_budget=0.5, decode=decode,
                             router_kernel="fused")
        assert fused.info().fused_routers == len(fused.layout.layers)
        calls = []
        real = router_module.ops.route_top_k
        monkeypatch.setattr(router_module.ops, "route_top_k", lambda *a, **k: calls.append(1) or real(*a, **k))
        want = plain.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6).token_ids
        got = fused.generate(image=image, prompt=prompt, max_new_tokens=6, min_new_tokens=6).token_ids
        assert got == want and calls, decode
        monkeypatch.setattr(router_module.ops, "route_top_k", real)
        assert fused.reconfigure(router_kernel="torch").info().fused_routers == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_routers_on_the_gpu_keep_the_tokens(qwen_checkpoint):
    from .conftest import random_requests

    requests = random_requests(3, seed=6)
    fused = vismmoe.load(qwen_checkpoint, device="cuda", router_kernel="fused", dtype="float32", expert_budget=0.5)
    plain = vismmoe.load(qwen_checkpoint, device="cuda", router_kernel="torch", dtype="float32", expert_budget=0.5)
    assert fused.info().fused_routers > 0 and plain.info().fused_routers == 0
    for image, prompt in requests:
        want = plain.generate(image=image, prompt=prompt, max_new_tokens=8, min_new_tokens=8)
        got = fused.generate(image=image, prompt=prompt, max_new_tokens=8, min_new_tokens=8)
        assert got.token_ids == want.token_ids
