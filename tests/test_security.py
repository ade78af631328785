"""[security] on every service: the token (UNAUTHENTICATED / HTTP 401 without it), TLS with server and optional
client certificates, loopback by default, shared memory 0600, NOT_FOUND for experts a store does not hold, and
bad config refused clearly. Real gRPC, real ZMQ, real processes; certificates made by openssl in a temp dir."""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
import zmq
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from bench.security_cost import make_pki
from expert_store.keys import ExpertKey, ExpertSpace
from expertflow.cli import main
from expertflow.services.client import InferenceClient, InferenceError
from expertflow.services.common import GrpcServer, wait_for_server
from expertflow.services.config import SecurityConfig, ServicesConfig
from expertflow.services.healthcheck import main as healthcheck
from expertflow.services.orchestrator_client import RemotePrefetcher
from expertflow.services.orchestrator_server import OrchestratorOptions, OrchestratorServicer, PlansEndpoint
from expertflow.services.orchestrator_server import make_server as make_orchestrator_server
from expertflow.services.predictor_server import PredictorServicer
from expertflow.services.predictor_server import make_server as make_predictor_server
from expertflow.services.security import Security, SecurityError, open_channel
from expertflow.services.store_client import RemoteExpertStore
from expertflow.services.store_server import SERVICE_NAME, ExpertStoreServicer, ServedModel
from expertflow.v1 import expert_store_pb2 as pb
from expertflow.v1 import expert_store_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc, predictor_pb2
from expertflow.v1 import predictor_pb2_grpc
from orchestrator.prefetcher import StepRequest
from test_orchestrator_service import FixedRoutes, _by_group, _view
from test_serve import stack_config

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "0123456789abcdef0123456789abcdef"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.pem signs server.pem (SAN 127.0.0.1, localhost) and client.pem; other-ca.pem signs other-client.pem."""
    return make_pki(tmp_path_factory.mktemp("pki"), TOKEN)


def _security(pki: Path, **keys) -> Security:
    """Keys of [security]; a file name is taken inside `pki`."""
    files = {k: v if k in ("token", "require_client_cert") else str(pki / v) for k, v in keys.items()}
    return Security.load(SecurityConfig(**files))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


@pytest.fixture(scope="module")
def store_model(tiny_models):
    directory = tiny_models["mixtral"][0]
    served = ServedModel.open(directory, "100%", torch.float32)
    store = served.load()
    yield served, store
    store.close()


def _store_server(store_model, security: Security) -> GrpcServer:
    served, store = store_model
    svc = ExpertStoreServicer(served, store, CollectorRegistry())
    add = expert_store_pb2_grpc.add_ExpertStoreServicer_to_server
    return GrpcServer("expert-store", "127.0.0.1:0", [(add, svc)], [SERVICE_NAME], security=security).start()


# -- loopback by default ----------------------------------------------------------------------------------------
def test_every_service_binds_loopback_unless_configured(tmp_path):
    config = ServicesConfig()
    listens = [config.worker.listen, config.expert_store.listen, config.predictor.listen,
               config.orchestrator.listen, config.api.listen, f"{config.metrics.host}:1"]  # fmt: skip
    assert all(a.startswith("127.0.0.1:") for a in listens), listens
    # an exposed address with neither TLS nor a token is refused before anything listens ...
    with pytest.raises(SecurityError, match="not a loopback address, and \\[security\\] sets neither TLS nor a token"):
        GrpcServer("expert-store", "0.0.0.0:0", [], [])
    Security(token=TOKEN).check_listen("0.0.0.0:1", "x")  # ... a token (or TLS) makes it a choice
    Security().check_listen("localhost:1", "x")
    # compose's config says so explicitly: its network is private, its published ports bind 127.0.0.1
    compose = ServicesConfig.load(ROOT / "docker" / "expertflow.toml")
    assert compose.worker.listen.startswith("0.0.0.0:") and compose.security.allow_insecure
    Security.load(compose.security).check_listen(compose.worker.listen, "[worker] listen")
    # and a lone container's command line says so with --allow-insecure, on every server command
    import argparse

    from expertflow.services.cli import add_subcommands

    parser = argparse.ArgumentParser()
    add_subcommands(parser.add_subparsers(dest="command"))
    for command in ("worker", "api", "expert-store", "predictor", "orchestrator", "serve"):
        extra = ["--model", "m"] if command == "expert-store" else []
        plain = ServicesConfig.from_args(parser.parse_args([command, *extra]))
        allowed = ServicesConfig.from_args(parser.parse_args([command, *extra, "--allow-insecure"]))
        assert not plain.security.allow_insecure and allowed.security.allow_insecure, command
        Security.load(allowed.security).check_listen("0.0.0.0:1", command)


# -- the token ---------------------------------------------------------------------------------------------------
def test_the_token_guards_the_store_predictor_and_orchestrator_but_not_health(store_model):
    guarded = Security(token=TOKEN)
    wrong = Security(token="f" * 32)
    registry = CollectorRegistry()
    store = _store_server(store_model, guarded)
    predictor = make_predictor_server(PredictorServicer(lambda: FixedRoutes(4, 8, _by_group)), "127.0.0.1:0", guarded)
    predictor.start()
    # the orchestrator calls the predictor with the token too
    options = OrchestratorOptions(policy="expertflow", predictor_address=predictor.address, security=guarded)
    servicer = OrchestratorServicer(options, registry)
    orchestrator = make_orchestrator_server(servicer, "127.0.0.1:0", guarded).start()
    endpoint = PlansEndpoint(servicer).start()
    calls = {
        store.address: lambda ch: expert_store_pb2_grpc.ExpertStoreStub(ch).GetLayout(pb.LayoutRequest(), timeout=5),
        predictor.address: lambda ch: predictor_pb2_grpc.PredictorStub(ch).GetInfo(
            predictor_pb2.PredictorInfoRequest(), timeout=5),
        orchestrator.address: lambda ch: orchestrator_pb2_grpc.OrchestratorStub(ch).GetInfo(
            orchestrator_pb2.PrefetchSetup(moe_layers=4, experts=8, top_k=2), timeout=5),
    }  # fmt: skip
    try:
        for address, call in calls.items():
            for security, why in ((None, "requires a token"), (wrong, "does not match")):
                with open_channel(address, security) as channel:
                    with pytest.raises(grpc.RpcError) as e:
                        call(channel)
                    assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED and why in e.value.details(), address
                    # the standard health service is exempt: probes (Docker's, Kubernetes') send no metadata
                    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    assert health.status == health_pb2.HealthCheckResponse.SERVING
            with open_channel(address, guarded) as channel:
                call(channel)  # answered
            assert healthcheck([address]) == 0
        # a store client without the token fails at construction, saying why
        with pytest.raises(ConnectionError, match="UNAUTHENTICATED"):
            RemoteExpertStore(store.address, timeout_s=5)
        RemoteExpertStore(store.address, timeout_s=5, security=guarded).close()

        # the ZMQ plans port: only a connection with a ticket from the (token-guarded) GetInfo is heard
        space = ExpertSpace.of(range(4), 8, 2)
        with pytest.raises(ValueError, match="requires a token"):
            RemotePrefetcher(orchestrator.address, space)
        with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as intruder:
            intruder.setsockopt(zmq.IDENTITY, b"a-guessed-ticket")
            intruder.setsockopt(zmq.LINGER, 0)
            intruder.connect(f"tcp://127.0.0.1:{servicer.plans_port}")
            setup = orchestrator_pb2.PrefetchSetup(moe_layers=4, experts=8, top_k=2)
            intruder.send(orchestrator_pb2.PrefetchEvent(setup=setup).SerializeToString())
            refused = "expertflow_orchestrator_refused_messages_total"
            for _ in range(200):
                if registry.get_sample_value(refused):
                    break
                time.sleep(0.05)
            assert registry.get_sample_value(refused) == 1
            prefetcher = RemotePrefetcher(orchestrator.address, space, wait_ms=5000, security=guarded)
            try:  # the ticketed worker's events are answered
                prefetcher.begin_step([StepRequest("a0", (5,))], _view())
                for _ in range(200):
                    if prefetcher.stats.answers:
                        break
                    time.sleep(0.05)
                assert prefetcher.stats.answers >= 1
            finally:
                prefetcher.close()
            assert intruder.poll(0) == 0  # the intruder never got an answer
    finally:
        endpoint.stop()
        for server in (store, predictor, orchestrator):
            server.stop(0)
        servicer.close()


# -- TLS ---------------------------------------------------------------------------------------------------------
def test_tls_with_and_without_client_certificates_on_the_store(store_model, pki):
    tls = dict(tls_cert="server.pem", tls_key="server.key", tls_ca="ca.pem")
    client = _security(pki, tls_ca="ca.pem", token_file="token")
    server = _store_server(store_model, _security(pki, token_file="token", **tls))
    try:
        remote = RemoteExpertStore(server.address, timeout_s=5, security=client, host_id="elsewhere")
        try:  # fetched over TLS, as a client on another host does: bytes equal the store's
            key = remote.keys()[0]
            out = torch.zeros(remote.layout.padded_numel)
            remote.stage(key, out).wait()
            assert torch.equal(out.view(torch.uint8)[: remote.layout.nbytes],
                               store_model[1].host_view(key).view(torch.uint8)[: remote.layout.nbytes])  # fmt: skip
        finally:
            remote.close()
        for refused in (
            Security(token=TOKEN),  # plaintext to a TLS server
            _security(pki, tls_ca="other-ca.pem", token="x" * 16),  # trusts another CA
        ):
            with open_channel(server.address, refused) as channel:
                stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
                assert _code(lambda: stub.GetLayout(pb.LayoutRequest(), timeout=3)) is grpc.StatusCode.UNAVAILABLE
            # the client waits for a store still starting, then gives up saying so
            with pytest.raises(ConnectionError, match="GetLayout failed: (DEADLINE_EXCEEDED|UNAVAILABLE)"):
                RemoteExpertStore(server.address, timeout_s=1, security=refused)
    finally:
        server.stop(0)

    mutual = _security(pki, token_file="token", require_client_cert=True, **tls)
    server = _store_server(store_model, mutual)
    layout = lambda security: lambda: expert_store_pb2_grpc.ExpertStoreStub(  # noqa: E731
        open_channel(server.address, security)).GetLayout(pb.LayoutRequest(), timeout=3)  # fmt: skip
    try:
        layout(_security(pki, tls_ca="ca.pem", client_cert="client.pem", client_key="client.key", token=TOKEN))()
        assert _code(layout(client)) is grpc.StatusCode.UNAVAILABLE  # no client certificate
        other = _security(pki, tls_ca="ca.pem", client_cert="other-client.pem", client_key="other-client.key")
        assert _code(layout(replace(other, token=TOKEN))) is grpc.StatusCode.UNAVAILABLE  # signed by another CA
        # a client with the right certificate but no token is still refused
        right_cert = _security(pki, tls_ca="ca.pem", client_cert="client.pem", client_key="client.key")
        assert _code(layout(right_cert)) is grpc.StatusCode.UNAUTHENTICATED
    finally:
        server.stop(0)


# -- what a store hands out --------------------------------------------------------------------------------------
def test_shared_memory_is_0600_and_unheld_experts_are_not_found(store_model):
    server = _store_server(store_model, Security())
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
            segments = stub.Attach(pb.AttachRequest(), timeout=5).segments
            assert segments
            for segment in segments:
                assert os.stat(f"/dev/shm/{segment.name.lstrip('/')}").st_mode & 0o777 == 0o600
            # keys past the model's layers or experts, and at the edges of uint32: NOT_FOUND, no bytes at all
            for layer, expert in ((3, 0), (0, 8), (2**32 - 1, 0), (0, 2**32 - 1)):
                replies = stub.Fetch(pb.FetchRequest(key={"layer": layer, "expert": expert}), timeout=5)
                got = []
                with pytest.raises(grpc.RpcError) as e:
                    got.extend(replies)
                assert e.value.code() is grpc.StatusCode.NOT_FOUND and not got, (layer, expert)
            # a held expert's stream is exactly its own bytes: total and offsets within its buffer
            chunks = list(stub.Fetch(pb.FetchRequest(key={"layer": 2, "expert": 7}), timeout=5))
            total = store_model[1].layout.slot_nbytes
            assert {c.total for c in chunks} == {total} and sum(len(c.data) for c in chunks) == total
            # a range: only bytes of that expert's buffer; one reaching past its end (or wrapping uint64) gets none
            tail = list(stub.Fetch(pb.FetchRequest(key={"layer": 2, "expert": 7}, offset=total - 100), timeout=5))
            own = store_model[1].host_view(ExpertKey(2, 7)).view(torch.uint8)[total - 100 : total]
            assert b"".join(c.data for c in tail) == own.numpy().tobytes()
            for offset, length in ((total, 0), (total - 100, 101), (8, 2**64 - 8)):
                request = pb.FetchRequest(key={"layer": 2, "expert": 7}, offset=offset, length=length)
                got = []
                with pytest.raises(grpc.RpcError) as e:
                    got.extend(stub.Fetch(request, timeout=5))
                assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and not got, (offset, length)
    finally:
        server.stop(0)


# -- bad config --------------------------------------------------------------------------------------------------
def test_a_bad_security_section_is_a_clear_error(pki, tmp_path, mixtral_dir, capsys):
    cases = [
        ({"tls_cert": str(tmp_path / "missing.pem"), "tls_key": str(pki / "server.key")},
         "tls_cert = '.*missing.pem': cannot read it"),
        ({"tls_key": str(pki / "server.key")}, "tls_cert and tls_key go together"),
        ({"token_file": str(tmp_path / "no-token")}, "token_file = '.*no-token': cannot read it"),
        ({"tls_cert": str(pki / "server.pem"), "tls_key": str(pki / "client.key")}, "not a PEM certificate and its"),
        ({"tls_ca": str(pki / "token")}, "tls_ca = .*: not PEM certificates"),
        ({"token": "short"}, "at least 16 printable"),
        ({"require_client_cert": True}, "require_client_cert needs tls_cert"),
    ]  # fmt: skip
    for keys, message in cases:
        with pytest.raises(SecurityError, match=message):
            Security.load(SecurityConfig(**keys))
    # through a command: one line naming the key, no traceback, before the model loads
    config = tmp_path / "expertflow.toml"
    config.write_text(f'[security]\ntoken_file = "{tmp_path / "no-token"}"\n')
    from redis_server import free_port

    listen = f"127.0.0.1:{free_port()}"  # not the default port: another test's store may hold it
    assert main(["expert-store", "--model", str(mixtral_dir), "--config", str(config), "--listen", listen,
                 "--metrics-port", "0"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.startswith("expertflow: error: [security] token_file") and "Traceback" not in err


# -- the whole stack -------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_serve_with_tls_client_certificates_and_a_token_end_to_end(pki, tmp_path, capsys):
    """`expertflow serve` with mutual TLS and a token: every service-to-service call goes through them, and a
    generate comes through the gRPC client and the HTTPS API; without the token or the CA it is refused."""
    security = {"token_file": str(pki / "token"), "tls_cert": str(pki / "server.pem"),
                "tls_key": str(pki / "server.key"), "tls_ca": str(pki / "ca.pem"),
                "client_cert": str(pki / "client.pem"), "client_key": str(pki / "client.key"),
                "require_client_cert": True}  # fmt: skip
    config = stack_config(model={"expert_budget": "25%"}, security=security)
    path = tmp_path / "expertflow.toml"
    path.write_text(config.to_toml())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    serve = subprocess.Popen([sys.executable, "-m", "expertflow.cli", "serve", "--config", str(path)], env=env)
    client_security = Security.load(config.security)
    try:
        wait_for_server(config.worker.listen, timeout_s=240, security=client_security)
        with InferenceClient(config.worker.listen, timeout_s=120, security=client_security) as client:
            grpc_text = client.complete("def main():", max_new_tokens=8)
            assert grpc_text.completion_tokens > 0
        without_token = replace(client_security, token="")
        with InferenceClient(config.worker.listen, timeout_s=30, security=without_token) as client:
            with pytest.raises(InferenceError) as e:
                client.complete("def main():", max_new_tokens=8)
            assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
        other_ca = _security(pki, tls_ca="other-ca.pem", client_cert="client.pem", client_key="client.key")
        no_cert = _security(pki, tls_ca="ca.pem")
        # plaintext, trusting another CA, without a client certificate: refused in the handshake
        for refused in (Security(token=TOKEN), replace(other_ca, token=TOKEN), replace(no_cert, token=TOKEN)):
            with InferenceClient(config.worker.listen, timeout_s=30, security=refused) as client:
                with pytest.raises(InferenceError) as e:
                    client.complete("def main():", max_new_tokens=8)
                assert e.value.code is grpc.StatusCode.UNAVAILABLE

        # `expertflow ask` with the config; with another token file it is refused, saying so
        ask = ["ask", "def main():", "--address", config.worker.listen, "--config", str(path), "--max-new-tokens", "2"]
        assert main(ask) == 0
        (tmp_path / "wrong-token").write_text("f" * 32)
        assert main([*ask, "--token-file", str(tmp_path / "wrong-token")]) == 2
        assert "does not match" in capsys.readouterr().err

        https = f"https://{config.api.listen}"
        context = client_security.client_context()
        body = json.dumps({"model": "x", "prompt": "def main():", "max_tokens": 8, "temperature": 0}).encode()

        def post(token: str | None) -> urllib.request.Request:
            headers = {"Content-Type": "application/json"}
            if token is not None:
                headers["Authorization"] = f"Bearer {token}"
            return urllib.request.Request(f"{https}/v1/completions", data=body, headers=headers)

        for _ in range(300):  # the API comes up after the worker
            try:
                urllib.request.urlopen(f"{https}/health", timeout=2, context=context)
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        with urllib.request.urlopen(post(TOKEN), timeout=120, context=context) as reply:
            answer = json.load(reply)
        assert answer["choices"][0]["text"] == grpc_text.text
        for token in (None, "f" * 32):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(post(token), timeout=30, context=context)
            assert e.value.code == 401 and json.load(e.value)["error"]["code"] == "invalid_api_key"
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):  # no client certificate
            urllib.request.urlopen(post(TOKEN), timeout=30, context=ssl.create_default_context(cafile=pki / "ca.pem"))
        # the healthcheck command, as compose runs it, with the same config
        for args in ([config.worker.listen], [config.expert_store.listen], [config.api.listen, "--http"]):
            assert healthcheck([*args, "--config", str(path)]) == 0, args
        assert healthcheck([config.api.listen, "--http"]) == 1  # plain HTTP to HTTPS
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(120)
    assert code == 0


def test_a_scaled_out_store_node_wants_the_token_from_the_cluster_client(mixtral_dir, tmp_path, pki, store_model):
    """A node of a directory-placed store with the token: a worker's ClusterExpertStore reads through it with the
    token, and without it is told the node refused it."""
    from expertflow.services.store_cluster import ClusterExpertStore, ExpertUnavailable
    from redis_server import RedisServer, free_port
    from store_nodes import NodeProcess
    from test_store_cluster import cluster

    config = tmp_path / "node.toml"
    config.write_text(f'[security]\ntoken_file = "{pki / "token"}"\n')
    version = ServedModel.open(mixtral_dir, "0", torch.float32).version
    redis_server = RedisServer(tmp_path / "redis").start()
    node = NodeProcess(mixtral_dir, redis_server.url, "node0", f"127.0.0.1:{free_port()}", shard="0/1", replicas=1,
                       extra=("--config", str(config)))  # fmt: skip
    try:
        node.start().wait_for("serving", 90)
        key = ExpertKey(1, 3)
        local = store_model[1]
        out, expected = torch.full((local.layout.padded_numel,), float("nan")), torch.zeros(local.layout.padded_numel)
        local.read_into(key, expected)
        remote: ClusterExpertStore = cluster(redis_server.url, version, host_id="another-host",
                                             security=Security(token=TOKEN))  # fmt: skip
        try:
            remote.read_into(key, out)
            assert torch.equal(out, expected)
        finally:
            remote.close()
        stranger = cluster(redis_server.url, version, host_id="another-host")
        try:
            with pytest.raises(ExpertUnavailable, match="UNAUTHENTICATED"):
                stranger.read_into(key, out)
        finally:
            stranger.close()
    finally:
        node.kill()
        redis_server.stop()
