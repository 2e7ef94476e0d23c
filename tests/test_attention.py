"""The optional xformers backend: its glue (layouts, GQA, masks) against torch SDPA.

xformers has no CPU build, so a stand-in `xformers.ops` computes memory_efficient_attention with
torch SDPA in xformers' [B, S, H, D] layout; the test checks what vismmoe owns: the conversion.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from torch.nn import functional as F

import vismmoe
from vismmoe import ConfigError

from .conftest import random_requests


class _TopLeftCausal:
    pass


CALLS = []


def _fake_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    CALLS.append(type(attn_bias).__name__)
    assert q.shape[2] == k.shape[2], "heads must be expanded before the call"
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(attn_bias, _TopLeftCausal):
        qn, kn = q.shape[2], k.shape[2]
        mask = torch.ones(qn, kn, dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    else:
        if attn_bias is not None:
            assert attn_bias.stride(-2) % 8 == 0, "bias rows must be 8-aligned"
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=scale)
    return out.transpose(1, 2)


@pytest.fixture
def fake_xformers(monkeypatch):
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    ops.LowerTriangularMask = _TopLeftCausal
    package = types.ModuleType("xformers")
    package.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_xformers_backend_gives_the_sdpa_answers(qwen_checkpoint, fake_xformers):
    requests = random_requests(3, seed=40)
    sdpa = vismmoe.load(qwen_checkpoint)
    xf = vismmoe.load(qwen_checkpoint, attn_implementation="xformers")
    CALLS.clear()
    for image, prompt in requests:
        a = sdpa.generate(image=image, prompt=prompt, max_new_tokens=6).token_ids
        assert xf.generate(image=image, prompt=prompt, max_new_tokens=6).token_ids == a
    assert "_TopLeftCausal" in CALLS  # the text layers really ran through the backend


def test_xformers_missing_is_a_config_error(qwen_checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "xformers", None)  # makes `import xformers` raise ImportError
    with pytest.raises(ConfigError, match="needs the xformers package"):
        vismmoe.load(qwen_checkpoint, attn_implementation="xformers")
