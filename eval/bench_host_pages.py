"""Does a missed expert's copy cost more when its record was not read lately (GPU address translation of
host memory), and do 2 MiB host pages change that?

Session 6 measured 241 µs per decode miss in the engine (bench model, 25% budget) against 193.5 µs for
one record copied again and again: the engine's misses read records spread over a 14.5 GB slab that the
GPU has not read lately. This times `ops.copy_records` of one 9.44 MB record per launch:
  warm  the same few records again and again;
  cold  every record of a multi-GB slab once, in a random order;
for two slabs registered as the store registers its slab (cudaHostRegister, portable + mapped):
  4k    torch.empty (the store's allocation today);
  thp   an anonymous mapping aligned to 2 MiB with madvise(MADV_HUGEPAGE), filled, then registered.
Writes bench_host_pages.json / .md into --out, with the machine's THP setting and AnonHugePages.

    python3 eval/bench_host_pages.py --out $OUT              # GPU, ~30 s
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import device_name, write_report  # noqa: E402

from vismmoe import ops  # noqa: E402
from vismmoe.offload.store import _pin_in_place, _unpin  # noqa: E402

MADV_HUGEPAGE = 14
HUGE = 2 << 20


def thp_tensor(rows: int, numel: int, dtype) -> tuple[torch.Tensor, mmap.mmap]:
    size = rows * numel * torch.empty((), dtype=dtype).element_size()
    mm = mmap.mmap(-1, size + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
    offset = (-base) % HUGE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    rc = libc.madvise(ctypes.c_void_p(base + offset), ctypes.c_size_t(size), MADV_HUGEPAGE)
    flat = torch.frombuffer(mm, dtype=torch.uint8)[offset: offset + size]
    return flat.view(dtype).view(rows, numel), mm, rc


def anon_huge_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return -1


def time_copies(slab, pool, order, device) -> float:
    """Mean µs per one-record launch over `order` (each launch timed by events, launches back to back)."""
    src = [torch.tensor([r], device=device) for r in order]
    dst = torch.zeros(1, dtype=torch.int64, device=device)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for s in src:
        ops.copy_records(slab, pool, s, dst)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / len(order)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", type=int, default=512, help="records per slab (9.44 MB each: 4.8 GB)")
    ap.add_argument("--numel", type=int, default=3 * 2048 * 768, help="elements per record (bf16)")
    args = ap.parse_args(argv)
    device = torch.device("cuda", 0)
    dtype = torch.bfloat16
    pool = torch.empty((1, args.numel), dtype=dtype, device=device)
    thp_setting = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    result = {"device": device_name(device), "record_mb": args.numel * 2 / 1e6, "rows": args.rows,
              "thp_enabled": thp_setting.read_text().strip() if thp_setting.exists() else None, "slabs": {}}
    gen = torch.Generator().manual_seed(0)
    for kind in ("4k", "thp"):
        before = anon_huge_kb()
        t0 = time.perf_counter()
        keep = None
        if kind == "4k":
            slab = torch.empty((args.rows, args.numel), dtype=dtype)
            madvise_rc = None
        else:
            slab, keep, madvise_rc = thp_tensor(args.rows, args.numel, dtype)
        slab.view(torch.int16).random_(-2000, 2000, generator=gen)  # touch every page
        fill_s = time.perf_counter() - t0
        huge_kb = anon_huge_kb() - before
        t0 = time.perf_counter()
        pinned = _pin_in_place(slab)
        register_s = time.perf_counter() - t0
        row = {"madvise_rc": madvise_rc, "anon_huge_pages_mb": huge_kb / 1024, "fill_s": fill_s,
               "register_s": register_s, "pinned": pinned}
        if pinned:
            warm = [0, 1, 2, 3] * 16
            time_copies(slab, pool, warm, device)  # build and warm
            row["warm_us"] = time_copies(slab, pool, warm, device)
            cold = torch.randperm(args.rows, generator=gen)[: min(args.rows, 256)].tolist()
            row["cold_us"] = time_copies(slab, pool, cold, device)
            row["cold_again_us"] = time_copies(slab, pool, cold, device)
            ref = slab[cold[-1]].clone()
            ok = torch.equal(pool[0].cpu().view(torch.int16), ref.view(torch.int16))  # bits: random bits hold NaNs
            row["copy_correct"] = ok
            _unpin(slab, device)
        result["slabs"][kind] = row
        print(kind, row, flush=True)
        del slab, keep  # the mapping goes with its last view
    lines = [f"# One-record copies from a page-locked slab: warm vs cold records, 4 KiB vs 2 MiB host pages "
             f"({result['device']})", "",
             f"{args.rows} records of {result['record_mb']:.2f} MB; THP setting: {result['thp_enabled']}.", "",
             "| slab | AnonHugePages MB | register s | warm µs/record | cold µs/record | same cold records again µs |",
             "|---|---:|---:|---:|---:|---:|"]
    for kind, r in result["slabs"].items():
        lines.append(f"| {kind} | {r['anon_huge_pages_mb']:.0f} | {r['register_s']:.2f} | {r.get('warm_us', 0):.1f} | "
                     f"{r.get('cold_us', 0):.1f} | {r.get('cold_again_us', 0):.1f} |")
    markdown = "\n".join(lines) + "\n"
    write_report(Path(args.out), "bench_host_pages", result, markdown, indent=2)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
