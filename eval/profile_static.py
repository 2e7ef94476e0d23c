"""Where a static decode step's time goes (issue 5), on the bench_offload model: GPU time of each
piece of a layer, measured inside CUDA graphs (as decode runs them, no launch gaps).

  * experts compute (ops.experts_from_slots, one token, top-8) over slot pools of different sizes;
  * the device-side cache decision of one layer (DeviceResidency.demand) when every expert hits;
  * the record-copy kernel when nothing is copied, and when one 9.4 MB record is copied;
  * whole decode steps at 100% and 25% budget, prefetch off and on.

    python eval/profile_static.py --out /tmp/out --layers 12
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import vismmoe  # noqa: E402
from vismmoe import ops  # noqa: E402
from vismmoe.tiny_models import full_size_checkpoint  # noqa: E402


def graph_us(fn, reps=20, replays=5) -> float:
    """GPU microseconds per call of fn, captured `reps` times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (reps * replays)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = full_size_checkpoint(args.layers)
    report = {"gpu": torch.cuda.get_device_name(), "layers": args.layers}
    engine = vismmoe.load(ckpt, dtype="bfloat16", expert_budget=0.25, prefetch=False)
    cache, layout = engine.cache, engine.layout
    module = layout.layers[0].experts
    k, h = layout.top_k, layout.hidden_size
    with torch.inference_mode():
        x = torch.randn(1, h, device="cuda", dtype=torch.bfloat16)
        w = torch.softmax(torch.randn(1, k, device="cuda"), -1).to(torch.bfloat16)
        compute = {}
        for groups in (128, 256, cache.num_slots):
            ids = torch.randperm(groups, device="cuda")[:k].view(1, k)
            gu, dn = cache.gate_up_view[:groups], cache.down_view[:groups]
            compute[groups] = graph_us(lambda: ops.experts_from_slots(x, w, ids, gu, dn, module._apply_gate))
        report["experts_compute_us_by_pool_slots"] = compute
        # One layer's device-side decision with every expert resident (a hit): fill the slots first.
        res = engine.runtime.residency
        res.load_from_host()
        experts = torch.arange(k, device="cuda")
        res.demand(0, experts)
        torch.cuda.synchronize()
        report["demand_all_hits_us"] = graph_us(lambda: res.demand(0, experts))
        none = torch.full((k,), -1, device="cuda", dtype=torch.int64)
        rows = torch.arange(k, device="cuda")
        report["copy_kernel_nothing_copied_us"] = graph_us(
            lambda: ops.copy_records(engine.store.slab_rows, cache.slots, rows, none))
        one = none.clone()
        one[0] = cache.num_slots - 1
        report["copy_kernel_one_record_us"] = graph_us(
            lambda: ops.copy_records(engine.store.slab_rows, cache.slots, rows, one), reps=5)
    print(json.dumps(report, indent=1), flush=True)

    import numpy as np
    from PIL import Image

    rs = np.random.RandomState(0)
    image = Image.fromarray((rs.rand(256, 256, 3) * 255).astype("uint8"))
    prompt = "what is the color of the shape on the left of the image?"
    steps = {}
    for budget in (1.0, 0.25, 0.5):
        for prefetch in (False, True):
            engine.reconfigure(expert_budget=budget, prefetch=prefetch, decode="static")
            engine.generate(image=image, prompt=prompt, max_new_tokens=32, min_new_tokens=32)
            s = engine.generate(image=image, prompt=prompt, max_new_tokens=32, min_new_tokens=32).stats
            steps[f"{budget}/prefetch={prefetch}"] = dict(
                decode_ms_per_token=s.decode_s * 1e3 / (s.new_tokens - 1), path=s.decode_path,
                decode_misses_per_token=(s.expert_misses - s.prefill_misses) / (s.new_tokens - 1),
                prefetch_mb_per_token=s.prefetch_issued_bytes / 1e6 / (s.new_tokens - 1))
            print(budget, prefetch, steps[f"{budget}/prefetch={prefetch}"], flush=True)
    report["decode_steps"] = steps
    (out / "profile_static.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
