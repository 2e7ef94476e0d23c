"""Which visual tokens to keep: every method maps the request's visual tokens to exactly `k` kept ones.

A method sees `VisualTokens` (the embeddings the language model would receive, their spatial
coordinates, the prompt's text embeddings, and, for affinity, the first MoE layers' routing) and
returns a `Selection`: the kept token indices (ascending, into the request's visual tokens) and, for
methods that average (pool) or when merging is on, which kept token each visual token folds into.
No method materialises an attention matrix: scores are per-token vectors or one token against a set;
the greedy methods (greedy.py) build one [N, N] token-token distance matrix of the request's visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .greedy import greedy_max_min


@dataclass
class VisualTokens:
    embeds: torch.Tensor  # [N, D] float32: the language model's input embeddings of the visual tokens
    coords: torch.Tensor  # [N, 3] int64: (image/tile id, row, column) of each token on its grid
    text: torch.Tensor  # [T, D] float32: embeddings of the prompt's text tokens after the last image
    routing: torch.Tensor | None = None  # [N, E] routing distributions (affinity only)


@dataclass
class Selection:
    kept: torch.Tensor  # [k] int64, ascending indices into the visual tokens
    assign: torch.Tensor | None = None  # [N] int64: slot in `kept` each token averages into (-1: dropped)


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.float(), dim=-1)


def select_random(tokens: VisualTokens, k: int, seed: int) -> Selection:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(tokens.embeds.shape[0], generator=g)
    return Selection(kept=perm[:k].sort().values.to(tokens.embeds.device))


def select_diversity(tokens: VisualTokens, k: int, seed: int) -> Selection:
    # DivPrune-style max-min diversity; the first pick is the token farthest from the mean embedding
    # (deterministic, and an outlier is the token the others cover worst).
    points = unit(tokens.embeds)
    first = int((points @ unit(points.mean(0))).argmin())
    return Selection(kept=greedy_max_min([(points, 1.0)], k, first))


def relevance(tokens: VisualTokens) -> torch.Tensor:
    """Text-conditioned relevance of each visual token: its largest cosine similarity to a text token
    of the prompt, in the language model's input-embedding space (one [N, T] product)."""
    if tokens.text.shape[0] == 0:
        return tokens.embeds.float().norm(dim=-1)
    return (unit(tokens.embeds) @ unit(tokens.text).T).max(dim=-1).values


def select_importance(tokens: VisualTokens, k: int, seed: int) -> Selection:
    score = relevance(tokens)
    kept = torch.topk(score, k, sorted=False).indices  # ties: torch's deterministic order on CPU
    return Selection(kept=kept.sort().values)


def select_pool(tokens: VisualTokens, k: int, seed: int) -> Selection:
    """Spatial average pooling to exactly k cells: each image's grid is cut into horizontal bands and each
    band into column runs, cells of near-equal size; a cell becomes one token, at its first token's
    position, holding the cell's mean embedding."""
    coords = tokens.coords.cpu()
    images = coords[:, 0].unique(sorted=True)
    if k < len(images):
        # Fewer cells than grids (many small tiles): stack the grids vertically into one.
        heights = torch.stack([coords[coords[:, 0] == i, 1].max() + 1 for i in images])
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), heights.cumsum(0)[:-1]])
        rows = coords[:, 1] + offsets[torch.searchsorted(images, coords[:, 0].contiguous())]
        coords = torch.stack([torch.zeros_like(rows), rows, coords[:, 2]], dim=1)
        images = images[:1] * 0
    sizes = torch.stack([(coords[:, 0] == i).sum() for i in images])
    # Cells per image proportional to its token count (largest remainders), at least one each.
    share = sizes.double() * k / sizes.sum()
    cells = share.floor().long().clamp(min=1)
    while cells.sum() > k:  # k >= number of grids here, so every grid keeps at least one cell
        cells[int((cells - share).masked_fill(cells <= 1, float("-inf")).argmax())] -= 1
    while cells.sum() < k:
        room = (share - cells).masked_fill(cells >= sizes, float("-inf"))
        cells[int(room.argmax())] += 1
    assign = torch.empty(coords.shape[0], dtype=torch.int64)
    next_cell = 0
    for image, n_cells in zip(images.tolist(), cells.tolist()):
        idx = (coords[:, 0] == image).nonzero().squeeze(1)
        labels = _grid_cells(coords[idx, 1], coords[idx, 2], n_cells)
        assign[idx] = labels + next_cell
        next_cell += n_cells
    kept = torch.stack([(assign == c).nonzero()[0, 0] for c in range(next_cell)])
    order = kept.argsort()
    slot = torch.empty_like(order)
    slot[order] = torch.arange(len(order))
    device = tokens.embeds.device
    return Selection(kept=kept[order].to(device), assign=slot[assign].to(device))


def _grid_cells(rows: torch.Tensor, cols: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Label each token of one grid with one of n_cells spatial cells (every label used)."""
    n = rows.shape[0]
    order = torch.argsort(rows * (int(cols.max()) + 1) + cols)  # row-major
    r_ids = rows.unique(sorted=True)
    height, width = len(r_ids), max(1, n // max(1, len(r_ids)))
    bands = max(-(-n_cells // width), round((n_cells * height / width) ** 0.5))
    bands = min(max(bands, 1), height, n_cells)
    # Band b holds rows [start_b, end_b) and cells_b cells (balanced).
    row_rank = torch.searchsorted(r_ids, rows)
    band_of_row = (row_rank * bands) // height
    labels = torch.empty(n, dtype=torch.int64)
    base = 0
    for b in range(bands):
        members = order[band_of_row[order] == b]  # row-major inside the band
        c_b = n_cells // bands + (1 if b < n_cells % bands else 0)
        c_b = min(c_b, len(members))
        # Column runs: sort by column then row, split into c_b contiguous near-equal groups.
        by_col = members[torch.argsort(cols[members] * (int(rows.max()) + 1) + rows[members])]
        chunk = torch.arange(len(by_col)) * c_b // len(by_col)
        labels[by_col] = chunk + base
        base += c_b
    if base != n_cells:  # a band had fewer tokens than cells: split the largest cells until the count fits
        while base < n_cells:
            counts = torch.bincount(labels, minlength=base)
            big = int(counts.argmax())
            members = (labels == big).nonzero().squeeze(1)
            labels[members[len(members) // 2:]] = base
            base += 1
    return labels


SELECTORS = {
    "random": select_random,
    "diversity": select_diversity,
    "importance": select_importance,
    "pool": select_pool,
}
