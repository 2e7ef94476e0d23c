"""The prediction ledger: how well the lookahead predictor guessed each layer's experts.

When a layer prefetches for layer l + d it notes the predicted set here; when layer l + d runs, its
real experts are scored against it. The host-decided path notes host arrays (`expect`) and scores
them after its one readback per layer (`score`). The device-decided path (static decode, no readback
inside a step) has its predictions written as ids into one device buffer (`predicted[l, d - 1]`: made
at layer l for layer l + d) and scored by the cache decision kernel of layer l + d itself (`scoring`,
no launch of its own; `score_predicted` is the torch twin) into a device tensor that `end_device` folds
into the same counters, so a request's recall and precision cover both its prefill and its decode steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class PredictionCounters:
    """Per lookahead distance and layer: true positives, actual and predicted set sizes."""

    true_pos: np.ndarray
    actual: np.ndarray
    predicted: np.ndarray
    # Under `prefetch: auto`: per MoE layer, the share of the request's decode steps its prefetch ran
    # (None: layer 0, which nothing predicts); None without auto (offload/autoprefetch.py).
    on_fraction: list | None = None

    @classmethod
    def zeros(cls, depth: int, num_layers: int) -> "PredictionCounters":
        return cls(*(np.zeros((depth, num_layers), np.int64) for _ in range(3)))

    def recall(self) -> np.ndarray:
        return np.divide(self.true_pos, self.actual, out=np.full(self.actual.shape, np.nan), where=self.actual > 0)

    def precision(self) -> np.ndarray:
        return np.divide(self.true_pos, self.predicted, out=np.full(self.predicted.shape, np.nan),
                         where=self.predicted > 0)


class PredictionLedger:
    def __init__(self, depth: int, num_layers: int, device: torch.device):
        self.depth, self.num_layers = depth, num_layers
        self.counters = PredictionCounters.zeros(depth, num_layers)
        # [true_pos, actual, predicted] x distance x layer, counted by device-decided steps (no sync).
        self.device_counts = torch.zeros((3, depth, num_layers), dtype=torch.int64, device=device)
        self._expected: dict = {}  # target layer -> {distance: predicted experts}, for this step (host path)
        self.predicted: torch.Tensor | None = None  # device path: [L, depth, k] ids (use_device_predictions)
        # Per layer, all distances, since the ledger was made: decode steps' true positives (`prefetch: auto`).
        self.decode_true_pos = np.zeros(num_layers, np.int64)

    def begin_request(self) -> None:
        self.counters = PredictionCounters.zeros(self.depth, self.num_layers)

    def begin_step(self) -> None:
        self._expected.clear()  # a step's predictions are scored within that step

    def expect(self, target: int, distance: int, predicted) -> None:
        """`predicted` (host array of expert ids) for layer `target`, made `distance` layers ahead."""
        self._expected.setdefault(target, {})[distance] = predicted

    # -- host-decided path -------------------------------------------------------------------------

    def score(self, layer: int, actual: np.ndarray, decode: bool = False) -> dict:
        """Score `actual` (distinct expert ids) of `layer` (in a decode step: `decode`); returns what was
        predicted for it by distance."""
        predicted_here = self._expected.pop(layer, {})
        c = self.counters
        for distance, predicted in predicted_here.items():
            true_pos = len(np.intersect1d(actual, predicted, assume_unique=True))
            c.true_pos[distance - 1, layer] += true_pos
            if decode:
                self.decode_true_pos[layer] += true_pos
            c.actual[distance - 1, layer] += len(actual) if len(predicted) else 0  # as score_predicted
            c.predicted[distance - 1, layer] += len(predicted)
        return predicted_here

    # -- device-decided path -----------------------------------------------------------------------

    def begin_device(self) -> None:
        self.device_counts.zero_()

    def use_device_predictions(self, top_k: int) -> None:
        """Allocate `predicted` [L, depth, top_k] (int64, -1 = none): the lookahead's ids on the device."""
        self.predicted = torch.full((self.num_layers, self.depth, top_k), -1, dtype=torch.int64,
                                    device=self.device_counts.device)

    def scoring(self, n_dist: int):
        """What ops.cache_demand needs to score a layer against the predictions made 1..n_dist layers before it."""
        return self.predicted, self.device_counts, n_dist

    def end_device(self) -> None:
        """Fold the device counts into the counters (one readback)."""
        self._expected.clear()
        counts = self.device_counts.cpu().numpy()
        c = self.counters
        c.true_pos += counts[0]
        self.decode_true_pos += counts[0].sum(0)  # static steps are decode steps
        c.actual += counts[1]
        c.predicted += counts[2]


def score_predicted(predicted: torch.Tensor, counts: torch.Tensor, n_dist: int, layer: int,
                    experts: torch.Tensor) -> None:
    """The torch twin of the scoring in the cache kernel: counts[:, d - 1, layer] += (true positives, actual,
    predicted) of `experts` (distinct ids of one decode token) against predicted[layer - d, d - 1], d <= n_dist.
    A skipped prediction (all -1: that layer's prefetch was off) scores nothing, so recall and precision
    describe the predictions that were made."""
    for d in range(1, n_dist + 1):
        pred = predicted[layer - d, d - 1]
        hit = (pred[:, None] == experts[None, :]) & (pred[:, None] >= 0)
        c = counts[:, d - 1, layer]
        made = (pred >= 0).sum()
        c[0] += hit.sum()
        c[1] += experts.numel() * (made > 0)
        c[2] += made
