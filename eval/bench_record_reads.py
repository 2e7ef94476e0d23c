"""An mmap store's record reads, two ways, from the page cache (offline, seconds): ExpertStore's positioned
reads (os.preadv at the safetensors header's offsets, the path a miss takes where the layout allows) against
safetensors' slices and a copy (the path before session 11, still taken for transposed layouts). Every
record of the model, `--passes` times each way, alternating; reports the median µs per record and checks
the two reads give the same bytes.

    python eval/bench_record_reads.py [--model DIR] [--dtype float32|bfloat16] [--passes N] [--out DIR]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=REPO / "models" / "easyvqa-qwen3vlmoe")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--out", type=Path, help="write bench_record_reads.json here")
    args = ap.parse_args(argv)
    if args.passes < 1:
        ap.error("--passes must be at least 1")
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
