#!/bin/bash
# Train the learned route predictors on a GPU and score them against the peers on the CPU beside it.
#   bash predictor/gpu_job.sh OUT [STEPS]
# OUT/{coarse,fine,fine-no-DOMAIN}/ (checkpoints), OUT/results/*.json (eval-predictor), OUT/logs/.
# Trained on the validation traces, scored on the test traces; fine-no-D trains on the other three domains
# and is scored on D only (distribution shift). DeepSeek-V2-Lite is trained where its routes are
# (`expertflow import-routes`, then train-predictor / eval-predictor as below).
set -euo pipefail
OUT=${1:?usage: gpu_job.sh OUT [STEPS]}
STEPS=${2:-400}
T=traces/data
PY=${PYTHON:-python}
mkdir -p "$OUT/results" "$OUT/logs"
train_() {  # name, then train-predictor arguments
  local name=$1; shift
  $PY -m predictor.cli train-predictor --device cuda --max-steps "$STEPS" --seconds 3600 --out "$OUT/$name" "$@" \
    > "$OUT/logs/train-$name.log" 2>&1
}
eval_() {  # name, then eval-predictor arguments
  local name=$1; shift
  $PY -m predictor.cli eval-predictor --threads 2 --out-json "$OUT/results/$name.json" "$@" > "$OUT/logs/eval-$name.txt" 2>&1
}
train_ fine --traces $T/fine_validation.safetensors
eval_ fine --predictor "$OUT/fine" --traces $T/fine_test.safetensors &
train_ coarse --traces $T/coarse_validation.safetensors
eval_ coarse --predictor "$OUT/coarse" --traces $T/coarse_test.safetensors &
ALL="bible dictionary python_doc python_src"
for held in $ALL; do
  keep=$(echo $ALL | tr ' ' '\n' | grep -vx "$held" | tr '\n' ' ')
  train_ "fine-no-$held" --traces $T/fine_validation.safetensors --domains $keep
  eval_ "fine_shift_$held" --predictor "$OUT/fine-no-$held" --traces $T/fine_test.safetensors --domains "$held" &
done
wait
