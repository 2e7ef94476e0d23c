"""`prefetch: auto`: lookahead prefetch (and its prediction) runs only for the layers where it pays.

Per MoE layer l (the target of the predictions made one or more layers before it; all its distances
together), decayed counts of what its prefetches did decide whether it is on:

    saved = used * copy_s                       used: prefetched experts a demand then hit (misses saved)
    cost  = steps * predict_s + (issued - used) * copy_s * wrong_cost
    on    = saved >= cost   (or no evidence yet: on, to measure)

`issued` / `used` are the cache's own prefetch counters (`pf[0]`, `pf[1]` of the cache state, counted
by the same transitions on the host, in the simulator and on the device); `steps` the decode steps the
layer's prefetch ran. `copy_s` is one record's copy time and `predict_s` one prediction launch, measured
once at load on a GPU (`measure_costs`), else priors (`prior_costs`). `wrong_cost` (2) charges a wrong
copy its link time and the miss that its eviction of a cached expert tends to cause later.

Every `period` decode steps the counts of the period fold in (`fold`): where the layer was on, old
counts decay by `decay` and the period's are added; where it was off nothing was measured and the counts
stay. A layer that is off comes back on for one period (a probe) after `probe_every` periods off, so a
layer whose predictions got better is found again; each probe that finds it still not worth it doubles
the wait, up to `MAX_WAIT` periods (probes cost: rarer where prefetch keeps failing).

One formula, four runners: `fold` is plain arithmetic on scalars or arrays, run as it is by numpy,
by numba (`tick`: the host path and the simulator, offload/simulate.py), by torch (`tick_torch`: the
static path's twin) and compiled by Triton (kernels/prefetch_gate.py: one launch per captured decode
step, so the decision is device scalars inside the CUDA graph: no host sync, no re-capture). Where a
layer is off, its prefetch limit is 0 and the prediction kernel skips its router (route_predict.py).
"""

from __future__ import annotations

import numpy as np
import torch
from numba import njit

PERIOD = 8  # decode steps between decisions
DECAY = 0.5  # weight of the earlier periods' counts at each decision (where the layer ran)
PROBE_EVERY = 8  # periods an off layer first waits before it runs one period again (a probe)
MAX_WAIT = 128.0  # the longest wait, after failed probes doubled it
WRONG_COPY_COST = 2.0  # a wrong copy: its own link time, and the miss its eviction tends to cause
# One stacked prediction launch (norm, router, top-k of a 128 x 2048 router), timed alone on an H200
# (BENCHMARKS.md, "Static decode"): the prior where nothing can be measured (CPU).
PREDICT_S_PRIOR = 32e-6

# Rows of the controller's state [ROWS, L] (float64): decayed counts, the decision, periods off, the
# wait before the next probe, the pf snapshot of the last decision, and decode steps with prefetch on.
USED, ISSUED, STEPS, ON, AGE, WAIT, LAST_USED, LAST_ISSUED, ON_STEPS = range(9)
ROWS = 9
# params [6] (float64): the costs and the rule's constants.
COPY_S, PREDICT_S, WRONG_COST, DECAY_P, PROBE_P, PERIOD_P = range(6)


def fold(used, issued, steps, on, age, wait, d_used, d_issued, copy_s, predict_s, wrong_cost, decay, probe_every,
         period):
    """One decision. Inputs: the decayed counts, the decision of the period that ended (1.0 / 0.0), periods
    off so far, the wait before the next probe, and the period's new prefetch counts. Returns (used,
    issued, steps, on, age, wait).

    Only + - * and comparisons times 1.0 (numpy, numba, torch and Triton all run this source and round
    alike); no branches, so it applies elementwise to scalars, arrays, tensors and Triton blocks."""
    keep = 1.0 - on * (1.0 - decay)  # decay where the layer ran, else keep: nothing new was measured
    used = used * keep + d_used
    issued = issued * keep + d_issued
    steps = steps * keep + on * period
    saved = used * copy_s
    cost = steps * predict_s + (issued - used) * (copy_s * wrong_cost)
    worth = (saved >= cost) * 1.0  # a tie (free prediction, nothing wrong) keeps it
    fresh = (steps <= 0.0) * 1.0  # never measured: run, to measure
    good = worth + fresh - worth * fresh
    wait = wait * (1.0 + on * (1.0 - good))  # it ran and failed: the next probe waits twice as long
    over = (wait > MAX_WAIT) * 1.0
    wait = (wait * (1.0 - over) + MAX_WAIT * over) * (1.0 - good) + probe_every * good  # worth it: back to the first
    age = (age + 1.0) * (1.0 - good)  # periods off in a row
    probe = (age >= wait) * 1.0
    on = good + probe - good * probe
    age = age * (1.0 - probe)  # a probe restarts the count
    return used, issued, steps, on, age, wait


_fold_nb = njit(cache=True, nogil=True)(fold)


def new_state(num_layers: int) -> np.ndarray:
    """Every layer on, no evidence."""
    state = np.zeros((ROWS, num_layers), np.float64)
    state[ON] = 1.0
    state[WAIT] = PROBE_EVERY
    return state


def new_params(copy_s: float, predict_s: float) -> np.ndarray:
    return np.array([copy_s, predict_s, WRONG_COPY_COST, DECAY, PROBE_EVERY, PERIOD], np.float64)


def prior_costs(record_bytes: int) -> tuple[float, float]:
    """(copy_s, predict_s) where nothing is measured: a record at the simulator's pinned link rate plus its
    fixed copy overhead (offload/simulate.py), and one prediction launch as measured on an H200."""
    from .simulate import COPY_OVERHEAD_S, PINNED_GBPS

    return record_bytes / (PINNED_GBPS * 1e9) + COPY_OVERHEAD_S, PREDICT_S_PRIOR


@njit(cache=True, nogil=True, _nrt=False)
def tick(state, params, pf, step):
    """A decode step starts (`step` = 1, 2, ... counted by the caller): at steps period + 1, 2 period + 1, ...
    fold the period's prefetch counts (pf [>= 2, >= L] int64, cumulative: issued, used) into `state`; then
    count this step's decisions. Returns whether it decided. The host path and the simulator call this."""
    period = params[PERIOD_P]
    decided = step > 1 and (step - 1) % int(period) == 0
    for layer in range(state.shape[1]):
        if decided:
            now_used, now_issued = float(pf[1, layer]), float(pf[0, layer])
            used, issued, steps, on, age, wait = _fold_nb(
                state[USED, layer], state[ISSUED, layer], state[STEPS, layer], state[ON, layer], state[AGE, layer],
                state[WAIT, layer], now_used - state[LAST_USED, layer], now_issued - state[LAST_ISSUED, layer],
                params[COPY_S], params[PREDICT_S], params[WRONG_COST], params[DECAY_P], params[PROBE_P], period)
            state[USED, layer], state[ISSUED, layer], state[STEPS, layer] = used, issued, steps
            state[ON, layer], state[AGE, layer], state[WAIT, layer] = on, age, wait
            state[LAST_USED, layer], state[LAST_ISSUED, layer] = now_used, now_issued
        state[ON_STEPS, layer] += state[ON, layer]
    return decided


def tick_torch(state: torch.Tensor, step: torch.Tensor, params: torch.Tensor, pf: torch.Tensor, base: torch.Tensor,
               limits: torch.Tensor) -> None:
    """The static path's step, as fixed-shape torch ops (the twin of kernels/prefetch_gate.py): step += 1,
    the same decision as `tick` where it falls due (device `step`), then limits = base where on, else 0.
    state [ROWS, L] float64, step int64 [1], params [6] float64, pf [>= 2, >= L] int64, base / limits
    int64 [L, depth]."""
    L = state.shape[1]
    step += 1
    period = params[PERIOD_P]
    due = (step > 1) & (torch.remainder(step - 1, period.to(torch.int64)) == 0)
    now_used, now_issued = pf[1, :L].to(torch.float64), pf[0, :L].to(torch.float64)
    new = fold(state[USED], state[ISSUED], state[STEPS], state[ON], state[AGE], state[WAIT],
               now_used - state[LAST_USED], now_issued - state[LAST_ISSUED], params[COPY_S], params[PREDICT_S],
               params[WRONG_COST], params[DECAY_P], params[PROBE_P], period)
    rows = [USED, ISSUED, STEPS, ON, AGE, WAIT, LAST_USED, LAST_ISSUED]
    values = torch.stack([*new, now_used, now_issued])
    state[rows] = torch.where(due, values, state[rows])
    state[ON_STEPS] += state[ON]
    limits.copy_(torch.where(state[ON].unsqueeze(1) > 0.5, base, torch.zeros_like(base)))


class AutoPrefetch:
    """The controller of one runtime: its state on the host (numpy: host path, handed over at the static
    path's boundaries) and on the device (tensors the captured step updates), the costs, and the stats."""

    def __init__(self, num_layers: int, copy_s: float, predict_s: float, device: torch.device):
        self.state = new_state(num_layers)
        self.params = new_params(copy_s, predict_s)
        self.step = 0
        self.last_host_pf = np.zeros((2, num_layers), np.int64)  # the host cache's pf when the host last took over
        f64 = dict(dtype=torch.float64, device=device)
        self.device_state = torch.from_numpy(self.state).to(**f64)
        self.device_step = torch.zeros(1, dtype=torch.int64, device=device)
        self.device_params = torch.from_numpy(self.params).to(**f64)
        self._request_start = (np.zeros(num_layers), 0)
        self.costs_from = "prior"

    @property
    def costs(self) -> dict:
        return dict(copy_us=round(float(self.params[COPY_S] * 1e6), 2),
                    predict_us=round(float(self.params[PREDICT_S] * 1e6), 2), costs_from=self.costs_from)

    def set_costs(self, copy_s: float, predict_s: float, source: str = "measured") -> None:
        self.params[COPY_S], self.params[PREDICT_S], self.costs_from = copy_s, predict_s, source
        self.device_params.copy_(torch.from_numpy(self.params))

    # -- host path (and the simulator's driver calls `tick` the same way) -------------------------

    def host_step(self, host_pf: np.ndarray, base: np.ndarray, active: np.ndarray) -> None:
        """A host-path decode step starts: decide where due, and set `active` = base where on, else 0."""
        self.step += 1
        # Counts since the host took over: the LAST_* rows `tick` compares them with count from there too.
        tick(self.state, self.params, host_pf[:2] - self.last_host_pf, self.step)
        self.apply(base, active)

    def apply(self, base: np.ndarray, active: np.ndarray) -> None:
        """active = base where the layer is on, else 0 (host arrays [L, depth])."""
        active[:] = np.where(self.state[ON][:, None] > 0.5, base, 0)

    # -- static path ---------------------------------------------------------------------------------

    def to_device(self) -> None:
        """The static path takes over (its pf counters restart from zero at the residency's load)."""
        self.state[LAST_USED] = self.state[LAST_ISSUED] = 0.0
        self.device_state.copy_(torch.from_numpy(self.state))
        self.device_step.fill_(self.step)

    def from_device(self, host_pf: np.ndarray) -> None:
        """The static path hands back (after the residency folded its pf counters into the host's)."""
        self.state[:] = self.device_state.cpu().numpy()
        self.step = int(self.device_step.item())
        self.state[LAST_USED] = self.state[LAST_ISSUED] = 0.0  # the host counts from here
        self.last_host_pf = host_pf[:2].copy()

    def device_step_ops(self, pf: torch.Tensor, base: torch.Tensor, limits: torch.Tensor) -> None:
        """Queued at the start of each static decode step (captured with it)."""
        from .. import ops

        ops.prefetch_gate(self.device_state, self.device_step, self.device_params, pf, base, limits)

    # -- stats ---------------------------------------------------------------------------------------

    def begin_request(self) -> None:
        self._request_start = (self.state[ON_STEPS].copy(), self.step)

    def on_fraction(self) -> list:
        """Per MoE layer: the share of this request's decode steps in which its prefetch was on (None for
        layer 0, which no prediction targets, and when no decode step ran)."""
        on_steps, step = self._request_start
        steps = self.step - step
        if steps <= 0:
            return [None] * self.state.shape[1]
        fraction = (self.state[ON_STEPS] - on_steps) / steps
        return [None] + [round(float(f), 4) for f in fraction[1:]]

    def info(self) -> dict:
        """What auto decided so far: the layers on now, and the measured or prior costs."""
        return dict(on_layers=[int(i) for i in np.flatnonzero(self.state[ON] > 0.5) if i > 0],
                    decode_steps=self.step, **self.costs)


def measure_costs(cache, lookahead, top_k: int, reps: int = 20) -> tuple[float, float]:
    """(copy_s, predict_s) timed on the GPU with CUDA events: one record copied from the host slab into a
    slot (and paced, under an emulated link), and one prediction launch of the first layer."""
    from .. import ops

    device = cache.device
    stream = torch.cuda.current_stream(device)
    slot = torch.zeros(1, dtype=torch.int64, device=device)
    rows = torch.tensor([len(cache.store.slab_rows) - 1], dtype=torch.int64, device=device)

    def copy():
        ops.copy_records(cache.store.slab_rows, cache.slots, rows, slot)
        if cache.pacer is not None:
            cache.pacer.pace_device(slot)

    if hasattr(lookahead, "norm_w"):  # the router stack
        norm_w = lookahead.norm_w[0]
    else:  # the module predictor: a pre-router norm's weight
        norm_w = next(norm.weight for router, norm in filter(None, lookahead.targets))
    hidden = torch.randn(norm_w.shape[0], device=device, dtype=norm_w.dtype)
    out = torch.empty((1, top_k), dtype=torch.int64, device=device)
    times = []
    for fn in (copy, lambda: lookahead.predict_into(0, hidden, out)):
        fn()  # warm up (compile)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        for _ in range(reps):
            fn()
        end.record(stream)
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    # The copy's slot 0 now holds another expert's bytes: the caller measures before anything is cached.
    return times[0], times[1]
