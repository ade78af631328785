"""The benchmark's zero-padded checkpoints: bigger experts, the very same model."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from bench.padded_experts import pad_checkpoint
from conftest import prompt_ids
from expertflow.engine import Engine
from expertflow.requests import SamplingParams
from expertflow.loader import LoadOptions, load


def test_padded_experts_change_size_not_outputs(mixtral_dir, tmp_path):
    cfg = json.loads((mixtral_dir / "config.json").read_text())
    width, hidden = cfg["intermediate_size"], cfg["hidden_size"]
    element = 4 if cfg.get("dtype", cfg.get("torch_dtype")) == "float32" else 2
    padded = pad_checkpoint(mixtral_dir, tmp_path / "padded", 3 * hidden * (3 * width) * element)
    assert json.loads((padded / "config.json").read_text())["intermediate_size"] == 3 * width

    ids = torch.tensor([prompt_ids(3, 12)])
    with torch.no_grad():
        ref = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir).float()(ids).logits
        big = transformers.AutoModelForCausalLM.from_pretrained(padded).float()(ids).logits
    assert torch.allclose(big, ref, atol=1e-5)

    params = SamplingParams(max_new_tokens=8, stop_on_eos=False)
    outs = []
    for directory in (mixtral_dir, padded):
        loaded = load(directory, LoadOptions(expert_budget="25%"))
        outs.append(Engine(loaded).generate([prompt_ids(4, 10)], params).outputs[0].token_ids)
        nbytes = loaded.cache.layout.nbytes
        loaded.close()
    assert outs[0] == outs[1]
    assert nbytes >= 3 * hidden * (3 * width) * element


def test_padding_refuses_a_smaller_size_other_families_and_its_own_source(mixtral_dir, tiny_models, tmp_path):
    with pytest.raises(ValueError, match="below the model's own expert size"):
        pad_checkpoint(mixtral_dir, tmp_path / "small", 16)
    with pytest.raises(ValueError, match="Mixtral checkpoints"):
        pad_checkpoint(tiny_models["qwen3_moe"][0], tmp_path / "qwen", 1 << 20)
    with pytest.raises(ValueError, match="another directory"):
        pad_checkpoint(mixtral_dir, mixtral_dir, 1 << 20)


def test_a_padded_copy_is_reused_only_for_the_same_source_and_size(mixtral_dir, tmp_path):
    cfg = json.loads((mixtral_dir / "config.json").read_text())
    size = 3 * cfg["hidden_size"] * (2 * cfg["intermediate_size"]) * 4
    out = pad_checkpoint(mixtral_dir, tmp_path / "p", size)
    first = (out / "padded.json").stat().st_mtime_ns
    assert pad_checkpoint(mixtral_dir, tmp_path / "p", size) == out
    assert (out / "padded.json").stat().st_mtime_ns == first  # reused, not rewritten
    pad_checkpoint(mixtral_dir, tmp_path / "p", 2 * size)
    assert json.loads((out / "config.json").read_text())["intermediate_size"] >= 4 * cfg["intermediate_size"]
