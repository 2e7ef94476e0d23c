#!/usr/bin/env bash
# The GPU runs of issues 10-13 in a few device calls on a 2-GPU machine (kind nvidia-h200-x2), each ending
# well inside the 10-minute call limit. Every step has its own time limit; logs are written straight
# into $OUT so that a step killed at its limit still leaves what it printed. Run dirs live outside $OUT
# and come back as one tarball (the device tool returns at most 8 files).
#
#   PHASE=train   GPU 0: train the scene model (models/train_scenevqa.py, TRAIN_S seconds);
#                 GPU 1: tune the fused MoE kernel (bench_fused_moe --tune), GPU tests of the cache core,
#                 fused kernels and static decode, then profile_static and bench_pruning on the
#                 12-layer bench model (built once, on the CPU, while the kernels are tuned).
#   PHASE=check   GPU 0: train the scene model; GPU 1 (both GPUs for the multi-GPU tests first): GPU tests,
#                 bench_fused_moe, profile_static and gpu_check on the 12-layer bench model (fused decode kernel
#                 on the hot path), then the easy-VQA retention at keep 0.25 (4 ranks on GPU 1).
#   PHASE=validate  both GPUs: the multi-GPU tests; then GPU 1: the runtime's GPU tests, profile_static and
#                 gpu_check on the 12-layer bench model, while GPU 0 runs the scene pruning sweep (resumable:
#                 SWEEP_DIR keeps its finished questions between calls; carry it back in).
#   PHASE=final   GPU 0: profile_static on the 12-layer bench model (built on the CPU meanwhile), gpu_check
#                 at 4 layers (tokens against transformers), bench_miss_paths, probe_vs_bench; GPU 1: the
#                 GPU tests (TESTS), then EXTRA (a command line, e.g. eval/validate_plan.py; results under
#                 $WORK/extra) with the time left.
#   PHASE=sweep   both GPUs: the multi-GPU tests, then the scene pruning sweep (issue 10) and the easy-VQA
#                 retention at keep 0.25, several ranks per GPU (needs models/scenevqa-qwen3vlmoe).
#   PHASE=one     one GPU (kind nvidia-h200): the 12-layer bench model builds on the CPU while the GPU tests
#                 (TESTS) run; then profile_static, profile_kernels (kernel by kernel, eager), bench_pruning,
#                 then EXTRA (a command line; results under $WORK/extra) with the time left.
#   PHASE=final3  two GPUs: GPU tests, prefetch: auto live, miss-path table at the minimum budget (GPU 0);
#                 validate_plan and measure_memory (GPU 1); see the branch below.
#   PHASE=final2  two GPUs (kind nvidia-h200-x2). GPU 0: the GPU tests (TESTS), then profile_static on the
#                 12-layer bench model (built on the CPU meanwhile), then GPU0_EXTRA; GPU 1: gpu_check --quick
#                 (the default engine's tokens against transformers), kernel_build_times, then GPU1_EXTRA.
#                 Extras write under $WORK/extra0 and $WORK/extra1 (and find the bench model at $WORK/vismmoe-fullsize-12).
#   PHASE=s6a|s6b|s6c  session 6's three calls (kind nvidia-h200-x2); see their branches below.
#   PHASE=s7a     one GPU (kind nvidia-h200): the bench model built on the GPU; profile_inputs on the bundled
#                 and bench models (the bimodal input building), profile_static --interleaved-only (issue 12's
#                 25% target), then the fused-kernel GPU tests (the self-check and install checks of session 6).
#   PHASE=s7b     one GPU: the bench model built on the GPU, the planner's validation alone on the host (input
#                 building with one intra-op thread since session 7), then tests/test_fused_moe.py and
#                 tests/test_input_threads.py on the GPU.
#   PHASE=s7c     one GPU: the bench model built on the GPU while the zero-copy recapture GPU tests run, then
#                 the planner's validation with the rest of BUDGET_S (the prefill's host figures probed).
#   PHASE=s8      one GPU, written for the next session: the 25% target's rounds on the GPU-built bench
#                 model (misses per token recorded), then the planner's validation (requests record their
#                 waves; mmap rows read the checkpoint through the page cache first).
#   PHASE=s8cpu   one GPU: the same rounds on the CPU-built bench model of sessions 1-6 (built first, ~4
#                 minutes, alone on the host): do the two builds miss alike at 25%?
#   PHASE=s9      one GPU: the planner's validation alone (session 8: the looped layers counted per request of
#                 the trace, the generate path's partial budget probed without prefetch and with it apart);
#                 VALIDATE_ARGS adds arguments (run 6: --trace-requests 16).
#   PHASE=s10     one GPU, written for the next session: the validation in rounds (eval/validate_rounds.py: each
#                 round a fresh validate_plan.py process with its own probe, each row's ratio the median over
#                 the rounds), the bundled model's 8 rows, 3 rounds.
#   PHASE=s10b    one GPU: the same for the bench model's 8 rows, 2 rounds (the bench model built on the GPU first).
#   PHASE=s11     one GPU: the probe's prefill host figures in rounds (session 9): the bench model's 8 rows once,
#                 then the bundled model's rounds in what is left.
#   PHASE=s12     one GPU, written for the next session: profile_host_modes --variants (the probe's engine against
#                 the rows'), then s11's bench round and bundled rounds.
#   PHASE=s13     one GPU (session 10): the probe's per-miss figure from cold one-wave loads; the bundled model's
#                 3 rounds first, then the bench model's rounds (ROUNDS_BENCH, default 1) with what is left;
#                 ORDER=bench runs the bench rounds (default 2) first; ROUNDS_BENCH=0 builds no bench model;
#                 BENCH_DEADLINE_S (default 200) is a bench round's --deadline-s (a cold machine probes for ~120 s).
#                 eval/sleep_overshoot.py and eval/bench_record_reads.py first (session 11: how late a sleep
#                 wakes, as pace_read now spins its waits; the store's positioned reads against the slices).
#   PHASE=quiet   one GPU (kind nvidia-h200), every job alone on the host: the planner's validation, then
#                 profile_static --interleaved (issue 12's 25% target), then the emulation GPU tests.
set -u
OUT=${OUT:-gpu_out}
WORK=${WORK:-/tmp/vismmoe_runs}
PHASE=${PHASE:-train}
DEADLINE=$(( $(date +%s) + ${BUDGET_S:-560} ))
mkdir -p "$OUT" "$WORK"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
left() { local s=$(( DEADLINE - $(date +%s) - ${1:-0} )); echo $(( s > 5 ? s : 5 )); }
step() {  # step NAME LIMIT_S COMMAND...: run with min(LIMIT_S, time left), log rc and wall time
    local name=$1 limit=$2; shift 2
    local l; l=$(left); [ "$limit" -lt "$l" ] && l=$limit
    local t0; t0=$(date +%s)
    echo "=== $name (limit ${l}s) $(date -u +%T)"
    timeout "$l" "$@"; local rc=$?
    echo "=== $name rc=$rc wall=$(( $(date +%s) - t0 ))s"
}
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader > "$OUT/gpu.txt"
# The 12-layer bench model, built in the background (start_build [ARGS]: full_size_checkpoint(12, ARGS); without
# ARGS, in its default place); on the CPU (minutes) unless BUILD_DEVICE=cuda (seconds of GPU time, and the
# random weights differ from a CPU build's); wait_build blocks until it is there.
start_build() {
    ( for d in ${BUILD_DEVICE:-} cpu; do  # (a failed GPU build falls back to the CPU's)
          python3 -c "from vismmoe.testing.tiny_models import full_size_checkpoint as f; f(12${1:+, $1}, device='$d')" \
              >> "$WORK/build.log" 2>&1 && break
      done
      echo "build rc=$?" >> "$WORK/build.log" ) &
}
wait_build() { until grep -q "build rc=" "$WORK/build.log" 2>/dev/null; do sleep 2; done; tail -1 "$WORK/build.log"; }
rounds_of() {  # rounds_of MODEL ROUNDS DEADLINE_S KEEP_S: ROUNDS of MODEL's 8 rows (0: none), KEEP_S left after them
    [ "$2" -gt 0 ] || return 0
    step "rounds_$1" "$(left 10)" python3 eval/validate_rounds.py --out "$WORK/rounds_$1" --rounds "$2" \
        --budget-s "$(( $(left 10) - 10 - $4 ))" -- --parts B --models "$1" --deadline-s "$3"
}
bench_then_bundled_rounds() {  # BENCH_DEADLINE_S: the bench model's 8 rows once, then the bundled model's rounds
    rounds_of bench 1 "$1" 0
    rounds_of bundled 3 150 0
}
train_scene_model() {  # on GPU 0, TRAIN_S seconds; the checkpoint (36.6 MB float32) comes back in 15 MB
    # pieces (the tool returns files of up to 16 MiB): `cat scene_model.tgz.part-* | tar -xz`
    CUDA_VISIBLE_DEVICES=0 timeout "$(left 20)" python3 models/train_scenevqa.py --out "$WORK/scenevqa-qwen3vlmoe" \
        --time-limit "${TRAIN_S:-330}" --metrics "$WORK/scenevqa-qwen3vlmoe/metrics.json" > "$OUT/train.log" 2>&1
    echo "train rc=$?" >> "$OUT/train.log"
    tar -C "$WORK" -czf - scenevqa-qwen3vlmoe | split -b 15m - "$OUT/scene_model.tgz.part-"
}

if [ "$PHASE" = train ]; then
    train_scene_model &
    train_pid=$!
    export CUDA_VISIBLE_DEVICES=1
    # The 12-layer bench model (~14 GB, CPU-bound) builds while GPU 1 tunes and tests the kernels.
    start_build "'$WORK', image_size=896"
    build_pid=$!
    {
        step tune_fused_moe 150 python3 eval/bench_fused_moe.py --out "$WORK/fused_moe" --tokens 1,4,16 --tune
        step tune_fused_moe_t 100 python3 eval/bench_fused_moe.py --out "$WORK/fused_moe_t" --tokens 1,4,16 \
            --tune --transposed
        step pytest 150 python3 -m pytest -q tests/test_cache_core.py tests/test_fused_moe.py tests/test_ops.py \
            tests/test_static_decode.py tests/test_prefetch.py
        echo "=== waiting for the bench model build $(date -u +%T)"; wait $build_pid; cat "$WORK/build.log" | tail -2
        step profile_static 90 python3 eval/profile_static.py --out "$WORK/profile_static" --layers 12 \
            --checkpoint "$WORK/vismmoe-fullsize-12"
        step bench_pruning 120 python3 eval/bench_pruning.py --out "$WORK/bench_pruning" --layers 12 --image-px 896 \
            --budget 0.25 --new-tokens 32 --repeats 2 --methods affinity random pool --root "$WORK"
    } > "$OUT/gpu1.log" 2>&1
    wait $train_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' profile_static fused_moe fused_moe_t \
        bench_pruning 2>/dev/null
elif [ "$PHASE" = check ]; then
    # GPU 0 trains the scene model as in PHASE=train; GPU 1 checks the fused decode kernel on the hot path.
    train_scene_model &
    train_pid=$!
    # One 12-layer bench model (built on the CPU) for gpu_check, profile_static and bench_offload.
    start_build
    build_pid=$!
    {
        step multi_gpu 120 python3 -m pytest -q -o faulthandler_timeout=60 tests/test_multi_gpu.py
        export CUDA_VISIBLE_DEVICES=1
        step pytest 200 python3 -m pytest -v -o faulthandler_timeout=60 tests/test_fused_moe.py tests/test_cache_core.py \
            tests/test_ops.py tests/test_static_decode.py tests/test_prefetch.py
        step bench_fused_moe 40 python3 eval/bench_fused_moe.py --out "$WORK/fused_moe"
        echo "=== waiting for the bench model build $(date -u +%T)"; wait $build_pid; tail -2 "$WORK/build.log"
        step profile_static 120 python3 eval/profile_static.py --out "$WORK/profile_static" --layers 12
        step gpu_check 100 python3 eval/gpu_check.py --out "$WORK/gpu_check" --layers 12 --requests 4
        step easyvqa_keep "$(left 30)" torchrun --nproc-per-node 4 -m vismmoe.evaluation eval \
            --model models/easyvqa-qwen3vlmoe --task easyvqa --output "$WORK/easyvqa_keep" --no-progress \
            --sweep visual_keep=1.0,0.25 visual_prune=affinity
    } > "$OUT/gpu1.log" 2>&1
    wait $train_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='*.jsonl' fused_moe profile_static \
        gpu_check easyvqa_keep 2>/dev/null
    tar -C "$WORK" -czf "$OUT/easyvqa_keep.tgz" easyvqa_keep 2>/dev/null
elif [ "$PHASE" = validate ]; then
    SWEEP_DIR=${SWEEP_DIR:-gpu_runs/scene_pruning}
    start_build
    build_pid=$!
    step multi_gpu 150 python3 -m pytest -q -o faulthandler_timeout=90 tests/test_multi_gpu.py > "$OUT/multi_gpu.log" 2>&1
    ( export CUDA_VISIBLE_DEVICES=0; step scene_sweep "$(left 25)" torchrun --nproc-per-node "${RANKS:-6}" \
        eval/scene_pruning_sweep.py --model models/scenevqa-qwen3vlmoe --out "$SWEEP_DIR" ) > "$OUT/sweep.log" 2>&1 &
    sweep_pid=$!
    {
        export CUDA_VISIBLE_DEVICES=1
        step pytest 240 python3 -m pytest -q -o faulthandler_timeout=90 tests/test_runtime.py tests/test_static_decode.py \
            tests/test_fused_moe.py tests/test_prefetch.py tests/test_cache_core.py tests/test_engine_info.py tests/test_ops.py
        echo "=== waiting for the bench model build $(date -u +%T)"; wait $build_pid; tail -2 "$WORK/build.log"
        step profile_static 120 python3 eval/profile_static.py --out "$WORK/profile_static" --layers 12
        step gpu_check 200 python3 eval/gpu_check.py --out "$WORK/gpu_check" --layers 12 --requests 4
    } > "$OUT/gpu1.log" 2>&1
    wait $sweep_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' profile_static gpu_check 2>/dev/null
    tar -czf "$OUT/sweep.tgz" "$SWEEP_DIR" 2>/dev/null
elif [ "$PHASE" = final ]; then
    start_build
    build_pid=$!
    (
        export CUDA_VISIBLE_DEVICES=0
        # (the build is the parent shell's child: wait for its log line instead)
        wait_build
        step profile_static 150 python3 eval/profile_static.py --out "$WORK/profile_static" --layers 12
        step gpu_check 150 python3 eval/gpu_check.py --out "$WORK/gpu_check" --layers 4 --requests 3
        step miss_paths 60 python3 eval/bench_miss_paths.py --out "$WORK/miss_paths"
        step probe_vs_bench 120 python3 eval/probe_vs_bench.py --out "$WORK/probe_vs_bench" --layers 12 --rounds 2
    ) > "$OUT/gpu0.log" 2>&1 &
    gpu0_pid=$!
    {
        step multi_gpu 90 python3 -m pytest -q -o faulthandler_timeout=60 tests/test_multi_gpu.py  # during the build
        export CUDA_VISIBLE_DEVICES=1
        step pytest 240 python3 -m pytest -q -o faulthandler_timeout=90 ${TESTS:-tests/test_rms_norm.py \
            tests/test_static_decode.py tests/test_prefetch.py tests/test_cache_core.py tests/test_fused_moe.py \
            tests/test_runtime.py}
        [ -n "${EXTRA:-}" ] && step extra "$(left 20)" bash -c "$EXTRA"
    } > "$OUT/gpu1.log" 2>&1
    wait $gpu0_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' profile_static gpu_check miss_paths \
        probe_vs_bench extra 2>/dev/null
elif [ "$PHASE" = one ]; then
    start_build "'$WORK', image_size=896"
    build_pid=$!
    {
        step pytest 200 python3 -m pytest -q -o faulthandler_timeout=90 ${TESTS:-tests/test_route_predict.py \
            tests/test_ops.py tests/test_static_decode.py tests/test_prefetch.py}
        echo "=== waiting for the bench model build $(date -u +%T)"; wait $build_pid; tail -2 "$WORK/build.log"
        ckpt="$WORK/vismmoe-fullsize-12"
        step profile_static 120 python3 eval/profile_static.py --out "$WORK/profile_static" --checkpoint "$ckpt"
        step profile_kernels 90 python3 eval/profile_kernels.py --out "$WORK/profile_kernels" --checkpoint "$ckpt"
        [ -z "${SKIP_PRUNING:-}" ] && step bench_pruning 100 python3 eval/bench_pruning.py --out "$WORK/bench_pruning" \
            --layers 12 --image-px 896 --budget 0.25 --new-tokens 32 --repeats 2 --methods affinity random pool --root "$WORK"
        [ -n "${EXTRA:-}" ] && step extra "$(left 15)" bash -c "$EXTRA"
    } > "$OUT/gpu.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' profile_static profile_kernels bench_pruning \
        extra 2>/dev/null
elif [ "$PHASE" = final2 ]; then
    start_build "'$WORK'"
    mkdir -p "$WORK/extra0" "$WORK/extra1"
    (
        export CUDA_VISIBLE_DEVICES=0
        step pytest "${PYTEST_S:-170}" python3 -m pytest -q -o faulthandler_timeout=90 ${TESTS:-tests/test_router_kernel.py tests/test_rotary.py}
        wait_build
        step profile_static "${PROFILE_S:-100}" python3 eval/profile_static.py --out "$WORK/profile_static" --checkpoint "$WORK/vismmoe-fullsize-12"
        [ -n "${GPU0_EXTRA:-}" ] && step extra0 "$(left 15)" bash -c "$GPU0_EXTRA"
    ) > "$OUT/gpu0.log" 2>&1 &
    gpu0_pid=$!
    {
        export CUDA_VISIBLE_DEVICES=1
        [ -z "${SKIP_GPU_CHECK:-}" ] && step gpu_check_quick "${GPU_CHECK_S:-150}" python3 eval/gpu_check.py --out "$WORK/gpu_check" --layers 4 --requests 3 --quick
        [ -z "${SKIP_BUILD_TIMES:-}" ] && step build_times "${BUILD_S:-60}" python3 eval/kernel_build_times.py --out "$WORK/build_times"
        wait_build
        [ -n "${GPU1_EXTRA:-}" ] && step extra1 "$(left 15)" bash -c "$GPU1_EXTRA"
    } > "$OUT/gpu1.log" 2>&1
    wait $gpu0_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' --exclude='vismmoe-fullsize-*' profile_static \
        gpu_check build_times extra0 extra1 2>/dev/null
elif [ "$PHASE" = final3 ]; then
    # Two GPUs (kind nvidia-h200-x2), WORK=/tmp so that every script finds the bench model where
    # full_size_checkpoint builds it by default. GPU 0: GPU tests, prefetch: auto live, the miss-path
    # table's minimum-budget rows; GPU 1: the auto-prefetch/gate tests while the model builds, then the
    # planner's predictions under emulation and memory by part.
    start_build "'$WORK'"
    (
        export CUDA_VISIBLE_DEVICES=0
        step pytest 150 python3 -m pytest -q --tb=short -o faulthandler_timeout=90 -m gpu tests/test_static_decode.py \
            tests/test_emulate.py tests/test_autoprefetch.py tests/test_rotary.py
        wait_build
        step autoprefetch 240 python3 eval/profile_autoprefetch.py --out "$WORK/autoprefetch" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials 2 --traces
        step miss_table 100 python3 eval/bench_miss_paths.py --engine --budgets min --out "$WORK/miss_table" --deadline-s 90
    ) > "$OUT/gpu0.log" 2>&1 &
    gpu0_pid=$!
    {
        export CUDA_VISIBLE_DEVICES=1
        step pytest_auto 75 python3 -m pytest -q --tb=short -o faulthandler_timeout=60 tests/test_cache_core.py -k "auto or gate"
        wait_build
        step validate_plan 380 python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B --models bundled bench \
            --deadline-s 320
        step measure_memory 140 python3 eval/measure_memory.py --out "$WORK/measure_memory" --deadline-s 120
    } > "$OUT/gpu1.log" 2>&1
    wait $gpu0_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" autoprefetch miss_table validate_plan measure_memory 2>/dev/null
elif [ "$PHASE" = last ]; then
    # A short call (WORK=/tmp): the fixed GPU tests on GPU 0 while the bench model builds, then the miss-path
    # table's 12 GB/s minimum-budget cells (auto's CPU margin) on GPU 1.
    start_build "'$WORK'"
    ( CUDA_VISIBLE_DEVICES=0 step pytest 100 python3 -m pytest -q --tb=short -o faulthandler_timeout=60 \
        tests/test_static_decode.py::test_captures_run_on_the_engines_one_stream \
        tests/test_autoprefetch.py::test_captured_graph_follows_the_device_decision_without_recapture ) > "$OUT/gpu0.log" 2>&1 &
    wait_build
    CUDA_VISIBLE_DEVICES=1 step miss_table "$(left 5)" python3 eval/bench_miss_paths.py --engine --budgets min \
        --throttled-only --paths copy zerocopy auto --out "$WORK/miss_table" > "$OUT/gpu1.log" 2>&1
    wait
    tar -C "$WORK" -czf "$OUT/results.tgz" miss_table 2>/dev/null
elif [ "$PHASE" = s6a ]; then
    # Session 6, first call (kind nvidia-h200-x2, WORK=/tmp). GPU 0: the two GPU tests fixed without a GPU,
    # then the miss-path table's 12 GB/s minimum-budget cells (auto's CPU margin), then memory by part for
    # the bench model on the RTX 4090 profile. GPU 1: the planner's predictions out of sample (the probe
    # measures each model's own engine times).
    start_build "'$WORK'"
    (
        export CUDA_VISIBLE_DEVICES=0
        step pytest 100 python3 -m pytest -q --tb=short -o faulthandler_timeout=60 \
            tests/test_static_decode.py::test_captures_run_on_the_engines_one_stream \
            tests/test_autoprefetch.py::test_captured_graph_follows_the_device_decision_without_recapture
        wait_build
        step miss_table 200 python3 eval/bench_miss_paths.py --engine --budgets min --throttled-only \
            --paths copy zerocopy auto --out "$WORK/miss_table" --deadline-s 190
        step measure_memory "$(left 15)" python3 eval/measure_memory.py --out "$WORK/measure_memory" --models bench \
            --profiles rtx4090-24gb --deadline-s "$(left 25)"
    ) > "$OUT/gpu0.log" 2>&1 &
    gpu0_pid=$!
    {
        export CUDA_VISIBLE_DEVICES=1
        wait_build
        step validate_plan "$(left 10)" python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B \
            --models bundled bench --deadline-s "$(left 25)"
    } > "$OUT/gpu1.log" 2>&1
    wait $gpu0_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" miss_table validate_plan measure_memory 2>/dev/null
elif [ "$PHASE" = s6b ]; then
    # Session 6, misses installed by the fused decode kernel (kind nvidia-h200-x2, WORK=/tmp). GPU 0: the fused
    # kernel's tests (install bit for bit against copy_records + compute), the miss micro-benchmark (copy,
    # install, zero-copy), then profile_static (25%/50% with installs against the copy launch). GPU 1: the
    # miss-path table at the minimum budget (native and 12 GB/s), then the static path's GPU tests.
    start_build "'$WORK'"
    (
        export CUDA_VISIBLE_DEVICES=0
        step pytest_fused "${PYTEST_S:-120}" python3 -m pytest -q --tb=short -o faulthandler_timeout=100 tests/test_fused_moe.py
        step miss_micro 60 python3 eval/bench_miss_paths.py --out "$WORK/miss_micro"
        wait_build
        step profile_static "$(left 15)" python3 eval/profile_static.py --out "$WORK/profile_static" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials "${TRIALS:-3}"
    ) > "$OUT/gpu0.log" 2>&1 &
    gpu0_pid=$!
    {
        export CUDA_VISIBLE_DEVICES=1
        wait_build
        step miss_table "${MISS_S:-200}" python3 eval/bench_miss_paths.py --engine --budgets min --paths copy zerocopy auto \
            --out "$WORK/miss_table" --deadline-s "$(( ${MISS_S:-200} - 10 ))"
        step pytest_static "$(left 15)" python3 -m pytest -q --tb=short -o faulthandler_timeout=100 -m gpu \
            tests/test_static_decode.py tests/test_miss_paths.py ${TESTS1:-}
    } > "$OUT/gpu1.log" 2>&1
    wait $gpu0_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' profile_static miss_micro miss_table 2>/dev/null
elif [ "$PHASE" = s6c ]; then
    # Session 6, last call (kind nvidia-h200-x2, WORK=/tmp). GPU 0: the install kernel's tests and micro-
    # benchmark, host pages, profile_static, then prefetch: auto live. GPU 1: the planner out of sample,
    # then the GPU tests of the two captured steps under auto and the static path.
    start_build "'$WORK'"
    (
        export CUDA_VISIBLE_DEVICES=0
        step pytest_fused 100 python3 -m pytest -q --tb=short -o faulthandler_timeout=90 tests/test_fused_moe.py \
            -k "install or zero_copy or self_check"
        step miss_micro 40 python3 eval/bench_miss_paths.py --out "$WORK/miss_micro"
        step host_pages 60 python3 eval/bench_host_pages.py --out "$WORK/host_pages"
        wait_build
        step profile_static "${PROFILE_S:-130}" python3 eval/profile_static.py --out "$WORK/profile_static" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials 3
        step autoprefetch "$(left 12)" python3 eval/profile_autoprefetch.py --out "$WORK/autoprefetch" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials 2 --traces
    ) > "$OUT/gpu0.log" 2>&1 &
    gpu0_pid=$!
    {
        export CUDA_VISIBLE_DEVICES=1
        wait_build
        step validate_plan "${VALIDATE_S:-360}" python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B \
            --models bundled bench --deadline-s "$(( ${VALIDATE_S:-360} - 30 ))"
        step pytest_gpu "$(left 12)" python3 -m pytest -q --tb=short -o faulthandler_timeout=100 -m gpu \
            tests/test_autoprefetch.py tests/test_static_decode.py ${TESTS1:-}
    } > "$OUT/gpu1.log" 2>&1
    wait $gpu0_pid
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' profile_static miss_micro host_pages autoprefetch \
        validate_plan 2>/dev/null
elif [ "$PHASE" = quiet ]; then
    # One GPU (kind nvidia-h200), every job alone on the host, in turn (WORK=/tmp): the planner's validation
    # (its probe's input building and the rows' are then timed under the same load: session 6's last call
    # ran it beside another GPU's jobs, and the bench processor's input building measured 41.7 ms in the probe
    # against 3.7-25 ms in the rows), then profile_static with the 100% and 25% steps taken alternately
    # (issue 12's 25% target), then the GPU test fixed after that call.
    start_build "'$WORK'"
    {
        wait_build
        step validate_plan "${VALIDATE_S:-330}" python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B \
            --models bundled bench --deadline-s "$(( ${VALIDATE_S:-330} - 30 ))"
        step profile_static "$(left 60)" python3 eval/profile_static.py --out "$WORK/profile_static" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials 3 --interleaved "${ROUNDS:-5}"
        step pytest_gpu "$(left 5)" python3 -m pytest -q --tb=short -m gpu tests/test_emulate.py
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.safetensors' validate_plan profile_static 2>/dev/null
elif [ "$PHASE" = s7a ]; then
    BUILD_DEVICE=cuda start_build "'$WORK'"
    {
        step inputs_bundled 100 python3 eval/profile_inputs.py --out "$WORK/inputs_bundled" \
            --model models/easyvqa-qwen3vlmoe --requests 30 --emulate rtx4090-24gb
        wait_build
        step inputs_bench 100 python3 eval/profile_inputs.py --out "$WORK/inputs_bench" \
            --model "$WORK/vismmoe-fullsize-12" --requests 20
        step interleaved 170 python3 eval/profile_static.py --out "$WORK/profile_static" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials 3 --interleaved "${ROUNDS:-5}" --interleaved-only
        step pytest_gpu "$(left 10)" python3 -m pytest -q --tb=short -m gpu tests/test_fused_moe.py
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" inputs_bundled inputs_bench profile_static 2>/dev/null
elif [ "$PHASE" = s7b ]; then
    BUILD_DEVICE=cuda start_build "'$WORK'"
    {
        wait_build
        step validate_plan "${VALIDATE_S:-330}" python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B \
            --models bundled bench --deadline-s "$(( ${VALIDATE_S:-330} - 30 ))"
        step pytest_gpu "$(left 5)" python3 -m pytest -q --tb=short tests/test_fused_moe.py tests/test_input_threads.py
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' validate_plan 2>/dev/null
elif [ "$PHASE" = s7c ]; then
    BUILD_DEVICE=cuda start_build "'$WORK'"
    {
        step pytest_gpu 90 python3 -m pytest -q --tb=short -m gpu tests/test_miss_paths.py \
            -k "switch_captures_again_on_the_gpu or zero_copy_on_the_gpu"
        wait_build
        step validate_plan "$(left 10)" python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B \
            --models bundled bench --deadline-s "$(( $(left 10) - 45 ))"
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' validate_plan 2>/dev/null
elif [ "$PHASE" = s8 ]; then
    BUILD_DEVICE=cuda start_build "'$WORK'"
    {
        wait_build
        step interleaved_gpu_build 120 python3 eval/profile_static.py --out "$WORK/interleaved_gpu_build" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials 3 --interleaved 5 --interleaved-only
        step validate_plan "$(left 10)" python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B \
            --models bundled bench --deadline-s "$(( $(left 10) - 45 ))"
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' validate_plan interleaved_gpu_build 2>/dev/null
elif [ "$PHASE" = s9 ]; then
    BUILD_DEVICE=cuda start_build "'$WORK'"
    {
        wait_build
        step validate_plan "$(left 10)" python3 eval/validate_plan.py --out "$WORK/validate_plan" --parts B \
            --models bundled bench --deadline-s "$(( $(left 10) - 45 ))" ${VALIDATE_ARGS:-}
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' validate_plan 2>/dev/null
elif [ "$PHASE" = s10 ]; then
    {
        step rounds_bundled "$(left 10)" python3 eval/validate_rounds.py --out "$WORK/rounds_bundled" --rounds 3 \
            --budget-s "$(( $(left 10) - 20 ))" -- --parts B --models bundled --deadline-s 200
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' rounds_bundled 2>/dev/null
elif [ "$PHASE" = s10b ]; then
    BUILD_DEVICE=cuda start_build  # (where validate_plan.py looks for it: the temp dir, whatever WORK is)
    {
        wait_build
        step rounds_bench "$(left 10)" python3 eval/validate_rounds.py --out "$WORK/rounds_bench" --rounds 2 \
            --budget-s "$(( $(left 10) - 20 ))" -- --parts B --models bench --deadline-s 260
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' rounds_bench 2>/dev/null
elif [ "$PHASE" = s11 ]; then
    # session 9: the probe's prefill host figures timed in rounds against the full budget; the bench model's
    # 8 rows once (built on the GPU first), then the bundled model's rounds with what is left
    BUILD_DEVICE=cuda start_build  # (where validate_plan.py looks for it: the temp dir, whatever WORK is)
    {
        wait_build
        bench_then_bundled_rounds 220
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' rounds_bench rounds_bundled 2>/dev/null
elif [ "$PHASE" = s13 ]; then
    # ORDER: which model's rounds run first (bundled or bench); ROUNDS_BUNDLED, ROUNDS_BENCH (0 skips one);
    # BENCH_S: the time kept for the bench rounds when the bundled ones run first (~180 s a round)
    {
        if [ "${ROUNDS_BENCH:-1}" -gt 0 ]; then  # (ROUNDS_BENCH=0: the bundled model alone, no build)
            BUILD_DEVICE=cuda start_build
            wait_build  # (before the rounds: the build's host work would slow the first round's probe or rows)
        fi
        # how late time.sleep wakes on this host (emulation holds mmap reads by wall clock), ~10 s
        step sleep_overshoot 30 python3 eval/sleep_overshoot.py --out "$WORK/sleep_overshoot"
        # an mmap store's record reads on this host: positioned reads against safetensors' slices (seconds)
        step record_reads 60 python3 eval/bench_record_reads.py --dtype bfloat16 --out "$WORK/record_reads"
        step record_reads_f32 60 python3 eval/bench_record_reads.py --dtype float32 --out "$WORK/record_reads_f32"
        # where positioned reads and the slices cross on this host (store.POSITIONED_READ_MAX_BYTES), seconds
        step read_sizes 60 python3 eval/bench_record_reads.py --sizes 64,128,256,512,1024,2048,8192 --passes 3 \
            --out "$WORK/read_sizes"
        if [ "${ORDER:-bundled}" = bundled ]; then
            rounds_of bundled "${ROUNDS_BUNDLED:-3}" 150 "${BENCH_S:-190}"
            rounds_of bench "${ROUNDS_BENCH:-1}" "${BENCH_DEADLINE_S:-200}" 0
        else
            rounds_of bench "${ROUNDS_BENCH:-2}" "${BENCH_DEADLINE_S:-200}" "${BUNDLED_S:-70}"
            rounds_of bundled "${ROUNDS_BUNDLED:-3}" 150 0
        fi
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' rounds_bench rounds_bundled sleep_overshoot record_reads record_reads_f32 read_sizes \
        2>/dev/null
elif [ "$PHASE" = s12 ]; then
    # written in session 9 for the next: what slows the full-budget rows against the probe (the probe's engine,
    # a row's with and without emulation, a 25% row's, in turn), then the bench rows once with the generate
    # path's probe rounds, then the bundled model's rounds with what is left
    {
        step host_variants 200 python3 eval/profile_host_modes.py --out "$WORK/host_variants" --dtype bfloat16 \
            --variants probe row row-plain row-25 --instances 16
        BUILD_DEVICE=cuda start_build
        wait_build
        bench_then_bundled_rounds 200
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" --exclude='*.npz' host_variants rounds_bench rounds_bundled 2>/dev/null
elif [ "$PHASE" = s8cpu ]; then
    start_build "'$WORK'"  # on the CPU (~4 minutes), nothing else running: the earlier sessions' bench model
    {
        wait_build
        step interleaved_cpu_build "$(left 5)" python3 eval/profile_static.py --out "$WORK/interleaved_cpu_build" \
            --checkpoint "$WORK/vismmoe-fullsize-12" --trials 3 --interleaved 5 --interleaved-only
    } > "$OUT/gpu0.log" 2>&1
    tar -C "$WORK" -czf "$OUT/results.tgz" interleaved_cpu_build 2>/dev/null
elif [ "$PHASE" = sweep ]; then
    # The scene pruning sweep on both GPUs plus CPU ranks on the spare cores (VISMMOE_EVAL_GPU_RANKS: ranks
    # past GPU_RANKS evaluate on the CPU). SEED: a tarball of earlier pieces of the run (resumable), unpacked
    # into WORK first; KEEP limits the keeps of this piece (the unpruned run is part of every piece).
    [ -n "${SEED:-}" ] && tar -C "$WORK" -xzf "$SEED"
    GPU_RANKS=${GPU_RANKS:-10}; CPU_RANKS=${CPU_RANKS:-18}
    {
        export VISMMOE_EVAL_GPU_RANKS=$GPU_RANKS; step scene_sweep "$(left 30)" torchrun --nproc-per-node $((GPU_RANKS + CPU_RANKS)) \
            eval/scene_pruning_sweep.py --model models/scenevqa-qwen3vlmoe --out "$WORK/scene_pruning" \
            --keep "${KEEP:-1.0,0.75,0.5,0.25,0.125}"
    } > "$OUT/sweep.log" 2>&1
    (cd "$WORK" && tar -czf "$OUT/sweep.tgz" --exclude='unpruned' scene_pruning)
fi
echo "phase $PHASE done $(date -u +%T)"
