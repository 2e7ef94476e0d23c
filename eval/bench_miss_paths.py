"""A decode step's missed experts: copy them to slots then compute, or read them in place (zero-copy);
and with `--engine`, the whole engine's decode time per miss path (copy, zerocopy, cpu, auto).

Issue 12 item 4 needs measured figures for its cost model of miss paths. This times, at 1 token x top-k
(Qwen3-VL-30B-A3B expert shapes by default), the fused decode MoE kernel with m of the k experts missing
from the slot pool, for m = 0..k:
  copy      `ops.copy_records` of the m records from the page-locked host slab into free slots, then
            `ops.fused_moe_decode` over the pool (what static decode does today);
  zerocopy  `ops.fused_moe_decode` with the m experts' slot ids naming host rows (-r-1): the kernel reads
            them over the bus in place, no slot taken.
Each timed call names other host rows (rotating over a slab larger than the GPU's L2) and other slots;
R calls are captured in one CUDA graph and the replay time divided by R (as static decode runs). The
outputs of the two paths are compared on every layout. Writes bench_miss_paths.json / .md into --out.

    python3 eval/bench_miss_paths.py --out $OUT                       # GPU
    TRITON_INTERPRET=1 python eval/bench_miss_paths.py --out /tmp/m --device cpu --hidden 72 --inter 40 \\
        --rows 16 --slots 12 --top-k 4 --repeats 2                    # CPU smoke run (interpreter)

`--engine` (eval/miss_path_table.py): decode ms/token of the random 12-layer bench model (Qwen3-VL-30B-A3B
expert shapes, bf16) at budgets min / 10% / 25% for miss_path copy, zerocopy, cpu and auto, on this
machine's link and with the link emulated at 12 GB/s (a laptop's PCIe 4.0 x8); writes
miss_path_table.json / .md:

    python3 eval/bench_miss_paths.py --engine --out $OUT              # GPU, ~4 minutes on an H200
    python eval/bench_miss_paths.py --engine --tiny --out /tmp/m      # CPU smoke run (tiny model)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import device_name, graph_time, write_report  # noqa: E402

from vismmoe import ops  # noqa: E402


def views(flat: torch.Tensor, hidden: int, inter: int):
    """[N, record] rows (gate_up then down, as the store and the cache lay them out) as weight views."""
    gu = 2 * inter * hidden
    n = flat.shape[0]
    return flat[:, :gu].view(n, 2 * inter, hidden), flat[:, gu:].view(n, hidden, inter)


def main(argv=None) -> dict:
    if "--engine" in (sys.argv[1:] if argv is None else argv):
        from eval.miss_path_table import main as table

        return table([a for a in (sys.argv[1:] if argv is None else argv) if a != "--engine"])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--slots", type=int, default=64, help="experts in the slot pool")
    ap.add_argument("--rows", type=int, default=96, help="records in the host slab (> L2 in bytes)")
    ap.add_argument("--repeats", type=int, default=16, help="calls per timing (distinct layouts)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    H, I, k, S, R = args.hidden, args.inter, args.top_k, args.slots, args.rows
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    record = 3 * H * I
    gen = torch.Generator().manual_seed(0)
    slab = (torch.randn(R, record, generator=gen) / H**0.5).to(dtype)
    if device.type == "cuda":
        slab = slab.pin_memory()
    pool = (torch.randn(S, record, generator=gen) / H**0.5).to(device, dtype)
    gate_up, down = views(pool, H, I)
    host_gu, host_dn = views(slab, H, I)
    x = torch.randn(1, H, generator=gen).to(device, dtype)
    w = torch.softmax(torch.randn(1, k, generator=gen), -1).to(device, dtype)
    record_mb = record * slab.element_size() / 1e6
    result = {"device": device_name(device), "hidden": H, "inter": I, "top_k": k, "record_mb": record_mb,
              "slab_rows": R, "pool_slots": S, "rows": []}
    for m in range(k + 1):
        # Per call: k - m resident slots, and m host rows copied into m other (free) slots or read in place.
        layouts = []
        for _ in range(args.repeats):
            slots = torch.randperm(S, generator=gen)[:k]
            rows = torch.randperm(R, generator=gen)[:m]
            zero_copy_ids = torch.cat([slots[: k - m], -1 - rows]).view(1, k)
            layouts.append(dict(src=rows.to(device), dst=slots[k - m:].to(device), copy_ids=slots.view(1, k).to(device),
                                zero_copy_ids=zero_copy_ids.to(device)))

        def copy_path(i):
            lay = layouts[i]
            ops.copy_records(slab, pool, lay["src"], lay["dst"])
            return ops.fused_moe_decode(x, w, lay["copy_ids"], gate_up, down, kernel=True)

        def zero_copy_path(i):
            lay = layouts[i]
            return ops.fused_moe_decode(x, w, lay["zero_copy_ids"], gate_up, down, kernel=True,
                                        host_gate_up=host_gu, host_down=host_dn)

        def install_path(i):  # the copy list executed by the decode kernel as it reads (static decode's default)
            lay = layouts[i]
            return ops.fused_moe_decode(x, w, lay["copy_ids"], gate_up, down, kernel=True, host_gate_up=host_gu,
                                        host_down=host_dn, install=lay["install"])

        for lay in layouts:
            fill = torch.full((k,), -1, dtype=torch.int64)
            src = torch.zeros(k, dtype=torch.int64)
            fill[k - m:], src[k - m:] = lay["dst"].cpu(), lay["src"].cpu()
            lay["install"] = (fill.to(device), src.to(device))
        diffs = [(copy_path(i).float() - zero_copy_path(i).float()).abs().max().item() for i in range(len(layouts))]

        def installs_as_copy(i) -> bool:  # the installed slots cleared first, so a missing store shows
            lay = layouts[i]
            want = copy_path(i)
            pool[lay["dst"]] = 0
            got = install_path(i)
            return torch.equal(got, want) and torch.equal(pool[lay["dst"]].cpu().view(torch.int16),
                                                          slab[lay["src"].cpu()].view(torch.int16))

        install_equal = all(installs_as_copy(i) for i in range(len(layouts)))
        row = {"missing": m, "host_mb_per_call": m * record_mb, "max_abs_diff_copy_vs_zerocopy": max(diffs),
               "install_equals_copy": install_equal}
        for name, fn in (("copy", copy_path), ("zerocopy", zero_copy_path), ("install", install_path)):
            seconds, mode = graph_time(fn, args.repeats, device)
            row[f"{name}_us"], row[f"{name}_timing"] = seconds * 1e6, mode
            if m:
                row[f"{name}_host_gbps"] = m * record_mb * 1e6 / seconds / 1e9
        if m == 0:  # the pool-only kernel (100% budget), against which the host-capable variants' cost is seen
            seconds, mode = graph_time(lambda i: ops.fused_moe_decode(x, w, layouts[i]["copy_ids"], gate_up, down,
                                                                      kernel=True), args.repeats, device)
            result["pool_only_us"] = seconds * 1e6
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    lines = [f"# Missed experts at 1 token x top-{k}: copy then compute vs zero-copy ({result['device']})", "",
             f"Expert record {record_mb:.2f} MB (H={H}, I={I}), host slab {R} records page-locked, pool {S} slots. "
             f"The pool-only kernel (nothing can miss): {result['pool_only_us']:.1f} µs. \"install\": the copy list "
             "executed by the decode kernel as it reads (output and pool identical to copy + compute).", "",
             "| missing of k | host MB | copy + compute µs | install µs | zero-copy µs | install / copy | zero-copy / copy "
             "| zero-copy host GB/s | max |diff| | install = copy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in result["rows"]:
        gbps = r.get("zerocopy_host_gbps")
        lines.append(f"| {r['missing']} | {r['host_mb_per_call']:.1f} | {r['copy_us']:.1f} | {r['install_us']:.1f} | "
                     f"{r['zerocopy_us']:.1f} | {r['install_us'] / r['copy_us']:.2f} | {r['zerocopy_us'] / r['copy_us']:.2f} | "
                     f"{'' if gbps is None else f'{gbps:.1f}'} | {r['max_abs_diff_copy_vs_zerocopy']:.1e} | "
                     f"{r['install_equals_copy']} |")
    markdown = "\n".join(lines) + "\n"
    write_report(Path(args.out), "bench_miss_paths", result, markdown, indent=2)
    print(markdown)
    return result


if __name__ == "__main__":
    main()
