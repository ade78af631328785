#!/usr/bin/env bash
# One lease on the lent GPU: train both models, evaluate them, trace the fine-grained one.
# Usage (through the device tool, with .data and .whl carried):
#   bash training/gpu_job.sh .data/enc4096 .data/tok4096 "$OUT" [coarse_seconds] [fine_seconds]
# Writes to OUT: the coarse checkpoint's shards plus coarse_meta.tar (config, index,
# tokenizer, training.json), fine_training.json, and the fine model's routing traces.
set -euo pipefail
data=$1 tok=$2 out=$3 coarse_s=${4:-130} fine_s=${5:-250}
python3 -c "import pytest" 2>/dev/null || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
python3 -m training.train --preset coarse --data "$data" --tokenizer "$tok" --out /tmp/coarse --seconds "$coarse_s" 2>&1 | tee "$out/train_log.txt"
cp /tmp/coarse/*.safetensors "$out/"
tar -C /tmp/coarse -cf "$out/coarse_meta.tar" --exclude='*.safetensors' .
python3 -m training.train --preset fine --data "$data" --tokenizer "$tok" --out /tmp/fine --seconds "$fine_s" 2>&1 | tee -a "$out/train_log.txt"
cp /tmp/fine/training.json "$out/fine_training.json"
for split in validation test; do
  args=()
  for d in "$data"/*/; do args+=(--data "$d$split.npy"); done
  python3 -m expertflow.cli trace --model /tmp/fine --device cuda "${args[@]}" --max-tokens 12000 \
    --max-seq-len 256 --batch 32 --out "$out/fine_$split.safetensors"
done
ls -la "$out"
