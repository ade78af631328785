"""The orchestrator service: prefetchers from the policy registry, run for gpu workers over the wire.

    servicer = OrchestratorServicer(OrchestratorOptions(policy="expertflow", predictor_address="host:port"))
    endpoint = PlansEndpoint(servicer, "127.0.0.1")      # the hot path over ZMQ (orchestrator_client.py says why)
    serve(servicer, endpoint, listen, log)               # gRPC: GetInfo, Plans, BeginStep/AfterLayer/Finish, Schedule

Each worker connection (a ZMQ peer, or a gRPC `Plans` stream) gets a `PrefetchSession`: one prefetcher built by
`make_policy(name, PolicyInputs)` for the worker's model (its PrefetchSetup: shape, top-k, policy; without one,
the default policy for the shape of its first view), the predictive one with `RemoteSessions` of its own to the
predictor service. The unary BeginStep / AfterLayer / Finish share one more session. Every begin_step and
after_layer event is answered once, in order: the plan (if any) and, whenever the prefetcher's next-use ranking
changed, the ranking itself (or that it was cleared), so the worker's NextUse eviction ranks as the orchestrator
does. A session knows the requests a begin_step brought; routes of others (after a restart) are left out, and
such a request starts afresh at its next step, as a new one does.

Schedule runs the token scheduler (orchestrator/scheduler.py) over a worker's waiting requests with the
latest [L, E] prediction its session holds for each (ExpertFlow.prediction; no prediction: no preference).

Malformed messages (shapes, indices, unknown or unservable policies) are answered INVALID_ARGUMENT with the
reason on gRPC; a ZMQ peer gets an empty answer and the reason is logged once per peer.

Who may use the ZMQ plans port: the gRPC calls are guarded by security.py (TLS, the token); the plans port
guards itself with what those give. GetInfo issues a ticket (`PlanTickets`: a random secret, good for one
connection, within `ttl_s`), and a worker's DEALER uses it as its routing id. ZMQ stamps every message with the
routing id of the connection it came on, so the ROUTER checks each message's sender without a byte more on the
wire: a peer whose id is not a redeemed ticket is ignored (never answered, counted, logged once a minute); the
answers go only to the ticket's connection. So with a token set, a peer that cannot call GetInfo can neither
inject events nor read plans. Where the orchestrator uses TLS (across hosts), the port also speaks CURVE, its
public key sent in GetInfo (over TLS, so a worker knows it is the orchestrator's): events, plans and the ticket
are encrypted, at a few microseconds per message (the gRPC Plans stream, TLS-encrypted already, stays for
clients that prefer it, at four times the latency: orchestrator_client.py).

Not for: the planning logic (orchestrator/), predicting (the predictor service), or the worker's side
(orchestrator_client.py).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NoReturn

import grpc
import numpy as np
import zmq
from google.protobuf.message import DecodeError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from expert_store.eviction import NextUse
from expertflow.services import convert
from expertflow.services.common import GrpcServer, run_until_stopped
from expertflow.services.predictor_client import RemoteSessions
from expertflow.services.security import Security
from expertflow.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.expertflow import ExpertFlow
from orchestrator.policies import PolicyInputs, PolicyUnavailable, make_policy
from orchestrator.prefetcher import Prefetcher
from orchestrator.scheduler import Request, SchedulerConfig, fifo_batch, form_batch
from predictor.base import RequestId

WORKER_KEY = "expertflow-worker"  # gRPC metadata: the worker whose session Schedule reads
SERVICE_NAME = "expertflow.v1.Orchestrator"
SCHEDULERS = {"": form_batch, "expertflow": form_batch, "fifo": fifo_batch}


@dataclass(frozen=True)
class OrchestratorOptions:
    policy: str = "expertflow"  # the default; a worker's PrefetchSetup may name another
    predictor_address: str | None = None  # the predictor service, for the policies that predict
    predictor_timeout_ms: float = 100.0  # deadline of each predictor call; past it, that call predicts nothing
    predictor_retry_s: float = 1.0  # how long a session asks the predictor nothing after it failed
    security: Security | None = None  # how to call the predictor service (None: plaintext, no token)


class PrefetchSession:
    """One prefetcher for one worker connection, with the request ids it knows. Its lock serialises the calls
    of the connection's transport thread and of Schedule."""

    def __init__(self, setup: orchestrator_pb2.PrefetchSetup, options: OrchestratorOptions) -> None:
        self.setup = setup
        self.shape = (setup.moe_layers, setup.experts)
        if setup.moe_layers < 1 or setup.experts < 1 or not 1 <= setup.top_k <= setup.experts:
            raise convert.MessageError(
                f"setup of {setup.moe_layers} MoE layers x {setup.experts} experts, top-{setup.top_k}: layers and "
                "experts must be at least 1, top-k between 1 and the experts"
            )
        self.policy_name = setup.policy or options.policy
        self.remote: RemoteSessions | None = None
        if options.predictor_address:
            self.remote = RemoteSessions(
                options.predictor_address,
                *self.shape,
                timeout_ms=options.predictor_timeout_ms,
                retry_s=options.predictor_retry_s,
                security=options.security,
            )
        try:
            # speculation: the worker's engine computes next-layer gate speculation when the prefetcher wants it
            inputs = PolicyInputs(*self.shape, setup.top_k, learned=self.remote, speculation=True)
            self.prefetcher = _prefetcher(self.policy_name, inputs)
        except convert.MessageError:
            if self.remote is not None:
                self.remote.close()
            raise
        # the predictive prefetcher: it holds predictions (for Schedule) and plans with the predictor service
        self.flow = self.prefetcher if isinstance(self.prefetcher, ExpertFlow) else None
        self.lock = threading.Lock()
        self.seen = time.monotonic()
        self._known: set[RequestId] = set()
        self._ranking: np.ndarray | None = None  # the next-use ranking last sent

    def same(self, setup: orchestrator_pb2.PrefetchSetup) -> bool:
        return setup == self.setup

    def begin_step(self, msg: orchestrator_pb2.BeginStepRequest) -> orchestrator_pb2.PlanMessage:
        view = convert.view_from_proto(msg.view, self.shape)
        requests = convert.requests_from_proto(msg.requests)
        self._known.update(r.id for r in requests)
        return self._answer(msg.step, -1, self.prefetcher.begin_step(requests, view))

    def after_layer(self, msg: orchestrator_pb2.AfterLayerRequest) -> orchestrator_pb2.PlanMessage:
        view = convert.view_from_proto(msg.view, self.shape)
        routed = convert.routes_from_proto(msg.layer, msg.routes, self.shape, known=self._known)
        return self._answer(msg.step, msg.layer, self.prefetcher.after_layer(routed, view))

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        ids = [rid for rid in request_ids if rid in self._known]
        self._known.difference_update(ids)
        if ids:
            self.prefetcher.finish(ids)

    def route_estimate(self, request_id: RequestId) -> np.ndarray | None:
        """[L, E] what the session expects the request's next token to use (None: nothing known)."""
        return None if self.flow is None else self.flow.route_estimate(request_id)

    def predictor_mismatch(self) -> str | None:
        """Why the predictor service cannot serve this session's model (it predicts another shape), if it says so."""
        if self.remote is None or self.flow is None:
            return None
        # briefly: a worker's handshake waits on this, and a predictor that is down is no reason to refuse it
        self.remote.check(timeout_s=min(self.remote.timeout_s, 0.5))
        return self.remote.mismatch

    def info(self) -> orchestrator_pb2.OrchestratorInfo:
        predictor = self.remote.label if self.remote is not None and self.flow is not None else ""
        return orchestrator_pb2.OrchestratorInfo(
            policy=self.policy_name, wants_speculation=self.prefetcher.wants_speculation, predictor=predictor
        )

    def close(self) -> None:
        self.finish(list(self._known))
        self.prefetcher.close()
        if self.remote is not None:
            self.remote.close()

    def _answer(self, step: int, layer: int, plan) -> orchestrator_pb2.PlanMessage:
        eviction = self.prefetcher.eviction
        use = eviction.use if isinstance(eviction, NextUse) else None
        changed = use is not self._ranking  # the prefetcher rebinds a new array with each ranking
        self._ranking = use
        ranking = use if changed else None
        clear = changed and use is None
        if not (plan or ranking is not None or clear):
            return orchestrator_pb2.PlanMessage(step=step, layer=layer)
        return orchestrator_pb2.PlanMessage(
            step=step, layer=layer, has_plan=True, plan=convert.plan_to_proto(plan, ranking, clear)
        )


def _prefetcher(name: str, inputs: PolicyInputs) -> Prefetcher:
    """The registry's prefetcher for `name`; MessageError says why there is none to run here."""
    try:
        policy = make_policy(name, inputs)
    except PolicyUnavailable as e:
        reason = "no --predictor-address given" if name == "expertflow" and inputs.learned is None else e
        raise convert.MessageError(f"policy {name} cannot run here: {reason}") from None
    except ValueError as e:  # an unknown name
        raise convert.MessageError(str(e)) from None
    if policy.prefetcher is None:
        raise convert.MessageError(f"policy {name} prefetches nothing: a worker runs it alone, without an orchestrator")
    return policy.prefetcher


class PlanTickets:
    """Admissions to the ZMQ plans port: `issue` gives a random ticket for a worker (GetInfo does), `redeem` takes
    it back once (the port, on a connection's first message) and says whose it was. Tickets not redeemed within
    `ttl_s` lapse; at most `max_pending` wait at once (the oldest lapse first)."""

    def __init__(self, ttl_s: float = 60.0, max_pending: int = 1024) -> None:
        self.ttl_s, self.max_pending = ttl_s, max_pending
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, float]] = {}  # ticket -> (worker id, issued at), oldest first

    def issue(self, worker: str) -> str:
        ticket = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            self._pending = {t: e for t, e in self._pending.items() if now - e[1] < self.ttl_s}
            while len(self._pending) >= self.max_pending:
                del self._pending[next(iter(self._pending))]
            self._pending[ticket] = (worker, now)
        return ticket

    def redeem(self, ticket: str) -> str | None:
        """The worker the ticket was issued to, if it is pending (it no longer is); else None."""
        with self._lock:
            entry = self._pending.pop(ticket, None)
        if entry is None or time.monotonic() - entry[1] >= self.ttl_s:
            return None
        return entry[0]


class _Peer:
    """One worker connection: its id and (once it has a setup or a view) its session."""

    def __init__(self, worker: str) -> None:
        self.worker = worker
        self.setup: orchestrator_pb2.PrefetchSetup | None = None  # the last one it sent (ZMQ)
        self.session: PrefetchSession | None = None
        self.refused: str | None = None  # why its setup was refused (ZMQ)
        self.complaint: str | None = None  # the last reason logged for it (ZMQ: each reason once)


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(
        self,
        options: OrchestratorOptions = OrchestratorOptions(),
        registry: CollectorRegistry | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.options = options
        self.log = log or logging.getLogger("expertflow.orchestrator")
        self.plans_port = 0  # set once a PlansEndpoint listens
        self.plans_curve_key = ""  # the PlansEndpoint's CURVE public key, where it encrypts
        self.tickets = PlanTickets()
        # Refuse a default that can never run (unknown, needing training traces, without a predictor) up front.
        PrefetchSession(orchestrator_pb2.PrefetchSetup(moe_layers=1, experts=2, top_k=1), options).close()
        self._lock = threading.Lock()
        self._sessions: dict[str, PrefetchSession] = {}  # by worker id, for Schedule
        self._shared: PrefetchSession | None = None  # the unary calls'
        self._shared_lock = threading.Lock()
        registry = registry or CollectorRegistry()
        self.registry = registry  # the PlansEndpoint's metrics go here too
        self._events = Counter("expertflow_orchestrator_events", "Prefetch events handled", ["kind"], registry=registry)
        self._seconds = Histogram(
            "expertflow_orchestrator_event_seconds",
            "Time to plan one event",
            ["kind"],
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
            registry=registry,
        )
        self._plans = Counter(
            "expertflow_orchestrator_plans", "Answers that carried a plan or ranking", registry=registry
        )
        self._invalid = Counter("expertflow_orchestrator_invalid", "Malformed messages refused", registry=registry)
        self._n_sessions = Gauge(
            "expertflow_orchestrator_sessions", "Worker connections with a prefetcher", registry=registry
        )
        Gauge(
            "expertflow_prediction_recall",
            "routed experts among the k the prefetchers rated likeliest, over every session",
            registry=registry,
        ).set_function(self._recall)

    def _recall(self) -> float:
        with self._lock:
            flows = [s.flow for s in self._sessions.values() if s.flow is not None]
        total = sum(f.recall_total for f in flows)
        return sum(f.recall_hits for f in flows) / total if total else 0.0

    # -- sessions, for both transports ---------------------------------------------------------------------

    def open_session(self, peer: _Peer, setup: orchestrator_pb2.PrefetchSetup) -> PrefetchSession:
        """The peer's session for `setup`: kept if it has the same setup (a reconnect), else a new one."""
        if peer.session is not None and peer.session.same(setup):
            return peer.session
        session = PrefetchSession(setup, self.options)
        self.close_session(peer)
        peer.session = session
        with self._lock:  # the registry only finds a worker's session for Schedule; its connection owns it
            self._sessions[peer.worker] = session
            self._n_sessions.set(len(self._sessions))
        self.log.info(
            "worker connected",
            extra={"worker": peer.worker, "policy": session.policy_name, "shape": list(session.shape)},
        )
        return session

    def close_session(self, peer: _Peer) -> None:
        session, peer.session = peer.session, None
        if session is None:
            return
        with self._lock:
            if self._sessions.get(peer.worker) is session:
                del self._sessions[peer.worker]
            self._n_sessions.set(len(self._sessions))
        self._close(session)
        self.log.info("worker left", extra={"worker": peer.worker})

    def handle(self, peer: _Peer, event: orchestrator_pb2.PrefetchEvent) -> orchestrator_pb2.PlanMessage | None:
        """One event of a worker connection; the answer to send (None for setup and finish). Raises MessageError."""
        kind = event.WhichOneof("event")
        if kind == "setup":
            self.open_session(peer, event.setup)
            peer.setup = event.setup
            return None
        if kind == "finish":
            if peer.session is not None:
                with peer.session.lock:
                    peer.session.finish(event.finish.request_ids)
            return None
        if kind is None:
            raise convert.MessageError("an event with none of setup, begin_step, after_layer, finish set")
        if peer.session is None:  # no setup sent, or its session closed while idle
            if peer.setup is not None:
                self.open_session(peer, peer.setup)
            else:
                shape = convert.view_shape(getattr(event, kind).view)
                setup = orchestrator_pb2.PrefetchSetup(moe_layers=shape[0], experts=shape[1], top_k=1)
                self.open_session(peer, setup)
        return self.plan_event(peer.session, event)

    def plan_event(
        self, session: PrefetchSession, event: orchestrator_pb2.PrefetchEvent
    ) -> orchestrator_pb2.PlanMessage:
        """A begin_step or after_layer event through the session's prefetcher (the hot path)."""
        kind = event.WhichOneof("event")
        t0 = time.perf_counter()
        with session.lock:
            session.seen = time.monotonic()
            if kind == "begin_step":
                answer = session.begin_step(event.begin_step)
            else:
                answer = session.after_layer(event.after_layer)
        self._events.labels(kind).inc()
        self._seconds.labels(kind).observe(time.perf_counter() - t0)
        if answer.has_plan:
            self._plans.inc()
        return answer

    def close(self) -> None:
        with self._lock:
            sessions, self._sessions = list(self._sessions.values()), {}
        with self._shared_lock:
            if self._shared is not None:
                sessions.append(self._shared)
                self._shared = None
        for s in sessions:
            self._close(s)

    def _close(self, session: PrefetchSession) -> None:
        with session.lock:
            session.close()

    # -- gRPC ----------------------------------------------------------------------------------------------

    def GetInfo(self, request, context) -> orchestrator_pb2.OrchestratorInfo:
        try:
            session = PrefetchSession(request, self.options)
        except convert.MessageError as e:
            self._refuse(context, e)
        try:
            mismatch = session.predictor_mismatch()
            info = session.info()
        finally:
            session.close()
        if mismatch is not None:
            self._refuse(context, mismatch)
        info.plans_port = self.plans_port
        if self.plans_port:
            worker = dict(context.invocation_metadata()).get(WORKER_KEY) or f"zmq-{context.peer()}"
            info.plans_ticket = self.tickets.issue(worker)
            info.plans_curve_key = self.plans_curve_key
        return info

    def Plans(self, request_iterator, context):
        peer = _Peer(dict(context.invocation_metadata()).get(WORKER_KEY, f"grpc-{context.peer()}"))
        try:
            for event in request_iterator:
                try:
                    answer = self.handle(peer, event)
                except convert.MessageError as e:
                    self._refuse(context, e)
                if answer is not None:
                    yield answer
        finally:
            self.close_session(peer)

    def BeginStep(self, request, context) -> orchestrator_pb2.PlanMessage:
        return self._unary(orchestrator_pb2.PrefetchEvent(begin_step=request), context)

    def AfterLayer(self, request, context) -> orchestrator_pb2.PlanMessage:
        return self._unary(orchestrator_pb2.PrefetchEvent(after_layer=request), context)

    def Finish(self, request, context) -> common_pb2.FinishResponse:
        with self._shared_lock:
            session = self._shared
        if session is not None:
            with session.lock:
                session.finish(request.request_ids)
        return common_pb2.FinishResponse()

    def Schedule(self, request, context) -> orchestrator_pb2.ScheduleResponse:
        try:
            choose = SCHEDULERS.get(request.scheduler)
            if choose is None:
                raise convert.MessageError(f"unknown scheduler {request.scheduler!r}: expertflow or fifo")
            if request.batch < 1:
                raise convert.MessageError("schedule: batch must be at least 1")
            ids = [w.request_id for w in request.queue]
            convert.requests_from_proto(common_pb2.RequestTokens(request_id=rid) for rid in ids)  # unique ids
        except convert.MessageError as e:
            self._refuse(context, e)
        worker = dict(context.invocation_metadata()).get(WORKER_KEY)
        with self._lock:
            session = self._sessions.get(worker) if worker is not None else None
        if session is None:
            with self._shared_lock:
                session = self._shared
        shape = session.shape if session is not None else (1, 1)
        probs = []
        for rid in ids:
            p = None
            if session is not None:
                with session.lock:
                    p = session.route_estimate(rid)
            probs.append(np.zeros(shape, np.float32) if p is None else p)  # unknown: no preference
        queue = [Request(i, w.waited, p) for i, (w, p) in enumerate(zip(request.queue, probs))]
        chosen = choose(queue, SchedulerConfig(batch=request.batch, max_wait=request.max_wait))
        return orchestrator_pb2.ScheduleResponse(request_ids=[ids[i] for i in chosen])

    def _unary(self, event: orchestrator_pb2.PrefetchEvent, context) -> orchestrator_pb2.PlanMessage:
        kind = event.WhichOneof("event")
        try:
            shape = convert.view_shape(getattr(event, kind).view)
            with self._shared_lock:
                if self._shared is None:
                    # top_k sizes only the policies that need training traces, which this service cannot build
                    setup = orchestrator_pb2.PrefetchSetup(moe_layers=shape[0], experts=shape[1], top_k=1)
                    self._shared = PrefetchSession(setup, self.options)
                session = self._shared
            return self.plan_event(session, event)
        except convert.MessageError as e:
            self._refuse(context, e)

    def _refuse(self, context: grpc.ServicerContext, error: Exception | str) -> NoReturn:
        self._invalid.inc()
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


class PlansEndpoint:
    """The Plans exchange over ZMQ: a ROUTER on `host` (port 0: any free one, `port` says which) that hands each
    ticketed peer's events to the servicer in order and sends back the answers (the module says who is let in).
    One thread serves every peer in turn; the session of a peer silent for `idle_s` is closed (a worker that died
    without its closing empty frame), and opened again should it speak. `curve`: encrypt (ZMQ CURVE), for an
    orchestrator that uses TLS."""

    def __init__(
        self,
        servicer: OrchestratorServicer,
        host: str = "127.0.0.1",
        port: int = 0,
        idle_s: float = 600.0,
        curve: bool = False,
    ):
        self.servicer = servicer
        self.idle_s = idle_s
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a worker that reconnects under its ticket takes its place
        self.curve_key = ""
        if curve:  # a key pair per process: workers learn the public half from GetInfo
            public, secret = zmq.curve_keypair()
            self._sock.curve_secretkey, self._sock.curve_publickey = secret, public
            self._sock.curve_server = True
            self.curve_key = public.decode()
        # ZMQ binds interfaces by address, not by host name
        bind_host = {"": "*", "0.0.0.0": "*", "[::]": "*", "::": "*", "localhost": "127.0.0.1"}.get(host, host)
        if bind_host.startswith("["):
            self._sock.setsockopt(zmq.IPV6, 1)
        try:
            if port:
                self._sock.bind(f"tcp://{bind_host}:{port}")
                self.port = port
            else:
                self.port = self._sock.bind_to_random_port(f"tcp://{bind_host}")
        except zmq.ZMQError as e:
            self._sock.close()
            self._ctx.term()
            raise OSError(f"orchestrator: cannot listen for plans on {bind_host}:{port} ({e})") from None
        self._peers: dict[bytes, _Peer] = {}  # by routing id: redeemed tickets
        self._refused_logged_at = -60.0
        self._refused = Counter(
            "expertflow_orchestrator_refused_messages",
            "ZMQ messages from peers without a ticket from GetInfo, ignored",
            registry=servicer.registry,
        )
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="orchestrator-plans", daemon=True)

    def start(self) -> PlansEndpoint:
        self.servicer.plans_curve_key = self.curve_key
        self.servicer.plans_port = self.port
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()  # its last act closes the socket
        elif not self._sock.closed:  # never started
            self._sock.close()
            self._ctx.term()

    def _run(self) -> None:
        swept = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._sock.poll(200):  # ms: how soon stop() is noticed
                    while not self._stop.is_set():
                        try:
                            ident, payload = self._sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        except ValueError:  # not two frames: not one of our DEALERs
                            continue
                        self._receive(ident, payload)
                now = time.monotonic()
                if now - swept > min(self.idle_s, 10.0):
                    swept = now
                    # the peer stays: its ticket was spent, and a worker idle this long may yet speak again
                    for peer in [p for p in self._peers.values() if p.session and now - p.session.seen > self.idle_s]:
                        self.servicer.close_session(peer)
        finally:
            for peer in self._peers.values():
                self.servicer.close_session(peer)
            self._sock.close()
            self._ctx.term()

    def _receive(self, ident: bytes, payload: bytes) -> None:
        peer = self._peers.get(ident)
        if peer is None:
            worker = self.servicer.tickets.redeem(ident.decode(errors="replace"))
            if worker is None:
                self._refuse()
                return
            peer = self._peers[ident] = _Peer(worker)
        if not payload:  # the worker closed: its ticket is spent
            self.servicer.close_session(self._peers.pop(ident))
            return
        try:
            event = orchestrator_pb2.PrefetchEvent.FromString(payload)
        except DecodeError as e:
            self._complain(peer, f"not a PrefetchEvent: {e}")
            return
        kind = event.WhichOneof("event")
        answer = None
        try:
            if kind == "setup" or peer.refused is None:  # a refused setup: no plans until a valid one
                answer = self.servicer.handle(peer, event)
                if kind == "setup":
                    peer.refused = None
        except convert.MessageError as e:
            if kind == "setup":
                peer.refused = str(e)
            self._complain(peer, str(e))
        except Exception:  # a prefetcher's bug: logged; the worker goes on without this plan
            self.servicer.log.exception("planning failed", extra={"worker": peer.worker, "event": kind})
        if answer is None and kind in ("begin_step", "after_layer"):
            answer = orchestrator_pb2.PlanMessage()  # every such event is answered: the worker counts them
        if answer is not None:
            self._sock.send_multipart([ident, answer.SerializeToString()])

    def _refuse(self) -> None:
        self._refused.inc()
        now = time.monotonic()
        if now - self._refused_logged_at >= 60.0:  # a flood is logged once a minute, counted always
            self._refused_logged_at = now
            self.servicer.log.warning("ignored messages on the plans port from a peer without a ticket from GetInfo")

    def _complain(self, peer: _Peer, why: str) -> None:
        self.servicer._invalid.inc()
        if peer.complaint != why:  # once per reason, not once per event
            peer.complaint = why
            self.servicer.log.warning("refused a worker's event", extra={"worker": peer.worker, "why": why})


def serve(
    servicer: OrchestratorServicer,
    endpoint: PlansEndpoint,
    listen: str,
    log: logging.Logger,
    security: Security | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT."""
    server = make_server(servicer, listen, security)
    endpoint.start()
    log.info("plans over zmq", extra={"port": endpoint.port, "curve": bool(endpoint.curve_key)})

    def stop() -> None:
        endpoint.stop()
        servicer.close()

    run_until_stopped(server, log, on_stop=stop)


def make_server(servicer: OrchestratorServicer, listen: str, security: Security | None = None) -> GrpcServer:
    add = orchestrator_pb2_grpc.add_OrchestratorServicer_to_server
    return GrpcServer("orchestrator", listen, [(add, servicer)], [SERVICE_NAME], security=security)
