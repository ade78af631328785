"""The ExpertFlow policy in the live engine: predictions drive prefetches; outputs never change."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import prompt_ids
from expertflow.engine import Engine, SamplingParams
from expertflow.loader import LoadOptions, load
from orchestrator.live_policy import ExpertFlowPolicy, LivePlanConfig
from orchestrator.planner import PlanConfig
from predictor.base import PredictorSession, RoutePredictor


class _RepeatLastSession(PredictorSession):
    """Predicts that a token routes like the previous token did (a fair guess for tests)."""

    def __init__(self, layers: int, experts: int):
        self.last = np.zeros((layers, experts), np.float32)
        self.current = np.zeros_like(self.last)
        self.tokens = 0

    def observe_token(self, token_id: int) -> None:
        if self.tokens:
            self.last, self.current = self.current, np.zeros_like(self.current)
        self.tokens += 1

    def observe_route(self, layer_index: int, experts: list[int]) -> None:
        self.current[layer_index, experts] = 1.0

    def predict(self) -> np.ndarray:
        return self.last


class _RepeatLast(RoutePredictor):
    name = "repeat-last"

    def __init__(self, layers: int, experts: int):
        self.shape = (layers, experts)

    def predict(self, trace, s):  # pragma: no cover - offline replay is not what this test exercises
        raise NotImplementedError

    def session(self) -> PredictorSession:
        return _RepeatLastSession(*self.shape)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v2"])
def test_expertflow_policy_prefetches_and_never_changes_outputs(tiny_models, family):
    directory, _ = tiny_models[family]
    prompts = [prompt_ids(20, 9), prompt_ids(21, 14)]
    params = SamplingParams(max_new_tokens=16, stop_on_eos=False)
    lru = load(directory, LoadOptions(expert_budget="25%", policy="lru"))
    expected = Engine(lru).generate(prompts, params)
    lru.close()

    policies = []

    def factory(spec):
        moe = spec.layers[spec.moe_layers[0]].moe
        predictor = _RepeatLast(len(spec.moe_layers), moe.router.n_experts)
        policies.append(ExpertFlowPolicy(predictor, spec.moe_layers, LivePlanConfig(plan=PlanConfig(threshold=0.5))))
        return policies[-1]

    for budget in ["25%", "100%"]:
        loaded = load(directory, LoadOptions(expert_budget=budget, policy_factory=factory))
        result = Engine(loaded).generate(prompts, params)
        loaded.close()
        assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
        total = result.stats.total
        print(budget, total.to_dict())
        assert policies[-1].plans > 0  # the deadline planner ran at every decode layer
        if budget == "25%":  # at 100% every expert stays resident after the prefill
            assert total.prefetches > 0 and total.prefetch_used > 0
        assert total.prefetch_used + total.prefetch_wasted <= total.prefetches


def test_learned_predictor_with_layer_head_drives_the_live_planner(tiny_models):
    """End to end on CPU: a trace recorded from the model trains a predictor with a layer head; the live
    policy plans with it (refining each layer from the routes already taken) and outputs stay identical."""
    from expertflow.trace import record
    from predictor.learned import LearnedPredictor, LearnedSession
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

    class WatchedSession(LearnedSession):
        def refine(self, layer_index, spec=None):
            refined.append((layer_index, spec))
            return super().refine(layer_index, spec)

    class Watched(LearnedPredictor):
        def session(self):
            return WatchedSession(self.model)

    made = []

    def factory(spec):
        made.append(ExpertFlowPolicy(Watched(model), spec.moe_layers))
        return made[-1]

    loaded = load(directory, LoadOptions(expert_budget="25%", policy_factory=factory))
    result = Engine(loaded).generate(prompts[:2], params)
    loaded.close()
    assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
    assert [o.finish_reason for o in result.outputs] == ["eos", "length"]  # request 0 left the batch early
    assert refined and result.stats.total.prefetches > 0
    # each layer after the first is refined once the layer before it has routed, with the model's gate speculation
    assert {j for j, _ in refined} == set(range(1, len(trace.info.moe_layers)))
    assert all(spec is not None and len(spec) == trace.info.top_k for _, spec in refined)
    # one plan per layer and decode step: the plan made when a layer routes serves the next layer's routing too
    assert 0 < made[-1].plans <= len(trace.info.moe_layers) * params.max_new_tokens
