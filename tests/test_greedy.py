"""The greedy max-min selection (vismmoe/pruning/greedy.py): the numba loop equals its torch twin on the
same distances (random, tied, NaN), and the diversity and affinity methods keep exactly what the per-pick
torch loops they replaced kept, on inputs whose dot products are exact in any summation order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vismmoe.pruning import greedy
from vismmoe.pruning.affinity import _rescale, dominant_set, select_affinity
from vismmoe.pruning.greedy import _greedy_host, _reference, distance_rows, greedy_max_min
from vismmoe.pruning.methods import VisualTokens, relevance, select_diversity, unit


# -- the loops this module replaced, verbatim but for their signatures -----------------------------------


def old_greedy_max_min(points, k, first):
    n = points.shape[0]
    chosen = torch.zeros(n, dtype=torch.bool, device=points.device)
    first = torch.as_tensor(first, device=points.device)
    order = [first]
    chosen[first] = True
    nearest = 1.0 - points @ points[first]
    for _ in range(k - 1):
        pick = nearest.masked_fill(chosen, float("-inf")).argmax()
        order.append(pick)
        chosen[pick] = True
        nearest = torch.minimum(nearest, 1.0 - points @ points[pick])
    return torch.stack(order).sort().values


def old_select_diversity(tokens, k):
    points = unit(tokens.embeds)
    first = (points @ unit(points.mean(0))).argmin()
    return old_greedy_max_min(points, k, first)


def old_select_affinity(tokens, k, weights):
    routing = tokens.routing
    rel = _rescale(relevance(tokens))
    mass = _rescale(routing[:, dominant_set(routing)].sum(-1))
    base = weights["importance"] * rel + weights["concentration"] * mass
    emb, route = unit(tokens.embeds), unit(routing)
    w_route = min(max(weights["routing"], 0.0), 1.0)

    def distance(j):
        return (1 - w_route) * (1.0 - emb @ emb[j]) + w_route * (1.0 - route @ route[j])

    chosen = torch.zeros(emb.shape[0], dtype=torch.bool, device=emb.device)
    first = base.argmax()
    order = [first]
    chosen[first] = True
    nearest = distance(first)
    for _ in range(k - 1):
        pick = (base + weights["diversity"] * nearest).masked_fill(chosen, float("-inf")).argmax()
        order.append(pick)
        chosen[pick] = True
        nearest = torch.minimum(nearest, distance(pick))
    return torch.stack(order).sort().values


# -- inputs ----------------------------------------------------------------------------------------------


def exact_tokens(n, seed, text=3):
    """Visual tokens whose unit embeddings (entries +-1/4 in 16 dims) and unit routing rows (four entries
    of 1/2 among 16 experts) have dot products that are multiples of 1/16: a matmul and per-row products
    give the same bits, so old and new loops see identical distances, and many of them tie."""
    g = torch.Generator().manual_seed(seed)
    embeds = (torch.randint(0, 2, (n, 16), generator=g) * 2 - 1) * 0.25 * 2.0 ** torch.randint(-2, 3, (n, 1), generator=g)
    routing = torch.zeros(n, 16)
    routing.scatter_(1, torch.rand(n, 16, generator=g).argsort(-1)[:, :4], 0.5)
    return VisualTokens(embeds=embeds.float(), coords=torch.zeros(n, 3, dtype=torch.int64),
                        text=torch.randn(text, 16, generator=g), routing=routing)


def random_terms(n, seed, dims=(24, 8), weights=(0.6, 0.4)):
    g = torch.Generator().manual_seed(seed)
    return [(unit(torch.randn(n, d, generator=g)), w) for d, w in zip(dims, weights)]


# -- the numba loop against its torch twin, on the same distance matrix ---------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (7, 1), (7, 7), (40, 13), (200, 100), (300, 300)])
@pytest.mark.parametrize("seed", [0, 1])
def test_numba_loop_equals_torch_reference_on_random_distances(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(n, n, generator=g) * 2
    base = torch.rand(n, generator=g)
    first = int(torch.randint(0, n, (1,), generator=g))
    for b, w in ((None, 1.0), (base, 0.37), (base, 0.0)):
        want = _reference(lambda j: dist[j], n, k, first, b, w)
        host_base = torch.zeros(n) if b is None else b
        got = torch.from_numpy(_greedy_host(dist.numpy(), host_base.numpy(), np.float32(w), first, k))
        assert len(set(got.tolist())) == k and int(got[0]) == first
        assert torch.equal(got.sort().values, want)


@pytest.mark.parametrize("levels", [1, 2, 4])
def test_ties_go_to_the_lowest_index(levels):
    """Quantised distances and base scores (every score ties with many others; levels=1: all tie)."""
    g = torch.Generator().manual_seed(levels)
    n, k = 60, 30
    dist = torch.randint(0, levels, (n, n), generator=g).float() / levels
    base = torch.randint(0, levels, (n,), generator=g).float() / levels
    for b, w in ((None, 1.0), (base, 0.5)):
        want = _reference(lambda j: dist[j], n, k, 3, b, w)
        got = _greedy_host(dist.numpy(), (torch.zeros(n) if b is None else b).numpy(), np.float32(w), 3, k)
        assert torch.equal(torch.from_numpy(got).sort().values, want)
    if levels == 1:  # every score equal: the lowest unchosen index each time
        assert want.tolist() == sorted([3] + [i for i in range(n) if i != 3][:k - 1])


def test_nan_scores_pick_as_torch_argmax_does():
    g = torch.Generator().manual_seed(5)
    n, k = 30, 12
    dist = torch.rand(n, n, generator=g)
    dist[4, 9] = dist[11, 2] = dist[0, 20] = float("nan")
    base = torch.rand(n, generator=g)
    base[17] = float("nan")
    for first in (0, 4):
        want = _reference(lambda j: dist[j], n, k, first, base, 0.5)
        got = _greedy_host(dist.numpy(), base.numpy(), np.float32(0.5), first, k)
        assert torch.equal(torch.from_numpy(got).sort().values, want)


@pytest.mark.parametrize("n,k", [(1, 1), (50, 1), (50, 50), (97, 31), (784, 392)])
def test_greedy_max_min_equals_reference_on_its_distances(n, k):
    """End to end on continuous random points: the reference reading the same matrix picks the same."""
    terms = random_terms(n, seed=n + k)
    base = torch.rand(n, generator=torch.Generator().manual_seed(k))
    dist = distance_rows(terms, slice(0, n))  # the one block greedy_max_min computes at these sizes
    for b, w in ((None, 1.0), (base, 1.0), (base, 0.25)):
        got = greedy_max_min(terms, k, n // 2, b, w)
        assert got.dtype == torch.int64 and got.device == terms[0][0].device
        assert torch.equal(got, _reference(lambda j: dist[j], n, k, n // 2, b, w))


def test_blocks_and_the_large_n_path_select_the_same(monkeypatch):
    """Row blocks (small BLOCK_BYTES) and the per-row device loop above MATRIX_LIMIT give the matrix's
    selection (exact inputs, so every path's distances have the same bits)."""
    tokens = exact_tokens(150, seed=9)
    terms = [(unit(tokens.embeds), 0.5), (unit(tokens.routing), 0.5)]
    base = torch.rand(150, generator=torch.Generator().manual_seed(1))
    want = greedy_max_min(terms, 60, 7, base, 0.8)
    monkeypatch.setattr(greedy, "BLOCK_BYTES", 4 * 150 * 16)  # 16 rows a block: 10 blocks
    assert torch.equal(greedy_max_min(terms, 60, 7, base, 0.8), want)
    monkeypatch.setattr(greedy, "MATRIX_LIMIT", 100)
    assert torch.equal(greedy_max_min(terms, 60, 7, base, 0.8), want)


def test_bad_counts_are_refused():
    terms = random_terms(10, seed=0)
    for k, first in ((0, 0), (11, 0), (3, 10), (3, -1)):
        with pytest.raises(ValueError, match="1 <= k <= N"):
            greedy_max_min(terms, k, first)


# -- the methods against the loops they replaced ----------------------------------------------------------


@pytest.mark.parametrize("n,k", [(1, 1), (64, 1), (64, 64), (196, 49), (196, 98), (400, 133)])
def test_diversity_keeps_what_the_old_loop_kept(n, k):
    tokens = exact_tokens(n, seed=n * 7 + k)
    assert torch.equal(select_diversity(tokens, k, seed=0).kept, old_select_diversity(tokens, k))


@pytest.mark.parametrize("weights", [
    {"importance": 1.0, "concentration": 1.0, "diversity": 1.0, "routing": 0.5},
    {"importance": 0.3, "concentration": 2.0, "diversity": 0.7, "routing": 0.0},
    {"importance": 1.0, "concentration": 0.0, "diversity": 3.0, "routing": 1.0},
    {"importance": 1.0, "concentration": 1.0, "diversity": 0.0, "routing": 0.25},
])
@pytest.mark.parametrize("n,k,text", [(1, 1, 2), (64, 64, 2), (196, 49, 3), (196, 98, 0), (400, 200, 5)])
def test_affinity_keeps_what_the_old_loop_kept(weights, n, k, text):
    tokens = exact_tokens(n, seed=n + k + text, text=text)  # text=0: relevance ties everywhere (unit norms)
    assert torch.equal(select_affinity(tokens, k, weights).kept, old_select_affinity(tokens, k, weights))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_kept_indices_stay_on_the_device_and_match_the_cpu():
    tokens = exact_tokens(784, seed=3)
    weights = {"importance": 1.0, "concentration": 1.0, "diversity": 1.0, "routing": 0.5}
    cuda = VisualTokens(**{f: getattr(tokens, f).cuda() for f in ("embeds", "coords", "text", "routing")})
    for kept, want in ((select_affinity(cuda, 392, weights).kept, old_select_affinity(cuda, 392, weights)),
                       (select_diversity(cuda, 196, seed=0).kept, old_select_diversity(cuda, 196))):
        assert kept.device.type == "cuda" and torch.equal(kept, want)
