"""The ExpertFlow policy in the live engine: predictions drive prefetches; outputs never change."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import prompt_ids
from expertflow.engine import Engine, SamplingParams
from expertflow.loader import LoadOptions, load
from orchestrator.live_policy import ExpertFlowPolicy
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

    def factory(spec):
        moe = spec.layers[spec.moe_layers[0]].moe
        return ExpertFlowPolicy(_RepeatLast(len(spec.moe_layers), moe.router.n_experts), spec.moe_layers, threshold=0.5)

    for budget in ["25%", "100%"]:
        loaded = load(directory, LoadOptions(expert_budget=budget, policy_factory=factory))
        result = Engine(loaded).generate(prompts, params)
        loaded.close()
        assert [o.token_ids for o in result.outputs] == [o.token_ids for o in expected.outputs]
        total = result.stats.total
        print(budget, total.to_dict())
        if budget == "25%":  # at 100% every expert stays resident after the prefill
            assert total.prefetches > 0 and total.prefetch_used > 0
        assert total.prefetch_used + total.prefetch_wasted <= total.prefetches
