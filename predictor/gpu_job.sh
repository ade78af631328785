#!/bin/bash
# Train the learned route predictors on a GPU and score them against the peers on the CPU beside it.
#   bash predictor/gpu_job.sh OUT [STEPS]
# OUT/{coarse,fine,fine-no-DOMAIN}/ (checkpoints), OUT/results/*.json (eval-predictor), OUT/logs/.
# Trained on the validation traces, scored on the test traces; fine-no-D trains on the other three domains
# and is scored on D only (distribution shift). With DEEPSEEK_NPZ set (the routes.npz of
# ../shared/data/deepseek-v2-lite-puffin), DeepSeek-V2-Lite's routes are imported and split by prompt,
# trained on (DEEPSEEK_STEPS, default 3 x STEPS: it has three times the fine traces' tokens) and scored on
# the held-out prompts: OUT/deepseek/, OUT/results/deepseek.json. Its checkpoint (144 MB, mostly the token
# table of a 17k-token vocabulary) is too big to bring back from a lent GPU machine, so the simulator's
# DeepSeek runs happen here too (SIM_LAYER_MS per MoE layer, default 0.1; DeepSeek-V2-Lite's experts are
# 3 x 2048 x 1408 bf16 = 17301504 bytes): OUT/results/sim_deepseek_B.json per budget B and sim_deepseek_true_routes.json.
# DEVICE=cpu trains on the CPU instead. Exit status 1 if any step failed (a failed training stops the job at once).
set -euo pipefail
OUT=${1:?usage: gpu_job.sh OUT [STEPS]}
STEPS=${2:-400}
DEEPSEEK_STEPS=${DEEPSEEK_STEPS:-$((3 * STEPS))}
T=traces/data
PY=${PYTHON:-python}
mkdir -p "$OUT/results" "$OUT/logs"
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failing step takes the background ones down with it
train_() {  # name, then train-predictor arguments (a later --max-steps wins)
  local name=$1; shift
  $PY -m predictor.cli train-predictor --device "${DEVICE:-cuda}" --max-steps "$STEPS" --seconds 3600 --out "$OUT/$name" "$@" \
    > "$OUT/logs/train-$name.log" 2>&1
}
eval_() {  # name, then eval-predictor arguments
  local name=$1; shift
  $PY -m predictor.cli eval-predictor --threads 2 --out-json "$OUT/results/$name.json" "$@" > "$OUT/logs/eval-$name.txt" 2>&1
}
wait_all() {  # wait for the given background jobs; fail if any did
  local status=0 pid
  for pid in "$@"; do wait "$pid" || status=1; done
  return $status
}
deepseek_() {  # runs beside the others: its own GPU training, then CPU-only scoring and simulation
  local D="$OUT/deepseek-traces" b pids=()
  $PY -m predictor.cli import-routes --npz "$DEEPSEEK_NPZ" --out "$D" > "$OUT/logs/import-deepseek.txt"
  train_ deepseek --traces "$D/deepseek_train.safetensors" --max-steps "$DEEPSEEK_STEPS"
  eval_ deepseek --predictor "$OUT/deepseek" --traces "$D/deepseek_test.safetensors" & pids+=($!)
  local sim=(--traces "$D/deepseek_test.safetensors" --expert-bytes 17301504 --layer-ms "${SIM_LAYER_MS:-0.1}"
    --bandwidth 55GB/s --json)
  for b in 0.1 0.25 0.5; do
    OMP_NUM_THREADS=2 $PY -m orchestrator.cli simulate "${sim[@]}" --policy all --budget "$b" --predictor "$OUT/deepseek" \
      --train-traces "$D/deepseek_train.safetensors" > "$OUT/results/sim_deepseek_$b.json" 2> "$OUT/logs/sim-$b.txt" &
    pids+=($!)
  done
  OMP_NUM_THREADS=2 $PY -m orchestrator.cli simulate "${sim[@]}" --policy expertflow --budget 0.1,0.25,0.5 \
    --expertflow-predictor true-routes > "$OUT/results/sim_deepseek_true_routes.json" 2> "$OUT/logs/sim-true-routes.txt" &
  pids+=($!)
  wait_all "${pids[@]}"
}
pids=()
if [ -n "${DEEPSEEK_NPZ:-}" ]; then
  deepseek_ & pids+=($!)
fi
train_ fine --traces $T/fine_validation.safetensors
eval_ fine --predictor "$OUT/fine" --traces $T/fine_test.safetensors & pids+=($!)
train_ coarse --traces $T/coarse_validation.safetensors
eval_ coarse --predictor "$OUT/coarse" --traces $T/coarse_test.safetensors & pids+=($!)
ALL="bible dictionary python_doc python_src"
for held in $ALL; do
  keep=$(echo $ALL | tr ' ' '\n' | grep -vx "$held" | tr '\n' ' ')
  train_ "fine-no-$held" --traces $T/fine_validation.safetensors --domains $keep
  eval_ "fine_shift_$held" --predictor "$OUT/fine-no-$held" --traces $T/fine_test.safetensors --domains "$held" & pids+=($!)
done
wait_all "${pids[@]}"
