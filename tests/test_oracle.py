"""The correctness oracle: ExpertFlow equals transformers, whatever the budget, tier or policy."""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import DEVICES, prompt_ids
from expertflow.engine import Engine
from expertflow.requests import SamplingParams
from expertflow.loader import LoadOptions, load
from expertflow.tiny import FAMILIES


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tiny_models, family, device):
    directory, reference = tiny_models[family]
    loaded = load(directory, LoadOptions(device=device, expert_budget="25%"))
    ids = prompt_ids(1, 24)
    ours = Engine(loaded).logits(ids).cpu()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    loaded.close()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def _one_expert(directory) -> str:
    probe = load(directory, LoadOptions(expert_budget="100%", host_budget="0"))
    nbytes = probe.cache.layout.nbytes
    probe.close()
    return f"{nbytes}B"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches_and_is_budget_invariant(tiny_models, family, device):
    directory, reference = tiny_models[family]
    ids = prompt_ids(2, 12)
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(ids) :].tolist()
    budgets = [_one_expert(directory), "25%", "100%"]
    for budget, host, policy in itertools.product(budgets, ["100%", "0"], ["lru", "ondemand"]):
        loaded = load(directory, LoadOptions(device=device, expert_budget=budget, host_budget=host, policy=policy))
        result = Engine(loaded).generate([ids], SamplingParams(max_new_tokens=32, stop_on_eos=False))
        loaded.close()
        assert result.outputs[0].token_ids == expected, (budget, host, policy)
        stats = result.stats.total
        if host == "0":
            assert stats.bytes_from_host == 0 and stats.bytes_from_nvme > 0
        else:
            assert stats.bytes_from_nvme == 0


def test_sharded_checkpoint_with_index(tmp_path, tiny_models):
    _, reference = tiny_models["qwen2_moe"]
    reference.save_pretrained(str(tmp_path), max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = prompt_ids(3, 10)
    loaded = load(tmp_path, LoadOptions(expert_budget="25%", host_budget="30%"))
    ours = Engine(loaded).logits(ids)
    loaded.close()
    with torch.no_grad():
        theirs = reference(torch.tensor([ids])).logits[0]
    assert (ours - theirs).abs().max().item() < 1e-4
