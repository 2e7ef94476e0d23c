"""An mmap store's record reads, two ways, from the page cache (offline, seconds): ExpertStore's positioned
reads (os.preadv at the safetensors header's offsets, the path a miss takes where the layout allows and the
record is at most store.POSITIONED_READ_MAX_BYTES) against safetensors' slices and a copy (the path before
session 11, still taken for transposed layouts and larger records). Every record of the model, `--passes`
times each way, alternating; reports the median µs per record and checks the two reads give the same bytes.
A model whose records are over the cap reads through the slices both ways (`records_positioned` says 0).

--sizes KIB,... times the two reads themselves (store._pread_into and a slice's copy) on a synthetic
bfloat16 file per record size instead: where they cross is what the cap is set from.

    python eval/bench_record_reads.py [--model DIR] [--dtype float32|bfloat16] [--passes N] [--out DIR]
    python eval/bench_record_reads.py --sizes 64,128,256,512,1024,2048,8192 [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import REPO, write_report  # noqa: E402

import vismmoe  # noqa: E402


def by_size(sizes_kib: list[int], passes: int) -> list[dict]:
    """µs per record read of a bfloat16 block of each size from the page cache: a positioned read
    (store._pread_into, straight into the buffer) against safetensors' slice of the record and a copy."""
    import os
    import tempfile

    from safetensors import safe_open
    from safetensors.torch import save_file

    from vismmoe.offload.store import _pread_into, _tensor_offsets

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kib in sizes_kib:
            numel = kib * 1024 // 2
            experts = max(8, (64 << 20) // (kib * 1024))  # 64 MiB a file, at least 8 records
            path = os.path.join(tmp, f"{kib}.safetensors")
            save_file({"w": torch.randn(experts, numel).to(torch.bfloat16)}, path)
            _, _, offset, _ = _tensor_offsets(path)["w"]
            out = torch.empty(numel, dtype=torch.bfloat16)
            buffer = memoryview(out.view(torch.uint8).numpy()).cast("B")
            fd = os.open(path, os.O_RDONLY)
            try:
                with safe_open(path, framework="pt") as handle:
                    reads = {"positioned": lambda e: _pread_into(fd, buffer, offset + e * numel * 2, path),
                             "slices": lambda e: out.copy_(handle.get_slice("w")[e])}
                    times = {name: [] for name in reads}
                    for name, read in reads.items():  # the page cache warm (save_file wrote it)
                        for e in range(experts):
                            read(e)
                    for _ in range(passes):
                        for name, read in reads.items():
                            for e in range(experts):
                                start = time.perf_counter()
                                read(e)
                                times[name].append((time.perf_counter() - start) * 1e6)
            finally:
                os.close(fd)
            row = dict(record_kib=kib, records=experts, passes=passes, threads=torch.get_num_threads(),
                       **{f"{k}_us": round(float(np.median(v)), 1) for k, v in times.items()})
            row["ratio"] = round(row["positioned_us"] / row["slices_us"], 3)
            print(json.dumps(row))
            rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "easyvqa-qwen3vlmoe")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--sizes", help="comma-separated record sizes in KiB: time the two reads on synthetic files")
    ap.add_argument("--out", type=Path, help="write bench_record_reads.json (bench_read_sizes.json) here")
    args = ap.parse_args(argv)
    if args.passes < 1:
        ap.error("--passes must be at least 1")
    if args.sizes:
        try:
            sizes = [int(v) for v in args.sizes.split(",")]
        except ValueError:
            ap.error(f"--sizes takes KiB as integers, e.g. 64,256,1024; got {args.sizes!r}")
        if any(v < 1 for v in sizes):
            ap.error("--sizes must be at least 1 KiB each")
        rows = by_size(sizes, args.passes)
        if args.out:
            write_report(args.out, "bench_read_sizes", {"rows": rows})
        return 0
    engine = vismmoe.load(args.model, device="cpu", dtype=args.dtype, store="mmap")
    store = engine.store
    records = [(layer, expert) for layer in range(store.num_layers) for expert in range(store.num_experts)]
    positioned = sum(store._spans[layer][expert] is not None for layer, expert in records)
    a, b = torch.empty(store.record_numel, dtype=store.dtype), torch.empty(store.record_numel, dtype=store.dtype)
    for layer, expert in records:  # the page cache warm, and the two reads equal
        store._read_into(layer, expert, a)
        store._read_via_slices(layer, expert, b)
        if not torch.equal(a, b):
            raise SystemExit(f"record ({layer}, {expert}) differs between the two reads")
    times = {"positioned": [], "slices": []}
    for _ in range(args.passes):
        for name, read in (("positioned", store._read_into), ("slices", store._read_via_slices)):
            start = time.perf_counter()
            for layer, expert in records:
                read(layer, expert, a)
            times[name].append((time.perf_counter() - start) / len(records) * 1e6)
    engine.close()
    row = dict(model=args.model.name, dtype=args.dtype, record_bytes=store.record_bytes, records=len(records),
               records_positioned=positioned, passes=args.passes,
               **{f"{k}_us": round(float(np.median(v)), 1) for k, v in times.items()})
    row["ratio"] = round(row["positioned_us"] / row["slices_us"], 3)
    print(json.dumps(row))
    if args.out:
        write_report(args.out, "bench_record_reads", row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
