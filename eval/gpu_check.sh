#!/usr/bin/env bash
# One device call: GPU tests, the engine acceptance check, the static-decode stress test, and
# (optionally, with BENCH=1) the offloading benchmark. Results land in $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$OUT/gpu.txt"
python -m pytest -q tests/test_ops.py tests/test_prefetch.py tests/test_families.py tests/test_attention.py \
    tests/test_static_decode.py > "$OUT/pytest_gpu.txt" 2>&1; echo "pytest rc=$?" >> "$OUT/pytest_gpu.txt"
python eval/gpu_check.py --out "$OUT" --layers 4 > "$OUT/gpu_check.log" 2>&1; echo "gpu_check rc=$?"
python eval/gpu_stress.py --out "$OUT" --layers 4 --requests ${STRESS_REQUESTS:-32} > "$OUT/gpu_stress.log" 2>&1; echo "gpu_stress rc=$?"
if [ "${BENCH:-0}" = 1 ]; then
    python eval/bench_offload.py --out "$OUT" --layers ${BENCH_LAYERS:-12} > "$OUT/bench_offload.log" 2>&1; echo "bench rc=$?"
fi
