"""The predictor service: any SessionPredictor (predictor/base.py) behind the Predictor API.

    servicer = PredictorServicer(factory)    factory() -> a fresh SessionPredictor (default: the model's learned
                                             predictor with online correction, LearnedPredictor.sessions)
    serve(servicer, listen, registry, log)   a GrpcServer with health and reflection, until SIGTERM / SIGINT

Each client (an orchestrator prefetcher, named by the `expertflow-client` metadata key; none: one shared client)
gets its own SessionPredictor, because a session predictor's calls of one step belong together (LearnedSessions
remembers which requests brought one token this step) and two workers may use the same request ids. A client
silent for `idle_s` is forgotten. Requests are known once a Step brought their tokens: Layer routes of others
(after this service restarted, say) are left out, so such a request starts afresh at its next Step.

Metrics (Prometheus): calls by method and status code, call latency by method, live requests, clients.
Logs: JSON lines (services/common.py).

Not for: predicting (predictor/), deciding what to fetch (the orchestrator), or the client's fallbacks
(predictor_client.py).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from expertflow.services import convert
from expertflow.services.common import GrpcServer, run_until_stopped
from expertflow.services.security import Security
from expertflow.v1 import common_pb2, predictor_pb2, predictor_pb2_grpc
from predictor.base import RequestId, SessionPredictor

CLIENT_KEY = "expertflow-client"  # gRPC metadata: which client's sessions a call belongs to
SERVICE_NAME = "expertflow.v1.Predictor"


@dataclass
class _Client:
    predictor: SessionPredictor
    live: set[RequestId] = field(default_factory=set)  # requests a Step has brought, not finished
    seen: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(
        self,
        factory: Callable[[], SessionPredictor],
        registry: CollectorRegistry | None = None,
        log: logging.Logger | None = None,
        idle_s: float = 600.0,
    ) -> None:
        self.factory = factory
        probe = factory()  # the shape and label every client's predictor shares
        self.n_layers, self.n_experts, self.label = probe.n_layers, probe.n_experts, probe.label
        self.log = log or logging.getLogger("expertflow.predictor")
        self.idle_s = idle_s
        self._clients: dict[str, _Client] = {}
        self._lock = threading.Lock()
        self._swept = time.monotonic()
        registry = registry or CollectorRegistry()
        self._calls = Counter(
            "expertflow_predictor_calls", "Predictor calls", ["method", "code"], registry=registry
        )
        self._latency = Histogram(
            "expertflow_predictor_call_seconds",
            "Time to answer a predictor call",
            ["method"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=registry,
        )
        self._live = Gauge("expertflow_predictor_live_requests", "Requests being predicted", registry=registry)
        self._n_clients = Gauge("expertflow_predictor_clients", "Clients with sessions", registry=registry)

    def GetInfo(self, request, context) -> predictor_pb2.PredictorInfo:
        return predictor_pb2.PredictorInfo(moe_layers=self.n_layers, experts=self.n_experts, label=self.label)

    def Step(self, request, context) -> predictor_pb2.PredictStepResponse:
        with self._call("step", context) as client:
            requests = convert.requests_from_proto(request.requests)
            predicted = client.predictor.step({r.id: r.new_tokens for r in requests})
            client.live.update(r.id for r in requests)
            return predictor_pb2.PredictStepResponse(predictions=convert.probabilities_to_proto(predicted))

    def Layer(self, request, context) -> predictor_pb2.PredictLayerResponse:
        with self._call("layer", context) as client:
            shape = (self.n_layers, self.n_experts)
            routed = convert.routes_from_proto(request.layer, request.routes, shape, known=client.live)
            refined = client.predictor.layer(routed.layer, routed.routes, routed.speculation)
            return predictor_pb2.PredictLayerResponse(refined=convert.probabilities_to_proto(refined))

    def Finish(self, request, context) -> common_pb2.FinishResponse:
        with self._call("finish", context) as client:
            ids = list(request.request_ids)
            client.predictor.finish(ids)
            client.live.difference_update(ids)
            return common_pb2.FinishResponse()

    @property
    def live_requests(self) -> int:
        with self._lock:
            return sum(len(c.live) for c in self._clients.values())

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext) -> Iterator[_Client]:
        """The calling client, locked; the call timed and counted; a malformed message answered INVALID_ARGUMENT."""
        t0 = time.perf_counter()
        client = self._client(dict(context.invocation_metadata()).get(CLIENT_KEY, ""))
        code = grpc.StatusCode.OK
        try:
            with client.lock:
                yield client
        except convert.MessageError as e:
            code = grpc.StatusCode.INVALID_ARGUMENT
            context.abort(code, str(e))
        except Exception as e:  # a predictor bug must not kill the server; the caller sees INTERNAL with why
            code = grpc.StatusCode.INTERNAL
            self.log.exception("predictor call failed", extra={"method": method})
            context.abort(code, f"the predictor failed: {type(e).__name__}: {e}")
        finally:
            self._calls.labels(method, code.name).inc()
            self._latency.labels(method).observe(time.perf_counter() - t0)
            self._live.set(self.live_requests)

    def _client(self, name: str) -> _Client:
        now = time.monotonic()
        with self._lock:
            if now - self._swept > min(self.idle_s, 60.0):  # forget clients that went away without finishing
                self._swept = now
                for gone in [n for n, c in self._clients.items() if now - c.seen > self.idle_s]:
                    self.log.info("forgetting an idle client", extra={"client": gone})
                    del self._clients[gone]
            client = self._clients.get(name)
            if client is None:
                client = self._clients[name] = _Client(self.factory())
            client.seen = now
            self._n_clients.set(len(self._clients))
            return client


def learned_factory(predictor_dir: Path) -> Callable[[], SessionPredictor]:
    """Fresh LearnedSessions of the predictor in `predictor_dir`, with online correction; the model loads once."""
    from predictor.learned import LearnedPredictor
    from predictor.online import OnlineConfig

    if not (predictor_dir / "config.json").exists():
        raise FileNotFoundError(f"{predictor_dir}: not a predictor directory (no config.json)")
    return LearnedPredictor.load(predictor_dir, OnlineConfig()).sessions


def make_server(servicer: PredictorServicer, listen: str, security: Security | None = None) -> GrpcServer:
    add = predictor_pb2_grpc.add_PredictorServicer_to_server
    return GrpcServer("predictor", listen, [(add, servicer)], [SERVICE_NAME], security=security)


def serve(servicer: PredictorServicer, listen: str, log: logging.Logger, security: Security | None = None) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = make_server(servicer, listen, security)
    log.info(
        "predictor ready",
        extra={"label": servicer.label, "moe_layers": servicer.n_layers, "experts": servicer.n_experts},
    )
    run_until_stopped(server, log)
