"""The command line, end to end, on the embedded default model and on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest

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
def test_default_model_text(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EXPERTFLOW_CACHE", str(tmp_path))
    assert main(["generate", "--prompt", "Hello", "--max-new-tokens", "6", "--policy", "ondemand"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("Hello")
    assert "tok/s" in captured.err and "hit rate" in captured.err
    assert (tmp_path / "tiny-mixtral-random-v1" / "tokenizer.json").exists()
    assert main(["generate", "--prompt", "Hello", "--max-new-tokens", "6", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["requests"][0]["token_ids"]) == 6
