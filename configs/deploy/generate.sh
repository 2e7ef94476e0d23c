#!/usr/bin/env bash
# Regenerates the planner-written deployment configs in this directory (the others are written by hand).
# Run from the repository root: bash configs/deploy/generate.sh
set -euo pipefail
plan() { python -m vismmoe.cli plan "$@" > /dev/null; }
# GPU memory (reserve included) at which MODEL's own plan for PROFILE holds SLOTS experts (planner.memory_cap_for)
cap() { python -c "import sys; from vismmoe.deploy.model_info import model_info; from vismmoe.deploy.profiles import load_profile
from vismmoe.offload.trace import load_trace; from vismmoe.deploy.planner import make_plan, memory_cap_for
m, p, t, px, n = sys.argv[1:]; plan = make_plan(model_info(m), load_profile(p), load_trace(t), image_size=int(px))
print(memory_cap_for(plan, int(n)))" "$@"; }
B=models/easyvqa-qwen3vlmoe
T=eval/results/easyvqa_test_traces.npz
Q=configs/models/qwen3-vl-30b-a3b
# The bundled demo model (20 MB) fits every profile entirely. The -capped file limits usable GPU memory to
# leave room for 22 of its 64 experts (the cap is planner.memory_cap_for(plan, 22): the reserve and every
# other part counted), to show the per-layer slot plan planned on its own routing trace against the
# global pool (the planner writes whichever is predicted faster per request as `slot_plan`: here the global
# pool, whose layers never compute their prefill's experts one at a time; the note gives both figures).
for d in jetson-orin-nano-8gb rtx4060-laptop-8gb rtx3060-12gb rtx4090-24gb; do
  plan --model $B --device $d --trace $T --image-size 64 --output configs/deploy/easyvqa-$d.yaml
done
plan --model $B --device rtx4060-laptop-8gb --trace $T --image-size 64 --max-gpu-memory "$(cap $B rtx4060-laptop-8gb $T 64 22)" \
  --output configs/deploy/easyvqa-rtx4060-laptop-8gb-capped.yaml
# The scene model (36.6 MB float32, 9.4 MB of bf16 experts) fits every profile too; its -capped file leaves
# room for 64 of its 192 experts (memory_cap_for(plan, 64); the planner then compares a per-layer plan
# with the global pool, and again writes the pool).
S=models/scenevqa-qwen3vlmoe
ST=eval/results/scenevqa_test_traces.npz
for d in jetson-orin-nano-8gb rtx4060-laptop-8gb rtx3060-12gb rtx4090-24gb; do
  plan --model $S --device $d --trace $ST --image-size 224 --output configs/deploy/scenevqa-$d.yaml
done
plan --model $S --device rtx4060-laptop-8gb --trace $ST --image-size 224 --max-gpu-memory "$(cap $S rtx4060-laptop-8gb $ST 224 64)" \
  --output configs/deploy/scenevqa-rtx4060-laptop-8gb-capped.yaml
# Qwen3-VL-30B-A3B from its config (58 GB of experts): no trace of it exists here, so the routing prior.
for d in jetson-orin-nano-8gb jetson-orin-nx-16gb jetson-agx-orin-32gb jetson-agx-orin-64gb rtx4060-laptop-8gb \
         rtx3060-12gb rtx4090-24gb a100-40gb h100-80gb h200-141gb; do
  plan --model $Q --device $d --output configs/deploy/qwen3-vl-30b-a3b-$d.yaml
done
