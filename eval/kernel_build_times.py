"""First-use time of every fused kernel (build, or load from Triton's cache, plus the check against its torch
twin), with Triton's cache empty and then warm (issue 12 item 5: builds that do not make users wait).

    python3 eval/kernel_build_times.py --out OUT

Runs the same short generation twice in fresh processes with TRITON_CACHE_DIR pointing at a new directory:
the first process compiles every kernel, the second loads them from that cache. Each process reports
`vismmoe.ops.KERNEL_FIRST_USE_S` (seconds per kernel) and the wall time of load + first request. Writes
kernel_build_times.{json,md} into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from eval.common import output_dir, write_report  # noqa: E402

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, vismmoe
from vismmoe import ops
from vismmoe.testing.tiny_models import build_checkpoint
from eval.common import random_requests
ckpt = sys.argv[1]
engine = vismmoe.load(ckpt, device="cuda", dtype="bfloat16", expert_budget=0.5, rope_kernel="auto")
(image, prompt), = random_requests(1, seed=0)
engine.generate(image=image, prompt=prompt, max_new_tokens=4, min_new_tokens=4)
torch.cuda.synchronize()
print(json.dumps(dict(wall_s=time.perf_counter() - t0, kernels={k: v for (k, _), v in ops.KERNEL_FIRST_USE_S.items()},
                      gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()))))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = output_dir(args.out)
    repo = Path(__file__).resolve().parents[1]
    from vismmoe.testing.tiny_models import build_checkpoint

    work = Path(tempfile.mkdtemp(prefix="vismmoe_build_times_"))
    ckpt = work / "tiny"
    build_checkpoint("qwen3_vl_moe", ckpt)
    env = dict(os.environ, TRITON_CACHE_DIR=str(work / "triton_cache"), PYTHONPATH=f"{repo}:{os.environ.get('PYTHONPATH', '')}")
    runs = {}
    for name in ("cold cache", "warm cache"):
        proc = subprocess.run([sys.executable, "-c", CHILD, str(ckpt)], env=env, cwd=repo, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(f"{name} run failed:\n{proc.stderr[-3000:]}")
        runs[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = sorted(set(runs["cold cache"]["kernels"]) | set(runs["warm cache"]["kernels"]))
    lines = [f"First use of each kernel ({runs['cold cache']['gpu']}, compute capability "
             f"{'.'.join(map(str, runs['cold cache']['capability']))}): build or load from Triton's cache, plus the "
             "check against its torch twin.", "", "| kernel | cold cache s | warm cache s |", "|---|---:|---:|"]
    for k in kernels:
        lines.append(f"| {k} | {runs['cold cache']['kernels'].get(k, float('nan')):.2f} | "
                     f"{runs['warm cache']['kernels'].get(k, float('nan')):.2f} |")
    lines.append(f"| process: load + first 4-token request | {runs['cold cache']['wall_s']:.1f} | {runs['warm cache']['wall_s']:.1f} |")
    text = "\n".join(lines) + "\n"
    write_report(out, "kernel_build_times", runs, text)
    print(text)


if __name__ == "__main__":
    main()
