"""compose.yaml as data, for the tests that run it: as plain local processes (test_compose.py) and with Docker
(test_docker.py). Reads the services, their commands, environment, healthchecks, ports and mounted config, and
runs a set of them here with exactly those commands, the config rewritten from container addresses to free
loopback ports (and compose's redis, the expert store's directory, as a redis-server here).

Not for: deciding anything about deployment; compose.yaml and docker/expertflow.toml do.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from expertflow.services.config import ServicesConfig
from redis_server import RedisServer

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "compose.yaml"
# the `expertflow` subcommand -> its section of the services config (listen address, metrics port)
SECTIONS = {"expert-store": "expert_store", "predictor": "predictor", "orchestrator": "orchestrator",
            "worker": "worker", "api": "api"}  # fmt: skip
# the config keys that hold another service's address, by section
ADDRESS_KEYS = {"worker": ("store", "orchestrator"), "orchestrator": ("predictor",), "api": ("worker",),
                "expert_store": ("directory",)}  # fmt: skip
_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


@dataclass(frozen=True)
class Service:
    name: str
    command: tuple[str, ...]
    environment: dict[str, str]
    depends_on: tuple[str, ...]
    healthcheck: tuple[str, ...]  # the test after "CMD"; empty when the image's own (or none) applies
    ports: tuple[tuple[str, int], ...]  # (published host port, container port)
    volumes: dict[str, str]  # container path -> host path (a named volume: its name)

    @property
    def subcommand(self) -> str | None:
        """`worker` for `expertflow worker ...`; None for a service not run by `expertflow` (redis)."""
        return self.command[1] if len(self.command) > 1 and self.command[0] == "expertflow" else None

    @property
    def config_file(self) -> Path:
        """The host file mounted where the command's --config points."""
        target = self.command[self.command.index("--config") + 1]
        source = self.volumes.get(target)
        assert source is not None, f"{self.name}: --config {target} is not a mounted file"
        return (REPO / source).resolve()


def _interpolate(value, env: dict[str, str]):
    """${VAR:-default} and ${VAR} as Compose substitutes them, from `env`."""
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [_interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _interpolate(v, env) for k, v in value.items()}
    return value


def load_compose(path: Path = COMPOSE_FILE, env: dict[str, str] | None = None) -> dict[str, Service]:
    """The services of a compose file, variables substituted from `env` (default: none set, so the defaults)."""
    raw = _interpolate(yaml.safe_load(path.read_text()), env or {})
    services = {}
    for name, s in raw["services"].items():
        command = s.get("command", [])
        assert isinstance(command, list), f"{name}: write command as a list (exec form), not a shell string"
        environment = s.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        health = s.get("healthcheck", {}).get("test", [])
        assert not health or health[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test {health}"
        ports = []
        for p in s.get("ports", []):
            *_, host_port, container_port = str(p).split(":")
            ports.append((host_port, int(container_port.split("/")[0])))
        volumes = {}
        for v in s.get("volumes", []):
            source, target = v.split(":")[:2]
            volumes[target] = source
        services[name] = Service(
            name=name,
            command=tuple(str(c) for c in command),
            environment={k: str(v) for k, v in environment.items()},
            depends_on=tuple(s.get("depends_on", {})),
            healthcheck=tuple(health[1:]) if health and health[0] == "CMD" else (),
            ports=tuple(ports),
            volumes=volumes,
        )
    return services


def start_order(services: dict[str, Service], names: list[str]) -> list[str]:
    """`names` with each after the services it depends on (those among `names`)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"compose.yaml: a dependency cycle through {name}"
        if name in order:
            return
        for dep in services[name].depends_on:
            if dep in names:
                visit(dep, path + (name,))
        order.append(name)

    for name in names:
        visit(name, ())
    return order


def available_subcommands() -> set[str]:
    """The subcommands this checkout's `expertflow` has (read from its parser: argparse keeps them in a private
    attribute, and asking `expertflow --help` would cost a process that imports torch)."""
    from expertflow.cli import _parser

    (sub,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return set(sub.choices)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def rewire(
    config: ServicesConfig,
    services: dict[str, Service],
    running: list[str],
    where: dict[tuple[str, int], str],
    redis_url: str = "",
) -> ServicesConfig:
    """The config with every address that names a compose service (`gpu-worker:50051`) replaced by where that
    service is reachable (`where[(service, port)]`), or emptied (the in-process default) when it is not running.
    A Redis URL (`redis://redis:6379`: the expert store's directory) becomes `redis_url`; the worker's store
    through it is emptied too when no expert-store node runs."""
    stores = [n for n in running if services[n].subcommand == "expert-store"]
    for section, keys in ADDRESS_KEYS.items():
        for key in keys:
            value = getattr(getattr(config, section), key)
            if not value:
                continue
            if value.startswith("redis://"):
                host = value.removeprefix("redis://").rsplit(":", 1)[0]
                assert host in services, f"[{section}] {key} = {value!r} names no service of compose.yaml"
                needed = section == "expert_store" or stores
                config = config.override(section, **{key: redis_url if needed else ""})
                continue
            host, port = value.rsplit(":", 1)
            assert host in services, f"[{section}] {key} = {value!r} names no service of compose.yaml"
            if (host, int(port)) in where:
                config = config.override(section, **{key: where[(host, int(port))]})
            else:
                assert host not in running, f"[{section}] {key} = {value!r}: {host} does not listen on {port}"
                config = config.override(section, **{key: ""})
    return config


class LocalStack:
    """Compose services run here as processes: each service's own command and environment, the config it mounts
    rewritten to free loopback ports, started in dependency order, each healthy (by its own healthcheck command)
    before the next."""

    def __init__(self, services: dict[str, Service], names: list[str], workdir: Path, timeout_s: float = 180.0):
        self.services = services
        self.names = start_order(services, names)
        self.workdir, self.timeout_s = workdir, timeout_s
        self.processes: dict[str, subprocess.Popen] = {}
        configs = {services[n].config_file for n in self.names}
        assert len(configs) == 1, f"the services mount different config files: {configs}"
        config = ServicesConfig.load(configs.pop())
        self.local: dict[tuple[str, int], str] = {}  # (service, container port) -> 127.0.0.1:port here
        for name in self.names:
            section = SECTIONS[services[name].subcommand]
            listen = getattr(config, section).listen
            host = listen.rsplit(":", 1)[0]
            assert host == "0.0.0.0", f"{name}: [{section}] listen = {listen!r}; in a container it must be 0.0.0.0"
            here = f"127.0.0.1:{free_port()}"
            self.local[(name, _port(listen))] = here
            config = config.override(section, listen=here).override("metrics", **{section: free_port()})
        assert config.metrics.host == "0.0.0.0", "[metrics] host: in a container a scraper needs 0.0.0.0"
        config = config.override("metrics", host="127.0.0.1")
        self.redis: RedisServer | None = None
        if any(s.subcommand == "expert-store" for s in (services[n] for n in self.names)) and (
            config.expert_store.directory.startswith("redis://")
        ):  # the directory: a redis-server here, as compose's redis service
            self.redis = RedisServer(workdir / "redis")
        self.config = rewire(config, services, self.names, self.local, self.redis.url if self.redis else "")
        self.config_file = workdir / "expertflow.toml"
        self.config_file.write_text(self.config.to_toml())

    def address(self, name: str) -> str:
        """Where the service `name` listens here."""
        (address,) = [a for (n, _), a in self.local.items() if n == name]
        return address

    def command(self, name: str) -> list[str]:
        s = self.services[name]
        target = s.command[s.command.index("--config") + 1]
        args = [str(self.config_file) if a == target else a for a in s.command[1:]]
        return [sys.executable, "-m", "expertflow.cli", *args]

    def healthcheck(self, name: str) -> list[str]:
        """The service's declared healthcheck, its python and its container address mapped to here."""
        s = self.services[name]
        assert s.healthcheck, f"{name}: no healthcheck in compose.yaml"
        config = s.command[s.command.index("--config") + 1]
        out = []
        for arg in s.healthcheck:
            if arg == config:  # the mounted config ([security]: how to connect)
                arg = str(self.config_file)
            elif arg == "python":
                arg = sys.executable
            elif re.fullmatch(r"(127\.0\.0\.1|localhost):\d+", arg):
                assert (name, _port(arg)) in self.local, f"{name}: the healthcheck asks {arg}, not the listen port"
                arg = self.local[(name, _port(arg))]
            out.append(arg)
        return out

    def __enter__(self) -> LocalStack:
        try:
            if self.redis is not None:
                self.redis.start()
            for name in self.names:
                log = open(self.workdir / f"{name}.log", "w")
                env = {**os.environ, **self.services[name].environment}
                command = self.command(name)
                self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                log.close()
                self._wait_healthy(name)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_healthy(self, name: str) -> None:
        deadline = time.monotonic() + self.timeout_s
        check = self.healthcheck(name)
        while subprocess.run(check, capture_output=True).returncode != 0:
            if self.processes[name].poll() is not None:
                raise AssertionError(f"{name} exited with {self.processes[name].returncode}:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not healthy after {self.timeout_s:.0f} s:\n{self.log(name)}")
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text()[-4000:]

    def __exit__(self, *exc) -> None:
        """SIGTERM in reverse order; the exit codes are in `self.codes`."""
        self.codes = {}
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            process.send_signal(signal.SIGTERM)
            try:
                self.codes[name] = process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                self.codes[name] = process.wait()
        if self.redis is not None:
            self.redis.stop()
