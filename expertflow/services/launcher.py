"""`expertflow serve`: every service as its own process, from one config, stopped together.

The launcher writes the effective config (the file plus command-line overrides, the services wired to each
other's addresses) to one TOML file, then starts each service with exactly the command compose.yaml runs:
`python -m expertflow.cli <service> --config FILE`, in dependency order, waiting for each to report SERVING
(gRPC health) or to answer on its port before the next. A service that exits on its own is started again (as
compose's `restart: unless-stopped` does; the others carry on meanwhile: a worker without its predictor loads
reactively), unless it failed `max_restarts` times within `restart_window_s`: then everything stops, with
an error. On SIGTERM/SIGINT it stops the services in reverse order: SIGTERM, `grace_s` to finish requests in
flight, then SIGKILL.

Not for: any service's work (each runs its own module) or deployment across hosts (compose, the next issue).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from expertflow.services.common import wait_for_server
from expertflow.services.config import ServicesConfig
from expertflow.services.security import Security


@dataclass(frozen=True)
class ServiceSpec:
    name: str  # the `expertflow` subcommand
    address: str  # where it listens (host:port)
    grpc: bool = True  # health-checked over gRPC; else a TCP connect


def wire(config: ServicesConfig, names: tuple[str, ...]) -> ServicesConfig:
    """The config with the services in `names` pointed at each other's addresses: the worker at the expert
    store and the orchestrator, the orchestrator at the predictor, the API at the worker."""
    if "expert-store" in names:
        config = config.override("worker", store=config.expert_store.listen)
    if "orchestrator" in names:
        config = config.override("worker", orchestrator=config.orchestrator.listen)
    if "predictor" in names:
        config = config.override("orchestrator", predictor=config.predictor.listen)
    return config.override("api", worker=config.worker.listen)


def services(config: ServicesConfig, names: tuple[str, ...]) -> list[ServiceSpec]:
    known = {
        "expert-store": ServiceSpec("expert-store", config.expert_store.listen),
        "predictor": ServiceSpec("predictor", config.predictor.listen),
        "orchestrator": ServiceSpec("orchestrator", config.orchestrator.listen),
        "worker": ServiceSpec("worker", config.worker.listen),
        "api": ServiceSpec("api", config.api.listen, grpc=False),
    }
    return [known[n] for n in names]


def command(name: str, config_file: Path) -> list[str]:
    """The command that starts one service (compose.yaml runs the same, as `expertflow ...`)."""
    return [sys.executable, "-m", "expertflow.cli", name, "--config", str(config_file)]


def _wait_tcp(address: str, timeout_s: float) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing answers at {address} after {timeout_s:.0f} s") from None
            time.sleep(0.1)


class Launcher:
    def __init__(
        self,
        config: ServicesConfig,
        names: tuple[str, ...],
        log: logging.Logger,
        grace_s: float = 30.0,
        start_timeout_s: float = 300.0,
        max_restarts: int = 3,
        restart_window_s: float = 60.0,
    ) -> None:
        self.config, self.log = config, log
        self.grace_s, self.start_timeout_s = grace_s, start_timeout_s
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s
        self.security = Security.load(config.security)  # a bad [security] fails here, before any service starts
        self.specs = services(config, names)
        for spec in self.specs:  # each service would refuse it too, but only after the ones before it started
            self.security.check_listen(spec.address, f"{spec.name}: listen")
        self._dir = tempfile.TemporaryDirectory(prefix="expertflow-serve-")  # mode 0700
        self.config_file = Path(self._dir.name) / "expertflow.toml"
        # 0600 as well: a [security] token may be in it
        with open(os.open(self.config_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            f.write(config.to_toml())
        self.processes: list[tuple[ServiceSpec, subprocess.Popen]] = []
        self._stop = threading.Event()

    def start(self) -> None:
        """Start every service in order, each SERVING before the next; stop them all if one fails."""
        try:
            for spec in self.specs:
                process = subprocess.Popen(command(spec.name, self.config_file))
                self.processes.append((spec, process))
                self._wait_ready(spec, process)
                self.log.info("service up", extra={"service_name": spec.name, "address": spec.address, "pid": process.pid})
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, spec: ServiceSpec, process: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{spec.name} exited with code {process.returncode} while starting")
            try:
                if spec.grpc:
                    wait_for_server(spec.address, timeout_s=2.0, security=self.security)
                else:
                    _wait_tcp(spec.address, timeout_s=2.0)
                return
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{spec.name} did not come up at {spec.address}") from None

    def wait(self) -> int:
        """Block until SIGTERM/SIGINT, restarting services that exit on their own; stop everything; the exit code
        (0, or 1 when a service kept failing)."""
        previous = {s: signal.signal(s, lambda *_: self._stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
        code = 0
        failures: dict[str, list[float]] = {}
        try:
            while not self._stop.wait(0.5):
                for i, (spec, process) in enumerate(self.processes):
                    if process.poll() is None:
                        continue
                    now = time.monotonic()
                    recent = [t for t in failures.get(spec.name, []) if now - t < self.restart_window_s] + [now]
                    failures[spec.name] = recent
                    if len(recent) > self.max_restarts:
                        self.log.error(
                            "service keeps failing", extra={"service_name": spec.name, "code": process.returncode}
                        )
                        code = 1
                        self._stop.set()
                        break
                    self.log.warning("service exited; starting it again",
                                     extra={"service_name": spec.name, "code": process.returncode})  # fmt: skip
                    self.processes[i] = (spec, subprocess.Popen(command(spec.name, self.config_file)))
        finally:
            self.stop()
            for s, handler in previous.items():
                signal.signal(s, handler)
        return code

    def stop(self) -> None:
        """SIGTERM every service in reverse order, `grace_s` each to finish, then SIGKILL."""
        for spec, process in reversed(self.processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(self.grace_s)
                except subprocess.TimeoutExpired:
                    self.log.warning("killing", extra={"service_name": spec.name})
                    process.kill()
                    process.wait()
        self.processes.clear()
        self._dir.cleanup()
