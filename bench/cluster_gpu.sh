#!/usr/bin/env bash
# The scaled-out expert store's GPU figures (issue 12), one command for the device tool:
#   fetch_transport.json   one expert fetched over gRPC (loopback, a veth pair) into pinned buffers against local
#                          shared memory, chunk size x streams (bench/fetch_transport.py)
#   pytest_cluster.log     the directory, cluster, namespace failover and GPU tests with workers on the GPU
#   failover.json          the failover timings (tests/test_failover_netns.py) with a GPU worker
#   bash bench/cluster_gpu.sh OUTDIR [seconds for fetch_transport]
# The device machine has no redis-server or iproute2: carry them in .gpubin/ (bin/ and lib/, copied from a Debian
# bookworm host) and the wheels in .whl/. Each step is bounded and runs even when one before it failed.
set -uo pipefail
out=${1:?usage: bash bench/cluster_gpu.sh OUTDIR}
mkdir -p "$out"
status=0
if [ -d .gpubin ]; then export PATH="$PWD/.gpubin/bin:$PATH" LD_LIBRARY_PATH="$PWD/.gpubin/lib"; fi
if [ -d .whl ]; then python3 -m pip install -q --no-deps .whl/*.whl > "$out/pip.log" 2>&1 || tail -5 "$out/pip.log"; fi
redis-server --version | head -1; ip -V
source "$(dirname "$0")/gpu_steps.sh"
step fetch_transport "${2:-240}" python3 -m bench.fetch_transport --device cuda --out "$out/fetch_transport.json"
EXPERTFLOW_FAILOVER_JSON="$out/failover.json" step pytest_cluster 300 python3 -m pytest -q -s -p no:cacheprovider \
  tests/test_directory.py tests/test_store_cluster.py tests/test_failover_netns.py tests/test_store_fetch.py \
  tests/test_placement.py
tail -3 "$out/pytest_cluster.log"
exit $status
