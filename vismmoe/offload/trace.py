"""Routing traces: which experts every token of every layer call used, recorded from real runs.

A trace is a sequence of *groups*, one per layer call in execution order: for each request, for each
forward step (0 = prefill, then one per decode token), for each MoE layer 0..L-1. Stored flat:
  experts           int16 [N, k]   routed expert ids of every token row
  visual            bool  [N]      whether the row's token is visual
  group_offsets     int64 [G+1]    rows of group g are group_offsets[g]:group_offsets[g+1]
  group_request     int32 [G]      index into request_ids
  group_step        int32 [G]
  group_layer       int32 [G]
  predicted         int16 [P]      optional: the set (sorted, unique) of experts predicted for group g
  predicted_offsets int64 [G+1]      one layer earlier; an empty set means "no prediction"
  request_ids       str   [R]
  meta              JSON: format_version, num_layers, num_experts, top_k, expert_bytes, model
saved with np.savez_compressed (no pickles). `TraceRecorder` writes them, `load_trace` reads them,
`synthetic_trace` makes ones with realistic structure for tests and sweeps.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from numba import njit

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TraceMeta:
    num_layers: int
    num_experts: int
    top_k: int
    expert_bytes: int = 0  # bytes of one expert record (one miss copies this many)
    model: str = ""


class Group(NamedTuple):
    index: int
    request: int
    step: int
    layer: int
    experts: np.ndarray  # [T, k]
    visual: np.ndarray  # [T] bool
    predicted: np.ndarray | None  # sorted unique expert ids, None if no prediction was recorded


class DemandSets(NamedTuple):
    """Per group, the distinct experts needed (ascending, as the experts op loads them) and how many
    visual / text token-expert pairs used each."""
    offsets: np.ndarray  # int64 [G+1]
    experts: np.ndarray  # int16 [M]
    n_visual: np.ndarray  # int32 [M]
    n_text: np.ndarray  # int32 [M]


@dataclass(eq=False)
class Trace:
    experts: np.ndarray
    visual: np.ndarray
    group_offsets: np.ndarray
    group_request: np.ndarray
    group_step: np.ndarray
    group_layer: np.ndarray
    request_ids: np.ndarray
    meta: TraceMeta
    predicted: np.ndarray | None = None
    predicted_offsets: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        G, N = len(self.group_request), len(self.experts)
        ok = (self.experts.ndim == 2 and self.experts.shape[1] == self.meta.top_k and self.visual.shape == (N,)
              and self.group_offsets.shape == (G + 1,) and self.group_offsets[0] == 0 and self.group_offsets[-1] == N
              and self.group_step.shape == (G,) and self.group_layer.shape == (G,))
        if self.predicted is not None:
            ok &= self.predicted_offsets is not None and self.predicted_offsets.shape == (G + 1,)
        if not ok:
            raise ValueError("inconsistent trace arrays")

    @property
    def num_groups(self) -> int:
        return len(self.group_request)

    @property
    def num_requests(self) -> int:
        return len(self.request_ids)

    @property
    def has_predictions(self) -> bool:
        return self.predicted is not None

    def group(self, g: int) -> Group:
        lo, hi = self.group_offsets[g], self.group_offsets[g + 1]
        predicted = None
        if self.predicted is not None and self.predicted_offsets[g + 1] > self.predicted_offsets[g]:
            predicted = self.predicted[self.predicted_offsets[g]:self.predicted_offsets[g + 1]]
        return Group(g, int(self.group_request[g]), int(self.group_step[g]), int(self.group_layer[g]),
                     self.experts[lo:hi], self.visual[lo:hi], predicted)

    def groups(self) -> Iterator[Group]:
        for g in range(self.num_groups):
            yield self.group(g)

    def requests(self, start: int, stop: int) -> "Trace":
        """The sub-trace of requests start..stop-1 (renumbered from 0), e.g. a held-out half."""
        if not 0 <= start < stop <= self.num_requests:
            raise ValueError(f"requests({start}, {stop}) outside the trace's {self.num_requests} requests")
        keep = (self.group_request >= start) & (self.group_request < stop)
        groups = np.flatnonzero(keep)
        if not np.array_equal(groups, np.arange(groups[0], groups[-1] + 1)):
            raise ValueError("the trace's requests are not contiguous in group order")
        g0, g1 = groups[0], groups[-1] + 1
        r0, r1 = self.group_offsets[g0], self.group_offsets[g1]
        predicted = predicted_offsets = None
        if self.predicted is not None:
            p0, p1 = self.predicted_offsets[g0], self.predicted_offsets[g1]
            predicted, predicted_offsets = self.predicted[p0:p1], self.predicted_offsets[g0:g1 + 1] - p0
        return Trace(self.experts[r0:r1], self.visual[r0:r1], self.group_offsets[g0:g1 + 1] - r0,
                     self.group_request[g0:g1] - start, self.group_step[g0:g1], self.group_layer[g0:g1],
                     self.request_ids[start:stop], self.meta, predicted, predicted_offsets)

    def decode_predictions_only(self) -> "Trace":
        """This trace with the prefill's predictions dropped (self if it has none): what an engine with
        prefetch_prefill off (the default) prefetches from, in decode steps only. A trace recorded with
        prefetch_prefill on, or a synthetic one, predicts in the prefill too."""
        if self.predicted is None:
            return self
        sizes = np.diff(self.predicted_offsets)
        if not sizes[self.group_step == 0].any():
            return self
        decode = self.group_step > 0
        offsets = np.zeros(self.num_groups + 1, np.int64)
        np.cumsum(sizes * decode, out=offsets[1:])
        return Trace(self.experts, self.visual, self.group_offsets, self.group_request, self.group_step,
                     self.group_layer, self.request_ids, self.meta, self.predicted[np.repeat(decode, sizes)], offsets)

    def demand_sets(self) -> DemandSets:
        """What each layer call must have resident (computed once, then cached on the trace)."""
        if "demand" not in self._cache:
            self._cache["demand"] = DemandSets(*_demand_sets(
                self.experts, self.visual, self.group_offsets, self.meta.num_experts))
        return self._cache["demand"]

    def prediction_quality(self, phase: str = "decode") -> dict[str, np.ndarray]:
        """Per layer: recall (needed experts that were predicted) and precision (predicted experts that
        were needed), pooled over groups that have a prediction. phase: "prefill", "decode" or "all"."""
        L, E = self.meta.num_layers, self.meta.num_experts
        zeros = np.zeros(L)
        if self.predicted is None:
            return dict(recall=zeros, precision=zeros, groups=zeros.astype(np.int64))
        steps = self.group_step
        use = {"prefill": steps == 0, "decode": steps > 0, "all": np.ones_like(steps, bool)}[phase]
        use &= np.diff(self.predicted_offsets) > 0
        demand = self.demand_sets()
        needed_group = np.repeat(np.arange(self.num_groups), np.diff(demand.offsets))
        pred_group = np.repeat(np.arange(self.num_groups), np.diff(self.predicted_offsets))
        needed_keys = needed_group * E + demand.experts
        pred_keys = pred_group * E + self.predicted
        needed_keys, pred_keys = needed_keys[use[needed_group]], pred_keys[use[pred_group]]
        pred_group = pred_group[use[pred_group]]
        correct = np.isin(pred_keys, needed_keys, assume_unique=True)
        layer_of = self.group_layer
        n_correct = np.bincount(layer_of[pred_group[correct]], minlength=L)
        n_pred = np.bincount(layer_of[pred_group], minlength=L)
        n_needed = np.bincount(layer_of[needed_keys // E], minlength=L)
        return dict(recall=n_correct / np.maximum(n_needed, 1), precision=n_correct / np.maximum(n_pred, 1),
                    groups=np.bincount(layer_of[use], minlength=L))

    def save(self, path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        arrays = dict(experts=self.experts, visual=self.visual, group_offsets=self.group_offsets,
                      group_request=self.group_request, group_step=self.group_step, group_layer=self.group_layer,
                      request_ids=self.request_ids,
                      meta=np.array(json.dumps(dict(format_version=FORMAT_VERSION, **asdict(self.meta)))))
        if self.predicted is not None:
            arrays.update(predicted=self.predicted, predicted_offsets=self.predicted_offsets)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)
        return path


def load_trace(path) -> Trace:
    with np.load(path, allow_pickle=False) as z:
        meta = json.loads(str(z["meta"]))
        version = meta.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: trace format {version}, this vismmoe reads {FORMAT_VERSION}")
        has_pred = "predicted" in z.files
        return Trace(
            experts=z["experts"], visual=z["visual"], group_offsets=z["group_offsets"],
            group_request=z["group_request"], group_step=z["group_step"], group_layer=z["group_layer"],
            request_ids=z["request_ids"], meta=TraceMeta(**meta),
            predicted=z["predicted"] if has_pred else None,
            predicted_offsets=z["predicted_offsets"] if has_pred else None,
        )


class TraceRecorder:
    """Collects a trace while the engine runs. Per request: `begin_request`, one `record` per layer
    call (in execution order), `end_request`; then `save`.

    Predictions for a layer are made one layer earlier: pass them to `record(..., predicted=)` or,
    when they are made, to `record_prediction(layer, step, ids)`; `record` picks up the pending one.
    An instance is also a runtime observer (`OffloadRuntime.add_observer`): `recorder(layer, step,
    top_k_index, visual_mask, predicted)`, where `predicted` is the set predicted for this layer one
    layer earlier (or None).
    """

    def __init__(self, num_layers: int, num_experts: int, top_k: int, expert_bytes: int = 0, model: str = ""):
        if num_experts > np.iinfo(np.int16).max:
            raise ValueError(f"{num_experts} experts do not fit the trace's int16 ids")
        self.meta = TraceMeta(num_layers, num_experts, top_k, int(expert_bytes), model)
        self._experts, self._visual, self._predicted = [], [], []
        self._request, self._step, self._layer = [], [], []
        self._request_ids: list[str] = []
        self._pending: dict[tuple[int, int], np.ndarray] = {}
        self._any_prediction = False
        self._open = False

    def begin_request(self, request_id) -> None:
        if self._open:
            self.end_request()
        self._request_ids.append(str(request_id))
        self._open = True

    def record_prediction(self, layer: int, step: int, expert_ids) -> None:
        self._pending[(int(layer), int(step))] = _prediction_set(expert_ids)

    def record(self, layer: int, step: int, expert_ids, visual=None, predicted=None) -> None:
        if not self._open:
            raise RuntimeError("TraceRecorder.record outside begin_request/end_request")
        ids = _numpy(expert_ids).astype(np.int16)
        if ids.ndim != 2 or ids.shape[1] != self.meta.top_k:
            raise ValueError(f"expert_ids must be [tokens, {self.meta.top_k}], got {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.meta.num_experts):
            raise ValueError(f"expert ids outside 0..{self.meta.num_experts - 1}")
        if not 0 <= layer < self.meta.num_layers:
            raise ValueError(f"layer {layer} outside 0..{self.meta.num_layers - 1}")
        vis = np.zeros(len(ids), bool) if visual is None else _numpy(visual).astype(bool).reshape(-1)
        if len(vis) != len(ids):
            raise ValueError(f"visual has {len(vis)} entries for {len(ids)} tokens")
        pending = self._pending.pop((int(layer), int(step)), None)
        pred = _prediction_set(predicted) if predicted is not None else pending
        self._any_prediction |= pred is not None
        self._experts.append(ids)
        self._visual.append(vis)
        self._predicted.append(np.zeros(0, np.int16) if pred is None else pred)
        self._request.append(len(self._request_ids) - 1)
        self._step.append(int(step))
        self._layer.append(int(layer))

    def __call__(self, layer, step, top_k_index, visual_mask, predicted=None) -> None:
        self.record(layer, step, top_k_index, visual_mask, predicted)

    def end_request(self) -> None:
        self._pending.clear()
        self._open = False

    def to_trace(self) -> Trace:
        k = self.meta.top_k
        sizes = np.array([len(e) for e in self._experts], np.int64)
        predicted = predicted_offsets = None
        if self._any_prediction:
            predicted = np.concatenate(self._predicted).astype(np.int16)
            predicted_offsets = _offsets([len(p) for p in self._predicted])
        return Trace(
            experts=np.concatenate(self._experts) if self._experts else np.zeros((0, k), np.int16),
            visual=np.concatenate(self._visual) if self._visual else np.zeros(0, bool),
            group_offsets=_offsets(sizes), group_request=np.array(self._request, np.int32),
            group_step=np.array(self._step, np.int32), group_layer=np.array(self._layer, np.int32),
            request_ids=np.array(self._request_ids, dtype=str), meta=self.meta,
            predicted=predicted, predicted_offsets=predicted_offsets,
        )

    def save(self, path) -> Path:
        return self.to_trace().save(path)


def synthetic_trace(num_requests: int = 100, num_layers: int = 4, num_experts: int = 16, top_k: int = 2,
                    visual_tokens: int = 49, text_tokens: int = 12, decode_steps: int = 24, zipf: float = 1.0,
                    request_focus: float = 1.0, reuse: float = 0.5, predict_accuracy: float | None = 0.8,
                    expert_bytes: int = 3 * 128 * 128 * 2, seed: int = 0) -> Trace:
    """A trace with the structure real VL-MoE routing has, for tests and policy sweeps.

    Per layer, visual and text tokens draw from two different Zipf(`zipf`) popularity orders (visual-
    expert affinity); each request tilts both by Gaussian noise of scale `request_focus` (its image and
    topic); a decode token repeats the previous step's experts at that layer with probability `reuse`
    (temporal locality). Prefill = `visual_tokens` visual then about `text_tokens` text tokens; decode
    runs decode_steps/2..decode_steps steps. Predictions, made for layers 1..L-1 as the engine makes
    them (one layer ahead, within a step), keep each routed expert with probability `predict_accuracy`
    and replace it by a uniform random one otherwise (None: no predictions).
    """
    rng = np.random.default_rng(seed)
    L, E, k = num_layers, num_experts, top_k
    rank_logit = -zipf * np.log(np.arange(1, E + 1))
    base_visual = np.stack([rank_logit[rng.permutation(E)] for _ in range(L)])
    base_text = np.stack([rank_logit[rng.permutation(E)] for _ in range(L)])
    parts = dict(experts=[], visual=[], sizes=[], request=[], step=[], layer=[], predicted=[], predicted_sizes=[])
    for r in range(num_requests):
        n_text = int(rng.integers(max(1, text_tokens // 2), text_tokens + 1))
        n_decode = int(rng.integers(max(0, decode_steps // 2), decode_steps + 1))
        n_prompt = visual_tokens + n_text
        logit_visual = base_visual + request_focus * rng.standard_normal((L, E))
        logit_text = base_text + request_focus * rng.standard_normal((L, E))
        # Prefill [L, tokens, E] logits -> top-k with Gumbel noise = sampling k experts per token.
        prefill_logits = np.concatenate([np.repeat(logit_visual[:, None], visual_tokens, 1),
                                         np.repeat(logit_text[:, None], n_text, 1)], axis=1)
        prefill = _gumbel_top_k(prefill_logits, k, rng)  # [L, T, k]
        decode = _gumbel_top_k(np.repeat(logit_text[None], n_decode, 0), k, rng)  # [D, L, k]
        # Temporal reuse: a step copies its predecessor's row (step 1 copies the last prompt token).
        chain = np.concatenate([prefill[:, -1][None], decode], axis=0)  # [D+1, L, k]
        source = np.where(rng.random((n_decode + 1, L)) < reuse, 0, np.arange(n_decode + 1)[:, None])
        source = np.maximum.accumulate(source, axis=0)
        decode = np.take_along_axis(chain, source[:, :, None], axis=0)[1:]
        # Groups in execution order: prefill layer by layer, then each decode step layer by layer.
        parts["experts"] += [prefill.reshape(-1, k), decode.reshape(-1, k)]
        parts["visual"] += [np.tile(np.arange(n_prompt) < visual_tokens, L), np.zeros(n_decode * L, bool)]
        parts["sizes"] += [np.full(L, n_prompt), np.ones(n_decode * L, np.int64)]
        parts["request"].append(np.full(L * (1 + n_decode), r))
        parts["step"].append(np.repeat(np.arange(1 + n_decode), L))
        parts["layer"].append(np.tile(np.arange(L), 1 + n_decode))
        if predict_accuracy is not None:  # one set per group, in the same order; none for layer 0
            for rows in (_predict(prefill, predict_accuracy, E, rng).reshape(L, -1),
                         _predict(decode, predict_accuracy, E, rng).reshape(-1, k)):
                values, sizes = _row_sets(rows, keep=np.arange(len(rows)) % L > 0)
                parts["predicted"].append(values)
                parts["predicted_sizes"].append(sizes)
    cat = lambda key, dtype: np.concatenate(parts[key]).astype(dtype)  # noqa: E731
    predicted = predicted_offsets = None
    if predict_accuracy is not None:
        predicted, predicted_offsets = cat("predicted", np.int16), _offsets(cat("predicted_sizes", np.int64))
    return Trace(
        experts=cat("experts", np.int16), visual=cat("visual", bool), group_offsets=_offsets(cat("sizes", np.int64)),
        group_request=cat("request", np.int32), group_step=cat("step", np.int32), group_layer=cat("layer", np.int32),
        request_ids=np.array([f"synthetic-{r}" for r in range(num_requests)]),
        meta=TraceMeta(L, E, k, int(expert_bytes), f"synthetic(seed={seed})"),
        predicted=predicted, predicted_offsets=predicted_offsets,
    )


# ------------------------------------------------------------------------------------------ helpers
def _gumbel_top_k(logits: np.ndarray, k: int, rng) -> np.ndarray:
    noisy = logits + rng.gumbel(size=logits.shape)
    return np.argsort(-noisy, axis=-1)[..., :k].astype(np.int16)


def _predict(rows: np.ndarray, accuracy: float, num_experts: int, rng) -> np.ndarray:
    """Each routed id stays with probability `accuracy`, else becomes a uniform random expert."""
    wrong = rng.random(rows.shape) >= accuracy
    return np.where(wrong, rng.integers(0, num_experts, rows.shape), rows)


def _row_sets(rows: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of every row of a 2-D array where `keep`, empty sets elsewhere:
    (concatenated values, count per row)."""
    ordered = np.sort(rows, axis=1)
    first = np.ones(ordered.shape, bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first &= keep[:, None]
    return ordered[first], first.sum(1)


def _prediction_set(ids) -> np.ndarray:
    return np.unique(_numpy(ids).reshape(-1)).astype(np.int16)


def _numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _offsets(sizes) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


@njit(cache=True)
def _demand_sets(experts, visual, group_offsets, num_experts):
    num_groups = group_offsets.shape[0] - 1
    k = experts.shape[1]
    capacity = experts.shape[0] * k
    out_offsets = np.zeros(num_groups + 1, np.int64)
    out_experts = np.empty(capacity, np.int16)
    out_visual = np.empty(capacity, np.int32)
    out_text = np.empty(capacity, np.int32)
    n_visual = np.zeros(num_experts, np.int32)
    n_text = np.zeros(num_experts, np.int32)
    touched = np.empty(num_experts, np.int64)
    pos = 0
    for g in range(num_groups):
        n_touched = 0
        for row in range(group_offsets[g], group_offsets[g + 1]):
            for j in range(k):
                e = experts[row, j]
                if n_visual[e] + n_text[e] == 0:
                    touched[n_touched] = e
                    n_touched += 1
                if visual[row]:
                    n_visual[e] += 1
                else:
                    n_text[e] += 1
        for i in range(1, n_touched):  # insertion sort: sets are small and mostly k long
            e = touched[i]
            j = i - 1
            while j >= 0 and touched[j] > e:
                touched[j + 1] = touched[j]
                j -= 1
            touched[j + 1] = e
        for i in range(n_touched):
            e = touched[i]
            out_experts[pos], out_visual[pos], out_text[pos] = e, n_visual[e], n_text[e]
            n_visual[e] = 0
            n_text[e] = 0
            pos += 1
        out_offsets[g + 1] = pos
    return out_offsets, out_experts[:pos].copy(), out_visual[:pos].copy(), out_text[:pos].copy()
