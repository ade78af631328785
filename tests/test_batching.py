"""Continuous batching: requests join and leave between steps; outputs never depend on the company they keep."""

from __future__ import annotations

import pytest
import torch

from conftest import prompt_ids
from expert_store.keys import ExpertKey
from expert_store.store import ExpertStore
from expertflow.batching import BatchEngine
from expertflow.engine import Engine
from expertflow.loader import LoadOptions, load
from expertflow.requests import RequestError, SamplingParams
from expertflow.services.store_server import ServedModel


@pytest.fixture
def loaded(tiny_models):
    loaded = load(tiny_models["mixtral"][0], LoadOptions(expert_budget="25%"))
    yield loaded
    loaded.close()


def _alone(loaded, prompt, params):
    return Engine(loaded).generate([prompt], params).outputs[0].token_ids


def test_requests_joining_mid_run_get_what_they_get_alone(loaded):
    params = [SamplingParams(max_new_tokens=n, stop_on_eos=False) for n in (12, 5, 9, 14)]
    prompts = [prompt_ids(70 + i, 4 + 3 * i) for i in range(4)]
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=5, stop_on_eos=False)
    batch = BatchEngine(loaded, rows=3, max_len=64, max_batch=3)
    arrivals = {0: [0, 1], 2: [2], 3: ["sampled"], 6: [3]}  # step -> requests submitted before it
    submitted, step = {}, 0
    while step < 200 and (step <= max(arrivals) or not batch.idle):
        for key in arrivals.get(step, []):
            prompt, p = (prompt_ids(90, 7), sampled) if key == "sampled" else (prompts[key], params[key])
            submitted[key] = (batch.submit(prompt, p), prompt, p)
        report = batch.step()
        if report is not None:
            assert len(report.ran) <= 3 and len([r for r in report.ran if r.length > 0]) <= 3
        step += 1
    assert batch.idle
    for key, (request, prompt, p) in submitted.items():
        assert request.tokens == _alone(loaded, prompt, p), key  # greedy and seeded sampling alike
        assert request.finish_reason == "length" and len(request.tokens) == p.max_new_tokens
    batch.close()


def test_token_budget_spreads_prompts_over_steps_and_rows_are_reused(loaded):
    batch = BatchEngine(loaded, rows=2, max_len=48, token_budget=20)
    params = SamplingParams(max_new_tokens=3, stop_on_eos=False)
    requests = [batch.submit(prompt_ids(100 + i, 12), params) for i in range(5)]
    reports = []
    while not batch.idle:
        reports.append(batch.step())
    for report in reports:
        assert report.prompt_tokens + report.decode_tokens <= 20 or report.decode_tokens == 0
        assert len({r.row for r in report.ran}) == len(report.ran) <= 2
    assert all(r.tokens == _alone(loaded, r.prompt, params) for r in requests)
    assert {r.row for r in requests} == {0, 1}  # five requests through two rows


def test_the_token_scheduler_keeps_its_wait_bound(tiny_models):
    from expertflow.loader import policy_inputs
    from predictor.learned import LearnedPredictor

    # a predictor of the right shape (untrained: the scheduler's grouping is under test, not its quality)
    from predictor.model import RouteModelConfig, RouteTransformer

    directory = tiny_models["mixtral"][0]

    def inputs(space):
        cfg = RouteModelConfig(space.n_layers, space.n_experts, space.top_k, 128, d_model=16, n_heads=2, layer_dim=8)
        return policy_inputs(space, learned=LearnedPredictor(RouteTransformer(cfg)).sessions())

    loaded = load(directory, LoadOptions(expert_budget="25%", policy="expertflow", policy_inputs=inputs))
    params = SamplingParams(max_new_tokens=12, stop_on_eos=False)
    for scheduler in ("expertflow", "fifo"):
        batch = BatchEngine(loaded, rows=8, max_len=64, max_batch=3, scheduler=scheduler, max_wait=2)
        requests = [batch.submit(prompt_ids(120 + i, 6 + i), params) for i in range(8)]
        while not batch.idle:
            report = batch.step()
            assert report.decode_tokens <= 3  # a micro-batch of 3 decodes, whatever the scheduler picks
            for r in requests:
                assert r.waited <= 2, (scheduler, r.id)  # 8 running, 3 a step: no one left out 3 steps in a row
        assert all(r.tokens == _alone(loaded, r.prompt, params) for r in requests)
        batch.close()
    loaded.close()


def test_cancel_frees_the_row_and_bad_requests_are_refused(loaded):
    batch = BatchEngine(loaded, rows=1, max_len=32)
    params = SamplingParams(max_new_tokens=20, stop_on_eos=False)
    seen = []
    first = batch.submit(prompt_ids(130, 5), params, on_tokens=lambda r, t: seen.append((r.id, t)))
    second = batch.submit(prompt_ids(131, 5), SamplingParams(max_new_tokens=4, stop_on_eos=False))
    batch.step()
    batch.step()
    assert batch.running == 1 and batch.waiting == 1  # one row: the second waits
    assert batch.cancel(first.id) and first.finish_reason == "cancelled" and seen[-1] == (first.id, [])
    while not batch.idle:
        batch.step()
    assert second.finish_reason == "length" and len(second.tokens) == 4
    assert not batch.cancel("nobody")
    with pytest.raises(RequestError, match="context holds 32"):
        batch.submit(prompt_ids(132, 40), params)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        batch.submit([10**6], params)
    long = batch.submit(prompt_ids(133, 28), params)  # 20 asked, 4 columns left in its row
    while not batch.idle:
        batch.step()
    assert len(long.tokens) == 4 and long.finish_reason == "length"


class _LostExpert(ExpertStore):
    """Every expert of `inner` but `lost`, whose reads fail as a store node's that is gone (a real store whose
    one expert cannot be read, not a mock)."""

    def __init__(self, inner: ExpertStore, lost: ExpertKey) -> None:
        self.inner, self.lost, self.layout = inner, lost, inner.layout

    def keys(self):
        return self.inner.keys()

    def tier(self, key):
        return self.inner.tier(key)

    def host_view(self, key):
        return None if key == self.lost else self.inner.host_view(key)

    def read_into(self, key, out):
        if key == self.lost:
            raise OSError(f"expert {tuple(key)}: every store node holding it is gone")
        return self.inner.read_into(key, out)


def test_an_expert_that_cannot_be_read_fails_only_the_requests_that_need_it(tiny_models):
    directory = tiny_models["mixtral"][0]
    params = SamplingParams(max_new_tokens=2, stop_on_eos=False)
    prompts = [prompt_ids(300 + i, 2) for i in range(8)]  # short: each touches few experts
    served = ServedModel.open(directory, "100%", torch.float32)
    inner = served.load()
    try:
        intact = load(directory, LoadOptions(expert_budget="25%", policy="lru"), store=inner)
        expected = [_alone(intact, p, params) for p in prompts]
        intact.close()

        def run(lost: ExpertKey, batch_prompts: list) -> list:
            loaded = load(directory, LoadOptions(expert_budget="25%", policy="lru"), store=_LostExpert(inner, lost))
            try:
                batch = BatchEngine(loaded, rows=8, max_len=32, max_batch=8)
                requests = [batch.submit(p, params) for p in batch_prompts]
                while not batch.idle:
                    batch.step()
                batch.close()
                return requests
            finally:
                loaded.close()

        # an expert that some of the prompts need and some do not (each alone tells which)
        for lost in [ExpertKey(layer, e) for layer in (2, 1, 0) for e in range(8)]:
            needs = [run(lost, [p])[0].finish_reason == "error" for p in prompts]
            if 0 < sum(needs) < len(prompts):
                break
        else:
            pytest.fail("no expert splits the prompts")
        together = run(lost, prompts)  # one batch: a step fails, its requests re-run alone
        for request, need, want in zip(together, needs, expected):
            if need:
                assert request.finish_reason == "error" and f"expert {tuple(lost)}" in request.error
            else:
                assert request.finish_reason == "length" and request.tokens == want
    finally:
        inner.close()
