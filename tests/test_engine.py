"""Engine behaviour: batches of different lengths, stopping, sampling, statistics."""

from __future__ import annotations

import pytest
import torch

from conftest import prompt_ids
from expertflow.engine import Engine
from expertflow.requests import SamplingParams, sample
from expertflow.loader import LoadOptions, load


@pytest.fixture
def engine(tiny_models):
    loaded = load(tiny_models["qwen3_moe"][0], LoadOptions(expert_budget="25%"))
    yield Engine(loaded)
    loaded.close()


def test_batch_of_different_lengths_equals_each_alone(engine):
    prompts = [prompt_ids(10, 5), prompt_ids(11, 17), prompt_ids(12, 9)]
    params = SamplingParams(max_new_tokens=16, stop_on_eos=False)
    batched = engine.generate(prompts, params)
    for prompt, out in zip(prompts, batched.outputs):
        alone = engine.generate([prompt], params).outputs[0]
        assert out.token_ids == alone.token_ids
        assert out.prompt_ids == prompt


def test_stops_on_stop_token_and_at_max_tokens(engine):
    prompt = prompt_ids(4, 8)
    free = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_on_eos=False)).outputs[0]
    assert len(free.token_ids) == 12 and free.finish_reason == "length"
    stop = free.token_ids[4]
    first = free.token_ids.index(stop)
    stopped = engine.generate([prompt], SamplingParams(max_new_tokens=12, stop_token_ids=(stop,))).outputs[0]
    assert stopped.token_ids == free.token_ids[: first + 1]
    assert stopped.finish_reason == "eos"


def test_finished_requests_stop_pulling_experts(engine):
    prompts = [prompt_ids(5, 6), prompt_ids(6, 6)]
    free = engine.generate(prompts, SamplingParams(max_new_tokens=10, stop_on_eos=False))
    stop = free.outputs[0].token_ids[0]
    result = engine.generate(prompts, SamplingParams(max_new_tokens=10, stop_token_ids=(stop,)))
    assert len(result.outputs[0].token_ids) == 1
    # the other request continues unchanged until its own stop
    other = free.outputs[1].token_ids
    expected = other[: other.index(stop) + 1] if stop in other else other
    assert result.outputs[1].token_ids == expected


def test_sampling_is_seeded_and_top_p_restricts(engine):
    prompt = prompt_ids(7, 8)
    p = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=3, stop_on_eos=False)
    a = engine.generate([prompt], p).outputs[0].token_ids
    b = engine.generate([prompt], p).outputs[0].token_ids
    assert a == b
    logits = torch.tensor([[5.0, 4.0, -10.0, -10.0]])
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=0.5), g).item() for _ in range(50)}
    assert draws == {0}
    draws = {sample(logits, SamplingParams(temperature=1.0, top_p=1.0), g).item() for _ in range(200)}
    assert draws == {0, 1}


def test_lru_reuses_experts_and_stats_add_up(tiny_models):
    loaded = load(tiny_models["mixtral"][0], LoadOptions(expert_budget="100%", policy="lru"))
    engine = Engine(loaded)
    prompt = prompt_ids(8, 10)
    first = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop_on_eos=False))
    second = engine.generate([prompt], SamplingParams(max_new_tokens=8, stop_on_eos=False))
    loaded.close()
    t1, t2 = first.stats.total, second.stats.total
    assert t1.misses > 0 and t1.misses <= 3 * 8  # each expert loaded at most once with a full budget
    assert t2.misses == 0 and t2.hits == t1.accesses
    assert sum(s.accesses for s in first.stats.steps) == t1.accesses
    assert len(first.stats.steps) == 8  # prefill + 7 decode steps
    assert first.memory.weight_bytes_saved == pytest.approx(0.0, abs=1e-9)


def test_ondemand_never_hits_and_memory_is_saved(tiny_models):
    loaded = load(tiny_models["mixtral"][0], LoadOptions(expert_budget="25%", policy="ondemand"))
    result = Engine(loaded).generate([prompt_ids(9, 6)], SamplingParams(max_new_tokens=6, stop_on_eos=False))
    loaded.close()
    assert result.stats.total.hits == 0
    assert result.stats.total.bytes_moved == result.stats.total.misses * loaded.cache.layout.nbytes
    assert 0.5 < result.memory.weight_bytes_saved < 0.75
