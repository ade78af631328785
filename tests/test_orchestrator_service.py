"""The orchestrator service with the worker's RemotePrefetcher, over real gRPC and ZMQ on loopback: a worker engine
whose plans come from other processes generates exactly what the embedded engine does, prefetches better than
lru, and keeps generating (reactively) when the predictor or the orchestrator dies or restarts; a slow
orchestrator never holds a step up past the bound; Schedule keeps the scheduler's invariants; malformed
messages are refused with the reason."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest
import zmq

from conftest import prompt_ids
from expert_store.keys import ExpertSpace
from expert_store.plan import CacheView
from expertflow.default_model import default_model_dir
from expertflow.engine import Engine, SamplingParams
from expertflow.loader import LoadOptions, load
from expertflow.services import convert
from expertflow.services.common import wait_for_server
from expertflow.services.orchestrator_client import RemotePrefetcher, remote_policy
from expertflow.services.orchestrator_server import (
    WORKER_KEY,
    OrchestratorOptions,
    OrchestratorServicer,
    PlansEndpoint,
    make_server,
)
from expertflow.services.predictor_server import PredictorServicer
from expertflow.services.predictor_server import make_server as make_predictor_server
from expertflow.tokenizer import TextCodec
from expertflow.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc
from orchestrator.expertflow import ExpertFlow
from orchestrator.prefetcher import LayerRoutes, StepRequest
from orchestrator.scheduler import SchedulerConfig
from predictor.base import RequestId, SessionPredictor
from test_predictor_service import free_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")


class FixedRoutes(SessionPredictor):
    """Request r's every token uses the experts `pick(r)` at every layer, and is predicted to (one-token steps)."""

    label = "fixed"

    def __init__(self, n_layers: int, n_experts: int, pick: Callable[[RequestId], Iterable[int]]) -> None:
        self.n_layers, self.n_experts, self.pick = n_layers, n_experts, pick

    def probs(self, rid: RequestId) -> np.ndarray:
        p = np.zeros((self.n_layers, self.n_experts), np.float32)
        p[:, list(self.pick(rid))] = 1.0
        return p

    def step(self, tokens: Mapping[RequestId, Sequence[int]]) -> dict[RequestId, np.ndarray]:
        return {rid: self.probs(rid) for rid, new in tokens.items() if len(new) == 1}

    def layer(self, layer, routes, speculation=None) -> dict[RequestId, np.ndarray]:
        return {}


def _by_group(rid: RequestId) -> list[int]:
    return [0, 1] if rid.startswith("a") else [2, 3]


def _by_hash(rid: RequestId) -> list[int]:
    return np.random.default_rng(zlib.crc32(rid.encode())).choice(8, 2, replace=False).tolist()


def _view(n_layers: int = 4, n_experts: int = 8) -> CacheView:
    return CacheView(now_ms=0.0, n_slots=8, resident=np.zeros((n_layers, n_experts), bool), layer_ms=(1.0,) * n_layers)


class _Services:
    """An orchestrator (gRPC + ZMQ) and, if given a session predictor factory, a predictor service, in this process."""

    def __init__(
        self, policy: str, sessions: Callable[[], SessionPredictor] | None = None, servicer=OrchestratorServicer
    ) -> None:
        self.predictor = None
        address = None
        if sessions is not None:
            self.predictor = make_predictor_server(PredictorServicer(sessions), "127.0.0.1:0").start()
            address = self.predictor.address
        self.servicer = servicer(OrchestratorOptions(policy=policy, predictor_address=address))
        self.server = make_server(self.servicer, "127.0.0.1:0").start()
        self.endpoint = PlansEndpoint(self.servicer).start()
        self.address = self.server.address

    def close(self) -> None:
        self.endpoint.stop()
        self.server.stop(0)
        self.servicer.close()
        if self.predictor is not None:
            self.predictor.stop(0)


@pytest.fixture
def fixed_services():
    services = _Services("expertflow", lambda: FixedRoutes(4, 8, _by_group))
    yield services
    services.close()


def _ids(result) -> list[list[int]]:
    return [o.token_ids for o in result.outputs]


# -- the process boundary: both services started by their CLI commands ------------------------------------


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a 2-core machine runs the test's engine too
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "expertflow.cli", *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env
        )


def test_services_from_the_cli_plan_the_worker_cache_and_outlive_restarts(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="expertflow.orchestrator-client")
    predictor_at, orchestrator_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    config = tmp_path / "services.toml"
    config.write_text(
        f'[predictor]\nlisten = "{predictor_at}"\n[orchestrator]\nlisten = "{orchestrator_at}"\n'
        "[metrics]\npredictor = 0\norchestrator = 0\n"
    )
    # a deadline no busy 2-core machine misses: the predictor's outage below is the only one
    orchestrator_cmd = ["orchestrator", "--config", str(config), "--policy", "expertflow"]
    orchestrator_cmd += ["--predictor-timeout-ms", "5000"]
    procs = {
        "predictor": _spawn(["predictor", "--config", str(config)], tmp_path / "predictor.log"),
        "orchestrator": _spawn(orchestrator_cmd, tmp_path / "orchestrator.log"),
    }
    model = default_model_dir()
    codec = TextCodec(model)
    prompts = [codec.encode("def read_config(path):"), codec.encode("In the beginning God")]
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    try:
        lru = load(model, LoadOptions(expert_budget="25%", policy="lru"))
        expected = Engine(lru).generate(prompts, params)
        lru.close()
        wait_for_server(predictor_at, 60)
        wait_for_server(orchestrator_at, 60)
        remote = remote_policy(orchestrator_at, wait_ms=1000, retry_s=0.2)  # a generous wait: plans in time
        options = LoadOptions(expert_budget="25%", policy_factory=remote)
        loaded = load(model, options)
        engine, prefetcher = Engine(loaded), loaded.policy.prefetcher
        assert (prefetcher.name, prefetcher.wants_speculation, prefetcher.connected) == ("expertflow", True, True)

        result = engine.generate(prompts, params)  # plans from the orchestrator, predictions from the predictor
        total, base = result.stats.total, expected.stats.total
        assert _ids(result) == _ids(expected)
        assert total.prefetches > 0 and total.prefetch_used > 0 and total.hits > base.hits + 50
        assert prefetcher.eviction.use is not None and prefetcher.eviction.use.shape == (4, 8)  # its ranking

        def restart_orchestrator(tokens) -> None:
            restart_orchestrator.steps += 1
            if restart_orchestrator.steps == 3:
                procs["orchestrator"].kill()
                procs["orchestrator"].wait()
            if restart_orchestrator.steps == 6:
                procs["orchestrator"] = _spawn(orchestrator_cmd, tmp_path / "orchestrator.log")

        restart_orchestrator.steps = 0
        result = engine.generate(prompts, params, on_tokens=restart_orchestrator)
        assert _ids(result) == _ids(expected) and prefetcher.stats.dropped_events > 0
        wait_for_server(orchestrator_at, 60)
        assert prefetcher.wait_connected(30) and prefetcher.stats.connects == 2
        result = engine.generate(prompts, params)  # the restarted orchestrator plans again
        assert _ids(result) == _ids(expected) and result.stats.total.prefetch_used > 0
        said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "expertflow.orchestrator-client"]
        outages = [m for level, m in said if level == logging.WARNING]
        assert len(outages) == 1 and "orchestrator unavailable" in outages[0]  # once for the whole outage
        assert any("answers again" in m for _, m in said)

        def kill_predictor(tokens) -> None:
            kill_predictor.steps += 1
            if kill_predictor.steps == 3:
                procs["predictor"].kill()
                procs["predictor"].wait()

        kill_predictor.steps = 0
        result = engine.generate(prompts, params, on_tokens=kill_predictor)
        assert _ids(result) == _ids(expected)
        result = engine.generate(prompts, params)  # no predictions: the orchestrator plans nothing, the cache loads
        assert _ids(result) == _ids(expected) and result.stats.total.prefetches == 0
        loaded.close()
        assert not prefetcher._thread.is_alive()
    finally:
        for proc in procs.values():
            proc.terminate()
        codes = {name: proc.wait(30) for name, proc in procs.items()}
    assert codes["orchestrator"] == 0  # SIGTERM: a graceful stop
    log = (tmp_path / "orchestrator.log").read_text()
    # the worker's session logged the predictor's outage once, not at every call since (a reconnecting worker's
    # handshake checks the predictor too, and may log its own miss on a busy machine)
    assert 1 <= log.count("predictor service unavailable") <= 2
    assert log.rstrip().endswith('"message": "stopped"}')


# -- in this process --------------------------------------------------------------------------------------


def test_the_service_commands_refuse_what_cannot_run(capsys, mixtral_dir, tmp_path):
    from expertflow.cli import main

    assert main(["orchestrator", "--policy", "lru", "--listen", "127.0.0.1:0", "--metrics-port", "0"]) == 2
    assert "policy lru prefetches nothing: a worker runs it alone" in capsys.readouterr().err
    assert main(["predictor", "--model", str(mixtral_dir), "--listen", "127.0.0.1:0", "--metrics-port", "0"]) == 2
    err = capsys.readouterr().err
    assert f"no route predictor for {mixtral_dir}" in err and "expertflow prepare" in err
    config = tmp_path / "bad.toml"
    config.write_text("[orchestrator]\nport = 50063\n")
    assert main(["orchestrator", "--config", str(config)]) == 2
    assert "unknown key(s) ['port']" in capsys.readouterr().err



def test_a_slow_orchestrator_never_holds_a_step_up(mixtral_dir):
    class Slow(OrchestratorServicer):
        def plan_event(self, session, event):
            time.sleep(0.25)
            return super().plan_event(session, event)

    services = _Services("speculate", servicer=Slow)
    prompts = [prompt_ids(70, 9), prompt_ids(71, 5)]
    params = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    try:
        lru = load(mixtral_dir, LoadOptions(expert_budget="25%", policy="lru"))
        expected = Engine(lru).generate(prompts, params)
        lru.close()
        wait_ms = 20.0
        options = LoadOptions(expert_budget="25%", policy_factory=remote_policy(services.address, wait_ms=wait_ms))
        loaded = load(mixtral_dir, options)
        result = Engine(loaded).generate(prompts, params)
        stats = loaded.policy.prefetcher.stats
        loaded.close()
    finally:
        services.close()
    assert _ids(result) == _ids(expected)
    n_layers = 3
    bound = (n_layers + 1) * wait_ms / 1e3  # every event of a step waited its longest
    # (a step that waited for the orchestrator would take its 0.25 s per event; 0.1 s: a busy machine's noise)
    assert max(result.step_s) < max(expected.step_s) + bound + 0.1, (result.step_s, expected.step_s)
    assert stats.late >= 1 and stats.waits < 4  # it waited while the orchestrator was caught up, then no more


def test_plans_carry_the_ranking_over_the_grpc_stream_and_unary_calls(fixed_services):
    view = convert.view_to_proto(_view())
    metadata = ((WORKER_KEY, "w1"),)

    def begin(step: int, tokens: dict[str, list[int]]):
        requests = [common_pb2.RequestTokens(request_id=r, tokens=t) for r, t in tokens.items()]
        return orchestrator_pb2.BeginStepRequest(step=step, requests=requests, view=view)

    def after(step: int, layer: int, routes: dict[str, list[int]]):
        rows = [common_pb2.RequestRoutes(request_id=r, experts=e, top_k=2) for r, e in routes.items()]
        return orchestrator_pb2.AfterLayerRequest(step=step, layer=layer, routes=rows, view=view)

    events = [orchestrator_pb2.PrefetchEvent(setup=orchestrator_pb2.PrefetchSetup(moe_layers=4, experts=8, top_k=2))]
    events.append(orchestrator_pb2.PrefetchEvent(begin_step=begin(1, {"a": [5, 6, 7]})))  # a prompt: no prediction
    events += [orchestrator_pb2.PrefetchEvent(after_layer=after(1, j, {"a": [0, 1] * 3})) for j in range(4)]
    events.append(orchestrator_pb2.PrefetchEvent(begin_step=begin(2, {"a": [8]})))
    events.append(orchestrator_pb2.PrefetchEvent(after_layer=after(2, 0, {"a": [0, 1], "ghost": [2, 3]})))
    events.append(orchestrator_pb2.PrefetchEvent(finish=common_pb2.FinishRequest(request_ids=["a"])))
    with grpc.insecure_channel(fixed_services.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        answers = list(stub.Plans(iter(events), metadata=metadata))
        # every step and layer event answered once, in order; a finish or setup is not
        assert [(a.step, a.layer) for a in answers] == [(1, -1), (1, 0), (1, 1), (1, 2), (1, 3), (2, -1), (2, 0)]
        assert not any(a.has_plan for a in answers[:5])  # nothing predicted for a prompt: no plan, no ranking
        decode = answers[5]
        assert decode.has_plan and len(decode.plan.next_use_ms) == 32  # the ranking the plan was made with
        assert {(t.key.layer, t.key.expert) for t in decode.plan.fetch} == {(j, e) for j in range(4) for e in (0, 1)}
        # the unary calls share one session; a request it never saw ("ghost") is left out, not an error
        assert not stub.BeginStep(begin(1, {"a": [5, 6]})).has_plan
        assert stub.BeginStep(begin(2, {"a": [7]})).has_plan
        assert stub.AfterLayer(after(2, 0, {"ghost": [2, 3]})).layer == 0
        stub.Finish(common_pb2.FinishRequest(request_ids=["a"]))


def test_schedule_groups_predicted_routes_and_keeps_the_wait_bound(fixed_services):
    space = ExpertSpace.of(range(4), 8, 2)
    prefetcher = RemotePrefetcher(fixed_services.address, space, wait_ms=5000)
    try:
        ids = ["a0", "b0", "a1", "b1"]
        prefetcher.begin_step([StepRequest(r, (5,)) for r in ids], _view())  # the orchestrator predicts them
        waiting = [(r, 3 - i) for i, r in enumerate(ids)]
        assert prefetcher.schedule(waiting, SchedulerConfig(2, 10)) == ["a0", "a1"]  # the same experts together
        stub = orchestrator_pb2_grpc.OrchestratorStub(prefetcher._channel)
        fifo = stub.Schedule(
            orchestrator_pb2.ScheduleRequest(
                queue=[orchestrator_pb2.WaitingRequest(request_id=r, waited=w) for r, w in waiting],
                batch=2, max_wait=10, scheduler="fifo",
            ),
            metadata=prefetcher._metadata,
        )  # fmt: skip
        assert list(fifo.request_ids) == ["a0", "b0"]
        assert prefetcher.schedule([], SchedulerConfig(2, 1)) == []
        unknown = [("x", 0), ("y", 5), ("z", 1)]  # no predictions: oldest first
        assert prefetcher.schedule(unknown, SchedulerConfig(2, 10)) == ["y", "z"]
    finally:
        prefetcher.close()


def test_schedule_through_the_service_keeps_every_request_within_its_wait_bound():
    services = _Services("expertflow", lambda: FixedRoutes(4, 8, _by_hash))
    space = ExpertSpace.of(range(4), 8, 2)
    prefetcher = RemotePrefetcher(services.address, space, wait_ms=5000)
    try:
        for batch, max_wait in ((2, 3), (3, 1)):
            ids = [f"r{batch}-{i}" for i in range(batch * (max_wait + 1))]
            prefetcher.begin_step([StepRequest(r, (5,)) for r in ids], _view())
            waited = dict.fromkeys(ids, 0)
            worst = 0
            for _ in range(12):
                picked = prefetcher.schedule(list(waited.items()), SchedulerConfig(batch, max_wait))
                assert len(picked) == batch == len(set(picked)) and set(picked) <= set(ids)
                worst = max([worst] + [waited[r] for r in picked])
                waited = {r: 0 if r in picked else w + 1 for r, w in waited.items()}
                assert max(waited.values()) <= max_wait  # whoever reached the bound ran
            assert worst <= max_wait
    finally:
        prefetcher.close()
        services.close()


def test_malformed_messages_get_invalid_argument_with_the_reason(fixed_services):
    good = convert.view_to_proto(_view())
    short = orchestrator_pb2.CacheView()
    short.CopyFrom(good)
    short.resident = good.resident[:-2]
    with grpc.insecure_channel(fixed_services.address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorStub(channel)
        def setup(policy: str = "", experts: int = 8):
            return orchestrator_pb2.PrefetchSetup(moe_layers=4, experts=experts, top_k=2, policy=policy)

        calls = [
            ("resident has 30 bytes, 4 x 8 experts need 32", lambda: stub.BeginStep(
                orchestrator_pb2.BeginStepRequest(step=1, view=short))),
            ("the model has 4 MoE layers", lambda: stub.AfterLayer(
                orchestrator_pb2.AfterLayerRequest(step=1, layer=9, view=good))),
            ("unknown cache policy 'nope'", lambda: stub.GetInfo(setup("nope"))),
            ("policy lru prefetches nothing", lambda: stub.GetInfo(setup("lru"))),
            ("predicts 4 MoE layers x 8 experts, the model has 4 x 16", lambda: stub.GetInfo(setup(experts=16))),
            ("unknown cache policy 'nope'", lambda: list(
                stub.Plans(iter([orchestrator_pb2.PrefetchEvent(setup=setup("nope"))])))),
            ("batch must be at least 1", lambda: stub.Schedule(orchestrator_pb2.ScheduleRequest(batch=0))),
            ("unknown scheduler 'lifo'", lambda: stub.Schedule(
                orchestrator_pb2.ScheduleRequest(batch=1, scheduler="lifo"))),
            ("request 'r' appears twice", lambda: stub.Schedule(orchestrator_pb2.ScheduleRequest(
                batch=1, queue=[orchestrator_pb2.WaitingRequest(request_id="r")] * 2))),
        ]  # fmt: skip
        for message, call in calls:
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, message
            assert message in e.value.details()
    space = ExpertSpace.of(range(4), 8, 2)
    with pytest.raises(ValueError, match="unknown cache policy 'nope'"):
        RemotePrefetcher(fixed_services.address, space, policy="nope")
    with pytest.raises(ValueError, match="predicts 4 MoE layers x 8 experts, the model has 4 x 16"):
        RemotePrefetcher(fixed_services.address, ExpertSpace.of(range(4), 16, 2))

    # over ZMQ a malformed event is answered empty (the worker counts answers) and the next one is planned
    with grpc.insecure_channel(fixed_services.address) as channel:  # the plans port admits GetInfo's ticket
        ticket = orchestrator_pb2_grpc.OrchestratorStub(channel).GetInfo(setup()).plans_ticket
    with zmq.Context() as ctx, ctx.socket(zmq.DEALER) as sock:
        sock.setsockopt(zmq.IDENTITY, ticket.encode())
        sock.connect(f"tcp://127.0.0.1:{fixed_services.servicer.plans_port}")
        bad = orchestrator_pb2.PrefetchEvent(begin_step=orchestrator_pb2.BeginStepRequest(step=1, view=short))
        fine = orchestrator_pb2.PrefetchEvent(
            begin_step=orchestrator_pb2.BeginStepRequest(
                step=2, view=good, requests=[common_pb2.RequestTokens(request_id="a", tokens=[5])]
            )
        )
        for event in (bad, fine):
            sock.send(event.SerializeToString())
        answers = [orchestrator_pb2.PlanMessage.FromString(sock.recv()) for _ in range(2)]
        assert [(a.step, a.has_plan) for a in answers] == [(0, False), (2, True)]
        sock.send(b"", zmq.NOBLOCK)


def test_expertflow_tells_a_requests_latest_prediction_else_its_recent_routing():
    flow = ExpertFlow(FixedRoutes(2, 4, lambda rid: [1, 3]))
    view = CacheView(now_ms=0.0, n_slots=2, resident=np.zeros((2, 4), bool), layer_ms=(1.0, 1.0))
    assert flow.route_estimate("a") is None
    flow.begin_step([StepRequest("a", (5, 6))], view)  # a prompt: nothing predicted yet
    for j in range(2):
        flow.after_layer(LayerRoutes(j, {"a": np.array([[0, 2], [0, 2]])}), view)
    recent = flow.route_estimate("a")
    assert recent.shape == (2, 4) and set(np.flatnonzero(recent[0])) == {0, 2}  # its decayed routing
    flow.begin_step([StepRequest("a", (7,))], view)
    assert np.array_equal(flow.route_estimate("a"), FixedRoutes(2, 4, lambda rid: [1, 3]).probs("a"))
    flow.route_estimate("a")[:] = 0  # a copy: the caller cannot change the prefetcher's state
    assert flow.route_estimate("a").sum() == 4
    flow.finish(["a"])
    assert flow.route_estimate("a") is None
