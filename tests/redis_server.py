"""A real redis-server for the tests: started on a free port in a temporary directory, stopped, restarted (on the
same port, empty) and killed like any process. The binary must be installed (`apt-get install -y redis-server`;
.ci/run installs it); without it the tests that need it are skipped with that reason.

Not for: anything but tests (the services reach Redis by URL: redis_directory.py), or a Redis mock.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
import redis


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RedisServer:
    """`redis-server` bound to `bind` (default loopback) on a free port, nothing persisted."""

    def __init__(
        self, workdir: Path, bind: str = "127.0.0.1", port: int | None = None, password: str | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed (apt-get install -y redis-server)")
        self.binary, self.workdir, self.bind, self.password = binary, workdir, bind, password
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.bind in ("0.0.0.0", "127.0.0.1") else self.bind
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> RedisServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", self.bind, "--dir", str(self.workdir),
                "--save", "", "--appendonly", "no", "--protected-mode", "no"]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=(self.workdir / "redis.log").open("a"), stderr=subprocess.STDOUT)
        client = redis.Redis(host="127.0.0.1" if self.bind == "0.0.0.0" else self.bind, port=self.port,
                             password=self.password)  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.workdir / "redis.log").read_text()
                    raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def stop(self) -> None:
        """Kill it (its data goes with it: nothing is persisted)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()
