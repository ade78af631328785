"""The prefetchers in the live engine: predictions drive prefetches, outputs never change, and the engine
runs the very policy code the simulator runs (the parity test replays one trace through both)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pytest
import torch

from conftest import DEVICES, prompt_ids
from expert_store.plan import CacheView, Plan
from expert_store.timing import FixedTiming
from expertflow.engine import Engine
from expertflow.requests import SamplingParams
from expertflow.loader import LoadOptions, load, policy_inputs
from expertflow.trace import TraceRecorder
from orchestrator.expertflow import ExpertFlow, ExpertFlowConfig
from orchestrator.planner import PlanConfig
from orchestrator.policies import CachePolicy, make_policy
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest
from orchestrator.simulator import SimConfig, simulate, trace_inputs
from predictor.base import RequestId, SessionPredictor
from traces.format import Trace, TraceInfo


class _RepeatLastSessions(SessionPredictor):
    """Predicts that a request's token routes like its previous token did (a fair guess for tests)."""

    def __init__(self, layers: int, experts: int):
        self.n_layers, self.n_experts = layers, experts
        self.last: dict[RequestId, np.ndarray] = {}
        self.current: dict[RequestId, np.ndarray] = {}

    def step(self, tokens: Mapping[RequestId, Sequence[int]]) -> dict[RequestId, np.ndarray]:
        out = {}
        for rid, new in tokens.items():
            if rid in self.current:
                self.last[rid] = self.current[rid]
            self.current[rid] = np.zeros((self.n_layers, self.n_experts), np.float32)
            if len(new) == 1 and rid in self.last:
                out[rid] = self.last[rid]
        return out

    def layer(self, layer, routes, speculation=None):
        for rid, rows in routes.items():
            self.current[rid][layer, rows[-1]] = 1.0
        return {}

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        for rid in request_ids:
            self.last.pop(rid, None)
            self.current.pop(rid, None)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2"])
def test_expertflow_prefetches_and_never_changes_outputs(tiny_models, family, device):
    directory, _ = tiny_models[family]
    prompts = [prompt_ids(20, 9), prompt_ids(21, 14)]
    params = SamplingParams(max_new_tokens=16, stop_on_eos=False)
    lru = load(directory, LoadOptions(device=device, expert_budget="25%", policy="lru"))
    expected = Engine(lru).generate(prompts, params)
    lru.close()

    def inputs(space):
        config = ExpertFlowConfig(plan=PlanConfig(threshold=0.5))
        return policy_inputs(space, learned=_RepeatLastSessions(*space.shape), expertflow=config)

    runs = [("25%", "100%", "inline"), ("100%", "100%", "inline"), ("25%", "100%", "thread"), ("25%", "0", "inline")]
    for budget, host, planning in runs:
        options = LoadOptions(
            device=device,
            expert_budget=budget,
            host_budget=host,
            policy="expertflow",
            policy_inputs=inputs,
            planning=planning,
        )
        loaded = load(directory, options)
        result = Engine(loaded).generate(prompts, params)
        loaded.close()
        assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
        total = result.stats.total
        print(budget, host, planning, total.to_dict())
        flow = loaded.policy.prefetcher
        assert getattr(flow, "inner", flow).plans > 0  # the deadline planner ran at every decode layer
        if budget == "25%":  # at 100% every expert stays resident after the prefill
            assert total.prefetches > 0 and total.prefetch_used > 0
        assert total.prefetch_used + total.prefetch_wasted <= total.prefetches
        assert total.plan_s > 0


@pytest.mark.parametrize("name", ["static", "speculate", "activation"])
def test_peer_policies_run_live_and_never_change_outputs(tiny_models, name):
    from predictor.baselines import ActivationMatrixPredictor, layer_frequency

    directory, _ = tiny_models["mixtral"]
    prompts = [prompt_ids(22, 10), prompt_ids(23, 6)]
    params = SamplingParams(max_new_tokens=10, stop_on_eos=False)
    lru = load(directory, LoadOptions(expert_budget="25%", policy="lru"))
    expected = Engine(lru).generate(prompts, params)
    train = _record(Engine(lru), [[1] + prompt_ids(40 + i, 12) for i in range(6)])
    lru.close()

    def inputs(space):
        return policy_inputs(
            space, frequency=layer_frequency(train), activation=ActivationMatrixPredictor(train).sessions()
        )

    loaded = load(directory, LoadOptions(expert_budget="25%", policy=name, policy_inputs=inputs))
    result = Engine(loaded).generate(prompts, params)
    loaded.close()
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
    assert result.stats.total.prefetches > 0


def test_learned_predictor_with_layer_head_drives_the_live_planner(tiny_models):
    """End to end on CPU: a trace recorded from the model trains a predictor with a layer head; the live
    policy plans with it (refining each layer from the routes already taken) and outputs stay identical."""
    from expertflow.trace import record
    from predictor.learned import LearnedPredictor, LearnedSessions
    from predictor.train import TrainConfig, model_config_for, train

    directory, _ = tiny_models["mixtral"]
    prompts = [prompt_ids(30 + i, 24) for i in range(12)]
    loaded = load(directory, LoadOptions(expert_budget="100%", policy="lru"))
    trace = record(Engine(loaded), prompts, [0] * len(prompts), ["test"], "test")
    free_run = Engine(loaded).generate(prompts[:2], SamplingParams(max_new_tokens=12, stop_on_eos=False))
    # Stop request 0 early, at a token request 1 never produces, so the batch shrinks mid-run and the
    # policy must map routing rows to the requests still running.
    first, second = free_run.outputs[0].token_ids, free_run.outputs[1].token_ids
    stop = next(t for i, t in enumerate(first[1:-2], 1) if t not in second and t not in first[:i])
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False, stop_token_ids=[stop])
    expected = Engine(loaded).generate(prompts[:2], params)
    loaded.close()
    cfg = model_config_for(trace, d_model=32, n_layers=1, n_heads=2, context=32, layer_dim=16)
    model, _ = train(trace, cfg, TrainConfig(seconds=30, max_steps=20, rows=4))
    refined = []

    class Watched(LearnedSessions):
        def layer(self, layer, routes, speculation=None):
            out = super().layer(layer, routes, speculation)
            refined.extend((layer + 1, None if speculation is None else speculation.get(rid)) for rid in out)
            return out

    def inputs(space):
        return policy_inputs(space, learned=Watched(LearnedPredictor(model).model))

    loaded = load(directory, LoadOptions(expert_budget="25%", policy="expertflow", policy_inputs=inputs))
    result = Engine(loaded).generate(prompts[:2], params)
    loaded.close()
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
    assert [o.finish_reason for o in result.outputs] == ["eos", "length"]  # request 0 left the batch early
    assert refined and result.stats.total.prefetches > 0
    # each layer after the first is refined once the layer before it has routed, with the model's gate speculation
    n_layers = len(trace.info.moe_layers)
    assert {j for j, _ in refined} == set(range(1, n_layers))
    assert all(spec is not None and len(spec) == trace.info.top_k for _, spec in refined)
    # a plan as each decode step starts and after its last layer; after the other layers, one wherever the next
    # layer's refined prediction wants a key that is not resident or coming
    decode_steps = len(result.step_s) - 1
    assert 2 * decode_steps < loaded.policy.prefetcher.plans < (n_layers + 1) * decode_steps


# -- one ExpertFlow: the simulator and the engine make the same plans -----------------------------------


class _Recording(Prefetcher):
    """Passes every call through to `inner` and keeps the plans it returns."""

    def __init__(self, inner: Prefetcher):
        self.inner = inner
        self.name, self.eviction, self.wants_speculation = inner.name, inner.eviction, inner.wants_speculation
        self.plans: list[tuple] = []

    def _keep(self, plan: Plan | None) -> Plan | None:
        if plan is not None:
            self.plans.append(([t.key for t in plan.fetch], list(plan.cancel), list(plan.evict)))
        return plan

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        return self._keep(self.inner.begin_step(requests, view))

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        return self._keep(self.inner.after_layer(routed, view))

    def finish(self, request_ids) -> None:
        self.inner.finish(request_ids)


class _GenerationRecorder(TraceRecorder):
    """Keeps every forward pass's routing (one token each: requests of one-token prompts, one at a time)."""

    def __init__(self, model):
        super().__init__(model)
        self.rows: list[tuple[np.ndarray, np.ndarray]] = []

    def on_route(self, moe_layer, ids, scores):
        super().on_route(moe_layer, ids, scores)
        if moe_layer == self.n_layers - 1:
            experts, _, spec = self.take(255, np.uint8)
            self.rows.append((experts, spec))


def _record(engine: Engine, prompts: list[list[int]]) -> Trace:
    """A routing trace of `prompts` (prefill), as `expertflow trace` records one."""
    from expertflow.trace import record

    return record(engine, prompts, [0] * len(prompts), ["test"], "test")


def test_simulator_and_engine_make_the_same_plans(tiny_models):
    """Requests generated by the engine are recorded as a trace; replaying that trace in the simulator and
    serving the same requests again in the engine runs the same ExpertFlow class with the same predictor,
    and both make the same sequence of plans (fetch, cancel, evict) with the same hit rate. The engine plans
    with the simulator's times (a clock of its own and fixed timing injected); copies that take no modelled
    time are what the CPU engine does, so the two replays see the same cache at every call. (With copies that
    take time the two would differ in when copies land, which only a modelled link can reproduce.)"""
    from predictor.learned import LearnedPredictor
    from predictor.train import TrainConfig, model_config_for, train

    directory, _ = tiny_models["mixtral"]
    n_requests, new_tokens = 5, 14
    params = SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False)
    resident = load(directory, LoadOptions(expert_budget="100%", policy="lru"))
    engine = Engine(resident)
    recorder = _GenerationRecorder(resident.model)
    tokens, experts, spec = [], [], []
    for r in range(n_requests):
        prompt = [r + 3]  # one-token prompts: every forward pass is one token, as the simulator replays
        out = engine.generate([prompt], params, recorder=recorder)
        tokens += prompt + out.outputs[0].token_ids[:-1]  # the tokens that went through the model
    experts = np.concatenate([e for e, _ in recorder.rows])
    spec = np.concatenate([p for _, p in recorder.rows])
    train_trace = _record(engine, [[1] + prompt_ids(60 + i, 20) for i in range(10)])
    resident.close()
    info = TraceInfo("tiny", "mixtral", train_trace.info.moe_layers, train_trace.info.n_experts,
                     train_trace.info.top_k, ("test",))  # fmt: skip
    offsets = np.arange(0, n_requests * new_tokens + 1, new_tokens, dtype=np.int64)
    trace = Trace(info, np.array(tokens, np.int32), offsets, np.zeros(n_requests, np.int16), experts,
                  np.ones(experts.shape, np.float16), spec)  # fmt: skip
    cfg = model_config_for(train_trace, d_model=32, n_layers=1, n_heads=2, context=32, layer_dim=16)
    model, _ = train(train_trace, cfg, TrainConfig(seconds=30, max_steps=30, rows=4))
    config = ExpertFlowConfig(plan=PlanConfig(threshold=0.2))
    n_layers = len(info.moe_layers)

    for budget in (0.25, 0.5):
        sim_policy = make_policy(
            "expertflow", trace_inputs(trace, learned=LearnedPredictor(model).sessions(), expertflow=config)
        )
        sim_recording = _Recording(sim_policy.prefetcher)
        sim = simulate(
            trace,
            CachePolicy("expertflow", sim_policy.eviction, sim_recording),
            SimConfig(budget=budget, bandwidth=float("inf"), expert_bytes=10**6, layer_ms=1.0),
        )

        live: list[_Recording] = []

        def factory(space):
            flow = ExpertFlow(LearnedPredictor(model).sessions(), config)
            live.append(_Recording(flow))
            return CachePolicy("expertflow", flow.eviction, live[-1])

        ticks = iter(range(10**9))  # a clock of its own: the engine's decisions must not depend on wall time
        options = LoadOptions(
            expert_budget=f"{budget:.0%}",
            policy_factory=factory,
            timing=FixedTiming(layer_ms=(1.0,) * n_layers, transfer_ms=0.0),
            clock=lambda: float(next(ticks)),
        )
        loaded = load(directory, options)
        assert loaded.cache.n_slots == sim.n_slots
        served = Engine(loaded)
        stats = []
        for r in range(n_requests):
            result = served.generate([[r + 3]], params)
            assert result.outputs[0].token_ids[:-1] == tokens[r * new_tokens + 1 : (r + 1) * new_tokens]
            stats.append(result.stats.total)
        loaded.close()

        assert isinstance(live[0].inner, type(sim_recording.inner))  # the same class ...
        assert live[0].plans == sim_recording.plans  # ... made the same plans, call by call
        assert 2 * n_requests * new_tokens <= len(live[0].plans) <= n_requests * new_tokens * (n_layers + 1)
        assert any(fetch for fetch, _, _ in live[0].plans) and any(evict for _, _, evict in live[0].plans)
        hits = sum(s.hits for s in stats)
        uses = sum(s.accesses for s in stats)
        assert (hits, uses) == (sim.hits, sim.uses) and sim.late == 0
        assert hits / uses == pytest.approx(sim.hit_rate)


def test_planning_thread_hands_over_the_newest_plan_and_its_errors():
    import threading

    from expert_store.plan import Transfer
    from orchestrator.planning_thread import PlanningThread

    gate = threading.Event()

    class Counting(Prefetcher):
        name = "counting"

        def __init__(self):
            self.calls = []

        def begin_step(self, requests, view):
            gate.wait(5)  # hold the worker until the test has queued more calls
            self.calls.append("step")
            return Plan(fetch=(Transfer((0, len(self.calls)), 0.0, 0.0, 1.0),))

        def after_layer(self, routed, view):
            if routed.layer == 9:
                raise ValueError("bad layer")
            self.calls.append(routed.layer)
            return Plan(fetch=(Transfer((1, routed.layer), 0.0, 0.0, 1.0),))

    view = CacheView(now_ms=0.0, n_slots=2, resident=np.zeros((2, 4), bool), layer_ms=(1.0, 1.0))
    inner = Counting()
    thread = PlanningThread(inner)
    assert thread.begin_step([StepRequest("a", (1,))], view) is None  # the worker has not planned yet
    thread.after_layer(LayerRoutes(0, {"a": np.array([[1, 2]])}), view)
    thread.after_layer(LayerRoutes(1, {"a": np.array([[1, 2]])}), view)
    gate.set()
    for _ in range(500):
        if len(inner.calls) == 3:
            break
        threading.Event().wait(0.01)
    plan = thread.poll()
    assert inner.calls == ["step", 0, 1]  # every call ran, in order ...
    assert [t.key for t in plan.fetch] == [(1, 1)] and thread.poll() is None  # ... the newest plan comes out once
    thread.after_layer(LayerRoutes(9, {"a": np.array([[1, 2]])}), view)
    with pytest.raises(RuntimeError, match="planner thread failed: bad layer"):
        for _ in range(500):
            thread.poll()
            threading.Event().wait(0.01)
    thread.close()
    assert not thread._thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        thread.after_layer(LayerRoutes(0, {"a": np.array([[1, 2]])}), view)


def test_a_request_that_fails_midway_leaves_no_state_behind(tiny_models):
    directory, _ = tiny_models["mixtral"]
    sessions = []

    def inputs(space):
        sessions.append(_RepeatLastSessions(*space.shape))
        return policy_inputs(space, learned=sessions[-1])

    loaded = load(directory, LoadOptions(expert_budget="25%", policy="expertflow", policy_inputs=inputs))
    engine = Engine(loaded)

    def stop(tokens):
        if len(tokens) and stop.calls == 2:
            raise KeyboardInterrupt
        stop.calls += 1

    stop.calls = 0
    with pytest.raises(KeyboardInterrupt):
        engine.generate([prompt_ids(50, 6), prompt_ids(51, 9)], SamplingParams(max_new_tokens=8), on_tokens=stop)
    flow = loaded.policy.prefetcher
    assert flow._recent == {} and flow._current == {} and sessions[0].current == {}
    loaded.close()
