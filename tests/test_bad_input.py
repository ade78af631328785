"""Bad input gets a clear error naming the problem, never a traceback from inside torch."""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import prompt_ids
from expert_store.checkpoint import CheckpointError
from expert_store.budget import parse_budget, percent_at_least
from expertflow.cli import main
from expertflow.engine import Engine
from expertflow.requests import RequestError, SamplingParams
from expertflow.families import UnsupportedArchitecture
from expertflow.loader import LoadOptions, load


@pytest.fixture
def ckpt(tmp_path, mixtral_dir):
    directory = tmp_path / "model"
    shutil.copytree(mixtral_dir, directory)
    return directory


def _edit_config(directory, **changes):
    path = directory / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load(tmp_path / "nope")


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(ckpt)


def test_missing_weights_file(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load(ckpt)


def test_missing_shard_listed_in_index(tmp_path, tiny_models):
    tiny_models["mixtral"][1].save_pretrained(str(tmp_path), max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing: {shard.name}"):
        load(tmp_path)


def test_pickle_checkpoints_are_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not even opened")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load(ckpt)


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load(ckpt)


def test_missing_tensor_is_named(ckpt):
    path = ckpt / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.k_proj.weight"):
        load(ckpt)


def test_shape_mismatch_dense(ckpt):
    _edit_config(ckpt, num_key_value_heads=4)
    with pytest.raises(CheckpointError, match="k_proj.weight.*has shape"):
        load(ckpt)


def test_shape_mismatch_expert(ckpt):
    _edit_config(ckpt, intermediate_size=100)
    with pytest.raises(ValueError, match="experts.0.w1.weight.*has shape"):
        load(ckpt)


def test_unknown_architecture(ckpt):
    _edit_config(ckpt, architectures=["LlamaForCausalLM"], model_type="llama")
    with pytest.raises(UnsupportedArchitecture, match="LlamaForCausalLM"):
        load(ckpt)


def test_budget_smaller_than_one_expert(mixtral_dir):
    with pytest.raises(ValueError, match="smaller than one expert"):
        load(mixtral_dir, LoadOptions(expert_budget="1KiB"))
    with pytest.raises(ValueError, match="smaller than one expert"):
        load(mixtral_dir, LoadOptions(expert_budget="0%"))


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "150%", "-5GB"])
def test_unparseable_budget(text):
    with pytest.raises(ValueError):
        parse_budget(text, 1000)


def test_budget_units():
    assert parse_budget("6GiB", 0) == 6 * 2**30
    assert parse_budget("512MB", 0) == 512 * 10**6
    assert parse_budget("25%", 1000) == 250
    assert parse_budget("4096", 0) == 4096


@pytest.fixture
def engine(mixtral_dir):
    loaded = load(mixtral_dir, LoadOptions(expert_budget="25%"))
    yield Engine(loaded)
    loaded.close()


def test_prompt_longer_than_context(engine):
    context = engine.spec.max_positions
    with pytest.raises(RequestError, match=f"longer than the model's context of {context}"):
        engine.generate([prompt_ids(0, context + 1)])


def test_empty_prompt(engine):
    with pytest.raises(RequestError, match="prompt 1 is empty"):
        engine.generate([[5, 6], []])
    with pytest.raises(RequestError, match="no prompts"):
        engine.generate([])


def test_token_outside_vocabulary(engine):
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.generate([[5, 10_000]])


def test_bad_sampling_params():
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(RequestError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_generation_near_the_context_end_stops_at_it(engine):
    context = engine.spec.max_positions
    out = engine.generate([prompt_ids(0, context - 3)], SamplingParams(max_new_tokens=10, stop_on_eos=False))
    assert len(out.outputs[0].token_ids) == 3
    assert out.max_new_tokens_capped_to == 3
    out = engine.generate([prompt_ids(0, context - 3)], SamplingParams(max_new_tokens=3, stop_on_eos=False))
    assert len(out.outputs[0].token_ids) == 3 and out.max_new_tokens_capped_to is None


def test_cli_reports_errors_without_traceback(tmp_path, ckpt, capsys):
    assert main(["generate", "--model", str(tmp_path / "absent"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("expertflow: error:") and "Traceback" not in err
    _edit_config(ckpt, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    assert main(["generate", "--model", str(ckpt), "--prompt", "x"]) == 2
    assert "unsupported architecture" in capsys.readouterr().err


def test_cli_text_prompt_needs_a_tokenizer(mixtral_dir, capsys):
    assert main(["generate", "--model", str(mixtral_dir), "--prompt", "hello"]) == 2
    assert "no tokenizer.json" in capsys.readouterr().err
    assert main(["generate", "--model", str(mixtral_dir), "--prompt-ids", "1,x"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["generate", "--model", str(mixtral_dir), "--prompt-ids", ""]) == 2
    assert "empty" in capsys.readouterr().err


def test_cli_non_utf8_prompt(mixtral_dir, capsys):
    prompt = os.fsdecode(b"\xff\xfe")  # what Python makes of argv bytes the locale cannot decode
    assert main(["generate", "--model", str(mixtral_dir), "--prompt", prompt]) == 2
    err = capsys.readouterr().err
    assert err.startswith("expertflow: error: --prompt b'\\xff\\xfe' is not UTF-8 text") and "Traceback" not in err


@pytest.mark.parametrize(
    "changes",
    [
        dict(temperature=math.nan),
        dict(temperature=math.inf),
        dict(temperature=-math.inf),
        dict(top_p=math.nan),
        dict(top_p=math.inf),
    ],
)
def test_non_finite_sampling_params(changes):
    with pytest.raises(RequestError, match=f"{next(iter(changes))} must be"):
        SamplingParams(**changes)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--temperature", "nan", "temperature must be a finite number >= 0, not nan"),
        ("--temperature", "inf", "temperature must be a finite number >= 0, not inf"),
        ("--top-p", "nan", "top_p must be in (0, 1], not nan"),
        ("--max-new-tokens", "-1", "max_new_tokens must be >= 0"),
    ],
)
def test_cli_rejects_bad_sampling_values_before_loading(flag, value, message, capsys, monkeypatch):
    import expertflow.loader

    monkeypatch.setattr(expertflow.loader, "load", lambda *a, **k: pytest.fail("loaded a model for a bad flag"))
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--prompt", "x", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}: {message}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_size=-64), "hidden_size must be a positive integer, not -64"),
        (dict(hidden_size=0), "hidden_size must be a positive integer, not 0"),
        (dict(num_local_experts=-2), "num_local_experts must be a positive integer, not -2"),
        (dict(num_experts_per_tok=9), "num_experts_per_tok (9) is more than num_local_experts (8)"),
        (dict(num_experts_per_tok=0), "num_experts_per_tok must be a positive integer, not 0"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer, not 0"),
        (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer, not -1"),
        (dict(vocab_size=0), "vocab_size must be a positive integer, not 0"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer, not -5"),
        (dict(num_attention_heads=0), "num_attention_heads must be a positive integer, not 0"),
        (dict(max_position_embeddings=0), "max_position_embeddings must be a positive integer, not 0"),
    ],
)
def test_nonsense_config_sizes_name_file_and_field(ckpt, changes, field):
    _edit_config(ckpt, **changes)
    with pytest.raises(CheckpointError) as e:
        load(ckpt)
    assert str(e.value) == f"{ckpt / 'config.json'}: {field}"


def test_nonsense_config_field_is_named_as_the_file_spells_it(tmp_path, tiny_models):
    # released Qwen3-MoE configs spell num_experts; transformers stores it as num_local_experts
    directory = tmp_path / "qwen3"
    shutil.copytree(tiny_models["qwen3_moe"][0], directory)
    cfg = json.loads((directory / "config.json").read_text())
    del cfg["num_local_experts"]
    (directory / "config.json").write_text(json.dumps({**cfg, "num_experts": 2}))
    with pytest.raises(CheckpointError, match=r"config.json: num_experts_per_tok \(4\) is more than num_experts \(2\)"):
        load(directory)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{", "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8 text"),
        (b"[1, 2]", "not a JSON object but [1, 2]"),
        (b"null", "not a JSON object but null"),
        (b'{"architectures": 5, "model_type": "mixtral"}', "architectures must be a list of class names, not 5"),
        (b'{"architectures": ["MixtralForCausalLM"], "hidden_size": "big"}', "transformers cannot read this config"),
        (b'{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}', "unsupported architecture"),
    ],
)
def test_garbage_config_names_the_file(ckpt, content, message, capsys):
    (ckpt / "config.json").write_bytes(content)
    with pytest.raises(CheckpointError if "unsupported" not in message else UnsupportedArchitecture) as e:
        load(ckpt)
    assert str(e.value).startswith(f"{ckpt / 'config.json'}: ") and message in str(e.value)
    assert main(["generate", "--model", str(ckpt), "--prompt-ids", "1,2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"expertflow: error: {ckpt / 'config.json'}: ") and "Traceback" not in err


def test_unreadable_config_names_the_file(ckpt):
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").mkdir()
    with pytest.raises(CheckpointError, match="config.json: cannot be read"):
        load(ckpt)


def test_budget_suggestion_is_accepted():
    # the embedded model has 32 experts: one is 3.125%, which two decimals rounded down to a refused 3.12%
    from expertflow.default_model import default_model_dir

    with pytest.raises(ValueError, match="smaller than one expert") as e:
        load(default_model_dir(), LoadOptions(expert_budget="1KiB"))
    suggested = re.search(r"give at least (\d+) bytes or (\S+%)$", str(e.value))
    assert suggested is not None, str(e.value)
    for budget in suggested.groups():
        loaded = load(default_model_dir(), LoadOptions(expert_budget=budget, host_budget="0"))
        try:
            assert loaded.cache.n_slots == 1
        finally:
            loaded.close()


def test_percent_at_least():
    assert parse_budget("3.125%", 32_000) == 1000
    assert parse_budget(".5%", 1000) == 5 and parse_budget("3.%", 100) == 3
    assert percent_at_least(1, 32) == "3.13%" and percent_at_least(3, 3) == "100%"
    g = random.Random(0)
    for _ in range(2000):
        total = g.randint(1, 10**14)
        needed = g.randint(1, total) if g.random() < 0.5 else g.randint(1, max(1, total // 10**6))
        text = percent_at_least(needed, total)
        got = parse_budget(text, total)
        assert needed <= got <= needed * 1.01 + total * 1e-4, (needed, total, text)  # enough, not wastefully more
