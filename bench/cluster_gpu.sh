#!/usr/bin/env bash
# The scaled-out expert store's GPU figures (issue 12), one command for the device tool:
#   fetch_transport.json   one expert fetched over gRPC (loopback, a veth pair) into pinned buffers against local
#                          shared memory, chunk size x streams (bench/fetch_transport.py)
#   pytest_cluster.log     the directory, cluster, namespace failover and GPU tests with workers on the GPU
#   failover.json          the failover timings (tests/test_failover_netns.py) with a GPU worker
#   store_load.json        3 nodes, 2 GPU workers, 64 clients for 60 s, a node killed (tests/test_store_load.py),
#   pytest_load.log        and the security tests (TLS, token) with the worker on the GPU
#   bash bench/cluster_gpu.sh OUTDIR [STEPS]     STEPS: some of fetch,cluster,load (default: all; one device call
#                                                 of 10 minutes holds two of them)
# The device machine has no redis-server or iproute2: carry them in .gpubin/ (bin/ and lib/, copied from a Debian
# bookworm host) and the wheels in .whl/. Each step is bounded and runs even when one before it failed.
set -uo pipefail
out=${1:?usage: bash bench/cluster_gpu.sh OUTDIR [STEPS]}
steps=",${2:-fetch,cluster,load},"
mkdir -p "$out"
status=0
if [ -d .gpubin ]; then export PATH="$PWD/.gpubin/bin:$PATH" LD_LIBRARY_PATH="$PWD/.gpubin/lib"; fi
if [ -d .whl ]; then python3 -m pip install -q --no-deps .whl/*.whl > "$out/pip.log" 2>&1 || tail -5 "$out/pip.log"; fi
redis-server --version | head -1; ip -V
source "$(dirname "$0")/gpu_steps.sh"
if [[ $steps == *,fetch,* ]]; then
  step fetch_transport 240 python3 -m bench.fetch_transport --device cuda --out "$out/fetch_transport.json"
fi
if [[ $steps == *,cluster,* ]]; then
  EXPERTFLOW_FAILOVER_JSON="$out/failover.json" step pytest_cluster 300 python3 -m pytest -q -s -p no:cacheprovider \
    tests/test_directory.py tests/test_store_cluster.py tests/test_failover_netns.py tests/test_store_fetch.py \
    tests/test_placement.py
  tail -3 "$out/pytest_cluster.log"
fi
if [[ $steps == *,load,* ]]; then
  EXPERTFLOW_LOAD_JSON="$out/store_load.json" step pytest_load 300 python3 -m pytest -q -s -p no:cacheprovider \
    tests/test_store_load.py tests/test_security.py
  tail -3 "$out/pytest_load.log"
fi
exit $status
