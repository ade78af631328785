"""What every service process does alike: a gRPC server with health checking and reflection, a Prometheus
endpoint, structured logs, and a clean stop on SIGTERM / SIGINT.

    server = GrpcServer("expert-store", listen, [(add_ExpertStoreServicer_to_server, servicer)], ...,
                        security=Security.load(config.security))   # TLS and the token check (security.py)
    registry = start_metrics(port)          # prometheus_client, one registry per process
    run_until_stopped(server, on_stop=...)  # blocks; SIGTERM/SIGINT stop it gracefully

Not for: any service's logic (its own module) or the messages (expertflow/v1, generated).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from expertflow.services.security import Security, open_channel


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, service, message, and any `extra` fields given."""

    _STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "service": self.service,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in self._STANDARD})
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(service: str, level: str = "INFO") -> logging.Logger:
    """Structured logs on stderr for this process; the service's logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    return logging.getLogger(f"expertflow.{service}")


def start_metrics(port: int, host: str = "127.0.0.1") -> CollectorRegistry:
    """A fresh registry served at http://host:port/metrics (port 0: not served)."""
    registry = CollectorRegistry()
    if port:
        start_http_server(port, addr=host, registry=registry)
    return registry


class GrpcServer:
    """A gRPC server for `servicers` (pairs of generated add_*_to_server and servicer) on `listen`, with the
    standard health service (SERVING once started, NOT_SERVING while stopping) and reflection, secured as
    `security` says (None: plaintext without a token, loopback only)."""

    def __init__(
        self,
        name: str,
        listen: str,
        servicers: Iterable[tuple[Callable, object]],
        service_names: Iterable[str],
        max_workers: int = 16,
        security: Security | None = None,
    ) -> None:
        self.name = name
        security = security or Security()
        security.check_listen(listen, f"{name}: listen")
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{name}-rpc"),
            options=[
                ("grpc.max_send_message_length", 64 << 20),
                ("grpc.max_receive_message_length", 64 << 20),
                ("grpc.so_reuseport", 0),  # else a second server binds a port in use and they share its calls
            ],
            interceptors=security.interceptors(),
        )
        for add, servicer in servicers:
            add(servicer, self.server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.service_names = list(service_names)
        reflection.enable_server_reflection(
            self.service_names + [health.SERVICE_NAME, reflection.SERVICE_NAME], self.server
        )
        credentials = security.server_credentials()
        if credentials is None:
            self.port = self.server.add_insecure_port(listen)
        else:
            self.port = self.server.add_secure_port(listen, credentials)
        if self.port == 0:
            raise OSError(f"{name}: cannot listen on {listen}")
        self.address = f"{listen.rsplit(':', 1)[0]}:{self.port}"

    def start(self) -> GrpcServer:
        self.server.start()
        for service in self.service_names + [""]:
            self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self

    def stop(self, grace_s: float = 5.0) -> None:
        """Refuse new calls, let calls in flight finish for up to `grace_s`, then stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace_s).wait()


def wait_for_signal(log: logging.Logger) -> None:
    """Block until SIGTERM or SIGINT (the handlers are restored afterwards)."""
    stopped = threading.Event()

    def request_stop(signum, frame) -> None:
        log.info("stopping", extra={"signal": signal.Signals(signum).name})
        stopped.set()

    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopped.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def run_until_stopped(
    server: GrpcServer,
    log: logging.Logger,
    on_stop: Callable[[], None] | None = None,
    drain: Callable[[], None] | None = None,
    on_start: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (`on_start` runs once the server answers); then `drain` (let requests in
    flight finish, while the server still answers their streams), stop the server gracefully, and run `on_stop`
    (release shared memory, ...)."""
    server.start()
    log.info("serving", extra={"address": server.address})
    try:
        if on_start is not None:
            on_start()
        wait_for_signal(log)
    finally:
        server.health.enter_graceful_shutdown()  # load balancers and health checks see NOT_SERVING at once
        if drain is not None:
            drain()
        server.stop()
        if on_stop is not None:
            on_stop()
        log.info("stopped")


def wait_for_server(
    address: str, timeout_s: float = 30.0, service: str = "", security: Security | None = None
) -> None:
    """Block until the gRPC server at `address` reports SERVING (health check), or raise TimeoutError with the
    last reason."""
    deadline = time.monotonic() + timeout_s
    security = security or Security()
    last = "no answer"
    with open_channel(address, security) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as e:
                last = security.explain(e)
            if time.monotonic() > deadline:
                raise TimeoutError(f"no gRPC server serving at {address} after {timeout_s:.0f} s ({last})")
            time.sleep(0.1)
