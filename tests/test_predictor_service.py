"""The predictor service over real gRPC on loopback: a remote session predictor predicts exactly what the local one
does, keeps each client's sessions apart, and when the service is slow or gone predicts nothing, logs once and
comes back by itself."""

from __future__ import annotations

import logging
import socket
import time

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from expertflow.default_model import default_model_dir
from expertflow.services.predictor_client import RemoteSessions
from expertflow.services.predictor_server import PredictorServicer, learned_factory, make_server
from expertflow.v1 import common_pb2, predictor_pb2, predictor_pb2_grpc
from predictor.locate import PREDICTOR_DIRNAME


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def factory():
    """LearnedSessions of the embedded model's shipped predictor (4 MoE layers x 8 experts, top-2)."""
    return learned_factory(default_model_dir() / PREDICTOR_DIRNAME)


def _serve(servicer: PredictorServicer, port: int = 0):
    return make_server(servicer, f"127.0.0.1:{port}").start()


def _routes(rng, tokens: int) -> np.ndarray:
    return np.sort(np.stack([rng.choice(8, 2, replace=False) for _ in range(tokens)]), -1)


def test_remote_sessions_predict_exactly_what_the_local_ones_do(factory):
    registry = CollectorRegistry()
    servicer = PredictorServicer(factory, registry)
    server = _serve(servicer)
    remote, other = RemoteSessions(server.address, 4, 8, timeout_ms=5000), RemoteSessions(server.address, 4, 8)
    local = factory()
    rng = np.random.default_rng(0)
    tokens = {"a": [5, 60, 700], "b": [81]}
    try:
        for step in range(4):
            other.step({"a": [3 + step]})  # the same request id from another client: a session of its own
            got, want = remote.step(tokens), local.step(tokens)
            assert got.keys() == want.keys() == ({"a", "b"} if step else {"b"})
            assert all(np.array_equal(got[r], want[r]) and got[r].dtype == np.float32 for r in want)
            for layer in range(4):
                routes = {rid: _routes(rng, len(t)) for rid, t in tokens.items()}
                spec = {"a": rng.choice(8, 2, replace=False)} if step else None
                other.layer(layer, {"a": _routes(rng, 1)})
                got, want = remote.layer(layer, routes, spec), local.layer(layer, routes, spec)
                assert got.keys() == want.keys() and all(np.array_equal(got[r], want[r]) for r in want)
                # the layer head refines the next layer of one-token requests (not a prompt's)
                assert want.keys() == ({rid for rid, t in tokens.items() if len(t) == 1} if layer < 3 else set())
            tokens = {rid: [int(rng.integers(3, 4000))] for rid in tokens}
        assert servicer.live_requests == 3 and remote.label == "remote learned+online"
        remote.finish(["a"])
        assert servicer.live_requests == 2
        assert registry.get_sample_value("expertflow_predictor_calls_total", {"method": "step", "code": "OK"}) == 8
        assert registry.get_sample_value("expertflow_predictor_live_requests") == 2
        assert registry.get_sample_value("expertflow_predictor_call_seconds_count", {"method": "layer"}) == 32
    finally:
        remote.close()
        other.close()
        server.stop(0)
    assert remote.failures == other.failures == 0


def test_remote_sessions_predict_nothing_while_the_service_is_gone_and_recover(factory, caplog):
    port = free_port()
    server = _serve(PredictorServicer(factory), port)
    remote = RemoteSessions(f"127.0.0.1:{port}", 4, 8, timeout_ms=300, retry_s=0.3)
    caplog.set_level(logging.INFO, logger="expertflow.predictor-client")
    try:
        assert remote.step({"a": [5, 6]}) == {} and remote.step({"a": [7]}).keys() == {"a"}
        server.stop(0)
        t0 = time.perf_counter()
        assert remote.step({"a": [8]}) == {}  # gone: no prediction, no exception
        assert remote.layer(0, {"a": np.array([[1, 2]])}) == {}  # within retry_s: not even asked
        assert time.perf_counter() - t0 < 0.5
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "without predictions" in warnings[0].getMessage()
        server = _serve(PredictorServicer(factory), port)  # restarted: it knows no request
        time.sleep(0.35)
        assert remote.layer(0, {"a": np.array([[1, 2]])}) == {}  # routes of a request it never saw: left out
        assert remote.step({"a": [9]}).keys() == {"a"}  # ... which starts afresh at its next step
        assert any("answers again" in r.getMessage() for r in caplog.records)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    finally:
        remote.close()
        server.stop(0)


def test_a_slow_predictor_costs_a_deadline_per_call_then_nothing(factory):
    class Slow(PredictorServicer):
        def Step(self, request, context):
            time.sleep(0.5)
            return super().Step(request, context)

    server = _serve(Slow(factory))
    remote = RemoteSessions(server.address, 4, 8, timeout_ms=50, retry_s=10, max_slow_calls=2)
    try:
        t0 = time.perf_counter()
        assert remote.step({"a": [5]}) == {} and remote.failures == 1  # late: that call predicts nothing ...
        assert remote.layer(0, {"b": np.array([[1, 2]])}) == {} and remote.failures == 1  # ... the next is asked
        assert remote.step({"a": [6]}) == {} and remote.step({"a": [7]}) == {} and remote.failures == 3
        assert time.perf_counter() - t0 < 0.5  # each late call cost its deadline, not the service's 0.5 s
        t0 = time.perf_counter()
        assert remote.step({"a": [8]}) == {} and remote.failures == 3  # late twice in a row: it stops asking
        assert time.perf_counter() - t0 < 0.01
    finally:
        remote.close()
        server.stop(0)


def test_a_predictor_for_another_model_predicts_nothing(factory, caplog):
    server = _serve(PredictorServicer(factory))
    remote = RemoteSessions(server.address, 26, 64)
    try:
        assert remote.step({"a": [5]}) == {} and remote.check() is None
        assert "predicts 4 MoE layers x 8 experts, the model has 26 x 64" in remote.mismatch
        assert [r.levelno for r in caplog.records if r.name == "expertflow.predictor-client"] == [logging.ERROR]
    finally:
        remote.close()
        server.stop(0)


def test_malformed_predictor_calls_get_invalid_argument(factory):
    server = _serve(PredictorServicer(factory))
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = predictor_pb2_grpc.PredictorStub(channel)
            assert stub.GetInfo(predictor_pb2.PredictorInfoRequest()).moe_layers == 4
            bad = {
                "the model has 4 MoE layers": predictor_pb2.PredictLayerRequest(
                    layer=4, routes=[common_pb2.RequestRoutes(request_id="a", experts=[1, 2], top_k=2)]
                ),
                "expert 8 is outside the model's 8 experts": predictor_pb2.PredictLayerRequest(
                    layer=0, routes=[common_pb2.RequestRoutes(request_id="a", experts=[1, 8], top_k=2)]
                ),
                "do not make rows of top_k 0": predictor_pb2.PredictLayerRequest(
                    layer=0, routes=[common_pb2.RequestRoutes(request_id="a", experts=[1, 2])]
                ),
            }
            for message, request in bad.items():
                with pytest.raises(grpc.RpcError) as e:
                    stub.Layer(request)
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and message in e.value.details()
            twice = [common_pb2.RequestTokens(request_id="a", tokens=[1])] * 2
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(predictor_pb2.PredictStepRequest(requests=twice))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "'a' appears twice" in e.value.details()
    finally:
        server.stop(0)
