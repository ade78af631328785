#!/usr/bin/env bash
# The live policies side by side on a GPU, one command for the device tool: the embedded coarse model with its
# shipped predictor, at its own expert size and zero-padded to Mixtral-8x7B's 336 MiB experts, then the GPU tests.
#   bash bench/live_gpu.sh OUTDIR [PER_DOMAIN] [NEW_TOKENS]
# Writes OUTDIR/live_own.json, OUTDIR/live_mixtral_size.json and OUTDIR/pytest_gpu.log; fails if a step fails.
set -euo pipefail
out=${1:?usage: bash bench/live_gpu.sh OUTDIR [PER_DOMAIN] [NEW_TOKENS]}
per_domain=${2:-2}
new_tokens=${3:-48}
mkdir -p "$out"
predictor=expertflow/assets/expertflow-coarse-8x2/expertflow-predictor
test_traces=traces/data/coarse_test.safetensors
train_traces=traces/data/coarse_validation.safetensors
common=(--predictor "$predictor" --traces "$test_traces" --train-traces "$train_traces" --device cuda --batch 1)

python3 -m bench.live_policies "${common[@]}" --budgets 25%,50% --per-domain "$per_domain" --new-tokens "$new_tokens" \
    --policies lru,ondemand,static,speculate,activation,expertflow,expertflow-thread,expertflow-nospec \
    --out "$out/live_own.json" > /dev/null
python3 -m bench.live_policies "${common[@]}" --budgets 25%,50% --per-domain 1 --new-tokens 24 \
    --policies lru,speculate,expertflow,expertflow-thread --pad-expert-bytes 352321536 \
    --out "$out/live_mixtral_size.json" > /dev/null
python3 -m pytest -q -m gpu -p no:cacheprovider tests > "$out/pytest_gpu.log" 2>&1 || { tail -30 "$out/pytest_gpu.log"; exit 1; }
tail -3 "$out/pytest_gpu.log"
