"""Rules every command shares: one budget syntax, expert sizes from the trace, stopping rules said out loud,
paths in saved metadata relative to the file, progress on stderr with stdout clean."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from expert_store.budget import parse_share
from expertflow.cli import main
from predictor.train import DEFAULT_SECONDS, TrainConfig
from traces.format import Trace, TraceInfo


pytestmark = pytest.mark.usefixtures("one_thread")


def _trace(seed: int = 0, n_seq: int = 6, length: int = 20, expert_bytes: int | None = 1000) -> Trace:
    """3 MoE layers x 8 experts, top-2; `info.extra` records `expert_bytes` unless None."""
    rng = np.random.default_rng(seed)
    n = n_seq * length
    experts = np.sort(np.stack([rng.permutation(8)[:2] for _ in range(n * 3)]), -1).reshape(n, 3, 2)
    extra = {} if expert_bytes is None else {"expert_bytes": expert_bytes}
    return Trace(
        TraceInfo("toy", "mixtral", (0, 1, 2), 8, 2, ("a",), extra=extra),
        rng.integers(0, 16, n).astype(np.int32),
        np.arange(0, n + 1, length).astype(np.int64),
        np.zeros(n_seq, np.int16),
        experts.astype(np.uint8),
        np.full(experts.shape, 0.5, np.float16),
    )


def _simulate(capsys, path, *args) -> tuple[int, list | None, str]:
    code = main(["simulate", "--traces", str(path), "--policy", "lru", "--json", *args])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if code == 0 else None), err


def test_simulate_takes_generates_budget_syntax_with_its_messages(tmp_path, capsys, mixtral_dir):
    path = tmp_path / "t.safetensors"
    _trace().save(path)
    code, rows, err = _simulate(capsys, path, "--budget", "25%,50%,12kB")  # 12000 B of 24 x 1000: 50%
    assert code == 0 and [r["budget"] for r in rows] == [0.25, 0.5, 0.5]
    assert "t: 100%" in err and "3/3" in err  # progress on stderr, a step per run; stdout held only the JSON
    _, shares, _ = _simulate(capsys, path, "--budget", "0.25,0.5")  # a bare share, as documented in --help
    assert [r["hits"] for r in shares] == [r["hits"] for r in rows[:2]]
    mistakes = {
        "150%": "'150%' is over 100%",
        "1.5": "'1.5' is over 100%",
        "lots": "'lots' is not a size",
        "0%": "'0%' holds no expert",
        "999B": "999B (999 bytes) is smaller than one expert",
    }
    for bad, message in mistakes.items():
        code, _, err = _simulate(capsys, path, "--budget", bad)
        assert code == 2 and f"--budget {message}" in err, (bad, err)
        assert err.startswith("expertflow: error:") and "Traceback" not in err
    # generate words the same mistake the same way
    assert main(["generate", "--model", str(mixtral_dir), "--prompt-ids", "1,2", "--expert-budget", "150%"]) == 2
    assert "--expert-budget '150%' is over 100%" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is over 100%"):
        parse_share("101%", 100, "--budget")


def test_expert_bytes_come_from_the_trace_or_the_flag(tmp_path, capsys):
    recorded, bare = tmp_path / "r.safetensors", tmp_path / "b.safetensors"
    _trace(expert_bytes=1000).save(recorded)
    _trace(expert_bytes=None).save(bare)
    code, rows, _ = _simulate(capsys, recorded, "--budget", "25%")
    assert code == 0 and rows[0]["bytes_moved"] == rows[0]["transfers"] * 1000
    code, _, err = _simulate(capsys, bare, "--budget", "25%")
    assert code == 2 and "does not record the size of one expert" in err and "--expert-bytes" in err
    code, rows, _ = _simulate(capsys, bare, "--budget", "25%", "--expert-bytes", "3*4*5")
    assert code == 0 and rows[0]["bytes_moved"] == rows[0]["transfers"] * 60
    assert main(["schedule", "--traces", str(bare), "--json"]) == 2
    assert "--expert-bytes" in capsys.readouterr().err
    code, _, err = _simulate(capsys, recorded, "--expert-bytes", "25%")
    assert code == 2 and "is a share" in err


def test_the_committed_traces_record_their_expert_size():
    from traces.format import load_trace

    assert load_trace("traces/data/coarse_test.safetensors").info.extra["expert_bytes"] == 3 * 256 * 320 * 2
    assert load_trace("traces/data/fine_validation.safetensors").info.extra["expert_bytes"] == 3 * 512 * 128 * 2


SMALL = ["--d-model", "16", "--layers", "1", "--heads", "2", "--context", "16", "--layer-dim", "8"]


def _train(tmp_path, *args: str) -> list[str]:
    return [
        "train-predictor",
        "--traces",
        str(tmp_path / "train.safetensors"),
        "--out",
        str(tmp_path / "p"),
        *SMALL,
        *args,
    ]


def test_training_stops_by_the_limit_the_user_gave_and_says_so(tmp_path, capsys):
    _trace(n_seq=12).save(tmp_path / "train.safetensors")
    assert TrainConfig().limits() == (None, DEFAULT_SECONDS) and TrainConfig(max_steps=5).limits() == (5, None)
    assert main(_train(tmp_path, "--max-steps", "4")) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)  # stdout: the result only; the log and the bar went to stderr
    assert (result["stopped_by"], result["steps_done"], result["steps_requested"]) == ("steps", 4, 4)
    assert result["seconds_requested"] is None and "ran the 4 requested steps" in err
    assert main(_train(tmp_path, "--max-steps", "100000", "--seconds", "0.3")) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["stopped_by"] == "time" and result["steps_done"] < 100000 == result["steps_requested"]
    assert f"after {result['steps_done']} of the 100000 requested steps" in err and "--seconds" in err
    assert main(_train(tmp_path, "--max-steps", "0")) == 2
    assert "--max-steps 0" in capsys.readouterr().err


def test_train_json_paths_resolve_from_any_directory(tmp_path, monkeypatch, capsys):
    (tmp_path / "work").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    _trace(n_seq=12).save("train.safetensors")  # typed relative to the directory it was trained from
    _trace(seed=1).save(tmp_path / "test.safetensors")
    assert main(["train-predictor", "--traces", "train.safetensors", "--out", "p", "--max-steps", "2", "--quiet",
                 "--d-model", "16", "--layers", "1", "--heads", "2", "--context", "16"]) == 0  # fmt: skip
    meta = json.loads((tmp_path / "work" / "p" / "train.json").read_text())
    assert meta["traces"] == ["../train.safetensors"]
    monkeypatch.chdir(tmp_path / "elsewhere")
    capsys.readouterr()
    evaluate = [
        "eval-predictor",
        "--predictor",
        str(tmp_path / "work" / "p"),
        "--traces",
        str(tmp_path / "test.safetensors"),
    ]
    assert main([*evaluate, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["train_traces"] == [str(tmp_path / "work" / "train.safetensors")]
    assert "evaluating" in err  # progress per scored sequence, on stderr
    (tmp_path / "work" / "train.safetensors").unlink()
    assert main(evaluate) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "work" / "train.safetensors") in err and "train.json" in err and "--train-traces" in err
    assert main([*evaluate, "--train-traces", str(tmp_path / "test.safetensors"), "--json"]) == 0


def test_routes_recorded_by_expertflow_trace_carry_the_expert_size(tmp_path, mixtral_dir):
    from traces.format import load_trace

    np.save(tmp_path / "d.npy", np.array([5, 6, 7, 8, 2, 9, 10, 11, 2], np.int32))
    assert main(["trace", "--model", str(mixtral_dir), "--data", str(tmp_path / "d.npy"),
                 "--out", str(tmp_path / "t.safetensors")]) == 0  # fmt: skip
    extra = load_trace(tmp_path / "t.safetensors").info.extra
    assert extra == {"expert_bytes": 3 * 64 * 96 * 4, "expert_dtype": "float32"}  # the tiny model's fp32 experts
