"""`expertflow prepare` end to end on a tiny checkpoint, the default predictor location, and the shipped predictor."""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from expertflow.cli import main
from expertflow.prepare import STAGES, heldout_documents
from predictor import locate
from predictor.locate import default_predictor_dir, find_predictor, model_id
from traces.format import load_trace

ROOT = Path(__file__).resolve().parents[1]
# d_model 16, one block, short context: the workflow is under test here, not the predictor's quality
SMALL = ["--d-model", "16", "--layers", "1", "--heads", "2", "--context", "16", "--layer-dim", "8", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def model(tmp_path, mixtral_dir, monkeypatch) -> Path:
    """A private copy of the tiny Mixtral (prepare writes next to it), and a private user cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return Path(shutil.copytree(mixtral_dir, tmp_path / "tiny-mixtral"))


def _documents(path: Path, n_docs: int = 14, seed: int = 0) -> list[list[int]]:
    """An .npy token stream of `n_docs` documents separated by the tiny models' EOS id (2)."""
    rng = np.random.default_rng(seed)
    docs = [rng.integers(3, 96, int(rng.integers(12, 30))).tolist() for _ in range(n_docs)]
    np.save(path, np.array([t for d in docs for t in d + [2]], np.int32))
    return docs


def _prepare(model: Path, data: Path, *extra: str) -> int:
    return main(["prepare", "--model", str(model), "--data", str(data), "--max-steps", "3", *SMALL, *extra])


def test_prepare_places_a_predictor_that_generate_finds_and_resumes(model, tmp_path, capsys):
    docs = _documents(tmp_path / "notes.npy")
    assert main(["generate", "--model", str(model), "--policy", "expertflow", "--prompt-ids", "5,6"]) == 2
    assert f"expertflow prepare --model {model} --data FILE" in capsys.readouterr().err  # what makes one

    assert _prepare(model, tmp_path / "notes.npy") == 0
    out, err = capsys.readouterr()
    predictor = model / "expertflow-predictor"
    assert find_predictor(model) == predictor == default_predictor_dir(model)
    for stage in STAGES:
        assert stage in err and "skipped" not in err  # a progress bar per stage, on stderr
    assert "recall@2 per MoE layer" in out and "ran the 3 requested steps" in out
    summary = json.loads((predictor / "prepare.json").read_text())
    assert list(summary["stages"]) == list(STAGES)
    recall = summary["stages"]["evaluate"]["info"]
    assert [row["layer"] for row in recall["layers"]] == [0, 1, 2]
    assert all(0.0 <= v <= 1.0 for row in recall["layers"] for k, v in row.items() if k != "layer")
    assert recall["best_peer"] in ("frequency", "gate-speculation", "activation-matrix")
    train_info = summary["stages"]["train"]["info"]
    assert (train_info["stopped_by"], train_info["steps_done"], train_info["steps_requested"]) == ("steps", 3, 3)

    # split by document: every document is in exactly one trace, whole (BOS-prefixed), none in both
    train, held = (load_trace(predictor / "prepare" / f"{p}.safetensors") for p in ("train", "heldout"))
    seqs = {
        p: {tuple(t.tokens[t.sequence(s)][1:]) for s in range(t.n_sequences)} for p, t in (("t", train), ("h", held))
    }
    assert seqs["t"].isdisjoint(seqs["h"]) and seqs["t"] | seqs["h"] == {tuple(d) for d in docs}
    assert len(seqs["h"]) == len(heldout_documents(docs, 0.1)) >= 1
    assert train.info.extra["expert_bytes"] == 3 * 64 * 96 * 4  # gate, up, down of hidden 64 x ffn 96 in fp32
    assert train.info.domains == ("notes",)

    # a re-run resumes: every stage is done
    assert _prepare(model, tmp_path / "notes.npy") == 0
    assert capsys.readouterr().err.count("skipped (done)") == 4
    # an interrupted evaluation (its output gone) and new training options redo only what they touch
    (predictor / "prepare" / "eval.json").unlink()
    assert _prepare(model, tmp_path / "notes.npy", "--seed", "1") == 0
    skipped = [line.split(":")[0] for line in capsys.readouterr().err.splitlines() if line.endswith("skipped (done)")]
    assert skipped == ["trace-train", "trace-heldout"]
    assert json.loads((predictor / "train.json").read_text())["train_config"]["seed"] == 1

    # generate --policy expertflow needs no --predictor now
    code = main(["generate", "--model", str(model), "--policy", "expertflow", "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "3", "--json"])  # fmt: skip
    assert code == 0 and json.loads(capsys.readouterr().out)["policy"] == "expertflow"


def test_prepare_refuses_bad_input_clearly(model, tmp_path, capsys):
    _documents(tmp_path / "one.npy", n_docs=1)
    assert _prepare(model, tmp_path / "one.npy") == 2
    assert "needs at least 2" in capsys.readouterr().err
    np.save(tmp_path / "big.npy", np.array([5, 6, 500, 7, 2, 8, 9, 2], np.int32))
    assert _prepare(model, tmp_path / "big.npy") == 2
    assert "token id 500 outside the model's vocabulary of 96" in capsys.readouterr().err
    for bad in (["--eval-share", "1.5"], ["--max-steps", "0"], ["--seconds", "-1"]):
        assert _prepare(model, tmp_path / "one.npy", *bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("expertflow: error: --") and "Traceback" not in err
    assert _prepare(model, tmp_path / "absent.txt") == 2
    assert "absent.txt: no such data file" in capsys.readouterr().err
    assert not (model / "expertflow-predictor" / "model.safetensors").exists()


def test_heldout_documents_are_stable_and_never_all_or_none():
    docs = [[i, i + 1, i + 2] for i in range(200)]
    held = heldout_documents(docs, 0.1)
    assert 10 <= len(held) <= 30
    more = heldout_documents(docs + [[7, 7, 7, 7]], 0.1)  # adding a document moves no other
    assert held <= more and len(more - held) <= 1
    assert len(heldout_documents(docs[:2], 0.01)) == 1 and len(heldout_documents(docs[:2], 0.99)) == 1


def test_read_only_model_dirs_keep_their_predictor_in_the_user_cache(model, tmp_path, monkeypatch):
    own = model / "expertflow-predictor"
    assert default_predictor_dir(model) == own
    monkeypatch.setattr(locate, "_writable", lambda directory: False)  # root writes anywhere: stand in for it
    cached = default_predictor_dir(model)
    assert cached == tmp_path / "cache" / "expertflow" / "predictors" / model_id(model)
    assert find_predictor(model) is None
    from predictor.model import RouteModelConfig, RouteTransformer, save_model

    tiny = RouteTransformer(RouteModelConfig(3, 8, 2, 96, d_model=16, n_heads=2, context=8))
    save_model(tiny, own)  # say, one shipped with the model before its directory became read-only
    assert find_predictor(model) == own
    save_model(tiny, cached)  # what `prepare` writes now wins
    assert find_predictor(model) == cached
    copy = Path(shutil.copytree(model, tmp_path / "elsewhere" / model.name))
    assert model_id(copy) == model_id(model)  # the same checkpoint under another parent: the same predictor
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 1}))
    assert model_id(copy) != model_id(model)  # a changed checkpoint is another model


def test_the_default_model_ships_its_predictor():
    from expertflow.default_model import default_model_dir
    from predictor.learned import LearnedPredictor

    directory = default_model_dir()
    shipped = find_predictor(directory)
    assert shipped == directory / "expertflow-predictor"
    model = LearnedPredictor.load(shipped).model
    cfg = json.loads((directory / "config.json").read_text())
    assert (model.cfg.moe_layers, model.cfg.n_experts, model.cfg.top_k) == (
        cfg["num_hidden_layers"], cfg["num_local_experts"], cfg["num_experts_per_tok"]
    )  # fmt: skip
    assert model.layer_head is not None
    assert sum(p.stat().st_size for p in shipped.iterdir()) < 8 * 2**20
    # packaged: every file under assets/ (the predictor's folder included) matches the package-data globs
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["expertflow"]
    package = ROOT / "expertflow"
    packaged = {p for pattern in patterns for p in package.glob(pattern) if p.is_file()}
    assert {p for p in (package / "assets").rglob("*") if p.is_file()} <= packaged
    assert (shipped / "model.safetensors") in packaged


@pytest.mark.slow
def test_generate_with_the_expertflow_policy_works_out_of_the_box(capsys):
    code = main(["generate", "--policy", "expertflow", "--prompt", "def main(", "--max-new-tokens", "4", "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == "expertflow" and out["stats"]["hits"] + out["stats"]["misses"] > 0
