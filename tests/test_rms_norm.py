"""The fused RMSNorm kernel (vismmoe/kernels/rms_norm.py) against its torch twin `ops.rms_norm_reference`,
and the swap of transformers' RMSNorm modules (vismmoe/layers/rms_norm.py).

The kernel runs natively on a GPU and in Triton's interpreter on the CPU (TRITON_INTERPRET=1, fp32): the
`kernel_device` fixture of conftest.py; skipped where triton is not installed (CI). The swap is tested on
the CPU with the kernel's usability forced on: the swapped modules then run the twin, so the engine must give the same tokens as with
transformers' modules, and exactly the right modules must be swapped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vismmoe
from vismmoe import ops
from vismmoe.errors import ConfigError
from vismmoe.layers import rms_norm as norms

from .conftest import random_requests


SHAPES = [(1, 8), (3, 72), (7, 128), (2, 2048), (2, 3, 4, 100)]


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_twin_fp32(kernel_device, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    x = torch.randn(*shape, generator=gen) * 3
    w = torch.randn(shape[-1], generator=gen)
    got = ops.rms_norm(x.to(kernel_device), w.to(kernel_device), 1e-6, kernel=True)
    assert got.shape == x.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), ops.rms_norm_reference(x, w, 1e-6), atol=1e-5, rtol=1e-5)


def test_kernel_takes_strided_rows(kernel_device):
    """q/k norms see views; a non-contiguous input is normed row by row all the same."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 4, 32, generator=gen).transpose(0, 1)  # [4, 6, 32], not contiguous
    w = torch.randn(32, generator=gen)
    got = ops.rms_norm(x.to(kernel_device), w.to(kernel_device), 1e-5, kernel=True)
    torch.testing.assert_close(got.cpu(), ops.rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_dtype", ["same", torch.float32])
def test_kernel_matches_twin_half_precision(dtype, weight_dtype):
    """In bf16/fp16 the kernel rounds where the module rounds: the output dtype is the promoted one and
    the values agree to one rounding step (the sum's order is the only difference)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 2048, generator=gen) * 3).to("cuda", dtype)
    w = torch.randn(2048, generator=gen).to("cuda", dtype if weight_dtype == "same" else weight_dtype)
    got, ref = ops.rms_norm(x, w, 1e-6, kernel=True), ops.rms_norm_reference(x, w, 1e-6)
    assert got.dtype == ref.dtype
    close = torch.isclose(got.float(), ref.float(), rtol=2 ** -7, atol=1e-3)
    assert close.all() and (got == ref).float().mean() > 0.95


def test_rms_norm_rejects_mismatched_weight():
    from vismmoe.errors import InputError

    with pytest.raises(InputError, match="rms_norm wants x"):
        ops.rms_norm(torch.ones(2, 8), torch.ones(4), 1e-6)


class GemmaStyleNorm(nn.Module):  # 1 + weight: another arithmetic, must not be swapped
    def __init__(self, h):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(h)), 1e-6

    def forward(self, x):
        h = x.float()
        return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight.float())).to(x.dtype)


def test_only_modules_computing_transformers_rms_norm_qualify():
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeRMSNorm
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextRMSNorm

    for cls in (Qwen3VLMoeTextRMSNorm, Glm4vMoeRMSNorm):
        module = cls(24, eps=1e-5)
        nn.init.normal_(module.weight)
        assert norms.computes_rms_norm(module), cls.__name__
    assert not norms.computes_rms_norm(GemmaStyleNorm(24))
    assert not norms.computes_rms_norm(nn.LayerNorm(24))
    assert not norms.computes_rms_norm(nn.Linear(24, 24))


def test_fused_setting_needs_a_gpu_and_auto_leaves_cpu_models_alone(qwen_checkpoint):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the kernel is usable")
    with pytest.raises(ConfigError, match="norm_kernel: fused needs a CUDA device"):
        vismmoe.load(qwen_checkpoint, device="cpu", norm_kernel="fused")
    assert vismmoe.load(qwen_checkpoint, device="cpu").info().fused_norms == 0
    with pytest.raises(ConfigError, match="norm_kernel must be auto, fused or torch"):
        vismmoe.load(qwen_checkpoint, device="cpu", norm_kernel="triton")


def test_swapped_norms_give_the_same_tokens(qwen_checkpoint, monkeypatch):
    """Every text RMSNorm (4 per decoder layer: input, post-attention, q and k; plus the final norm) is
    swapped, nothing else; the engine's tokens stay those of transformers' modules."""
    monkeypatch.setattr(ops, "rms_norm_usable", lambda device: True)
    swapped = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.5)
    plain = vismmoe.load(qwen_checkpoint, device="cpu", expert_budget=0.5, norm_kernel="torch")
    layers = swapped.model.config.get_text_config().num_hidden_layers
    assert swapped.info().fused_norms == 4 * layers + 1 and plain.info().fused_norms == 0
    for image, prompt in random_requests(3, seed=5):
        a = swapped.generate(image=image, prompt=prompt, max_new_tokens=6)
        b = plain.generate(image=image, prompt=prompt, max_new_tokens=6)
        assert a.token_ids == b.token_ids
    # reconfigure switches both ways, and a refused setting changes nothing
    assert swapped.reconfigure(norm_kernel="torch").info().fused_norms == 0
    assert not any(hasattr(m, "fused_norm_eps") for m in swapped.model.modules())
    assert swapped.reconfigure(norm_kernel="auto").info().fused_norms == 4 * layers + 1
    monkeypatch.setattr(ops, "rms_norm_usable", lambda device: False)
    with pytest.raises(ConfigError, match="norm_kernel: fused needs"):
        swapped.reconfigure(norm_kernel="fused")
    assert swapped.info().fused_norms == 4 * layers + 1 and swapped.config.norm_kernel == "auto"


@pytest.mark.gpu
def test_fused_norms_on_the_gpu_keep_the_tokens(qwen_checkpoint):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    fused = vismmoe.load(qwen_checkpoint, device="cuda", norm_kernel="fused", dtype="float32")
    plain = vismmoe.load(qwen_checkpoint, device="cuda", norm_kernel="torch", dtype="float32")
    assert fused.info().fused_norms > 0
    for image, prompt in random_requests(3, seed=6):
        assert fused.generate(image=image, prompt=prompt, max_new_tokens=8).token_ids == \
            plain.generate(image=image, prompt=prompt, max_new_tokens=8).token_ids
