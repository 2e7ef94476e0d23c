"""Fused decode MoE kernel (ops.fused_moe_decode) against grouped_mm (ops.experts_from_slots): time,
bandwidth and agreement at decode token counts, Qwen3-VL-30B-A3B expert shapes by default (issue 12
item 1: >= 70% of the HBM bandwidth measured in the same run at 1 token x top-8).

Each timed call reads different experts (a rotating list of random slot layouts over a pool larger than
L2), R calls are captured in one CUDA graph (as static decode runs them: no launch gaps) and the replay
time is divided by R. Bandwidth = bytes of the distinct experts' weights a call reads / its time; the
HBM reference is a device-to-device copy of 2 GiB measured in the same run. Agreement: max |difference|
of each op to the fp32 twin (experts_from_slots_reference) on the same bf16 inputs.

Writes bench_fused_moe.json and bench_fused_moe.md into --out.

    python3 eval/bench_fused_moe.py --out $OUT                     # GPU, Qwen3-VL-30B-A3B shapes
    TRITON_INTERPRET=1 python eval/bench_fused_moe.py --out /tmp/f --device cpu --hidden 72 --inter 40 \\
        --slots 12 --tokens 1,3 --repeats 2                         # CPU smoke run (interpreter)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import device_name, graph_time, hbm_gbps, write_report  # noqa: E402

from vismmoe import ops  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--inter", type=int, default=768)
    parser.add_argument("--slots", type=int, default=128, help="experts in the slot pool")
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", default="1,2,4,8,16")
    parser.add_argument("--repeats", type=int, default=32, help="calls per timing (distinct slot layouts)")
    parser.add_argument("--transposed", action="store_true")
    parser.add_argument("--tune", action="store_true", help="also time each launch over a grid of tile sizes and "
                        "launch options (kernels.fused_moe.Blocks) and report the fastest per token count")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    H, I, S, k, dtype = args.hidden, args.inter, args.slots, args.top_k, torch.bfloat16
    gate_up = (torch.randn(S, 2 * I, H, device=device) / H**0.5).to(dtype)
    down = (torch.randn(S, H, I, device=device) / I**0.5).to(dtype)
    if args.transposed:
        gate_up, down = gate_up.transpose(1, 2).contiguous(), down.transpose(1, 2).contiguous()
    expert_bytes = (gate_up[0].numel() + down[0].numel()) * gate_up.element_size()
    on_gpu = device.type == "cuda"
    result = {"device": device_name(device), "hidden": H, "inter": I,
              "slots": S, "top_k": k, "transposed": args.transposed, "expert_mb": expert_bytes / 1e6,
              "hbm_gbps": hbm_gbps(device, gib=2) if on_gpu else None, "rows": []}
    if on_gpu:  # the op's one-time check against its twin; its verdict decides the default dispatch
        result["fused_self_check"] = ops._fused_moe_checked(device)
    grouped = ops.grouped_mm_available(device, dtype)
    for T in [int(t) for t in args.tokens.split(",")]:
        layouts = [torch.stack([torch.randperm(S, device=device)[:k] for _ in range(T)]) for _ in range(args.repeats)]
        x = torch.randn(T, H, device=device).to(dtype)
        w = torch.softmax(torch.randn(T, k, device=device), -1).to(dtype)
        distinct = sum(lay.unique().numel() for lay in layouts) / len(layouts)
        row = {"tokens": T, "distinct_experts": distinct, "mb_per_call": distinct * expert_bytes / 1e6}
        exact = ops.experts_from_slots_reference(x.float(), w.float(), layouts[0], gate_up.float(), down.float(),
                                                 ops.silu_mul, args.transposed)
        ops_to_time = {"fused": lambda i: ops.fused_moe_decode(x, w, layouts[i], gate_up, down, args.transposed,
                                                               kernel=True)}
        if grouped:
            ops_to_time["grouped_mm"] = lambda i: ops.experts_from_slots(x, w, layouts[i], gate_up, down,
                                                                         ops.silu_mul, args.transposed)
        for name, fn in ops_to_time.items():
            row[f"{name}_max_abs_diff_to_fp32"] = (fn(0).float() - exact).abs().max().item()
            seconds, mode = graph_time(fn, args.repeats, device)
            row[f"{name}_us"] = seconds * 1e6
            row[f"{name}_gbps"] = row["mb_per_call"] * 1e6 / seconds / 1e9
            row[f"{name}_timing"] = mode
            if result["hbm_gbps"]:
                row[f"{name}_of_hbm"] = row[f"{name}_gbps"] / result["hbm_gbps"]
        if args.tune:
            row["tune"] = _tune(x, w, layouts, gate_up, down, args.transposed, args.repeats, device)
            print(json.dumps({"tokens": T, "tune_best": row["tune"]["best"]}), flush=True)
        result["rows"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "tune"}), flush=True)
    write_report(Path(args.out), "bench_fused_moe", result, _markdown(result), indent=2)
    print(_markdown(result))
    return result


GATE_TILES = [(8, 256), (8, 512), (16, 128), (16, 256), (16, 512), (32, 128), (32, 256), (64, 64), (64, 128),
              (128, 32), (128, 64)]
DOWN_TILES = [(2, 256), (4, 128), (4, 256), (8, 64), (8, 128), (8, 256), (16, 64), (16, 128), (32, 32), (32, 64),
              (64, 32), (128, 16)]
LAUNCH_OPTIONS = [(4, 2), (4, 4), (8, 2), (8, 4)]  # (num_warps, num_stages)


def _tune(x, w, layouts, gate_up, down, transposed, repeats, device) -> dict:
    """µs per call of each launch alone over the grid (launch 2 reads launch 1's real output); the fastest
    of each, their sum, and the defaults' for comparison."""
    from vismmoe.kernels import fused_moe

    k = w.shape[1]
    I = gate_up.shape[2 if transposed else 1] // 2
    slots = [lay.reshape(-1).contiguous() for lay in layouts]
    inter = torch.empty(slots[0].numel(), I, dtype=torch.float32, device=device)
    out = torch.empty_like(x)
    default = fused_moe.blocks_for(x.shape[0], transposed)
    fused_moe.gate_up_launch(x, slots[0], gate_up, inter, k, transposed, default)
    gate, dn = {}, {}

    def us(launch) -> float:
        return 1e6 * graph_time(launch, repeats, device)[0]

    for warps, stages in LAUNCH_OPTIONS:
        for gi, gh in GATE_TILES:
            b = fused_moe.Blocks(gate_i=gi, gate_h=gh, gate_warps=warps, gate_stages=stages)
            gate[(gi, gh, warps, stages)] = us(
                lambda i, b=b: fused_moe.gate_up_launch(x, slots[i], gate_up, inter, k, transposed, b))
        for dh, di in DOWN_TILES:
            b = fused_moe.Blocks(down_h=dh, down_i=di, down_warps=warps, down_stages=stages)
            dn[(dh, di, warps, stages)] = us(
                lambda i, b=b: fused_moe.down_launch(inter, slots[i], w, down, out, transposed, b))
    g_best, d_best = min(gate, key=gate.get), min(dn, key=dn.get)
    g_def = (default.gate_i, default.gate_h, default.gate_warps, default.gate_stages)
    d_def = (default.down_h, default.down_i, default.down_warps, default.down_stages)
    if g_def not in gate:
        gate[g_def] = us(lambda i: fused_moe.gate_up_launch(x, slots[i], gate_up, inter, k, transposed, default))
    if d_def not in dn:
        dn[d_def] = us(lambda i: fused_moe.down_launch(inter, slots[i], w, down, out, transposed, default))
    return {"best": {"gate": {"gate_i": g_best[0], "gate_h": g_best[1], "warps": g_best[2], "stages": g_best[3],
                              "us": gate[g_best]},
                     "down": {"down_h": d_best[0], "down_i": d_best[1], "warps": d_best[2], "stages": d_best[3],
                              "us": dn[d_best]},
                     "sum_us": gate[g_best] + dn[d_best]},
            "default_us": {"gate": gate.get(g_def), "down": dn.get(d_def)},
            "gate_us": {"x".join(map(str, c)): t for c, t in gate.items()},
            "down_us": {"x".join(map(str, c)): t for c, t in dn.items()}}


def _markdown(result: dict) -> str:
    lines = [f"# fused decode MoE vs grouped_mm on {result['device']}", "",
             f"H={result['hidden']} I={result['inter']} top-{result['top_k']}, {result['slots']}-slot pool, "
             f"transposed={result['transposed']}, {result['expert_mb']:.2f} MB per expert; "
             f"HBM copy bandwidth {result['hbm_gbps'] or float('nan'):.0f} GB/s; "
             f"fused self-check: {result.get('fused_self_check', 'n/a')}", "",
             "| tokens | MB/call | fused µs | fused GB/s | fused % HBM | fused max err | grouped_mm µs "
             "| grouped_mm GB/s | grouped_mm % HBM | grouped_mm max err |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [str(r["tokens"]), f"{r['mb_per_call']:.1f}"]
        for name in ("fused", "grouped_mm"):
            if f"{name}_us" in r:
                frac = r.get(f"{name}_of_hbm")
                cells += [f"{r[f'{name}_us']:.1f}", f"{r[f'{name}_gbps']:.0f}",
                          f"{100 * frac:.0f}%" if frac else "-", f"{r[f'{name}_max_abs_diff_to_fp32']:.2e}"]
            else:
                cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    timing = {r.get("fused_timing") for r in result["rows"]} | {r.get("grouped_mm_timing") for r in result["rows"]}
    lines += ["", f"timing: {', '.join(sorted(t for t in timing if t))}", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
