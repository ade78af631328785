"""Load on the scaled-out expert store, bounded in count and time: three store nodes (each a host of its own in a
network namespace, replication 2), two workers here fetching every expert over TCP, 64 clients sending greedy
requests for 60 s to both workers, and one node killed (SIGKILL) in the middle. Nothing may be lost: every request
sent is answered, with the fully resident model's tokens (the lost node's experts come from their other replica),
and none hangs. Each worker has 16 KV-cache rows for its 32 clients, so requests also wait in its queue: this is
the services' load test too (a worker under 64 clients for 60 s loses no request).

Reported as JSON (printed, and written to $EXPERTFLOW_LOAD_JSON when set): requests sent, completed, errors,
latency p50/p99 before and after the kill, tokens/s, and the bytes each node served (its GetStats, read every
half second, so the killed node's count is what it had served when it died). bench/results/store_load_cpu.json
was made with
    EXPERTFLOW_LOAD_JSON=bench/results/store_load_cpu.json .venv/bin/python -m pytest -p no:cacheprovider -s \
        tests/test_store_load.py
Needs root and `ip netns` (skipped otherwise, with the reason). Timing is reported, never asserted.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack

import grpc
import pytest

from conftest import prompt_ids
from expertflow.services.client import InferenceClient, InferenceError
from expertflow.services.common import open_channel, wait_for_server
from expertflow.v1 import expert_store_pb2 as store_pb
from expertflow.v1 import expert_store_pb2_grpc
from redis_server import free_port
from store_nodes import machine, namespace_cluster, namespace_test_model
from test_worker_service import embedded

pytestmark = pytest.mark.slow

NODES, REPLICAS, WORKERS, CLIENTS = 3, 2, 2, 64
SECONDS = float(os.environ.get("EXPERTFLOW_LOAD_SECONDS", "60"))
NEW_TOKENS = 12
REQUEST_TIMEOUT_S = 60.0  # a request not answered within this is a hang: the test fails
PROMPTS = [prompt_ids(700 + i, 4 + i % 9) for i in range(16)]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)


class BytesServed:
    """Each node's bytes served (GetStats), read every half second until stopped; a node that stops answering
    keeps the last count it gave."""

    def __init__(self, addresses: dict[str, str]) -> None:
        self.channels = {node: open_channel(address) for node, address in addresses.items()}
        self.last = {node: 0 for node in addresses}
        self.fetches = {node: 0 for node in addresses}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bytes-served")
        self._thread.start()

    def _read(self) -> None:
        for node, channel in self.channels.items():
            try:
                stats = expert_store_pb2_grpc.ExpertStoreStub(channel).GetStats(store_pb.StatsRequest(), timeout=1.0)
            except grpc.RpcError:
                continue
            self.last[node], self.fetches[node] = stats.bytes_sent, stats.fetches

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self._read()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        for channel in self.channels.values():
            channel.close()


class Clients:
    """`CLIENTS` threads, client c asking worker c % len(workers), one request at a time, until `stop_at`."""

    def __init__(self, workers: list[str], expected: list[list[int]], stop_at: float) -> None:
        self.workers, self.expected, self.stop_at = workers, expected, stop_at
        self.lock = threading.Lock()
        self.sent = 0
        self.records: list[dict] = []  # one per answered request: start, latency, outcome
        self.threads = [threading.Thread(target=self._client, args=(c,), name=f"client-{c}") for c in range(CLIENTS)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> list[str]:
        """Waits for every client; the names of those still running after the last request's timeout."""
        deadline = self.stop_at + REQUEST_TIMEOUT_S + 30
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def _client(self, c: int) -> None:
        with InferenceClient(self.workers[c % len(self.workers)], timeout_s=REQUEST_TIMEOUT_S) as client:
            k = 0
            while time.monotonic() < self.stop_at:
                i = (c + k) % len(PROMPTS)
                k += 1
                with self.lock:
                    self.sent += 1
                t0 = time.monotonic()
                try:
                    ids = client.complete(PROMPTS[i], max_new_tokens=NEW_TOKENS, ignore_eos=True).token_ids
                    outcome = "ok" if ids == self.expected[i] else "wrong output"
                except InferenceError as e:
                    outcome = f"{e.code.name}: {e.message[:160]}"
                with self.lock:
                    self.records.append({"start": t0, "latency": time.monotonic() - t0, "outcome": outcome})


def test_load_three_nodes_two_workers_64_clients_one_node_killed(tiny_models, tmp_path):
    model_dir, version = namespace_test_model(tiny_models)
    expected = [embedded(model_dir, p, NEW_TOKENS) for p in PROMPTS]
    with ExitStack() as stack:
        redis_server, nodes = namespace_cluster(stack, model_dir, tmp_path, version, NODES, REPLICAS, 3.0)
        addresses = {n.node_id: n.listen for n in nodes}

        workers = []
        for w in range(WORKERS):
            address = f"127.0.0.1:{free_port()}"
            process = subprocess.Popen(
                [sys.executable, "-m", "expertflow.cli", "worker", "--model", str(model_dir), "--listen", address,
                 "--store", redis_server.url, "--policy", "lru", "--expert-budget", "25%", "--rows", "16",
                 "--max-batch", "16", "--metrics-port", "0"],  # fmt: skip
                stderr=(tmp_path / f"worker{w}.log").open("w"),
            )
            stack.callback(lambda p=process: p.poll() is None and (p.kill(), p.wait()))
            workers.append((address, process))
        for address, _ in workers:
            wait_for_server(address, timeout_s=120)

        served = BytesServed(addresses)
        stack.callback(served.stop)
        t0 = time.monotonic()
        clients = Clients([a for a, _ in workers], expected, stop_at=t0 + SECONDS)
        clients.start()
        time.sleep(SECONDS / 2)
        killed_at = time.monotonic()
        nodes[0].kill()
        hanging = clients.join()
        wall = time.monotonic() - t0
        stack.pop_all().close()  # stops the byte reader, workers, nodes, Redis and the namespaces

    records = clients.records
    completed = [r for r in records if r["outcome"] == "ok"]
    failed = [r for r in records if r["outcome"] != "ok"]
    before = [r["latency"] for r in completed if r["start"] + r["latency"] < killed_at]
    across = [r["latency"] for r in completed if r["start"] + r["latency"] >= killed_at]
    figures = {
        "command": "EXPERTFLOW_LOAD_JSON=bench/results/store_load_cpu.json .venv/bin/python -m pytest "
        "-p no:cacheprovider -s tests/test_store_load.py",
        "machine": machine(),
        "model": "the tests' tiny Mixtral checkpoint (float32)",
        "nodes": NODES, "replicas": REPLICAS, "workers": WORKERS, "clients": CLIENTS, "seconds": SECONDS,
        "new_tokens": NEW_TOKENS, "node_killed": "node0 (SIGKILL) at half time",
        "requests_sent": clients.sent,
        "requests_completed": len(completed),
        "errors": len(failed),
        "error_examples": sorted({r["outcome"] for r in failed})[:5],
        "hanging_clients": hanging,
        "latency_p50_s": percentile([r["latency"] for r in completed], 0.5),
        "latency_p99_s": percentile([r["latency"] for r in completed], 0.99),
        "latency_p50_s_before_kill": percentile(before, 0.5),
        "latency_p99_s_before_kill": percentile(before, 0.99),
        "latency_p50_s_after_kill": percentile(across, 0.5),
        "latency_p99_s_after_kill": percentile(across, 0.99),
        "requests_per_s": round(len(completed) / wall, 2),
        "tokens_per_s": round(len(completed) * NEW_TOKENS / wall, 1),
        "bytes_served_per_node": served.last,
        "fetches_per_node": served.fetches,
        "mean_latency_s": round(statistics.fmean(r["latency"] for r in completed), 4) if completed else None,
    }  # fmt: skip
    print("load figures:", json.dumps(figures))
    if os.environ.get("EXPERTFLOW_LOAD_JSON"):
        with open(os.environ["EXPERTFLOW_LOAD_JSON"], "w") as f:
            json.dump(figures, f, indent=2)
            f.write("\n")
    assert not hanging, f"clients still waiting after every request's timeout: {hanging}"
    assert clients.sent == len(records), "a request sent was never answered"
    assert not failed, f"{len(failed)} requests failed with one of three nodes down (R=2): {figures['error_examples']}"
    assert served.last["node0"] > 0 and all(served.last[n] > 0 for n in addresses), served.last
