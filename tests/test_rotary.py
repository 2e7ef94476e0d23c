"""The fused rotary embedding of decode steps (kernels/rotary.py, `ops.rotary`) against its torch twin, the
twin against transformers' `apply_rotary_pos_emb`, and the dispatcher put into modeling modules
(layers/rotary.py).

The kernel runs natively on a GPU and in Triton's interpreter on the CPU (TRITON_INTERPRET=1); those
tests are skipped where triton is not installed (CI). The interpreter casts fp32 to bf16 by truncation
(a GPU rounds to nearest, as torch does), so bf16 is compared bit for bit on a GPU only.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import vismmoe
from vismmoe import ops
from vismmoe.errors import ConfigError
from vismmoe.layers import rotary as rotary_layer


def _case(gen, B, HQ, HK, S, D, dtype, device, cos_batch=1):
    q = (torch.randn(B, S, HQ, D, generator=gen) * 3).to(device, dtype).transpose(1, 2)  # as attention hands it
    k = (torch.randn(B, S, HK, D, generator=gen) * 3).to(device, dtype).transpose(1, 2)
    cos = torch.randn(cos_batch, S, D, generator=gen).to(device, dtype)
    sin = torch.randn(cos_batch, S, D, generator=gen).to(device, dtype)
    return q, k, cos, sin


@pytest.mark.parametrize("B,HQ,HK,S,D,cos_batch", [(1, 4, 2, 1, 16, 1), (2, 6, 3, 3, 40, 2), (1, 32, 4, 1, 128, 1),
                                                   (3, 5, 5, 16, 64, 1)])
def test_kernel_matches_twin_bit_for_bit(kernel_device, B, HQ, HK, S, D, cos_batch):
    gen = torch.Generator().manual_seed(B * 100 + D + S)
    # fp32 only in the interpreter (numpy does not contract a * b + c; a GPU compiler does, which is why
    # ops.rotary_fits keeps fp32 on transformers' function); bf16 bit for bit only on a GPU.
    dtypes = [torch.float16] + ([torch.bfloat16] if kernel_device == "cuda" else [torch.float32])
    for dtype in dtypes:
        q, k, cos, sin = _case(gen, B, HQ, HK, S, D, dtype, kernel_device, cos_batch)
        got = ops.rotary(q, k, cos, sin, kernel=True)
        want = ops.rotary_reference(q, k, cos, sin)
        for a, b in zip(got, want):
            assert a.shape == b.shape  # and the same layout (strides of dims longer than 1)
            assert [st for st, n in zip(a.stride(), a.shape) if n > 1] == [st for st, n in zip(b.stride(), b.shape) if n > 1]
            assert torch.equal(a, b), dtype


def test_kernel_in_bf16_is_within_the_interpreters_cast(kernel_device):
    if kernel_device != "cpu":
        pytest.skip("bit for bit on the GPU: test_kernel_matches_twin_bit_for_bit")
    gen = torch.Generator().manual_seed(1)
    q, k, cos, sin = _case(gen, 1, 8, 2, 1, 64, torch.bfloat16, "cpu")
    for a, b in zip(ops.rotary(q, k, cos, sin, kernel=True), ops.rotary_reference(q, k, cos, sin)):
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=2 ** -6)


def test_rotary_fits_refuses_what_the_kernel_does_not_take():
    q = torch.zeros(1, 4, 1, 8, dtype=torch.bfloat16)
    k = torch.zeros(1, 2, 1, 8, dtype=torch.bfloat16)
    cos = sin = torch.zeros(1, 1, 8, dtype=torch.bfloat16)
    assert not ops.rotary_fits(q, k, cos, sin)  # the CPU: the twin
    meta = dict(device="meta", dtype=torch.bfloat16)
    qm, km, cm = torch.zeros(1, 4, 1, 8, **meta), torch.zeros(1, 2, 1, 8, **meta), torch.zeros(1, 1, 8, **meta)
    assert not ops.rotary_fits(qm, km, cm, cm)  # not CUDA either
    assert not ops.rotary_fits(q, k, cos, sin, unsqueeze_dim=2)


@pytest.mark.parametrize("module_name", ["qwen3_vl_moe", "qwen3_moe", "olmoe"])
def test_transformers_rotary_is_the_twin(module_name):
    modeling = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    fn = getattr(modeling.apply_rotary_pos_emb, "vismmoe_original", modeling.apply_rotary_pos_emb)
    for dtype in (torch.float32, torch.bfloat16):
        assert rotary_layer.computes_rotary(fn, torch.device("cpu"), dtype)
    assert not rotary_layer.computes_rotary(lambda q, k, c, s: (q * c, k * c), torch.device("cpu"), torch.float32)


def test_dispatcher_runs_the_kernel_only_where_it_is_on(monkeypatch):
    calls = []

    def original(q, k, cos, sin, unsqueeze_dim=1):
        calls.append("original")
        return ops.rotary_reference(q, k, cos, sin, unsqueeze_dim)

    fn = rotary_layer._dispatcher(original)
    monkeypatch.setattr(ops, "rotary", lambda *a, **k: calls.append("kernel") or ("q", "k"))
    monkeypatch.setattr(ops, "rotary_fits", lambda *a: True)
    q = torch.zeros(1, 2, 1, 4)
    fn(q, q, q[0, 0:1], q[0, 0:1])  # a CPU tensor: never the kernel
    assert calls == ["original"]
    assert fn.vismmoe_original is original


def test_rope_kernel_setting_on_cpu(qwen_checkpoint):
    with pytest.raises(ConfigError, match="rope_kernel: fused needs a CUDA device"):
        vismmoe.load(qwen_checkpoint, device="cpu", rope_kernel="fused")
    with pytest.raises(ConfigError, match="rope_kernel must be auto, fused or torch"):
        vismmoe.load(qwen_checkpoint, device="cpu", rope_kernel="yes")
    info = vismmoe.load(qwen_checkpoint, device="cpu").info()
    assert info.fused_rotary == 0 and info.rope_kernel == "auto"  # auto on a CPU: transformers' function


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_vl_moe", "internvl_qwen3_moe", "llava_onevision_olmoe", "glm4v_moe"])
def test_fused_rotary_on_the_gpu_keeps_the_tokens(tiny_checkpoints, family):
    from .conftest import random_requests

    requests = random_requests(2, seed=9)
    fused = vismmoe.load(tiny_checkpoints[family], device="cuda", dtype="bfloat16", expert_budget=0.5)  # rope_kernel: auto
    # GLM-4.5V's text attention may rotate only part of each head (partial rotary), which ops.rotary_fits
    # leaves to transformers' function: whether its module dispatches or not, the tokens stay the same.
    assert fused.info().fused_rotary > 0 or family == "glm4v_moe"
    want = []
    for image, prompt in requests:
        want.append(fused.generate(image=image, prompt=prompt, max_new_tokens=8, min_new_tokens=8).token_ids)
    fused.reconfigure(rope_kernel="torch")
    assert fused.info().fused_rotary == 0
    got = [fused.generate(image=image, prompt=prompt, max_new_tokens=8, min_new_tokens=8).token_ids
           for image, prompt in requests]
    assert got == want


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rotary_fits_takes_half_types_only_on_the_gpu():
    shapes = ((1, 4, 1, 8), (1, 2, 1, 8), (1, 1, 8), (1, 1, 8))
    for dtype, fits in ((torch.bfloat16, True), (torch.float16, True), (torch.float32, False)):
        q, k, cos, sin = (torch.zeros(s, dtype=dtype, device="cuda") for s in shapes)
        assert ops.rotary_fits(q, k, cos, sin) is fits
        q17 = torch.zeros(1, 4, 17, 8, dtype=dtype, device="cuda")  # a prefill: transformers' function
        assert not ops.rotary_fits(q17, torch.zeros(1, 2, 17, 8, dtype=dtype, device="cuda"),
                                   torch.zeros(1, 17, 8, dtype=dtype, device="cuda"), torch.zeros(1, 17, 8, dtype=dtype, device="cuda"))
