"""Emulate a device profile on a bigger GPU (or on the CPU): `emulate: PROFILE` / `--emulate PROFILE`.

What is emulated:
  * memory: the profile's usable memory (memory_gb - reserved_gb, the planner's arithmetic) caps what
    the engine holds, counted by deploy/memory.gpu_parts, the planner's own function: what the engine
    has allocated is measured (non-expert weights as loaded, the expert cache, the stacked routers, the
    kernels' workspaces and the device cache state: Engine.held_bytes; each part at least its planned
    size), the rest is the planner's allowance (cuBLAS workspaces, the CUDA graph pool, staging, the
    margin, and on a unified-memory device a non-mmap host store, which lives in the same DRAM). At load
    those must fit; each request adds its KV cache (the static caches held, this request's grown to its
    length, and the old buffer while it grows) and its activation peak (for its real prompt and image
    tokens), checked before it runs.
    Either failing raises BudgetError where the real device would run out, saying by how much and what
    to lower. On CUDA, torch.cuda.set_per_process_memory_fraction is set to the usable share as a
    backstop (memory torch's allocator sees; the CUDA context is outside it, as reserved_gb is).
  * the host link: each expert copy is slowed to the time the planner predicts for the profile's link
    for the store (time_model._miss_ms: pinned PCIe or the device copy kernel for `pinned`, pageable PCIe
    for `memory`, which has no disk read; NVMe + pageable PCIe for `mmap`; DRAM on a Jetson), by a
    delay after each copy wave of (profile time - this machine's measured time) per record: a spin
    kernel on the copy's stream on CUDA (kernels/pace.py: device-side count, CUDA-graph capturable),
    time.sleep on the CPU.
  * the disk, for an mmap store: the host reads a missed record synchronously (ExpertStore.record);
    each read is timed by wall clock and held until the profile's disk time for a record has passed
    (`pace_read`: record bytes / disk_read_gbs), whatever served it here. A read from this host's page
    cache (which held the bench model's 14.5 GB store: session 5's mmap rows measured RAM, not NVMe) is
    slowed to the profile's disk; a read slower than the profile's (a cold read from a slow disk) cannot
    be sped up, and is counted (`reads_slower`). The copy that follows the read is paced as above, by
    the rest of the profile's time per record (its pageable PCIe or DRAM copy).
Not emulated: compute speed (this GPU's memory bandwidth, tensor throughput, kernel launches and the
host CPU). `info()` says so, and eval/validate_plan.py corrects for it: it compares the measured times
with the planner's prediction made for a hybrid profile (the emulated link and memory, this GPU's
compute figures), and rescales the compute share by the profile's compute figures over this GPU's.
"""

from __future__ import annotations

import math
import os
import time

import torch

from ..errors import BudgetError, ConfigError
from .profiles import DeviceProfile, load_profile

GB = 1e9
_yield = getattr(os, "sched_yield", lambda: None)  # (releases the GIL; returns at once)


def load_emulated_profile(value) -> DeviceProfile:
    """The `emulate:` value: a shipped profile name or a profile YAML path; a GPU profile."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"emulate must be a device profile name or file, got {value!r}")
    profile = load_profile(value.strip())
    if profile.kind == "cpu":
        raise ConfigError(f"emulate: {profile.name} is a CPU-only profile; emulation caps a GPU's memory and link: "
                          "name a GPU profile (`vismmoe devices` lists them)")
    return profile


class Emulation:
    # pace_read spins through a wait of up to SPIN_S and sleeps only what is beyond it. With a sleep until 0.5 ms
    # before each deadline, the bench model's mmap rows at 25% ran their decode 1.15x their prediction at
    # the probe's host speed; spun, 1.02x (BENCHMARKS, session 11). Why is not established: an idle sleep
    # there woke only 0.06-0.09 ms late (eval/sleep_overshoot.py). The spin yields the GIL (os.sched_yield;
    # time.sleep(0) wakes late itself) so that where a worker thread reads (miss_path: cpu) the main
    # thread's host work goes on meanwhile.
    SPIN_S = 0.02

    def __init__(self, profile: DeviceProfile, store: str, record_bytes: int, device: torch.device,
                 sleep=time.sleep, clock=time.perf_counter):
        self.profile = profile
        self.store = store
        self.record_bytes = record_bytes
        self.device = device
        self.usable_bytes = int((profile["memory_gb"] - profile["reserved_gb"]) * GB)
        self.shared_store = profile.unified and store != "mmap"  # the store lives in the same DRAM
        self.sleep = sleep
        self.clock = clock
        # mmap reads paced by wall clock (pace_read): count, this host's own time for them, the time added,
        # and the reads that took longer here than the profile's disk does
        # (read_late_s: how far past the profile's time the held reads returned, the pacing's own error)
        self.reads, self.read_native_s, self.read_paced_s, self.reads_slower, self.read_late_s = 0, 0.0, 0.0, 0, 0.0
        self._reads_at_request = (0, 0.0, 0.0, 0, 0.0)
        self.native_s = {"host": 0.0, "static": 0.0}  # this machine's time per record copy (measured on CUDA)
        self.iters_per_s = 0.0  # the spin kernel's rate on this GPU
        self.paced_s = 0.0  # delay added on the host path so far (device-decided waves count on the device)
        self._scratch = None
        self.fraction = None
        self.model = None  # deploy.model_info.ModelInfo: the activation estimate per request
        self._paced_at_request = 0.0

    # -- memory ----------------------------------------------------------------------------------------
    def engine_parts(self, engine, *, slots: int, static: bool, prompt_tokens: int = 0, new_tokens: int = 0,
                     visual_tokens: int = 0, kv_cache: int | None = None, held: dict | None = None) -> dict:
        """Bytes by part for `engine` with `slots` expert slots: deploy/memory.gpu_parts, the planner's own
        accounting, with the request at hand, the KV bytes the engine really holds for it and what it has
        allocated (`held`, each part at least its planned size); + the host store where it shares the DRAM."""
        from .memory import gpu_parts

        dtype = str(engine.dtype).removeprefix("torch.")
        parts = gpu_parts(self.model, dtype, slots=slots, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
                          visual_tokens=visual_tokens, static=static, prefetch=bool(engine.config.prefetch),
                          store=self.store, unified=self.profile.unified,
                          compute_capability=self.profile.compute_capability or "9.0", kv_cache=kv_cache, held=held)
        if self.shared_store:
            layout = engine.layout
            parts["host_store"] = len(layout.layers) * layout.num_experts * engine.layout_record_bytes
        return parts

    def check(self, parts: dict, record_bytes: int, top_k: int, what: str) -> None:
        """Raise BudgetError if `parts` (bytes by name) exceed the usable memory: by how much, and the
        largest expert budget that would fit (or that none does)."""
        need = sum(parts.values())
        if need <= self.usable_bytes:
            return
        p = self.profile
        listed = " + ".join(f"{k.replace('_', ' ')} {_gb(v)}" for k, v in parts.items() if v)
        room = self.usable_bytes - (need - parts.get("expert_cache", 0))
        slots = int(room // record_bytes) if room > 0 else 0
        if slots >= top_k:
            fix = f"lower expert_budget to {slots * record_bytes} bytes ({slots} experts)"
            if not parts.get("kv_cache"):
                fix += " at most (requests add their KV cache and activations)"
        else:
            fix = (f"no expert budget fits: even the smallest ({top_k} experts) is short by "
                   f"{_gb(need - parts.get('expert_cache', 0) + top_k * record_bytes - self.usable_bytes)}")
        hints = ["a shorter prompt or max_new_tokens", "visual_keep below 1.0 (fewer visual tokens)"]
        if self.shared_store:
            hints.insert(0, "store: mmap (the host store then leaves the shared DRAM)")
        raise BudgetError(f"{what} needs {_gb(need)} ({listed}); the emulated {p.description} has {_gb(self.usable_bytes)} "
                          f"usable ({p['memory_gb']:.4g} GB - {p['reserved_gb']:.4g} GB reserved): {fix}, or use "
                          + ", ".join(hints))

    def load_parts(self, engine, num_slots: int) -> dict:
        """The parts the engine holds whatever the request, with `num_slots` expert slots (no KV cache and
        no activations yet): the weights as loaded, the rest as planned (at a reconfigure the runtime
        in place is the old one's)."""
        from .planner import _path

        static = engine.config.decode != "generate" and _path(self.store, num_slots, self.model) == "static"
        return self.engine_parts(engine, slots=num_slots, static=static,
                                 held=dict(non_expert_weights=engine.held_bytes()["non_expert_weights"]))

    def check_engine(self, engine, num_slots: int) -> None:
        """At load / reconfigure: the parts the engine holds whatever the request."""
        self.check(self.load_parts(engine, num_slots), engine.layout_record_bytes, engine.layout.top_k,
                   f"loading {engine.model_dir.name} with {num_slots} expert slots")

    def check_request(self, engine, prompt_tokens: int, max_new_tokens: int, decoder, visual_tokens: int) -> dict:
        """Before a request runs: the engine's parts for it (engine_parts), with the KV caches it will hold
        (memory.static_kv_bytes: its static cache grown to the request's length, the old buffer while it
        grows, the other decoders' caches; or memory.dynamic_kv_bytes next to the static caches held) and
        its activation peak. Returns the parts."""
        from ..static_decode import cache_length
        from .memory import dynamic_kv_bytes, static_kv_bytes

        dtype = str(engine.dtype).removeprefix("torch.")
        tokens = prompt_tokens + max_new_tokens
        others = [d.max_cache_len for d in engine.decoders.held.values()
                  if d is not decoder and _cache_bytes(d.kv_cache)]
        if decoder is not None:  # its cache grows in buckets to the request's length (static_decode.py)
            final = max(cache_length(tokens - 1, engine.context), decoder.max_cache_len)
            old = 0  # it grows one bucket at a time: the last growth holds the bucket below `final` as well
            if final > decoder.max_cache_len:
                old = decoder.max_cache_len
                while cache_length(old + 1, engine.context) < final:
                    old = cache_length(old + 1, engine.context)
            kv = static_kv_bytes(self.model, dtype, final=final, old=old, others=others)
        else:
            kv = dynamic_kv_bytes(self.model, dtype, tokens, others)
        static = decoder is not None or engine._static_unavailable({}) is None  # captured graphs stay allocated
        parts = self.engine_parts(engine, slots=engine.num_slots, static=static, prompt_tokens=prompt_tokens,
                                  new_tokens=max_new_tokens, visual_tokens=visual_tokens, kv_cache=kv,
                                  held=engine.held_bytes())
        self.check(parts, engine.layout_record_bytes, engine.layout.top_k,
                   f"this request ({prompt_tokens} prompt + {max_new_tokens} new tokens)")
        self._paced_at_request = self.paced_s
        self._reads_at_request = (self.reads, self.read_native_s, self.read_paced_s, self.reads_slower,
                                  self.read_late_s)
        return parts

    def request_report(self, parts: dict, peak_gpu_bytes) -> dict:
        """For RequestStats.emulation: what the emulated device would hold, against its usable memory."""
        report = dict(profile=self.profile.name, usable_bytes=self.usable_bytes, accounted_bytes=sum(parts.values()),
                      parts=dict(parts), peak_gpu_bytes_here=peak_gpu_bytes,
                      host_paced_s=round(self.paced_s - self._paced_at_request, 6),
                      not_emulated="compute speed (this machine's)")
        if self.store == "mmap":  # this request's record reads: this host's own time, the time added, the too slow
            n, native, paced, slower, late = self._reads_at_request
            report.update(reads=self.reads - n, read_native_s=round(self.read_native_s - native, 6),
                          read_paced_s=round(self.read_paced_s - paced, 6), reads_slower=self.reads_slower - slower,
                          read_late_s=round(self.read_late_s - late, 6))
        return report

    def cap_allocator(self) -> None:
        """CUDA: the allocator may not hand out more than the usable share of this GPU (a backstop)."""
        if self.device.type != "cuda":
            return
        total = torch.cuda.get_device_properties(self.device).total_memory
        self.fraction = min(1.0, self.usable_bytes / total)
        torch.cuda.set_per_process_memory_fraction(self.fraction, self.device)

    def release(self) -> None:
        if self.fraction is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
            self.fraction = None

    # -- the link --------------------------------------------------------------------------------------
    def target_s(self, path: str) -> float:
        """Seconds one record's miss takes on the profile (the planner's miss time: for an mmap store the
        disk read and the copy; for a pinned or memory slab the copy alone)."""
        from .planner import _miss_ms

        return _miss_ms(self.profile, self.store, self.record_bytes, path) / 1e3

    def read_target_s(self) -> float:
        """mmap store: seconds the profile's disk takes to read one record (the host's synchronous read,
        paced by pace_read); 0 for a store in memory. The planner's figure (time_model.read_ms): it charges
        it to every record read, a prefetch copy's too."""
        from .time_model import read_ms

        return read_ms(self.profile, self.store, self.record_bytes) / 1e3

    def delay_s(self, path: str) -> float:
        """Delay per record after a copy wave: the profile's time per record beyond its disk read (paced
        apart) and this machine's copy."""
        return max(0.0, self.target_s(path) - self.read_target_s() - self.native_s[path])

    def pace_read(self, started: float) -> None:
        """After this host read one mmap record, from `started` (self.clock()) until now: hold until the
        profile's disk time has passed since `started` (sleep what is beyond SPIN_S, then spin)."""
        deadline = started + self.read_target_s()
        now = self.clock()
        self.reads += 1
        self.read_native_s += now - started
        if now >= deadline:
            self.reads_slower += now > deadline
            return
        rest = deadline - now
        if rest > self.SPIN_S:
            self.sleep(rest - self.SPIN_S)
        while (now := self.clock()) < deadline:
            _yield()
        self.read_late_s += now - deadline
        self.paced_s += rest
        self.read_paced_s += rest

    def calibrate(self, store) -> None:
        """CUDA: time this machine's record copies (host memcpy; the device copy kernel) and the spin rate."""
        if self.device.type != "cuda":
            return
        from .. import ops
        from ..kernels import pace

        self._scratch = torch.zeros(2, dtype=torch.float32, device=self.device)
        dst = torch.empty((8, store.record_numel), dtype=store.dtype, device=self.device)
        if store.slab is not None:
            self.native_s["host"] = _time_cuda(lambda: [dst[i].copy_(store.record(0, i % store.num_experts),
                                                                      non_blocking=True) for i in range(8)]) / 8
        else:  # mmap: the read is paced apart (pace_read); the copy is from a page-locked staging buffer
            staging = torch.empty(store.record_numel, dtype=store.dtype, pin_memory=True)
            self.native_s["host"] = _time_cuda(lambda: [dst[i].copy_(staging, non_blocking=True) for i in range(8)]) / 8
        if store.slab is not None and store.pinned and ops.device_copy_available(store.slab):
            rows = torch.arange(8, device=self.device) % len(store.slab_rows)
            fill = torch.arange(8, device=self.device)
            self.native_s["static"] = _time_cuda(lambda: ops.copy_records(store.slab_rows, dst, rows, fill)) / 8
        else:
            self.native_s["static"] = self.native_s["host"]
        iters = 200_000
        pace.pace(None, 1000, 0, self._scratch)  # build
        self.iters_per_s = iters / _time_cuda(lambda: pace.pace(None, iters, 0, self._scratch))

    def pace_host(self, records: int, stream=None, path: str = "host") -> None:
        """After a host-path wave of `records` copies (queued on `stream` on CUDA)."""
        if records <= 0:
            return
        seconds = records * self.delay_s(path)
        self.paced_s += seconds
        if self.device.type != "cuda":
            self.sleep(seconds)
            return
        from ..kernels import pace

        with torch.cuda.stream(stream) if stream is not None else _nullcontext():
            pace.pace(None, int(seconds * self.iters_per_s), 0, self._scratch)

    def pace_device(self, fill: torch.Tensor) -> None:
        """After a device-decided copy list (`fill` >= 0: records copied), on the current stream; no host sync on CUDA."""
        if self.device.type != "cuda":
            self.pace_host(int((fill >= 0).sum()), path="static")
            return
        from ..kernels import pace

        pace.pace(fill, 0, int(self.delay_s("static") * self.iters_per_s), self._scratch)

    def info(self) -> dict:
        p = self.profile
        return dict(
            profile=p.name, description=p.description, usable_bytes=self.usable_bytes,
            allocator_fraction=self.fraction, shared_store=self.shared_store,
            link_ms_per_expert={k: round(self.target_s(k) * 1e3, 4) for k in ("host", "static")},
            disk_read_ms_per_expert=round(self.read_target_s() * 1e3, 4),
            native_ms_per_expert={k: round(v * 1e3, 4) for k, v in self.native_s.items()},
            emulated=["usable memory (load and per request; allocator cap on CUDA)",
                      "host-to-device expert copy time (paced to the profile's link)"]
            + (["mmap record reads (each held to the profile's disk time by wall clock)"] if self.store == "mmap" else []),
            not_emulated=["compute speed: this GPU's memory bandwidth, tensor throughput and kernel launches",
                          "the host CPU", "the profile's memory bandwidth for non-expert weights"],
            correction="compare with the planner's prediction for the profile's link and this GPU's compute "
                       "figures (eval/validate_plan.py), then scale compute by the profile's figures over this GPU's")


def _cache_bytes(kv_cache) -> int:
    total = 0
    for layer in kv_cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            total += t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
    return total


def _time_cuda(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = math.inf
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return best


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _gb(n) -> str:
    return f"{n / GB:.2f} GB" if abs(n) >= 0.1 * GB else f"{n / 1e6:.1f} MB"
