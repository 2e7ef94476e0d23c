#!/usr/bin/env bash
# easy-VQA test split (9,673 questions) through the CLI: the accuracy check of the bundled demo model.
#   eval/easyvqa_eval.sh [MODEL_DIR] [OUTPUT_DIR] [extra `vismmoe eval` flags...]
# Re-running resumes into OUTPUT_DIR; results.json holds metrics.accuracy (also yes/no and other).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/easyvqa-qwen3vlmoe}
OUT=${2:-runs/eval/demo/easyvqa}
shift $(( $# < 2 ? $# : 2 ))
.venv/bin/python -m vismmoe.evaluation eval --model "$MODEL" --task easyvqa --output "$OUT" "$@"
.venv/bin/python -c "import json,sys; m=json.load(open(sys.argv[1]))['metrics']; print({k: round(v, 4) for k, v in m.items()})" "$OUT/results.json"
