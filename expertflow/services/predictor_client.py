"""`RemoteSessions`: a SessionPredictor whose predictions come from the predictor service.

    sessions = RemoteSessions("127.0.0.1:50062", n_layers, n_experts)   # the shape it must predict
    flow = ExpertFlow(sessions)                                         # as with any SessionPredictor

Each call has a deadline (`timeout_ms`). A call the service does not answer in time, or at all, answers no
predictions (the prefetcher then plans nothing and the cache loads experts as they are routed); it never
raises into its caller for the service's sake, and an outage is logged once. A late answer alone costs only
that call (the service is there, and has most likely taken the call's tokens or routes all the same); after
`max_slow_calls` late answers in a row, or once the service is gone or predicts another shape, nothing is asked
for `retry_s`, then the service is checked again (GetInfo: is it there, does it predict this shape). Requests
the service forgot meanwhile (it restarted) start afresh there at their next step.

A client id (the `expertflow-client` metadata) gives this object sessions of its own on the service.
Calls come from one thread at a time (the prefetcher that owns it).

Not for: deciding what to do without predictions (the prefetcher), or serving (predictor_server.py).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence

import grpc
import numpy as np

from expertflow.services import convert
from expertflow.services.predictor_server import CLIENT_KEY
from expertflow.services.security import Security, open_channel
from expertflow.v1 import common_pb2, predictor_pb2, predictor_pb2_grpc
from orchestrator.prefetcher import LayerRoutes
from predictor.base import RequestId, SessionPredictor


_QUIET_S = 60.0  # a service that keeps coming and going is logged once a minute, not at every change


class RemoteSessions(SessionPredictor):
    def __init__(
        self,
        address: str,
        n_layers: int,
        n_experts: int,
        timeout_ms: float = 100.0,
        retry_s: float = 1.0,
        max_slow_calls: int = 3,
        log: logging.Logger | None = None,
        security: Security | None = None,
    ) -> None:
        """`security`: the TLS and token the service wants (security.py; None: plaintext, no token)."""
        self.address = address
        self.security = security
        self.n_layers, self.n_experts = n_layers, n_experts
        self.label = "remote"
        self.timeout_s = timeout_ms / 1e3
        self.retry_s = retry_s
        self.max_slow_calls = max_slow_calls
        self.log = log or logging.getLogger("expertflow.predictor-client")
        self.failures = 0  # calls that got no answer in time
        self._slow_calls = 0  # late answers in a row
        self.mismatch: str | None = None  # why the service cannot predict for this model, if it said so
        self._metadata = ((CLIENT_KEY, uuid.uuid4().hex),)
        self._channel: grpc.Channel | None = None
        self._stub: predictor_pb2_grpc.PredictorStub | None = None
        self._up = False  # the last call was answered
        self._outage = False  # calls go unanswered
        self._outage_logged = False
        self._warned_at = -_QUIET_S
        self._retry_at = 0.0
        self._live: set[RequestId] = set()
        self._closed = False

    def step(self, tokens: Mapping[RequestId, Sequence[int]]) -> dict[RequestId, np.ndarray]:
        request = predictor_pb2.PredictStepRequest(
            requests=[common_pb2.RequestTokens(request_id=rid, tokens=t) for rid, t in tokens.items()]
        )
        self._live.update(tokens)  # a late call most likely reached the service: finish these there all the same
        reply = self._call("Step", request)
        return {} if reply is None else self._decode(reply.predictions, (self.n_layers, self.n_experts))

    def layer(
        self,
        layer: int,
        routes: Mapping[RequestId, np.ndarray],
        speculation: Mapping[RequestId, np.ndarray] | None = None,
    ) -> dict[RequestId, np.ndarray]:
        routed = convert.routes_to_proto(LayerRoutes(layer, routes, speculation))
        reply = self._call("Layer", predictor_pb2.PredictLayerRequest(layer=layer, routes=routed))
        return {} if reply is None else self._decode(reply.refined, (self.n_experts,))

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        ids = [rid for rid in request_ids if rid in self._live]
        self._live.difference_update(ids)
        if ids:
            self._call("Finish", common_pb2.FinishRequest(request_ids=ids))

    def check(self, timeout_s: float | None = None) -> predictor_pb2.PredictorInfo | None:
        """The service's info if it answers within `timeout_s` (None: the call deadline) and predicts this shape
        (else None, logged)."""
        if self._closed:
            return None
        self._connect()
        try:
            info = self._stub.GetInfo(predictor_pb2.PredictorInfoRequest(), timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            self._lost(f"{e.code().name}: {e.details()}")
            return None
        if (info.moe_layers, info.experts) != (self.n_layers, self.n_experts):
            self.mismatch = (
                f"the predictor service at {self.address} predicts {info.moe_layers} MoE layers x {info.experts} "
                f"experts, the model has {self.n_layers} x {self.n_experts}"
            )
            self._lost(self.mismatch, level=logging.ERROR)
            return None
        self.mismatch = None
        self.label = f"remote {info.label}"
        self._up = True
        self._answered()
        return info

    def close(self) -> None:
        """Finish the requests still live there (best effort) and close the channel; later calls predict nothing."""
        if self._up and self._live:
            self.finish(list(self._live))
        if self._channel is not None:
            self._channel.close()
        self._closed = True
        self._up = False

    def _call(self, method: str, request):
        if self._closed:
            return None
        if not self._up:
            if time.monotonic() < self._retry_at or self.check() is None:
                return None
        try:
            reply = getattr(self._stub, method)(request, timeout=self.timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            late = e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            self._slow_calls = self._slow_calls + 1 if late else 0
            down = not late or self._slow_calls >= self.max_slow_calls
            self._lost(f"{method}: {e.code().name}: {e.details()}", down=down)
            return None
        self._answered()
        return reply

    def _decode(self, msgs, shape: tuple[int, ...]) -> dict[RequestId, np.ndarray]:
        try:
            return convert.probabilities_from_proto(msgs, shape)
        except convert.MessageError as e:
            self._lost(str(e), level=logging.ERROR)
            return {}

    def _connect(self) -> None:
        # A fresh channel for each check: one that failed may sit in gRPC's reconnect backoff for up to minutes.
        if self._channel is not None:
            self._channel.close()
        self._channel = open_channel(self.address, self.security)
        self._stub = predictor_pb2_grpc.PredictorStub(self._channel)

    def _answered(self) -> None:
        self._slow_calls = 0
        if self._outage:
            self._outage = False
            if self._outage_logged:
                self.log.info("predictor service answers again", extra={"address": self.address})

    def _lost(self, why: str, level: int = logging.WARNING, down: bool = True) -> None:
        """A call got no (usable) answer; `down`: ask nothing more for retry_s."""
        self.failures += 1
        if down:
            self._up = False
            self._retry_at = time.monotonic() + self.retry_s
        if not self._outage:
            self._outage = True
            now = time.monotonic()
            self._outage_logged = now - self._warned_at >= _QUIET_S
            if not self._outage_logged:
                return
            self._warned_at = now
            self.log.log(
                level,
                "predictor service unavailable: planning without predictions (reactive loading) until it answers",
                extra={"address": self.address, "why": why, "retry_s": self.retry_s},
            )
