"""Store nodes of a scaled-out expert store as real `expertflow expert-store --directory ...` processes for the
tests: started (optionally inside a network namespace, with a /dev/shm of their own so that they are another
host to the worker), their JSON log lines read as they come, stopped (SIGTERM), killed (SIGKILL), restarted;
and the network namespaces that stand for other hosts (`Hosts`).

Not for: anything but tests (users run the command: README, "Scaled-out expert store").
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# inside `ip netns exec` (a mount namespace of its own already): a private /dev/shm, so the node's host_id differs
# from the worker's and nothing it leaves in shared memory outlives it
PRIVATE_SHM = 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec "$@"'


class NodeProcess:
    def __init__(
        self,
        model_dir: Path,
        directory_url: str,
        node_id: str,
        listen: str,
        *,
        shard: str = "auto",
        replicas: int = 2,
        ttl_s: float = 3.0,
        netns: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.node_id, self.listen, self.netns = node_id, listen, netns
        command = [sys.executable, "-m", "expertflow.cli", "expert-store", "--model", str(model_dir),
                   "--directory", directory_url, "--node-id", node_id, "--listen", listen, "--shard", shard,
                   "--replicas", str(replicas), "--ttl", str(ttl_s), "--metrics-port", "0", *extra]  # fmt: skip
        if netns is not None:
            command = ["ip", "netns", "exec", netns, "sh", "-c", PRIVATE_SHM, "sh", *command]
        self.command = command
        self.proc: subprocess.Popen | None = None
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []

    def start(self) -> NodeProcess:
        self.lines = queue.Queue()
        self.proc = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True).start()
        return self

    def _read(self, stream, lines: queue.Queue) -> None:
        for line in stream:
            self.log.append(line)
            lines.put(line)

    def wait_for(self, message: str, timeout_s: float = 60.0) -> dict:
        """The next log line whose message is `message` (JSON lines on stderr)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.proc is None or self.proc.poll() is not None:
                    break
                continue
            if line.startswith("{") and json.loads(line).get("message") == message:
                return json.loads(line)
        raise AssertionError(f"node {self.node_id}: no {message!r} log line; it wrote:\n{''.join(self.log[-40:])}")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.running:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(20)

    def stop(self) -> int:
        """SIGTERM: leave the directory, drain, release the shared memory."""
        assert self.proc is not None
        if self.running:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)


def private_network(directory: Path) -> Path:
    """A config for nodes listening on their namespace's address: the test's veth network is private, so the
    nodes may serve there without TLS or a token ([security] allow_insecure; tests/test_security.py tests those)."""
    path = directory / "private-network.toml"
    path.write_text("[security]\nallow_insecure = true\n")
    return path


def wait_until(condition, timeout_s: float, what: str, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)


def namespaces_unavailable() -> str | None:
    """Why network namespaces cannot be made here (a test skips with it), or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip`"
    probe = f"efprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` fails here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def sh(*args: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {done.stderr.strip()}")


class Hosts:
    """N namespaces, namespace i at 10.231.i.2 behind a veth pair whose end here is 10.231.i.1."""

    def __init__(self, count: int) -> None:
        self.tag = f"ef{os.getpid() % 100000}"
        self.names: list[str] = []
        for i in range(count):
            ns, here, there = f"{self.tag}n{i}", f"{self.tag}h{i}", f"{self.tag}p{i}"
            sh("ip", "netns", "add", ns)
            self.names.append(ns)
            sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
            sh("ip", "link", "set", there, "netns", ns)
            sh("ip", "addr", "add", f"10.231.{i}.1/24", "dev", here)
            sh("ip", "link", "set", here, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"10.231.{i}.2/24", "dev", there)
            sh("ip", "netns", "exec", ns, "ip", "link", "set", there, "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    def close(self) -> None:
        for i, ns in enumerate(self.names):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its veth end and the pair
            subprocess.run(["ip", "link", "del", f"{self.tag}h{i}"], capture_output=True)


def machine() -> str:
    """What a test's figures were measured on, for their JSON."""
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores, {gpu}"


def listed(url: str, version: str) -> set[str]:
    """The nodes the directory at `url` lists for `version` now."""
    from expertflow.services.redis_directory import RedisDirectory

    directory = RedisDirectory.from_url(url, timeout_s=1.0)
    try:
        return set(directory.snapshot(version).nodes)
    finally:
        directory.close()


def namespace_test_model(tiny_models) -> tuple[Path, str]:
    """The tiny Mixtral checkpoint and its model version, for a test whose store nodes run in namespaces; the test
    is skipped, with the reason, where namespaces cannot be made."""
    import pytest
    import torch

    from expertflow.services.store_server import ServedModel

    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(reason)
    model_dir = tiny_models["mixtral"][0]
    return model_dir, ServedModel.open(model_dir, "0", torch.float32).version


def namespace_cluster(stack: ExitStack, model_dir: Path, workdir: Path, version: str, count: int, replicas: int,
                      ttl_s: float):  # fmt: skip
    """`count` store nodes, node i in a namespace of its own at 10.231.i.2:50061 holding static shard i/count,
    registered in a redis-server here that every namespace reaches at 10.231.i.1; returns (redis, nodes) once
    the directory lists them all. Everything is torn down when `stack` closes."""
    from redis_server import RedisServer

    hosts = Hosts(count)
    stack.callback(hosts.close)
    redis_server = RedisServer(workdir / "redis", bind="0.0.0.0").start()
    stack.callback(redis_server.stop)
    nodes = [NodeProcess(model_dir, f"redis://10.231.{i}.1:{redis_server.port}", f"node{i}", f"10.231.{i}.2:50061",
                         shard=f"{i}/{count}", replicas=replicas, ttl_s=ttl_s, netns=ns,
                         extra=("--config", str(private_network(workdir))))
             for i, ns in enumerate(hosts.names)]  # fmt: skip
    for n in nodes:
        stack.callback(n.kill)
        n.start()
    for n in nodes:
        n.wait_for("serving", 120)
    want = {n.node_id for n in nodes}
    wait_until(lambda: listed(redis_server.url, version) == want, 30, f"{count} nodes listed")
    return redis_server, nodes
