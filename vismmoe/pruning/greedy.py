"""Greedy max-min selection, the loop shared by the diversity and affinity methods.

Start with token `first`; then, k - 1 times, keep the not-yet-kept token with the largest
    score_i = base_i + weight * nearest_i,    nearest_i = min over kept j of distance(i, j),
    distance(i, j) = sum over terms (P, w) of w * (1 - P_i . P_j)    (cosine distances of unit rows),
ties going to the lowest index (torch.argmax's rule; a NaN score counts as the largest, as there).
Diversity is one term (the embeddings) and no base; affinity mixes embedding and routing distances
and adds its base score.

How it runs. A loop of torch kernels pays ~6 launches per pick (eval/bench_pruning.py: 105 ms for 392
picks of 784 tokens on an H200, longer than the prefill it saves). Instead the [N, N] distance matrix
is computed once where the tokens live (one matmul per term, in row blocks of at most BLOCK_BYTES),
copied to the host, and all picks run in one numba loop: O(k N) scalar work, under 1 ms for 392 picks
of 784 tokens on one CPU core. The loop is compiled on its first call in a process (about a second the
first time, then loaded from numba's cache); `engine.warm_up` with pruning on pays that. The matrix is
N^2 float32 in host memory, so it is built only for N <= MATRIX_LIMIT (8192 tokens: 256 MiB); above
that `_reference` runs on the tokens' device, one distance row per pick (O(N) memory, slower).

The matrix's entries come from a matmul, the reference's from per-row products; the two round
differently, so they can pick differently only where two scores are within float32 rounding of each
other. Given the same distances they pick identically (tests/test_greedy.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from numba import njit

MATRIX_LIMIT = 8192  # largest N whose [N, N] float32 distance matrix is built (256 MiB on the host)
BLOCK_BYTES = 16 << 20  # device memory for one block of distance rows (each intermediate of the sum)

Terms = list[tuple[torch.Tensor, float]]  # (unit rows [N, D], weight) of each cosine-distance term


def greedy_max_min(terms: Terms, k: int, first: int, base: torch.Tensor | None = None,
                   weight: float = 1.0) -> torch.Tensor:
    """The k selected token indices, ascending, as a LongTensor on the tokens' device."""
    points = terms[0][0]
    n = points.shape[0]
    if not 1 <= k <= n or not 0 <= first < n:
        raise ValueError(f"greedy_max_min: need 1 <= k <= N and 0 <= first < N (k={k}, first={first}, N={n})")
    if n > MATRIX_LIMIT:
        return _reference(lambda j: distance_rows(terms, j), n, k, first, base, weight)
    dist = torch.empty((n, n), dtype=torch.float32)
    rows = max(1, BLOCK_BYTES // (4 * n))
    for start in range(0, n, rows):
        dist[start:start + rows].copy_(distance_rows(terms, slice(start, start + rows)))
    host_base = np.zeros(n, np.float32) if base is None else base.float().cpu().numpy()
    order = _greedy_host(dist.numpy(), host_base, np.float32(weight), first, k)
    return torch.from_numpy(order).sort().values.to(points.device)


def distance_rows(terms: Terms, rows) -> torch.Tensor:
    """Distances of tokens `rows` (an index: [N]; a slice: [rows, N]) to every token."""
    total = None
    for points, w in terms:
        d = w * (1.0 - points[rows] @ points.T)
        total = d if total is None else total + d
    return total


@njit(cache=True)
def _greedy_host(dist, base, weight, first, k):
    """The k picks in order over the host distance matrix, exactly as `_reference` makes them."""
    n = dist.shape[0]
    order = np.empty(k, np.int64)
    chosen = np.zeros(n, np.bool_)
    nearest = dist[first].copy()
    order[0] = first
    chosen[first] = True
    for step in range(1, k):
        pick, best = -1, np.float32(0.0)
        for i in range(n):  # argmax over the unchosen: first of the largest, NaN largest
            if chosen[i]:
                continue
            s = base[i] + weight * nearest[i]
            if pick < 0 or s > best or (s != s and best == best):
                pick, best = i, s
        order[step] = pick
        chosen[pick] = True
        row = dist[pick]
        for i in range(n):  # torch.minimum: NaN propagates
            if row[i] < nearest[i] or row[i] != row[i]:
                nearest[i] = row[i]
    return order


def _reference(distance_row: Callable, n: int, k: int, first: int, base: torch.Tensor | None = None,
               weight: float = 1.0) -> torch.Tensor:
    """The same selection as a plain torch loop on the distances' device, one `distance_row(j)` ([N]) per
    pick: the twin the numba loop is tested against, and the path for N > MATRIX_LIMIT."""
    nearest = distance_row(first)
    chosen = torch.zeros(n, dtype=torch.bool, device=nearest.device)
    chosen[first] = True
    order = [torch.as_tensor(first, device=nearest.device)]
    for _ in range(k - 1):
        score = nearest if base is None else base + weight * nearest
        pick = score.masked_fill(chosen, float("-inf")).argmax()
        order.append(pick)
        chosen[pick] = True
        nearest = torch.minimum(nearest, distance_row(pick))
    return torch.stack(order).sort().values
