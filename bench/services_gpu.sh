#!/usr/bin/env bash
# The services' GPU figures (issue 11, point 9), one command for the device tool:
#   store_transport.json  store -> GPU GB/s: registered shared memory across processes vs in-process pinned,
#                         unregistered, and Fetch over gRPC, Mixtral-8x7B-sized experts (bench/store_transport.py)
#   services_b1.json      tokens/s at batch 1: embedded vs one worker process vs `expertflow serve` (bench/services_b1.py)
#   serving.json          32 concurrent clients, token scheduler vs FIFO at the same budget (bench/serving.py)
#   pytest_gpu.log        the GPU tests
#   bash bench/services_gpu.sh OUTDIR
# Each step is bounded and runs even when one before it failed; the exit status says whether all passed.
set -uo pipefail
out=${1:?usage: bash bench/services_gpu.sh OUTDIR}
mkdir -p "$out"
status=0
source "$(dirname "$0")/gpu_steps.sh"
step store_transport 120 python3 -m bench.store_transport --out "$out/store_transport.json"
step services_b1 150 python3 -m bench.services_b1 --device cuda --out "$out/services_b1.json"
step serving 180 python3 -m bench.serving --clients 32 --max-batch 8 --device cuda --out "$out/serving.json"
step pytest_gpu 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests
tail -3 "$out/pytest_gpu.log"
exit $status
