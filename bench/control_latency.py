"""Round-trip latency of one prefetch event between a worker and the orchestrator, per transport, on loopback.

    python -m bench.control_latency [--rounds 2000] [--out FILE]

The event is what the engine sends after a MoE layer: an AfterLayer with the cache's view and the routes (and
gate speculation) of 8 decoding requests, for a 4 x 8 model (the embedded default's shape, top-2) and a 26 x 64
one (DeepSeek-V2-Lite's, top-6). The answer is a PlanMessage with a 4-transfer plan and the [L, E] next-use
ranking, as ExpertFlow sends. The server, in another process, parses each event and answers the same prepared
reply, so what is measured is the transport: serialisation of the messages, the stack, the thread hops.

    grpc-stream   the Plans bidi stream, events from a queue-fed request iterator (how RemotePrefetcher sends)
    grpc-unary    one AfterLayer call per event
    zmq           DEALER -> ROUTER carrying the same protobuf bytes

Also timed, in this process: turning the contracts into the message (encode: view + routes, serialised) and
back (decode: parsed + validated), which any transport pays on top.

Not for: planning cost (the orchestrator's own work per event) or correctness (tests/test_orchestrator_service.py).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import queue
import statistics
import time
from pathlib import Path

import numpy as np

from bench import emit
from expert_store.keys import ExpertKey
from expert_store.plan import CacheView, InFlight, Plan, Transfer
from expertflow.services import convert
from expertflow.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.prefetcher import LayerRoutes

SHAPES = {"4x8": (4, 8, 2), "26x64": (26, 64, 6)}  # (L, E, K)
REQUESTS = 8


def typical_event(n_layers: int, n_experts: int, top_k: int, seed: int = 0) -> tuple[CacheView, LayerRoutes]:
    """The view and routes after MoE layer 1 of a decode step of REQUESTS requests, a quarter of the keys resident."""
    rng = np.random.default_rng(seed)
    resident = np.zeros((n_layers, n_experts), bool)
    resident.flat[rng.choice(resident.size, resident.size // 4, replace=False)] = True
    free = np.flatnonzero(~resident.ravel())[: 2 * top_k]
    in_flight = tuple(
        InFlight(ExpertKey(*divmod(int(i), n_experts)), 10.0 + 0.5 * n, n < top_k) for n, i in enumerate(free)
    )
    routes = {f"req-{r}": np.sort(rng.choice(n_experts, (1, top_k), replace=False), -1) for r in range(REQUESTS)}
    spec = {f"req-{r}": rng.choice(n_experts, top_k, replace=False) for r in range(REQUESTS)}
    view = CacheView(
        now_ms=1234.5,
        n_slots=resident.size // 4 + len(free),
        resident=resident,
        in_flight=in_flight,
        pinned=frozenset(f.key for f in in_flight[:top_k]),
        layer_ms=(0.8,) * n_layers,
        transfer_ms=0.3,
        link_busy=0.4,
    )
    return view, LayerRoutes(1, routes, spec)


def typical_reply(n_layers: int, n_experts: int) -> orchestrator_pb2.PlanMessage:
    rng = np.random.default_rng(1)
    fetch = tuple(Transfer(ExpertKey(2, e), 12.0, 11.0 + e, 0.75) for e in range(4))
    plan = convert.plan_to_proto(Plan(fetch=fetch), rng.random((n_layers, n_experts)) * 100)
    return orchestrator_pb2.PlanMessage(step=1, layer=1, has_plan=True, plan=plan)


def event_message(view: CacheView, routed: LayerRoutes) -> orchestrator_pb2.AfterLayerRequest:
    return orchestrator_pb2.AfterLayerRequest(
        step=1, layer=routed.layer, routes=convert.routes_to_proto(routed), view=convert.view_to_proto(view)
    )


# -- servers (each in its own process) ----------------------------------------------------------------


class _EchoServicer(orchestrator_pb2_grpc.OrchestratorServicer):
    def __init__(self, reply: orchestrator_pb2.PlanMessage) -> None:
        self.reply = reply

    def Plans(self, request_iterator, context):
        for event in request_iterator:
            event.after_layer.view.resident  # noqa: B018 - parsed already; touch it as a servicer would
            yield self.reply

    def AfterLayer(self, request, context):
        return self.reply


def _serve_grpc(port: int, shape: str, ready) -> None:
    from expertflow.services.common import GrpcServer

    reply = typical_reply(*SHAPES[shape][:2])
    server = GrpcServer(
        "bench",
        f"127.0.0.1:{port}",
        [(orchestrator_pb2_grpc.add_OrchestratorServicer_to_server, _EchoServicer(reply))],
        ["expertflow.v1.Orchestrator"],
    ).start()
    ready.set()
    server.server.wait_for_termination()


def _serve_zmq(port: int, shape: str, ready) -> None:
    import zmq

    reply = typical_reply(*SHAPES[shape][:2]).SerializeToString()
    with zmq.Context() as ctx, ctx.socket(zmq.ROUTER) as sock:
        sock.bind(f"tcp://127.0.0.1:{port}")
        ready.set()
        while True:
            peer, payload = sock.recv_multipart()
            orchestrator_pb2.PrefetchEvent.FromString(payload)
            sock.send_multipart([peer, reply])


# -- clients ------------------------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _summary(seconds: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in seconds)
    return {
        "p50_us": round(statistics.median(us), 1),
        "p90_us": round(us[int(0.9 * (len(us) - 1))], 1),
        "p99_us": round(us[int(0.99 * (len(us) - 1))], 1),
        "mean_us": round(statistics.fmean(us), 1),
    }


def _time(call, rounds: int, cpu: dict[str, float] | None = None) -> list[float]:
    """Wall seconds of each of `rounds` calls; `cpu["us"]`: this process's CPU time per call (all its threads:
    what a transport costs the worker, whose engine thread shares the GIL with them)."""
    for _ in range(max(20, rounds // 10)):  # warm up: connections, allocators
        call()
    out = []
    c0 = time.process_time()
    for _ in range(rounds):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    if cpu is not None:
        cpu["us"] = round((time.process_time() - c0) / rounds * 1e6, 1)
    return out


def _grpc_clients(port: int, event: orchestrator_pb2.AfterLayerRequest, rounds: int) -> dict[str, dict]:
    import grpc

    from expertflow.services.common import wait_for_server

    address = f"127.0.0.1:{port}"
    wait_for_server(address, 10.0)
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        unary_cpu: dict[str, float] = {}
        unary = _summary(_time(lambda: stub.AfterLayer(event), rounds, unary_cpu)) | {"worker_cpu_us": unary_cpu["us"]}
        outgoing: queue.SimpleQueue = queue.SimpleQueue()

        def requests():
            while (item := outgoing.get()) is not None:
                yield item

        responses = stub.Plans(requests())
        wrapped = orchestrator_pb2.PrefetchEvent(after_layer=event)

        def round_trip() -> None:
            outgoing.put(wrapped)
            next(responses)

        stream_cpu: dict[str, float] = {}
        stream = _summary(_time(round_trip, rounds, stream_cpu)) | {"worker_cpu_us": stream_cpu["us"]}
        outgoing.put(None)
        responses.cancel()
    return {"grpc-stream": stream, "grpc-unary": unary}


def _zmq_client(port: int, event: orchestrator_pb2.AfterLayerRequest, rounds: int) -> dict:
    import zmq

    payload = orchestrator_pb2.PrefetchEvent(after_layer=event)
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.connect(f"tcp://127.0.0.1:{port}")

        def round_trip() -> None:
            # serialised here, as the worker must, and the reply parsed: the same work as the gRPC stubs do
            sock.send(payload.SerializeToString())
            orchestrator_pb2.PlanMessage.FromString(sock.recv())

        cpu: dict[str, float] = {}
        return _summary(_time(round_trip, rounds, cpu)) | {"worker_cpu_us": cpu["us"]}


def _run_server(target, shape: str) -> tuple[multiprocessing.process.BaseProcess, int]:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    port = _free_port()
    proc = ctx.Process(target=target, args=(port, shape, ready), daemon=True)
    proc.start()
    if not ready.wait(60):
        raise RuntimeError(f"{target.__name__} did not start")
    return proc, port


def measure(shape: str, rounds: int) -> dict:
    n_layers, n_experts, top_k = SHAPES[shape]
    view, routed = typical_event(n_layers, n_experts, top_k)
    event = event_message(view, routed)
    reply = typical_reply(n_layers, n_experts)
    out: dict = {
        "event_bytes": orchestrator_pb2.PrefetchEvent(after_layer=event).ByteSize(),
        "reply_bytes": reply.ByteSize(),
    }
    payload = orchestrator_pb2.PrefetchEvent(after_layer=event).SerializeToString()
    out["encode"] = _summary(_time(lambda: event_message(view, routed).SerializeToString(), rounds))

    def decode() -> None:
        msg = orchestrator_pb2.PrefetchEvent.FromString(payload).after_layer
        convert.view_from_proto(msg.view, (n_layers, n_experts))
        convert.routes_from_proto(msg.layer, msg.routes, (n_layers, n_experts))

    out["decode"] = _summary(_time(decode, rounds))
    out["decode_reply"] = _summary(
        _time(lambda: convert.plan_from_proto(reply.plan, (n_layers, n_experts)), rounds)
    )
    proc, port = _run_server(_serve_grpc, shape)
    try:
        out.update(_grpc_clients(port, event, rounds))
    finally:
        proc.terminate()
        proc.join()
    proc, port = _run_server(_serve_zmq, shape)
    try:
        out["zmq"] = _zmq_client(port, event, rounds)
    finally:
        proc.terminate()
        proc.join()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.control_latency", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2000, help="round trips per transport and shape")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    import grpc
    import zmq

    result = {
        "benchmark": "control_latency",
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1min": round(os.getloadavg()[0], 2),  # a shared machine: how busy it was when run
        },
        "versions": {"grpcio": grpc.__version__, "pyzmq": zmq.__version__},
        "requests": REQUESTS,
        "rounds": args.rounds,
        "shapes": {shape: measure(shape, args.rounds) for shape in SHAPES},
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
