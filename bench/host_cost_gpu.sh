#!/usr/bin/env bash
# Issue 10 point 5 on the GPU, one command for the device tool: the live expertflow policy's host time per decode
# step (plan_ms_per_step) beside lru, own-size and Mixtral-sized experts, the policy calls alone replayed
# (bench/policy_replay.py), and the GPU tests.
#   bash bench/host_cost_gpu.sh OUTDIR
set -uo pipefail
out=${1:?usage: bash bench/host_cost_gpu.sh OUTDIR}
mkdir -p "$out"
status=0
if [ -d .whl ]; then python3 -m pip install -q --no-deps .whl/*.whl > "$out/pip.log" 2>&1 || tail -5 "$out/pip.log"; fi
source "$(dirname "$0")/gpu_steps.sh"
P=expertflow/assets/expertflow-coarse-8x2/expertflow-predictor
A=(--predictor "$P" --traces traces/data/coarse_test.safetensors --device cuda --batch 1 --budgets 25% --policies lru,expertflow)
step live_own 90 python3 -m bench.live_policies "${A[@]}" --per-domain 2 --new-tokens 48 --out "$out/host_cost_own.json"
step replay_record 60 python3 -m bench.policy_replay record --out /tmp/calls.pkl
step replay 40 python3 -m bench.policy_replay replay /tmp/calls.pkl --out "$out/policy_replay.json"
step live_mixtral_size 120 python3 -m bench.live_policies "${A[@]}" --per-domain 1 --new-tokens 24 \
  --pad-expert-bytes 352321536 --out "$out/host_cost_mixtral_size.json"
step pytest_gpu 180 python3 -m pytest -q -m gpu -p no:cacheprovider --ignore tests/test_http_api.py --ignore tests/test_docker.py --ignore tests/test_compose.py tests
tail -3 "$out/pytest_gpu.log"
exit $status
