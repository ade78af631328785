"""Bad input gets a clear error naming the problem, never a traceback from inside torch."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import prompt_ids
from expert_store.checkpoint import CheckpointError
from expert_store.budget import parse_budget
from expertflow.cli import main
from expertflow.engine import Engine, RequestError, SamplingParams
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
