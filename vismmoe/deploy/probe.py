"""`vismmoe probe`: measure the machine it runs on, in seconds, as a device profile.

Every figure it writes is `source: measured` with how it was measured. On a machine without CUDA the
GPU figures are absent and the profile's kind is `cpu`. Timings use small repeat counts: the probe is
a sanity figure for the planner, not a benchmark (eval/bench_offload.py is).
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

from .engine_times import _engine_times

GB = 1e9
_DEFAULT_SHAPE = (2048, 768)  # Qwen3-VL-30B-A3B: hidden, moe_intermediate


def probe(model_dir=None, copy_mib: int = 64, repeats: int = 5, engine: bool = True) -> dict:
    """A device-profile mapping (configs/devices schema) of this machine. With `model_dir` (and `engine`),
    also the engine's own times on it (deploy/engine_times.py): the planner's per-layer decode and prefill terms."""
    hidden, inter, model_name = _shape(model_dir)
    figures = {}

    def put(name, value, how):
        if value is not None and value > 0:
            figures[name] = {"value": round(float(value), 4), "source": "measured", "ref": how}

    cuda = torch.cuda.is_available()
    kind, gpu_name, cc = "cpu", "", ""
    if cuda:
        props = torch.cuda.get_device_properties(0)
        gpu_name, cc = props.name, f"{props.major}.{props.minor}"
        kind = "unified" if getattr(props, "is_integrated", False) else "discrete"
        free, total = torch.cuda.mem_get_info(0)
        put("memory_gb", total / GB, "torch.cuda.mem_get_info total")
        put("reserved_gb", max(0.05, (total - free) / GB), "total - free GPU memory at probe time (torch.cuda.mem_get_info)")
        put("memory_bandwidth_gbs", _d2d_gbs(copy_mib, repeats), f"{copy_mib} MiB device-to-device copies (read + write)")
        put("bf16_tflops", _gemm_tflops(), "4096^3 bf16 torch.matmul")
        if kind == "discrete":
            put("h2d_pinned_gbs", _h2d_gbs(copy_mib, repeats, pinned=True), f"{copy_mib} MiB pinned host->device copies")
            put("h2d_pageable_gbs", _h2d_gbs(copy_mib, repeats, pinned=False), f"{copy_mib} MiB pageable host->device copies")
            n, numel = copy_records_shape(copy_mib)
            gbs, latency_ms = _copy_kernel(n, numel, repeats) or (None, None)
            put("copy_kernel_gbs", gbs, f"vismmoe.ops.copy_records, {n} records of {numel * 2 / 2**20:.0f} MiB from "
                "page-locked host memory (large enough to reach the link's rate, whatever the model's record size)")
            put("copy_latency_ms", latency_ms, "vismmoe.ops.copy_records of one 16 KiB record (its fixed cost per copy)")
        put("expert_decode_ms", _expert_ms(hidden, inter, 1, "cuda"), f"one expert MLP ({hidden}x{inter}, bf16), 1 token")
        put("expert_prefill_ms", _expert_ms(hidden, inter, 512, "cuda"), f"one expert MLP ({hidden}x{inter}, bf16), 512 tokens")
    ram_total, ram_available = _meminfo()
    if kind != "unified":
        put("ram_gb", ram_total / GB, "/proc/meminfo MemTotal (or sysconf)")
    if kind == "cpu":
        put("reserved_gb", max(0.05, (ram_total - ram_available) / GB), "MemTotal - MemAvailable at probe time")
    put("cpu_cores", len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cores this process may use (sched_getaffinity)")
    put("host_memcpy_gbs", _memcpy_gbs(copy_mib, repeats), f"{copy_mib} MiB host memory copies (torch)")
    put("cpu_expert_decode_ms", _expert_ms(hidden, inter, 1, "cpu"), f"one expert MLP ({hidden}x{inter}, float32) on the CPU, 1 token")
    put("cpu_tflops", _cpu_tflops(), "1024^3 float32 torch.matmul on the CPU")
    disk, how = _disk_gbs(model_dir)
    put("disk_read_gbs", disk, how)
    if model_dir is not None and engine:
        for name, (value, how) in _engine_times(model_dir, "cuda" if cuda else "cpu", dict(figures)).items():
            put(name, value, how)
    name = "probe-" + (gpu_name or platform.node() or "cpu").lower().replace(" ", "-")
    return {"name": name, "description": f"measured by `vismmoe probe` on {platform.node()} at "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} (expert shape from {model_name})", "kind": kind,
            "gpu_name": gpu_name, "compute_capability": cc, "figures": figures}


def _shape(model_dir):
    if model_dir is None:
        return (*_DEFAULT_SHAPE, "Qwen3-VL-30B-A3B (no --model)")
    from .model_info import model_info

    info = model_info(model_dir)
    return info.hidden_size, info.record_numel // (3 * info.hidden_size), info.name


def _timed(fn, repeats: int, cuda: bool) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _h2d_gbs(mib, repeats, pinned):
    src = torch.empty(mib * 2**20, dtype=torch.uint8, pin_memory=pinned)
    dst = torch.empty_like(src, device="cuda")
    return src.numel() / _timed(lambda: dst.copy_(src, non_blocking=pinned), repeats, True) / GB


def _d2d_gbs(mib, repeats):
    src = torch.empty(mib * 2**20, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _timed(lambda: dst.copy_(src), repeats, True) / GB


def _gemm_tflops():
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    return 2 * 4096 ** 3 / _timed(lambda: a @ a, 5, True) / 1e12


def _cpu_tflops():
    a = torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / _timed(lambda: a @ a, 3, False) / 1e12


COPY_RECORD_MIB = 8  # a record this size moves at the link's rate (a 100 KB record is latency-bound: an
#                     H200 probe measured 17 GB/s on the bundled model's records, 48 GB/s on 9 MiB ones)


def copy_records_shape(copy_mib: int = 64) -> tuple[int, int]:
    """(records, bf16 elements per record) the probe's copy-kernel test moves: COPY_RECORD_MIB records,
    at least 8 of them and at least `copy_mib` (64 MiB by default) in all. Independent of the model: the
    time model costs a record as bytes / bandwidth + copy_latency_ms, so one probe serves any record size."""
    numel = COPY_RECORD_MIB * 2**20 // 2
    return max(8, -(-copy_mib // COPY_RECORD_MIB)), numel


def _copy_kernel(n: int, numel: int, repeats: int):
    """(GB/s over `n` records of `numel` bf16 elements, ms of one 16 KiB record) for ops.copy_records
    from page-locked host memory; None without the device copy (no triton)."""
    from .. import ops

    src = torch.empty((n, numel), dtype=torch.bfloat16, pin_memory=True)
    if not ops.device_copy_available(src):
        return None
    dst = torch.empty((n, numel), dtype=torch.bfloat16, device="cuda")
    rows = torch.arange(n, device="cuda")
    gbs = src.numel() * 2 / _timed(lambda: ops.copy_records(src, dst, rows, rows), repeats, True) / GB
    small_src = torch.empty((1, 8192), dtype=torch.bfloat16, pin_memory=True)
    small_dst = torch.empty((1, 8192), dtype=torch.bfloat16, device="cuda")
    one = torch.zeros(1, dtype=torch.long, device="cuda")
    latency_ms = _timed(lambda: ops.copy_records(small_src, small_dst, one, one), 20, True) * 1e3
    return gbs, latency_ms


def _memcpy_gbs(mib, repeats):
    src = torch.empty(mib * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _timed(lambda: dst.copy_(src), repeats, False) / GB


def _expert_ms(hidden, inter, tokens, device):
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gate_up = torch.randn(2 * inter, hidden, dtype=dtype, device=device) * 0.02
    down = torch.randn(hidden, inter, dtype=dtype, device=device) * 0.02
    x = torch.randn(tokens, hidden, dtype=dtype, device=device)

    def run():
        g, u = (x @ gate_up.t()).chunk(2, dim=-1)
        return (torch.nn.functional.silu(g) * u) @ down.t()

    return _timed(run, 10, device == "cuda") * 1e3


def _meminfo() -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
        return int(fields["MemTotal"].split()[0]) * 1024, int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total, total


def _disk_gbs(model_dir, limit_bytes: int = 256 * 2**20, limit_s: float = 1.0):
    """Read bandwidth of the disk holding the model: its largest file, page cache dropped first
    (POSIX_FADV_DONTNEED), up to `limit_bytes` or `limit_s`. Without a model: a temporary file."""
    import tempfile

    temp = None
    files = sorted(Path(model_dir).glob("*.safetensors"), key=lambda p: -p.stat().st_size) if model_dir else []
    if files:
        path = files[0]
    else:
        fd, temp = tempfile.mkstemp(prefix="vismmoe-probe-")
        with os.fdopen(fd, "wb") as fh:
            fh.write(os.urandom(32 * 2**20))
            fh.flush()
            os.fsync(fh.fileno())
        path = Path(temp)
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            done, start = 0, time.perf_counter()
            while done < limit_bytes and time.perf_counter() - start < limit_s:
                chunk = os.read(fd, 8 * 2**20)
                if not chunk:
                    break
                done += len(chunk)
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        if temp:
            os.unlink(temp)
    how = (f"read {done / 2**20:.0f} MiB of {path.name if not temp else 'a temporary file'} after dropping it "
           "from the page cache (POSIX_FADV_DONTNEED)")
    return (done / seconds / GB if seconds > 0 and done else None), how


def profile_table(profile: dict) -> "object":
    """A rich Table of a profile mapping (probe output or a shipped profile's to_dict())."""
    from rich.table import Table

    table = Table(title=f"{profile['name']} ({profile['kind']})", show_lines=False)
    for col in ("figure", "value", "source", "how / where from"):
        table.add_column(col, overflow="fold")
    table.add_row("gpu", profile.get("gpu_name") or "-", "", f"compute capability {profile.get('compute_capability') or '-'}")
    for name, fig in profile["figures"].items():
        table.add_row(name, f"{fig['value']:g}", fig["source"], fig["ref"])
    return table
