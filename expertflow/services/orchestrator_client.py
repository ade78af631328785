"""`RemotePrefetcher`: the worker's Prefetcher whose plans come from the orchestrator service.

    options = LoadOptions(policy_factory=remote_policy("127.0.0.1:50063"))   # policy: the orchestrator's default
    loaded = load(model_dir, options)                                       # plan in the engine as any policy

It behaves as PlanningThread does (orchestrator/planning_thread.py), with the planner in another process:
`begin_step`, `after_layer` and `finish` put the event on the wire and return at once with the newest plan
already received; `poll()` (the engine calls it at each layer) returns the newest plan not taken yet, older
ones dropped (each plan covers everything from its view on, so the newest supersedes the rest). Where the
orchestrator has answered every earlier event, a step or layer event waits up to `wait_ms` for its own answer,
so a plan made in time is used in time; where the orchestrator lags, nothing waits. No call blocks longer.
`eviction` is a local NextUse whose ranking each answer updates from the plan's `next_use_ms` (or clears), so
victims are picked as the orchestrator's prefetcher ranks them; with no ranking it is LRU, which is also the
eviction of the registry's other prefetchers. `wants_speculation` is what the orchestrator's GetInfo says.

If the orchestrator is down or restarts (its socket disconnects), events are dropped (the engine loads experts
as they are routed: outputs never change, only hit rates) while a background thread reconnects every `retry_s`,
logging once per outage; a restarted orchestrator starts the running requests afresh. One that falls more than
`max_backlog` events behind gets no new ones until it catches up. A setup the orchestrator refuses (an unknown
policy, a model its predictor does not fit) raises ValueError at construction, when the orchestrator answers
then; later refusals are logged.

Transport (bench/control_latency.py, bench/results/control_latency_cpu.json: loopback on a shared 2-core Xeon,
grpcio 1.85, pyzmq 27; one after_layer event of 8 requests and its answer, a 4-transfer plan with the ranking):

    shape   event / answer bytes   gRPC bidi stream   gRPC unary       ZMQ DEALER/ROUTER (same protobuf bytes)
    4x8       335 /    390         233 us, 138 CPU    432 us, 210      49 us, 24 CPU
    26x64    2350 / 13446          234 us, 144 CPU    547 us, 270      61 us, 32 CPU
    (p50 round trip; CPU: microseconds of the worker process, every thread, per event; a run while the machine
    was busier: ZMQ 168-176 us, the stream 246-437 us)

So the per-event exchange, (L + 1) events per token, goes over ZMQ: a quarter of the stream's latency and a
fifth of its CPU in the worker, where that CPU competes with the engine's thread for the GIL (26 layers: about
3 ms less CPU and 5 ms less waiting per token). gRPC stays for what is not per event: GetInfo (the handshake,
which also says the ZMQ port), Schedule, health; the orchestrator serves the gRPC Plans stream too, for clients
that want it.
The socket belongs to one I/O thread (ZMQ sockets are not thread-safe): the engine's calls hand it their
events through a queue and an inproc wake-up socket, and the events are encoded there, off the engine's thread.

Security (`security`, security.py): the gRPC calls carry the token and use TLS as configured; the DEALER's routing
id is the ticket GetInfo issued for this connection (each reconnect asks for a new one), and where GetInfo gives
a CURVE key the DEALER encrypts with it. A worker that uses TLS refuses an orchestrator that offers no CURVE key
rather than send its plans in the clear (orchestrator_server.py says why this, not the gRPC stream). A refused
token, like a refused setup, raises ValueError at construction.

Not for: planning (the orchestrator service), or executing plans (the device cache).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
import numpy as np
import zmq
from google.protobuf.message import DecodeError
from zmq.utils.monitor import recv_monitor_message

from expert_store.eviction import NextUse
from expert_store.keys import ExpertSpace
from expert_store.plan import CacheView, Plan
from expertflow.services import convert
from expertflow.services.orchestrator_server import WORKER_KEY
from expertflow.services.security import Security, open_channel
from expertflow.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.policies import CachePolicy
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest
from orchestrator.scheduler import SchedulerConfig
from predictor.base import RequestId

# gRPC's own reconnect backoff grows to two minutes; a restarted orchestrator should be found within a second.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class RemoteStats:
    events: int = 0  # begin_step / after_layer events sent
    dropped_events: int = 0  # not sent: no connection
    answers: int = 0  # answers received
    plans: int = 0  # answers carrying a plan
    dropped_plans: int = 0  # plans superseded before the engine took them
    waits: int = 0  # events that waited for their answer
    late: int = 0  # ... of which the answer did not come within wait_ms
    connects: int = 0  # connections made (the first included)


class _Link:
    """One connection's accounting: begin_step / after_layer events handed to it, and those settled (answered, in
    order, or dropped because the socket would not take them)."""

    def __init__(self) -> None:
        self.sent = 0
        self.settled = 0


class RemotePrefetcher(Prefetcher):
    name = "remote"

    def __init__(
        self,
        address: str,
        space: ExpertSpace,
        policy: str = "",
        wait_ms: float = 2.0,
        max_backlog: int = 256,
        retry_s: float = 0.5,
        connect_timeout_s: float = 2.0,
        worker_id: str | None = None,
        log: logging.Logger | None = None,
        security: Security | None = None,
    ) -> None:
        """`address`: the orchestrator's gRPC host:port; `policy`: the one to plan with (empty: its default);
        `max_backlog`: events the orchestrator may be behind before new ones are dropped (its plans would come
        too late to matter, and the queue would only grow); `security`: the TLS and token the orchestrator
        wants (None: plaintext, no token)."""
        self.address = address
        self.security = security or Security()
        self.shape = space.shape
        self.setup = orchestrator_pb2.PrefetchSetup(
            moe_layers=space.n_layers, experts=space.n_experts, top_k=space.top_k, policy=policy
        )
        self.name = policy or "remote"
        self.eviction = NextUse()
        self.wants_speculation = False
        self.wait_ms, self.max_backlog = wait_ms, max_backlog
        self.retry_s, self.connect_timeout_s = retry_s, connect_timeout_s
        self.worker_id = worker_id or uuid.uuid4().hex
        self.log = log or logging.getLogger("expertflow.orchestrator-client")
        self.stats = RemoteStats()
        self._metadata = ((WORKER_KEY, self.worker_id),)
        self._channel = open_channel(address, self.security, _CHANNEL_OPTIONS)
        self._stub = orchestrator_pb2_grpc.OrchestratorStub(self._channel)
        self._cond = threading.Condition()
        self._link: _Link | None = None  # the open connection
        self._ready: Plan | None = None  # the newest plan not taken
        self._step = 0
        self._outage = False  # an outage was logged and has not ended
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()  # (link, kind, payload) for the I/O thread
        self._stopping = threading.Event()
        self._ctx = zmq.Context()
        self._wake_address = f"inproc://remote-prefetcher-{id(self)}"
        self._wake = self._ctx.socket(zmq.PUSH)
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.bind(self._wake_address)
        self._wake_lock = threading.Lock()  # the engine's calls share one socket
        try:
            info = self._handshake(refusal_raises=True)
        except BaseException:
            self._release()
            raise
        self._thread = threading.Thread(target=self._run, args=(info,), name="remote-prefetcher", daemon=True)
        self._thread.start()
        if info is not None:
            self.wait_connected(connect_timeout_s)

    # -- the engine's calls ----------------------------------------------------------------------------------

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        self._step += 1
        return self._event("begin_step", (self._step, list(requests), view))

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        return self._event("after_layer", (self._step, routed, view))

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        with self._cond:
            link = self._link
        if link is not None:
            self._send(link, "finish", list(request_ids))

    def poll(self) -> Plan | None:
        with self._cond:
            plan, self._ready = self._ready, None
        return plan

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self._wake_up()
        self._thread.join()
        self._release()

    # -- other calls -----------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._link is not None

    def wait_connected(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a connection; whether there is one."""
        with self._cond:
            return self._cond.wait_for(lambda: self._link is not None, timeout_s)

    def schedule(
        self, waiting: Sequence[tuple[RequestId, int]], config: SchedulerConfig, neutral: np.ndarray | None = None
    ) -> list[RequestId] | None:
        """The orchestrator's pick among (request id, rounds waited) for the next micro-batch, from the predictions
        it holds for this worker's requests; None if it did not answer within `connect_timeout_s` (the worker
        then takes the longest-waiting). `neutral` is unused: the orchestrator has its own."""
        request = orchestrator_pb2.ScheduleRequest(
            queue=[orchestrator_pb2.WaitingRequest(request_id=r, waited=w) for r, w in waiting],
            batch=config.batch,
            max_wait=config.max_wait,
            scheduler="expertflow",
        )
        try:
            reply = self._stub.Schedule(request, timeout=self.connect_timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ValueError(f"orchestrator at {self.address}: {e.details()}") from None
            return None
        return list(reply.request_ids)

    # -- internals -------------------------------------------------------------------------------------------

    def _event(self, kind: str, payload: tuple) -> Plan | None:
        with self._cond:
            link = self._link
            if link is None or link.sent - link.settled >= self.max_backlog:
                self.stats.dropped_events += 1
                plan, self._ready = self._ready, None
                return plan
            link.sent += 1
            number = link.sent
            caught_up = link.settled == number - 1
            self.stats.events += 1
        self._send(link, kind, payload)
        if self.wait_ms > 0 and caught_up:
            with self._cond:
                self.stats.waits += 1
                done = self._cond.wait_for(lambda: self._link is not link or link.settled >= number, self.wait_ms / 1e3)
                if not done:
                    self.stats.late += 1
        return self.poll()

    def _send(self, link: _Link, kind: str, payload) -> None:
        self._outbox.put((link, kind, payload))
        self._wake_up()

    def _wake_up(self) -> None:
        with self._wake_lock:
            try:
                self._wake.send(b"", zmq.NOBLOCK)
            except zmq.Again:  # the I/O thread has wake-ups enough queued
                pass

    def _handshake(self, refusal_raises: bool = False) -> orchestrator_pb2.OrchestratorInfo | None:
        """GetInfo for this worker's setup; None if the orchestrator did not answer (or refused, logged)."""
        try:
            info = self._stub.GetInfo(self.setup, timeout=self.connect_timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            if e.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED):
                return self._refused(e.details(), refusal_raises)
            self._lost(self.security.explain(e))
            return None
        if not info.plans_port or not info.plans_ticket:
            self._lost("the orchestrator serves no ZMQ plans port (or issues no ticket for it)", logging.ERROR)
            return None
        if self.security.tls and not info.plans_curve_key:
            why = (
                "it offers its plans port unencrypted (no CURVE key) while this worker uses TLS: "
                "give both the same [security]"
            )
            return self._refused(why, refusal_raises)
        self.name = info.policy
        self.wants_speculation = info.wants_speculation
        return info

    def _refused(self, why: str, raises: bool) -> None:
        if raises:
            raise ValueError(f"orchestrator at {self.address}: {why}")
        self._lost(why, logging.ERROR)

    def _lost(self, why: str, level: int = logging.WARNING) -> None:
        if not self._outage:
            self._outage = True
            self.log.log(
                level,
                "orchestrator unavailable: loading experts as they are routed until it answers",
                extra={"address": self.address, "why": why, "retry_s": self.retry_s},
            )

    def _run(self, info: orchestrator_pb2.OrchestratorInfo | None) -> None:
        """The I/O thread: (re)connects, sends the queued events, receives the answers."""
        wake = self._ctx.socket(zmq.PULL)
        wake.setsockopt(zmq.LINGER, 0)
        wake.connect(self._wake_address)
        poller = zmq.Poller()
        poller.register(wake, zmq.POLLIN)
        dealer = monitor = None
        next_try = 0.0
        try:
            while not self._stopping.is_set():
                if dealer is None and time.monotonic() >= next_try:
                    info = info or self._handshake()
                    if info is not None:
                        dealer, monitor = self._connect(info)
                    if dealer is not None:
                        poller.register(dealer, zmq.POLLIN)
                        poller.register(monitor, zmq.POLLIN)
                    else:
                        next_try = time.monotonic() + self.retry_s
                    info = None
                events = dict(poller.poll(None if dealer is not None else self.retry_s * 1e3))
                if wake in events:
                    while _drain(wake) is not None:
                        pass
                self._flush(dealer)
                if dealer is not None and dealer in events:
                    while (data := _drain(dealer)) is not None:
                        self._receive(data)
                if monitor is not None and monitor in events and _disconnected(monitor):
                    self._lost("the plans socket disconnected")
                    poller.unregister(dealer)
                    poller.unregister(monitor)
                    _close(dealer, monitor)
                    dealer = monitor = None
                    self._set_link(None)
                    next_try = time.monotonic()  # at once: a restarted orchestrator may be up already
        finally:
            if dealer is not None:
                try:
                    dealer.send(b"", zmq.NOBLOCK)  # the orchestrator may close this worker's session now
                except zmq.ZMQError:
                    pass
                _close(dealer, monitor, linger_ms=100)
            wake.close()
            self._set_link(None)

    def _connect(self, info: orchestrator_pb2.OrchestratorInfo):
        """A DEALER connected to the orchestrator's plans port, with its setup sent; (None, None) if it cannot."""
        host = self.address.rsplit(":", 1)[0]
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.IDENTITY, info.plans_ticket.encode())  # the port admits this connection by it
        if info.plans_curve_key:
            public, secret = zmq.curve_keypair()  # the client's half is anyone's: the ticket says who it is
            dealer.curve_secretkey, dealer.curve_publickey = secret, public
            dealer.curve_serverkey = info.plans_curve_key.encode()
        dealer.setsockopt(zmq.IMMEDIATE, 1)  # no queueing for a peer that is not there: sends fail at once
        dealer.setsockopt(zmq.LINGER, 0)
        if host.startswith("["):
            dealer.setsockopt(zmq.IPV6, 1)
        monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        dealer.connect(f"tcp://{host}:{info.plans_port}")
        try:
            if not dealer.poll(self.connect_timeout_s * 1e3, zmq.POLLOUT):
                raise zmq.Again()
            dealer.send(orchestrator_pb2.PrefetchEvent(setup=self.setup).SerializeToString(), zmq.NOBLOCK)
        except zmq.ZMQError as e:
            _close(dealer, monitor)
            self._lost(f"cannot reach the plans port {info.plans_port}: {e}")
            return None, None
        if self._outage:
            self.log.info("orchestrator answers again", extra={"address": self.address, "policy": info.policy})
        self._outage = False
        self.stats.connects += 1
        self._set_link(_Link())
        return dealer, monitor

    def _set_link(self, link: _Link | None) -> None:
        with self._cond:
            self._link = link
            self._cond.notify_all()

    def _flush(self, dealer: zmq.Socket | None) -> None:
        """Send the queued events of the open link (those of a closed one are stale: dropped)."""
        while True:
            try:
                link, kind, payload = self._outbox.get_nowait()
            except queue.Empty:
                return
            if dealer is None or link is not self._link:
                continue
            try:
                dealer.send(_encode(kind, payload).SerializeToString(), zmq.NOBLOCK)
            except zmq.Again:  # its queue is full (a stalled orchestrator) or its end just went (the monitor says)
                if kind != "finish":
                    with self._cond:
                        link.settled += 1
                        self.stats.dropped_events += 1
                        self._cond.notify_all()

    def _receive(self, data: bytes) -> None:
        plan = None
        try:
            answer = orchestrator_pb2.PlanMessage.FromString(data)
            if answer.has_plan:
                plan, ranking = convert.plan_from_proto(answer.plan, self.shape)
                if answer.plan.clear_next_use:
                    self.eviction.use = None
                elif ranking is not None:
                    self.eviction.use = ranking  # rebound whole: the cache reads it from the engine's thread
        except (DecodeError, convert.MessageError) as e:  # counted as an answer without a plan
            self.log.warning("ignored a malformed answer from the orchestrator", extra={"why": str(e)})
        with self._cond:
            link = self._link
            if link is not None:
                link.settled += 1
            self.stats.answers += 1
            if plan:
                self.stats.plans += 1
                if self._ready is not None:
                    self.stats.dropped_plans += 1
                self._ready = plan
            self._cond.notify_all()

    def _release(self) -> None:
        self._wake.close()
        self._ctx.term()
        self._channel.close()


def _encode(kind: str, payload) -> orchestrator_pb2.PrefetchEvent:
    if kind == "begin_step":
        step, requests, view = payload
        return orchestrator_pb2.PrefetchEvent(
            begin_step=orchestrator_pb2.BeginStepRequest(
                step=step, requests=convert.requests_to_proto(requests), view=convert.view_to_proto(view)
            )
        )
    if kind == "after_layer":
        step, routed, view = payload
        return orchestrator_pb2.PrefetchEvent(
            after_layer=orchestrator_pb2.AfterLayerRequest(
                step=step, layer=routed.layer, routes=convert.routes_to_proto(routed), view=convert.view_to_proto(view)
            )
        )
    return orchestrator_pb2.PrefetchEvent(finish=common_pb2.FinishRequest(request_ids=payload))


def _drain(sock: zmq.Socket) -> bytes | None:
    try:
        return sock.recv(zmq.NOBLOCK)
    except zmq.Again:
        return None


def _disconnected(monitor: zmq.Socket) -> bool:
    """Whether any of the monitor's queued events says the connection closed."""
    closed = False
    while True:
        try:
            closed = recv_monitor_message(monitor, zmq.NOBLOCK)["event"] == zmq.EVENT_DISCONNECTED or closed
        except zmq.Again:
            return closed


def _close(dealer: zmq.Socket, monitor: zmq.Socket, linger_ms: int = 0) -> None:
    dealer.disable_monitor()
    monitor.close()
    dealer.close(linger=linger_ms)


def remote_policy(address: str, policy: str = "", **options) -> Callable[[ExpertSpace], CachePolicy]:
    """A LoadOptions.policy_factory: the model's cache planned by the orchestrator at `address` (keep the loader's
    planning "inline": the prefetcher is asynchronous already). `options`: RemotePrefetcher's."""

    def build(space: ExpertSpace) -> CachePolicy:
        prefetcher = RemotePrefetcher(address, space, policy, **options)
        return CachePolicy(prefetcher.name, prefetcher.eviction, prefetcher)

    return build
