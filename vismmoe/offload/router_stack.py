"""The lookahead predictor of static decode steps: every layer's norm and router weights stacked once, so
predicting the next layers' experts is one kernel launch (`ops.predict_experts`) per layer.

The module predictor (predictor.py) calls each later layer's norm and router modules: a handful of
small kernels per predicted layer, which inside a CUDA graph cost more than the layer's own cache work.
For the routers this can stand in for — a linear router whose experts are the top-k of its logits
(softmax top-k: Qwen3-VL-MoE, Qwen3-MoE under InternVL, OLMoE under LLaVA-OneVision) after an RMSNorm
of the transformers form `w * (x * rsqrt(mean(x^2) + eps)).to(dtype)` — the weights are copied once
into [L, H] and [L, E, H] stacks (E x H per layer: small beside the experts) and one launch per layer
does norm, logits and top-k for the next `depth` layers. Which routers qualify is decided once, at build,
from the module's attributes and a probe of its behaviour; any other (sigmoid with a score-correction
bias and group limits: GLM-4.5V) keeps the module predictor.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from .. import ops


def top_k_ids(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """The top-k columns of each row, highest first, ties to the lowest index (a stable sort), NaN last."""
    logits = torch.nan_to_num(logits.float(), nan=float("-inf"))
    return torch.sort(logits, dim=-1, descending=True, stable=True).indices[..., :top_k]


def predict_experts_reference(hidden: torch.Tensor, norm_w: torch.Tensor, router_w: torch.Tensor, eps: float,
                              top_k: int, gate: torch.Tensor | None = None) -> torch.Tensor:
    """The torch twin of the kernel: ids [D, top_k] (int64) of the top-k logits of
    router_w[d] @ rms_norm(hidden, norm_w[d]) for each d, ties to the lowest id; -1 rows where gate[d] <= 0.
    The ops are the modules' own, so on the CPU the logits are bitwise theirs."""
    x = hidden.reshape(1, -1)
    ids = torch.cat([top_k_ids(F.linear(ops.rms_norm_reference(x, norm_w[d], eps), router_w[d]), top_k)
                     for d in range(router_w.shape[0])])
    if gate is not None:
        ids = torch.where(gate.reshape(-1, 1).to(ids.device) > 0, ids, -1)
    return ids


def _norm_eps(norm) -> float | None:
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return float(eps) if isinstance(eps, (int, float)) else None


def why_not_stackable(router, norm, top_k: int, hidden_size: int, num_experts: int) -> str | None:
    """None if the (router, norm) pair computes what the kernel computes; else the reason it does not."""
    weight = getattr(router, "weight", None)
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (num_experts, hidden_size):
        return "the router has no [experts, hidden] weight"
    if getattr(router, "bias", None) is not None or hasattr(router, "e_score_correction_bias"):
        return "the router adds a bias (score correction): not plain top-k of the logits"
    if int(getattr(router, "num_group", getattr(router, "n_group", 1)) or 1) > 1:
        return "the router picks experts within groups"
    norm_w, eps = getattr(norm, "weight", None), _norm_eps(norm)
    if not isinstance(norm_w, torch.Tensor) or tuple(norm_w.shape) != (hidden_size,) or eps is None:
        return "the pre-router norm is not an RMSNorm with a [hidden] weight and an eps"
    if norm_w.dtype != weight.dtype:
        return "the norm and the router hold different dtypes"
    # The attributes fit; the behaviour must too: probe the modules on random states of several scales.
    # The classes' own forwards: an instance may run a fused stand-in of the same math (layers/), whose
    # sums in another order could differ from this formula in a last bit without computing anything else.
    gen = torch.Generator().manual_seed(0)
    probe = torch.randn(8, hidden_size, generator=gen) * torch.logspace(-1, 1, 8).unsqueeze(1)
    probe = probe.to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        normed = type(norm).forward(norm, probe)
        if not torch.equal(normed, ops.rms_norm_reference(probe, norm_w, eps)):
            return "the pre-router norm does not compute transformers' RMSNorm"
        out = type(router).forward(router, normed)
        indices = out[-1] if isinstance(out, tuple) else out
        logits = F.linear(normed, weight).float()
    if not is_a_top_k(logits, indices, top_k):
        return "the router's experts are not the top-k of its logits"
    return None


def is_a_top_k(logits: torch.Tensor, indices: torch.Tensor, top_k: int) -> bool:
    """Are `indices` [rows, top_k] a top-k of each row of `logits`: distinct, and none of them below an
    expert left out? (Ties at the boundary may be broken either way: bf16 logits tie often.)"""
    if indices.dim() != 2 or tuple(indices.shape) != (logits.shape[0], top_k):
        return False
    chosen = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, indices.long(), True)
    lowest_in = torch.where(chosen, logits, float("inf")).min(1).values
    highest_out = torch.where(chosen, float("-inf"), logits).max(1).values
    return bool((chosen.sum(1) == top_k).all() and (lowest_in >= highest_out).all())


class RouterStack:
    """Stacked norm and router weights of every MoE layer, and the one-launch prediction from them."""

    def __init__(self, norm_w: torch.Tensor, router_w: torch.Tensor, eps: float, top_k: int):
        self.norm_w, self.router_w, self.eps, self.top_k = norm_w, router_w, eps, top_k
        self.num_layers = router_w.shape[0]
        # The prediction kernel's workspace, made here (not on first use) so that Engine.held_bytes counts
        # it from the start; on the CPU the kernel runs only in tests, with its own.
        self.scratch = (ops.predict_workspace(self.num_layers, router_w.shape[1], router_w.device)
                        if router_w.is_cuda else None)

    @classmethod
    def build(cls, predictor, top_k: int) -> tuple["RouterStack | None", str]:
        """A stack of `predictor`'s (router, norm) pairs, or (None, why not) when any layer cannot be
        stacked (then the module predictor serves the static path)."""
        targets = predictor.targets
        if any(t is None for t in targets):
            return None, "a MoE layer has no router or pre-router norm the predictor knows"
        router0, norm0 = targets[0]
        num_experts, hidden_size = router0.weight.shape if isinstance(getattr(router0, "weight", None),
                                                                      torch.Tensor) else (0, 0)
        eps = {_norm_eps(norm) for _, norm in targets}
        for router, norm in targets:
            why = why_not_stackable(router, norm, top_k, hidden_size, num_experts)
            if why is not None:
                return None, why
        if len(eps) != 1:
            return None, "the pre-router norms use different eps"
        norm_w = torch.stack([norm.weight.detach() for _, norm in targets]).contiguous()
        router_w = torch.stack([router.weight.detach() for router, _ in targets]).contiguous()
        return cls(norm_w, router_w, eps.pop(), top_k), "stacked"

    def predict_into(self, layer: int, hidden: torch.Tensor, out: torch.Tensor, gate=None) -> None:
        """out[d] = the predicted experts of layer `layer` + 1 + d, for d < out.shape[0] (which must not
        reach past the last layer), from `hidden`, the one decode token's state entering `layer`; -1 (and
        that layer's router not read) where gate[d] <= 0."""
        rows = slice(layer + 1, layer + 1 + out.shape[0])
        scratch = None if self.scratch is None else (self.scratch[0][rows], self.scratch[1][rows])
        ops.predict_experts(hidden.reshape(-1).contiguous(), self.norm_w[rows], self.router_w[rows], self.eps,
                            self.top_k, out, scratch=scratch, gate=gate)


def random_case(gen: torch.Generator, depth: int, num_experts: int, hidden_size: int, ties: bool = False):
    """(hidden, norm_w, router_w, eps) for kernel tests. With `ties`, small integers and eps 0: every
    product and sum is exact in fp32, so many logits tie exactly (the tie rule is what is compared)."""
    if ties:
        hidden = torch.full((hidden_size,), 2.0)  # rms 2: normalises to exactly 1
        norm_w = torch.randint(1, 3, (depth, hidden_size), generator=gen).float()
        router_w = torch.randint(-2, 3, (depth, num_experts, hidden_size), generator=gen).float()
        return hidden, norm_w, router_w, 0.0
    hidden = torch.randn(hidden_size, generator=gen) * 3
    norm_w = 1 + 0.1 * torch.randn(depth, hidden_size, generator=gen)
    router_w = torch.randn(depth, num_experts, hidden_size, generator=gen) / hidden_size**0.5
    return hidden, norm_w, router_w, 1e-6


def compare_predict_kernel(device: torch.device, seed: int = 0) -> bool:
    """The kernel against the twin on small random cases (fp32; exact ties in fp32, bf16 and fp16), for ops'
    one-time check."""
    from ..kernels import route_predict

    gen = torch.Generator().manual_seed(seed)
    cases = [(1, 8, 48, 2, False, torch.float32), (2, 60, 72, 8, False, torch.float32)]
    # Exact ties in every dtype the engine runs (small integers are exact in half types too).
    cases += [(3, 16, 40, 4, True, dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16)]
    for depth, num_experts, hidden_size, top_k, ties, dtype in cases:
        hidden, norm_w, router_w, eps = (t.to(dtype) if torch.is_tensor(t) else t for t in
                                         random_case(gen, depth, num_experts, hidden_size, ties))
        want = predict_experts_reference(hidden, norm_w, router_w, eps, top_k)
        out = torch.empty((depth, top_k), dtype=torch.int64, device=device)
        got = route_predict.predict_experts(hidden.to(device), norm_w.to(device), router_w.to(device), eps, top_k, out)
        if not torch.equal(got.cpu(), want):
            return False
    return True
