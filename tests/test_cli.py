"""The command line, end to end, on the embedded default model and on a tiny checkpoint."""

from __future__ import annotations

import io
import json
import select
import signal
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import torch

from conftest import prompt_ids
from expertflow.cli import _TextStream, main
from expertflow.engine import Engine
from expertflow.loader import LoadedModel

ROOT = Path(__file__).resolve().parents[1]


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
    assert out["dtype"] == "float32" and out["max_new_tokens_capped_to"] is None


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
    from expertflow.loader import LoadOptions, load
    from expertflow.tokenizer import TextCodec

    directory = default_model_dir()
    codec = TextCodec(directory)
    loaded = load(directory, LoadOptions(expert_budget="25%"))
    text = "import os\nimport sys\n\n\ndef main():\n    return 0\n"
    ids = [0] + codec.encode(text)
    logits = Engine(loaded).logits(ids)
    loaded.close()
    # what --dtype's help says: the checkpoint's dtype on CUDA, float32 on CPU
    assert loaded.spec.dtype == torch.bfloat16 and loaded.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()
    assert loss < 3.5  # a random model of this vocabulary scores about ln(4096) = 8.3


class _Recorder(io.StringIO):
    """A stdout that keeps each write, to see what was printed when."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _writes_during_generate(monkeypatch) -> tuple[_Recorder, list[list[str]]]:
    stdout, during = _Recorder(), []
    real = Engine.generate

    def generate(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        during.append(list(stdout.writes))
        return result

    monkeypatch.setattr(sys, "stdout", stdout)
    monkeypatch.setattr(Engine, "generate", generate)
    return stdout, during


def test_one_prompt_streams_while_generating(mixtral_dir, monkeypatch, capsys):
    args = ["generate", "--model", str(mixtral_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "6"]
    assert main([*args, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["requests"][0]
    stdout, during = _writes_during_generate(monkeypatch)
    assert main(args) == 0
    pieces = [("," if i else " ") + str(t) for i, t in enumerate(expected["token_ids"])]
    assert during == [["5,6,7", *pieces]]  # the prompt, then one piece per token, before generate returned
    assert stdout.getvalue() == f"5,6,7{expected['text']}\n"


def test_a_batch_prints_at_the_end(mixtral_dir, monkeypatch, capsys):
    args = ["generate", "--model", str(mixtral_dir), "--prompt-ids", "5,6,7", "--prompt-ids", "9,10"]
    assert main([*args, "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)["requests"]
    stdout, during = _writes_during_generate(monkeypatch)
    assert main(args) == 0
    assert during == [[]]
    assert stdout.getvalue().splitlines() == [r["prompt"] + r["text"] for r in expected]


def test_stream_prints_a_multibyte_character_once_whole():
    out = _Recorder()
    stream = _TextStream("P", lambda ids: bytes(ids).decode("utf-8", errors="replace"), out)
    for byte in "a日b".encode():  # 日 is three bytes, so three tokens of a byte-level tokenizer
        stream([(0, byte)])
    stream.finish()
    assert out.getvalue() == "Pa日b\n"
    assert not any("\ufffd" in w for w in out.writes)


def test_max_new_tokens_capped_by_the_context_is_reported(mixtral_dir, capsys):
    ids = ",".join(map(str, prompt_ids(0, 250)))  # the tiny models' context is 256
    args = ["generate", "--model", str(mixtral_dir), "--prompt-ids", ids, "--max-new-tokens", "100000"]
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_new_tokens_capped_to"] == 6 and 1 <= len(out["requests"][0]["token_ids"]) <= 6
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "expertflow: warning: --max-new-tokens 100000 capped to 6: " in err and "256-token context" in err


def test_output_names_the_dtype_that_ran(mixtral_dir, capsys):
    args = ["generate", "--model", str(mixtral_dir), "--prompt-ids", "5,6", "--max-new-tokens", "2", "--device", "cpu"]
    assert main([*args, "--dtype", "bfloat16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["dtype"] == "bfloat16"
    assert main(args) == 0
    assert "[mixtral on cpu, float32, policy lru," in capsys.readouterr().err


@pytest.mark.parametrize(
    "command, shown",
    [
        ("generate", ["25% of all (default: 25%)", "(default: 32)", "(default: lru)", "(default: 0.0)", "float32 on cpu"]),
        ("trace", ["(default: 256)", "(default: 100%)", "float32 on cpu"]),
        ("simulate", ["(default: all)", "(default: 55GB/s)"]),  # mounted from orchestrator/cli.py
        ("train-predictor", ["(default: "]),  # mounted from predictor/cli.py
    ],
)
def test_help_shows_defaults(command, shown, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the wrapping to the terminal's width
    assert all(s in text for s in shown), text
    assert "(default: None)" not in text and "(default: False)" not in text


def test_version(capsys, monkeypatch):
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"expertflow {expected}\n"

    def not_installed(name: str) -> str:
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a checkout run without pip install
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out == f"expertflow {expected}\n"


def test_ctrl_c_closes_the_model_and_exits_130(mixtral_dir, monkeypatch, capsys):
    closed: list[LoadedModel] = []
    real_close, real_stream = LoadedModel.close, _TextStream.__call__

    def close(self: LoadedModel) -> None:
        closed.append(self)
        real_close(self)

    def interrupted(self: _TextStream, sampled: list[tuple[int, int]]) -> None:
        real_stream(self, sampled)
        raise KeyboardInterrupt  # where Ctrl-C lands most often: between two decode steps

    monkeypatch.setattr(LoadedModel, "close", close)
    monkeypatch.setattr(_TextStream, "__call__", interrupted)
    args = ["generate", "--model", str(mixtral_dir), "--prompt-ids", "5,6,7", "--max-new-tokens", "20"]
    assert main(args) == 130
    captured = capsys.readouterr()
    assert captured.err == "expertflow: interrupted\n"
    assert len(closed) == 1
    assert captured.out.startswith("5,6,7 ") and captured.out.endswith("\n")  # the streamed line is ended


def _streaming_process() -> subprocess.Popen:
    """The embedded model writing 1000 tokens (many seconds; it does not stop early on this prompt)."""
    command = ["generate", "--prompt", "def read_config(path):", "--max-new-tokens", "1000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "expertflow.cli", *command], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    assert ready, "no text streamed within 60 s"
    return proc


def test_ctrl_c_in_a_real_process():
    proc = _streaming_process()
    try:
        first = proc.stdout.read1(1 << 16)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert first.startswith(b"def read_config(path):")
    assert proc.returncode == 130, err.decode()
    assert err.decode().endswith("expertflow: interrupted\n") and b"Traceback" not in err


def test_reader_leaving_the_pipe_is_not_a_traceback():
    proc = _streaming_process()  # as in `expertflow generate ... | head -1`
    try:
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 141 and b"Traceback" not in err, err.decode()
