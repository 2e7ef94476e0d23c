"""Miss paths: how a decode step serves an expert that is not in the GPU cache, chosen per layer.

  copy      copy the record into a slot (evicting the policy's victim), then compute from the slot;
  zerocopy  no slot, no eviction: the fused decode kernel reads the record straight from the
            page-locked host slab over the bus (slot id -r-1 = host row r; static and generate paths);
  cpu       no slot, no eviction: the CPU computes the expert for the step's tokens from the host store
            while the GPU computes the resident experts, then the two are added (offload/cpu_experts.py;
            host-decided path only: it needs the misses on the host).
Prefill steps always copy (a many-token step reuses each expert for many tokens). The cache's decision
is the same state machine for all three: zerocopy and cpu are its "in place" demand (offload/core.py).

`auto` is a cost model per layer and decode token, on figures measured on this machine at load
(`measure_figures`) or, where a figure cannot be measured, a stated prior (`PRIORS`):

  copy      m * copy_s
  zerocopy  m * zero_copy_s + zero_copy_layer_s
  cpu       m * cpu_s * CPU_COST_MARGIN (+ host_layer_s when the request could otherwise take the static path)

m = the layer's expected misses per decode token = top_k * its decode miss ratio, an exponential mean
over the requests served so far (before the first: the prior of uniform routing, top_k * (1 - the
layer's share of slots / E)). copy_s / zero_copy_s: seconds per record over the link (the static path's
copy, which the fused decode kernel executes as it reads where it runs, else the copy kernel; the host
path's DMA; the decode kernel's mapped reads); zero_copy_layer_s: what the host-capable kernel variant
costs a layer call even when nothing misses (0 where static copies run in that variant too); cpu_s: one expert for one
token on the CPU from the host store; host_layer_s: the host-decided path's extra cost per layer call
over a static step. The model takes the hit rate as independent of the path (stationary routing:
what a copy brings in is as likely to be reused as what it evicts); the hit rate that zerocopy and cpu
protect by not evicting shows up in the measured miss ratios of later requests, which auto then uses.
Static decode is kept unless the host path with the CPU for some layers is cheaper in total, overhead
included. A switch needs a 10% lower cost (hysteresis). The model runs only where the pool cannot keep
an expert between its uses (fewer than 2 x top-k slots: the minimum budget); elsewhere auto copies,
because the stationary-hit-rate assumption fails there (measured: BENCHMARKS.md, miss paths).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

COPY, ZEROCOPY, CPU = 0, 1, 2
NAMES = ("copy", "zerocopy", "cpu")
SETTINGS = ("auto", "copy", "zerocopy", "cpu")

# Priors (seconds), used where a figure cannot be measured here; each says where it comes from.
PRIORS = {
    # BENCHMARKS.md "Missed experts" (H200): with nothing missing, the kernel variant that can read host
    # rows costs 32.0 vs 24.5 µs for a layer call of 1 token x top-8 (Qwen3-VL-30B-A3B experts).
    "zero_copy_layer_s": 7.5e-6,
    # BENCHMARKS.md "Offloading variants" (H100, 12-layer bench model, 100% budget): transformers' generate
    # with the host-decided path 28.89 ms/token vs the static step 3.31 ms/token: 2.13 ms per MoE layer call.
    "host_layer_s": 2.13e-3,
}
HYSTERESIS = 0.9  # a layer switches only to a path at most 90% of its current path's cost
# The CPU path is costed at twice its measured figures. On an H200 host (12 GB/s link, minimum budget) the
# model predicted 69.8 ms/token for the CPU path from 0.47 ms per expert, and it ran at 107-122 ms/token
# (1.5-1.75x); the native cell took 120 and 326 ms/token in two runs (the second beside another job on the
# host's cores): its cost depends on what else the host runs. A wrong choice of the CPU cost 1.46x there;
# a missed one costs only the difference to the bus.
CPU_COST_MARGIN = 2.0
EWMA = 0.5  # weight of the latest request in the expected miss ratio


@dataclass
class MissFigures:
    """Seconds per unit for the cost model, and where each figure came from."""

    copy_s: float  # one record copied host -> device by the static path's copy kernel
    host_copy_s: float  # one record copied by the host path (DMA from the slab, or read + copy for mmap)
    zero_copy_s: float  # one record read in place by the decode kernel (inf: cannot run here)
    zero_copy_layer_s: float  # the in-place-capable kernel's extra cost per layer call
    cpu_s: float  # one expert, one token, on the CPU from the host store
    host_layer_s: float  # the host-decided path's extra cost per layer call over a static step
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (v if not isinstance(v, float) else (None if v == float("inf") else round(v, 9)))
                for k, v in asdict(self).items()}


def layer_costs(fig: MissFigures, misses: np.ndarray, static: bool) -> np.ndarray:
    """[L, 3] seconds per decode token of each layer on each path (inf where a path cannot run). `static`:
    the static path's figures (copy kernel; cpu unavailable); else the host path's."""
    m = np.asarray(misses, np.float64)
    costs = np.empty((len(m), 3))
    costs[:, COPY] = m * (fig.copy_s if static else fig.host_copy_s)
    costs[:, ZEROCOPY] = m * fig.zero_copy_s + fig.zero_copy_layer_s
    costs[:, CPU] = np.inf if static else m * fig.cpu_s * CPU_COST_MARGIN
    return costs


def choose(fig: MissFigures, misses: np.ndarray, allowed: set, static_possible: bool,
           current: np.ndarray | None = None) -> tuple[np.ndarray, bool, dict]:
    """Per layer, the cheapest allowed path (codes), whether to decode on the static path, and the costs.

    `allowed`: path codes that can run here; `static_possible`: the request could take the static path
    (then the host path pays host_layer_s per layer call on top). `current`: the paths in use (a switch
    needs a HYSTERESIS-times lower cost)."""
    L = len(misses)
    static_costs = layer_costs(fig, misses, True)
    host_costs = layer_costs(fig, misses, False)
    for code in range(3):
        if code not in allowed:
            static_costs[:, code] = host_costs[:, code] = np.inf
    static_pick = _pick(static_costs, current)
    host_pick = _pick(host_costs, current)
    static_total = static_costs[np.arange(L), static_pick].sum()
    host_total = host_costs[np.arange(L), host_pick].sum() + (L * fig.host_layer_s if static_possible else 0.0)
    use_static = static_possible and static_total <= host_total
    paths = static_pick if use_static else host_pick
    report = {"expected_misses_per_token": np.round(misses, 4).tolist(),
              "static_ms_per_token": round(static_total * 1e3, 4) if np.isfinite(static_total) else None,
              "host_ms_per_token": round(host_total * 1e3, 4) if np.isfinite(host_total) else None}
    return paths, use_static, report


def _pick(costs: np.ndarray, current) -> np.ndarray:
    best = costs.argmin(axis=1)
    if current is None:
        return best
    keep = np.isfinite(costs[np.arange(len(best)), current]) & (
        costs[np.arange(len(best)), best] > HYSTERESIS * costs[np.arange(len(best)), current])
    return np.where(keep, current, best)


def prior_misses(top_k: int, num_slots: int, num_layers: int, num_experts: int, quota=None) -> np.ndarray:
    """Uniform routing, no locality: a layer hits with probability (its slots) / E."""
    share = np.full(num_layers, num_slots / num_layers) if quota is None or not len(quota) else np.asarray(quota, float)
    return top_k * (1.0 - np.minimum(1.0, share / num_experts))


class MissPlanner:
    """The expected misses per layer and decode token, from the decode hits and misses observed."""

    def __init__(self, prior: np.ndarray, top_k: int):
        self.misses = np.asarray(prior, np.float64).copy()
        self.top_k = top_k
        self.observed = 0  # requests folded in

    def observe(self, hits: np.ndarray, misses: np.ndarray) -> None:
        """Fold one request's decode-step hits and misses per layer into the expectation."""
        total = hits + misses
        seen = total > 0
        ratio = np.where(seen, misses / np.maximum(total, 1), 0.0)
        self.misses = np.where(seen, (1 - EWMA) * self.misses + EWMA * self.top_k * ratio, self.misses)
        self.observed += 1


# -- measured figures ---------------------------------------------------------------------------------


def measure_figures(store, cache, compute, emulation=None, repeats: int = 3, installs: bool = True) -> MissFigures:
    """This machine's figures, timed at load (tens of milliseconds): the static copy kernel, the host
    path's copy and the decode kernel's in-place reads on CUDA (into the cache's free slots: call before
    any request), one expert on the CPU. Under `emulate:`, the link figures are the profile's (pacing
    slows copies and in-place reads alike). Priors fill what cannot be measured. `installs`: static decode's
    copied misses are installed by the fused decode kernel (DevicePath.install_misses)."""
    source = {}
    device = cache.device
    records = _distinct_records(store)
    cpu_s = _time(lambda: [_cpu_expert(store, compute, *r) for r in records], repeats, None) / len(records)
    source["cpu_s"] = (f"measured: one expert, one token, float ops on the CPU from the host store (mean over "
                       f"{len(records)} distinct records, read from memory as a miss reads them)")
    if device.type != "cuda":  # no link: a 'copy' is a host memcpy, an in-place read is free
        copy_s = _time(lambda: cache.slots[0].copy_(store.record(0, 0)), repeats, None)
        source.update(copy_s="measured: host memcpy of one record (no GPU)", zero_copy_s="none on a CPU device")
        return MissFigures(copy_s, copy_s, 0.0, 0.0, cpu_s, 0.0, source)
    from .. import ops

    n = min(cache.num_slots, store.num_layers * store.num_experts, 4)
    rows = torch.arange(n, device=device)
    host_copy_s = _time(lambda: [cache.slots[i].copy_(store.record(0, i % store.num_experts), non_blocking=True)
                                 for i in range(n)], repeats, device) / n
    source["host_copy_s"] = f"measured: {n} host-path record copies"
    copy_s, zero_copy_s, layer_s = host_copy_s, float("inf"), PRIORS["zero_copy_layer_s"]
    source["zero_copy_layer_s"] = "prior: BENCHMARKS.md (H200, 7.5 µs)"
    if store.slab is not None and store.pinned and ops.device_copy_available(store.slab_rows):
        copy_s = _time(lambda: ops.copy_records(store.slab_rows, cache.slots, rows, rows), repeats, device) / n
        source["copy_s"] = f"measured: ops.copy_records of {n} records"
        if compute.fused_decode:
            zero_copy_s, layer_s, install_s = _zero_copy_figures(store, cache, compute, n, repeats)
            source["zero_copy_s"] = source["zero_copy_layer_s"] = \
                f"measured: ops.fused_moe_decode, 1 token, {n} experts from host rows vs slots"
            if installs:
                # Static decode's copies run inside that same kernel variant (DevicePath.install_misses), so
                # a copied miss costs its in-kernel install and the variant's per-layer cost is common to both.
                copy_s, layer_s = install_s, 0.0
                source["copy_s"] = f"measured: ops.fused_moe_decode installing {n} host rows into slots"
                source["zero_copy_layer_s"] = "0: copies run in the same kernel variant (installed misses)"
    else:
        source["copy_s"] = "as host_copy_s (no device copy kernel here)"
    if emulation is not None:  # the emulated link: copies and in-place reads are paced alike
        delay = emulation.delay_s("static")  # what pacing adds per record: profile time - this machine's copy
        copy_s += delay
        if np.isfinite(zero_copy_s):
            zero_copy_s += delay
        host_copy_s = max(host_copy_s, emulation.target_s("host"))
        source["emulated"] = f"link figures paced to the emulated {emulation.profile.name}'s"
    source["host_layer_s"] = "prior: BENCHMARKS.md (H100, generate vs static step, 2.13 ms per layer call)"
    return MissFigures(copy_s, host_copy_s, zero_copy_s, layer_s, cpu_s, PRIORS["host_layer_s"], source)


def _zero_copy_figures(store, cache, compute, n, repeats):
    from .. import ops

    device = cache.device
    host = store.host_views()
    H = cache.gate_up_view.shape[2] if not compute.is_transposed else cache.gate_up_view.shape[1]
    x = torch.randn(1, H, device=device, dtype=store.dtype)
    w = torch.full((1, n), 1.0 / n, device=device, dtype=store.dtype)
    pool_ids = torch.arange(n, device=device).view(1, n)
    host_ids = (-1 - torch.arange(n, device=device)).view(1, n)
    args = (cache.gate_up_view, cache.down_view, compute.is_transposed)
    plain = _time(lambda: ops.fused_moe_decode(x, w, pool_ids, *args), repeats, device)
    two_sided = _time(lambda: ops.fused_moe_decode(x, w, pool_ids, *args, host_gate_up=host[0], host_down=host[1]),
                      repeats, device)
    in_place = _time(lambda: ops.fused_moe_decode(x, w, host_ids, *args, host_gate_up=host[0], host_down=host[1]),
                     repeats, device)
    # Installing: the pool slots 0..n-1 (free before any request) take host rows n..2n-1 as they are read.
    install = (pool_ids.clone(), (n + torch.arange(n, device=device)).view(1, n) % len(store.slab_rows))
    installed = _time(lambda: ops.fused_moe_decode(x, w, pool_ids, *args, host_gate_up=host[0], host_down=host[1],
                                                   install=install), repeats, device)
    return max(in_place - two_sided, 0.0) / n, max(two_sided - plain, 0.0), max(installed - two_sided, 0.0) / n


# A real miss reads a record the CPU has not touched lately; timing one record again and again reads it from
# the CPU's caches (on an H200 host 0.47-0.52 ms per expert that way, 0.63 over distinct records with
# another job on the host). Distinct records past the last-level cache:
CPU_TIMING_BYTES = 256 << 20
CPU_TIMING_RECORDS = (4, 32)  # at least, at most


def _distinct_records(store) -> list:
    total = store.num_layers * store.num_experts
    n = -(-CPU_TIMING_BYTES // max(store.record_bytes, 1))
    n = min(total, max(CPU_TIMING_RECORDS[0], min(CPU_TIMING_RECORDS[1], n)))
    step = max(1, total // n)
    return [divmod(i * step % total, store.num_experts) for i in range(n)]


def _cpu_expert(store, compute, layer: int = 0, expert: int = 0):
    from .compute import matmul

    gate_up, down = store.split(store.record(layer, expert).to("cpu"))
    x = torch.randn(1, gate_up.shape[1] if not compute.is_transposed else gate_up.shape[0], dtype=store.dtype)
    h = matmul(x, gate_up, compute.is_transposed)
    g, u = h.chunk(2, dim=-1)
    return matmul(torch.nn.functional.silu(g) * u, down, compute.is_transposed)


def _time(fn, repeats: int, device) -> float:
    """Best of `repeats` calls after one warm-up, in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if device is not None:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device is not None:
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


# -- the engine's control --------------------------------------------------------------------------


def check_setting(setting: str, decode: str, store_kind: str, cuda: bool, fused: bool) -> None:
    """ConfigError where `miss_path: setting` cannot run here (before anything is built). `store_kind`:
    page-locked, pageable or mmap (what the store is); `fused`: the fused decode kernel runs here."""
    from ..errors import ConfigError

    if setting not in SETTINGS:
        raise ConfigError(f"miss_path must be one of {', '.join(SETTINGS)}, got {setting!r}")
    if setting == "zerocopy":
        if store_kind == "mmap":
            raise ConfigError("miss_path: zerocopy reads missed experts in place from the host slab, and store: mmap "
                              "has none; use store: pinned, or miss_path: auto, copy or cpu")
        if cuda and store_kind != "page-locked":
            raise ConfigError("miss_path: zerocopy needs the GPU to read the host slab, so a page-locked store "
                              f"(store: pinned, registered with CUDA); here the store is {store_kind}. Use store: "
                              "pinned, or miss_path: auto, copy or cpu")
        if cuda and not fused:
            raise ConfigError("miss_path: zerocopy on a GPU reads missed experts in the fused decode kernel "
                              "(CUDA + triton, SiLU-gated experts, experts_kernel auto or fused), which does not run "
                              "here; use miss_path: auto, copy or cpu")
    if setting == "cpu" and decode == "static":
        raise ConfigError("miss_path: cpu computes missed experts on the CPU, so the host must know each layer's "
                          "misses: that is the host-decided path (decode: generate), while decode: static decides "
                          "them on the device. Use decode: auto (requests then decode with generate) or generate, "
                          "or miss_path: zerocopy / auto for static decode")


def zero_copy_runs(store, device, compute) -> bool:
    """Can decode steps read missed experts in place here? A slab, and on a GPU a page-locked one read by
    the fused decode kernel (on a CPU device the loop reads the slab's rows)."""
    if store.slab is None:
        return False
    return device.type != "cuda" or (store.pinned and compute.fused_decode)


class MissPathControl:
    """Each layer's miss path for an engine's runtime: the setting's, or auto's choice (re-made before each
    request from the decode misses observed so far). Writes them into the runtime (`set_miss_paths`)."""

    def __init__(self, setting: str, runtime, store, layout, num_slots: int, decode: str, emulation=None,
                 figures: MissFigures | None = None):
        """`figures`: auto's figures given (a profile's, or tests') instead of measured on a GPU."""
        self.setting = setting
        self.runtime = runtime
        cache = runtime.cache
        self.num_layers = cache.num_layers
        device = cache.device
        compute = runtime.compute
        self.allowed = {COPY, CPU} | ({ZEROCOPY} if zero_copy_runs(store, device, compute) else set())
        self.static_possible = decode != "generate"
        self.figures = None
        self.report = {}
        self.use_static = True
        self.why = ""
        self.planner = MissPlanner(prior_misses(layout.top_k, num_slots, self.num_layers, layout.num_experts,
                                                cache.quota), layout.top_k)
        self._seen = np.zeros((2, self.num_layers), np.int64)
        if setting != "auto":
            self.paths = np.full(self.num_layers, SETTINGS.index(setting) - 1, np.int64)
            self.use_static = setting != "cpu"
            self.why = f"miss_path: {setting}"
        elif cache.complete:
            self.paths, self.why = np.zeros(self.num_layers, np.int64), "every expert is resident: nothing misses"
        elif num_slots >= 2 * layout.top_k:
            # A miss read in place installs nothing, so the layer misses it again next time; where the pool
            # can keep an expert until its next use, that lost reuse outweighs the saved slot write (the
            # cost model's stationary hit rate does not hold): on the 12-layer bench model (H200), in place
            # was 1.7-3.7x slower than copy at 10% and 25% budgets, and 5% faster only at the minimum.
            self.paths = np.zeros(self.num_layers, np.int64)
            self.why = (f"auto: the pool ({num_slots} slots >= 2 x top-{layout.top_k}) keeps experts between "
                        "uses, which reading in place would give up: copy")
        elif device.type != "cuda" and figures is None:
            self.paths = np.zeros(self.num_layers, np.int64)
            self.why = "no GPU: a copy is a host memcpy, there is no link to spare (auto copies)"
        else:
            self.paths = np.zeros(self.num_layers, np.int64)
            try:
                self.figures = figures or measure_figures(store, cache, compute, emulation,
                                                          installs=runtime.device.install_misses)
            except Exception as exc:  # noqa: BLE001 - a measurement that fails: copy, and say why
                import warnings

                self.why = f"auto could not measure its figures ({type(exc).__name__}: {exc}); copying"
                warnings.warn(f"miss_path: auto {self.why}", stacklevel=3)
            if self.figures is not None:
                self._decide(None)
        runtime.set_miss_paths(self.paths)

    def _decide(self, current) -> None:
        self.paths, self.use_static, self.report = choose(self.figures, self.planner.misses, self.allowed,
                                                          self.static_possible, current)
        cpu_layers = np.flatnonzero(self.paths == CPU).tolist()
        self.why = (f"auto: the cost model on {'measured' if self.planner.observed else 'prior'} miss rates "
                    f"({self.planner.observed} requests seen)" + (
                        f"; the CPU for layers {cpu_layers} on the host-decided path is cheaper than static decode"
                        if not self.use_static and self.static_possible else ""))

    def before_request(self) -> bool:
        """Auto: fold in the decode misses seen since the last call and choose again. Returns True when the
        static path's captured steps must be captured again (a layer newly reads host rows, where the
        steps did not hand every layer the slab already: Runtime.set_miss_paths)."""
        if self.figures is None:
            return False
        calls = self.runtime.host.decode_calls
        new = calls - self._seen
        self._seen = calls.copy()
        if new.sum() == 0:
            return False
        self.planner.observe(new[0], new[1])
        self._decide(self.paths)
        return self.runtime.set_miss_paths(self.paths)

    def static_unavailable(self) -> str | None:
        """Why requests decode on the host path because of the miss paths (None: they need not)."""
        if self.use_static:
            return None
        return f"{self.why} (missed experts computed on the CPU need the host-decided path)"

    def names(self) -> list[str]:
        return [NAMES[p] for p in self.paths]

    def info(self) -> dict:
        return {"setting": self.setting, "per_layer": self.names(), "why": self.why,
                "figures": None if self.figures is None else self.figures.to_dict(), **self.report}
