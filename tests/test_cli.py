"""The command line, end to end, on the embedded default model and on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from expertflow.cli import main


def test_generate_json_with_prompt_ids(mixtral_dir, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(mixtral_dir),
            "--prompt-ids",
            "5,6,7",
            "--prompt-ids",
            "9,10",
            "--expert-budget",
            "25%",
            "--host-budget",
            "0",
            "--max-new-tokens",
            "5",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for r in out["requests"]:
        assert len(r["token_ids"]) == 5 or (r["finish_reason"] == "eos" and r["token_ids"][-1] == 2)
    assert out["stats"]["bytes_from_nvme"] > 0 and out["stats"]["bytes_from_host"] == 0
    assert out["memory"]["weight_bytes_saved"] > 0.5
    assert len(out["per_step"]) == 5


@pytest.mark.slow
def test_default_model_writes_text(capsys):
    assert main(["generate", "--prompt", "In the beginning God", "--max-new-tokens", "12", "--policy", "lru"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("In the beginning God")
    assert "tok/s" in captured.err and "hit rate" in captured.err
    assert main(["generate", "--prompt", "def main(", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["family"] == "mixtral" and 1 <= len(out["requests"][0]["token_ids"]) <= 8


def test_default_model_is_the_trained_one():
    from expertflow.default_model import default_model_dir
    from expertflow.engine import Engine
    from expertflow.loader import LoadOptions, load
    from expertflow.tokenizer import TextCodec

    directory = default_model_dir()
    codec = TextCodec(directory)
    loaded = load(directory, LoadOptions(expert_budget="25%"))
    text = "import os\nimport sys\n\n\ndef main():\n    return 0\n"
    ids = [0] + codec.encode(text)
    logits = Engine(loaded).logits(ids)
    loaded.close()
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert loss < 3.5  # a random model of this vocabulary scores about ln(4096) = 8.3
