#!/usr/bin/env bash
# scene-VQA test split (1,500 generated questions) through the CLI: the accuracy check of the scene model.
#   eval/scenevqa_eval.sh [MODEL_DIR] [OUTPUT_DIR] [extra `vismmoe eval` flags...]
# Re-running resumes into OUTPUT_DIR; results.json holds metrics.accuracy and metrics.per_question_type.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/scenevqa-qwen3vlmoe}
OUT=${2:-runs/eval/scene/scenevqa}
shift $(( $# < 2 ? $# : 2 ))
PY=${PYTHON:-.venv/bin/python}
"$PY" -m vismmoe.evaluation eval --model "$MODEL" --task scenevqa --output "$OUT" "$@"
"$PY" -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print(round(m['accuracy'], 4), {k: round(v, 4) for k, v in m['per_question_type'].items()})" "$OUT/results.json"
