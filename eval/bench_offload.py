"""Offloading benchmark (issue 5): four variants, one run, same model, inputs and GPU expert budget.

  (a) HF accelerate device_map offload: whole decoder layers beyond the budget live on the CPU and are
      copied to the GPU every forward (the device map is asserted, not trusted);
  (b) vismmoe on-demand loading, LRU, no prefetch (mixtral-offloading-style baseline);
  (c) vismmoe as shipped: static decode (experts decided on the device, each step one CUDA graph
      replay) with lookahead prediction and copy-stream prefetch;
  (d) all experts resident, transformers' own grouped_mm experts (the reference).
Before/after rows for (c): `c-generate` (transformers' generate loop, host-decided loads, prefetch on:
what (c) was before static decode) and `c-eager` (static decode without CUDA graphs).
For each: time to first token, decode ms/token, tokens/s, hit rate, bytes moved, and the ratio to the
decode floor = max(resident compute time per token, decode bytes moved per token / pinned host->GPU
bandwidth measured in this run). Writes bench_offload.json / .md into --out.

    python eval/bench_offload.py --out /tmp/out --layers 12 --budgets 0.25 0.5
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import BENCH_PROMPT, free_memory, output_dir, random_image, write_report  # noqa: E402

import vismmoe  # noqa: E402
from vismmoe.inputs import build_inputs  # noqa: E402
from vismmoe.testing.tiny_models import QWEN3_VL_30B_A3B_TEXT as FULL_SIZE  # noqa: E402
from vismmoe.testing.tiny_models import full_size_checkpoint  # noqa: E402


def pinned_bandwidth_gbps(nbytes=256 * 2**20, repeats=10) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    end.record()
    torch.cuda.synchronize()
    return nbytes * repeats / (start.elapsed_time(end) / 1e3) / 1e9


def device_copy_gbps(ckpt, records=64, repeats=5) -> float:
    """Bandwidth of the device-decided copy kernel (ops.copy_records) from the page-locked slab."""
    from vismmoe import ops

    engine = vismmoe.load(ckpt, dtype="bfloat16", expert_budget="min", decode="static")
    src = engine.store.slab_rows  # the kernel's own source: the page-locked host slab (an internal, on purpose)
    dst = torch.empty((records, src.shape[1]), dtype=src.dtype, device="cuda")
    rows = torch.randperm(src.shape[0])[:records].cuda()
    slots = torch.arange(records, device="cuda")
    ops.copy_records(src, dst, rows, slots)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        ops.copy_records(src, dst, rows, slots)
    end.record()
    torch.cuda.synchronize()
    assert torch.equal(dst[-1].cpu(), src[int(rows[-1])]), "device-decided copy returned wrong bytes"
    gbps = records * repeats * src.shape[1] * src.element_size() / (start.elapsed_time(end) / 1e3) / 1e9
    engine.close()
    del engine, dst
    free_memory()
    return gbps


class FirstTokenTimer:
    """A generate() streamer that notes when the first new token is known on the host."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def time_hf_generate(model, inputs, new_tokens, generation_config):
    timer = FirstTokenTimer()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, streamer=timer,
                             generation_config=generation_config)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    n = out.shape[1] - inputs["input_ids"].shape[1]
    return dict(ttft_ms=(timer.first - t0) * 1e3, decode_ms_per_token=(t1 - timer.first) * 1e3 / (n - 1),
                new_tokens=n, tokens=out[0, inputs["input_ids"].shape[1]:].tolist())


def run_vismmoe(engine, image, prompt, new_tokens, profile_path=None, warmup=None):
    # Warm-up on a different request: the measured one must not replay the warm-up's routing.
    w_image, w_prompt = warmup
    engine.generate(image=w_image, prompt=w_prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    engine.reset_stats()
    result = engine.generate(image=image, prompt=prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    if profile_path is not None:  # a separate, profiled run: the timed one above runs unobserved
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            engine.generate(image=image, prompt=prompt, max_new_tokens=8, min_new_tokens=8)
        Path(profile_path).write_text(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    s = result.stats
    decode_tokens = s.new_tokens - 1
    return dict(decode_path=s.decode_path, ttft_ms=s.ttft_s * 1e3, decode_ms_per_token=s.decode_s * 1e3 / decode_tokens,
                new_tokens=s.new_tokens,
                hit_rate=s.hit_rate, misses=s.expert_misses, bytes_h2d=s.bytes_h2d,
                decode_bytes_per_token=(s.bytes_h2d - s.prefill_bytes_h2d) / decode_tokens,
                prefetch_issued=s.prefetch_issued_bytes, prefetch_used=s.prefetch_used_bytes,
                prefetch_wasted=s.prefetch_wasted_bytes, stall_ms=(s.stall_s or 0) * 1e3,
                recall=s.prefetch_recall, precision=s.prefetch_precision, tokens=result.token_ids)


def accelerate_device_map(model_cls, hf_config, gpu_layers: int, num_layers: int):
    """Explicit, non-overlapping map: decoder layers >= gpu_layers on "cpu" (accelerate offloads them and
    copies them to the GPU at every forward); every other module on GPU 0."""
    with torch.device("meta"):
        skeleton = model_cls(hf_config)
    modules = dict(skeleton.named_modules())
    prefix = next(n for n in modules if n.endswith("language_model.layers"))
    device_map = {}

    def place(name, module):
        if name == prefix:
            for i in range(num_layers):
                device_map[f"{prefix}.{i}"] = 0 if i < gpu_layers else "cpu"
        elif prefix.startswith(name + ".") or name == "":
            for child, sub in module.named_children():
                place(f"{name}.{child}" if name else child, sub)
            for pname, _ in module.named_parameters(recurse=False):
                device_map[f"{name}.{pname}" if name else pname] = 0
            for bname, _ in module.named_buffers(recurse=False):
                device_map[f"{name}.{bname}" if name else bname] = 0
        else:
            device_map[name] = 0

    place("", skeleton)
    return device_map, prefix


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--skip-accelerate", action="store_true")
    args = ap.parse_args()
    out = output_dir(args.out)
    import transformers
    from transformers import AutoConfig, AutoModelForImageTextToText

    report = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                  layers=args.layers, new_tokens=args.new_tokens, **FULL_SIZE)
    t0 = time.perf_counter()
    ckpt = full_size_checkpoint(args.layers)
    report["build_s"] = time.perf_counter() - t0
    report["pinned_h2d_gbps"] = bw = pinned_bandwidth_gbps()
    print(f"pinned H2D {bw:.1f} GB/s", flush=True)
    import numpy as np

    rs = np.random.RandomState(0)
    image, prompt = random_image(rs, 256), BENCH_PROMPT
    # Same token count (sdpa/cuDNN build a plan per sequence length), different pixels and text.
    warmup = (random_image(rs, 256), prompt.upper())
    n = args.new_tokens
    results = {}

    report["device_copy_gbps"] = device_copy_gbps(ckpt)
    print(f"device-decided record copies {report['device_copy_gbps']:.1f} GB/s", flush=True)
    # (d) resident reference, and (c) at 100%: the resident compute time.
    engine = vismmoe.load(ckpt, dtype="bfloat16", expert_budget=1.0, prefetch=True)
    for key, overrides in (("c-generate@1.0", dict(decode="generate")), ("c-eager@1.0", dict(cuda_graphs=False)),
                           ("c@1.0", {})):
        engine.reconfigure(**{"decode": "auto", "cuda_graphs": True, **overrides})
        results[key] = run_vismmoe(engine, image, prompt, n, warmup=warmup)
        print(key, {k: v for k, v in results[key].items() if k not in ("tokens", "recall", "precision")}, flush=True)
    gen_cfg = engine.generation_config
    inputs = build_inputs(engine.processor, image, prompt).to("cuda")
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    engine.reconfigure(expert_budget="min")  # frees the 100% slot pool for the reference model
    free_memory()
    ref = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.bfloat16,
                                                      experts_implementation="grouped_mm").cuda().eval()
    w_inputs = build_inputs(engine.processor, *warmup).to("cuda")
    w_inputs["pixel_values"] = w_inputs["pixel_values"].to(torch.bfloat16)
    time_hf_generate(ref, w_inputs, n, gen_cfg)  # warm-up, same lengths as the measured request
    results["d"] = time_hf_generate(ref, inputs, n, gen_cfg)
    print("d", {k: v for k, v in results["d"].items() if k != "tokens"}, flush=True)
    del ref
    free_memory()
    resident_ms = min(results["d"]["decode_ms_per_token"], results["c@1.0"]["decode_ms_per_token"])
    report["resident_decode_ms_per_token"] = resident_ms

    variants = (
        ("b", dict(prefetch=False, decode="generate", measure_stalls=True)),  # mixtral-offloading style
        ("c-generate", dict(prefetch=True, decode="generate", measure_stalls=True)),
        ("c-eager", dict(prefetch=True, decode="static", cuda_graphs=False)),
        ("c", dict(prefetch=True, decode="static", cuda_graphs=True)),
    )
    for budget in args.budgets:
        for variant, overrides in variants:
            engine.reconfigure(expert_budget=budget, **{"decode": "auto", "cuda_graphs": True, "measure_stalls": False,
                                                        **overrides})
            key = f"{variant}@{budget}"
            prof = out / f"profile_{variant}_{budget}.txt" if variant == "c" else None
            results[key] = run_vismmoe(engine, image, prompt, n, profile_path=prof, warmup=warmup)
            r = results[key]
            r["floor_ms_per_token"] = max(resident_ms, r["decode_bytes_per_token"] / (bw * 1e9) * 1e3)
            r["ratio_to_floor"] = r["decode_ms_per_token"] / r["floor_ms_per_token"]
            print(key, {k: v for k, v in r.items() if k not in ("tokens", "recall", "precision")}, flush=True)
        for variant, _ in variants:
            results[f"{variant}@{budget}"]["same_tokens_as_c"] = (
                results[f"{variant}@{budget}"]["tokens"] == results[f"c@{budget}"]["tokens"])
    engine.close()
    del engine
    free_memory()

    if not args.skip_accelerate:
        hf_config = AutoConfig.from_pretrained(str(ckpt))
        model_cls = AutoModelForImageTextToText._model_mapping[type(hf_config)]
        for budget in args.budgets:
            gpu_layers = int(budget * args.layers)
            device_map, prefix = accelerate_device_map(model_cls, hf_config, gpu_layers, args.layers)
            model = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.bfloat16, device_map=device_map,
                                                                experts_implementation="grouped_mm").eval()
            placed = model.hf_device_map
            offloaded = [k for k, v in placed.items() if v == "cpu"]
            assert len(offloaded) == args.layers - gpu_layers and all(k.startswith(prefix) for k in offloaded), placed
            layer = dict(model.named_modules())[f"{prefix}.{args.layers - 1}"]
            hooks = [getattr(m, "_hf_hook", None) for m in layer.modules()]
            assert any(h is not None and getattr(h, "offload", False) for h in hooks), "layer is not offloaded"
            assert all(p.device.type == "meta" for p in layer.parameters()), "offloaded weights must not sit on the GPU"
            time_hf_generate(model, w_inputs, 2, gen_cfg)  # warm-up
            r = time_hf_generate(model, inputs, n, gen_cfg)
            r["gpu_layers"], r["cpu_layers"] = gpu_layers, args.layers - gpu_layers
            results[f"a@{budget}"] = r
            print(f"a@{budget}", {k: v for k, v in r.items() if k != "tokens"}, flush=True)
            del model
            free_memory()

    report["results"] = results
    write_report(out, "bench_offload", report)  # the JSON first: a failure formatting the table keeps the results
    lines = [f"GPU {report['gpu']}, torch {report['torch']}, transformers {report['transformers']}; "
             f"pinned H2D {bw:.1f} GB/s (DMA), device-decided copies {report['device_copy_gbps']:.1f} GB/s; {args.layers} layers x 128 experts (I=768, H=2048, top-8), bf16; "
             f"image 256x256 + prompt -> {n} new tokens", "",
             "| variant | budget | decode path | TTFT ms | decode ms/token | tokens/s | hit rate | decode MB/token | floor ms/token | x floor | end-to-end s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in results.items():
        variant, budget = key.split("@") if "@" in key else (key, "1.0")
        e2e = (r["ttft_ms"] + r["decode_ms_per_token"] * (r["new_tokens"] - 1)) / 1e3
        lines.append(f"| {variant} | {budget} | {r.get('decode_path', 'hf generate')} | {r['ttft_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
                     f"{1e3 / r['decode_ms_per_token']:.1f} | {r.get('hit_rate', float('nan')):.3f} | "
                     f"{r.get('decode_bytes_per_token', 0) / 1e6:.1f} | {r.get('floor_ms_per_token', float('nan')):.2f} | "
                     f"{r.get('ratio_to_floor', float('nan')):.2f} | {e2e:.2f} |")
    (out / "bench_offload.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
