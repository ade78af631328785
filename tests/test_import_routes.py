"""`import-routes`: any model's routes in the routes.npz format, with domains and splits as options."""

from __future__ import annotations

import argparse
import json

import numpy as np

from predictor.cli import add_subcommands, main
from predictor.routes_npz import ImportOptions, import_routes, split_of
from traces.format import load_trace


def _routes(path, n_seq=40, layers=3, k=2, experts=16, seed=0, **extra):
    """A routes.npz of `n_seq` sequences routed to `experts` experts; `extra`: more arrays. Returns the arrays."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 9, n_seq)
    n = int(lengths.sum())
    arrays = {
        "token_ids": rng.integers(0, 300, n).astype(np.int32),
        "seq_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "experts": np.sort(np.stack([rng.permutation(experts)[:k] for _ in range(n * layers)]), -1)
        .reshape(n, layers, k)
        .astype(np.uint8),
        **extra,
    }
    np.savez(path, **arrays)
    return arrays


def test_another_models_routes_import_with_its_own_shape_layers_and_domains(tmp_path):
    arrays = _routes(
        tmp_path / "r.npz",
        moe_layers=np.array([1, 3, 5]),
        n_experts=np.array(16),
        seq_domain=np.arange(40) % 2,
        domains=np.array(["chat", "code"]),
        model=np.array("org/other-moe"),
        expert_bytes=np.array(3 * 512 * 128 * 2),
    )
    result = import_routes(tmp_path / "r.npz", tmp_path / "out", ImportOptions(split=None))
    t = load_trace(tmp_path / "out" / "r.safetensors")
    assert result["outputs"]["all"]["sequences"] == 40 and "notes" not in result
    assert (t.info.moe_layers, t.info.n_experts, t.info.top_k, t.info.model) == ((1, 3, 5), 16, 2, "org/other-moe")
    assert t.info.domains == ("chat", "code") and t.seq_domain.tolist() == (np.arange(40) % 2).tolist()
    assert np.array_equal(t.experts, arrays["experts"]) and np.array_equal(t.tokens, arrays["token_ids"])
    assert t.info.extra["expert_bytes"] == 3 * 512 * 128 * 2 and t.info.extra["scores"] == "absent"


def test_split_shares_and_domain_are_options(tmp_path):
    _routes(tmp_path / "r.npz", n_seq=60, layers=4, k=3, experts=12)
    result = import_routes(tmp_path / "r.npz", tmp_path / "out", ImportOptions(domain="web", split=(0.5, 0.5)))
    assert "--n-experts" in result["notes"]["n_experts"]  # inferred from the largest id, and said so
    assert sorted(result["outputs"]) == ["test", "train"]
    seen = 0
    for name in ("train", "test"):
        t = load_trace(tmp_path / "out" / f"r_{name}.safetensors")
        assert t.info.moe_layers == (0, 1, 2, 3) and t.info.top_k == 3 and t.info.domains == ("web",)
        assert t.info.extra["split"] == name and "mod 10: 0-4 train, 5-9 test" in t.info.extra["split_rule"]
        for s in range(t.n_sequences):
            assert split_of(t.tokens[t.sequence(s)], (0.5, 0.5)) == name
        seen += t.n_sequences
    assert seen == 60 and 15 < result["outputs"]["train"]["sequences"] < 45
    # the default shares keep DeepSeek's rule: 8 of 10 buckets train, one validation, one test
    many = [split_of(np.arange(i, i + 5)) for i in range(3000)]
    assert abs(many.count("train") / 3000 - 0.8) < 0.03 and abs(many.count("validation") / 3000 - 0.1) < 0.02


def _cli(capsys, *args) -> tuple[int, str]:
    code = main(["import-routes", *args])
    return code, capsys.readouterr().err


def test_bad_routes_files_get_clear_errors(tmp_path, capsys):
    out = ["--out", str(tmp_path / "out")]
    _routes(tmp_path / "ok.npz")
    code, err = _cli(capsys, "--npz", str(tmp_path / "ok.npz"), *out, "--split", "0.5,0.6")
    assert code == 2 and "add up to 1" in err
    code, err = _cli(capsys, "--npz", str(tmp_path / "ok.npz"), *out, "--n-experts", "8", "--split", "none")
    assert code == 2 and "outside 0..7" in err
    np.savez(tmp_path / "nokey.npz", token_ids=np.zeros(3, np.int32), experts=np.zeros((3, 2, 2), np.uint8))
    code, err = _cli(capsys, "--npz", str(tmp_path / "nokey.npz"), *out)
    assert code == 2 and "no 'seq_offsets' array" in err
    _routes(tmp_path / "float.npz")
    with np.load(tmp_path / "float.npz") as f:
        arrays = dict(f)
    np.savez(tmp_path / "float.npz", **{**arrays, "experts": arrays["experts"].astype(np.float32)})
    code, err = _cli(capsys, "--npz", str(tmp_path / "float.npz"), *out)
    assert code == 2 and "experts has dtype float32, expected integers" in err
    np.savez(tmp_path / "flat.npz", **{**arrays, "experts": arrays["experts"][:, 0]})
    code, err = _cli(capsys, "--npz", str(tmp_path / "flat.npz"), *out)
    assert code == 2 and "experts has shape" in err
    (tmp_path / "text.npz").write_text("not a zip")
    code, err = _cli(capsys, "--npz", str(tmp_path / "text.npz"), *out)
    assert code == 2 and "not a numpy .npz file" in err
    code, err = _cli(capsys, "--npz", str(tmp_path / "absent.npz"), *out)
    assert code == 2 and "no such routes file" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_every_import_routes_flag_has_help():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    add_subcommands(sub)
    im = sub.choices["import-routes"]
    flags = [a for a in im._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 9 and all(a.help for a in flags), [a.dest for a in flags if not a.help]


def test_cli_import_prints_what_it_wrote(tmp_path, capsys):
    _routes(tmp_path / "r.npz", layers=2, k=1, experts=4)
    assert main(["import-routes", "--npz", str(tmp_path / "r.npz"), "--out", str(tmp_path / "o"), "--split", "none",
                 "--moe-layers", "2-3", "--n-experts", "4", "--prefix", "mine"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["moe_layers"] == [2, 3] and result["n_experts"] == 4
    assert load_trace(tmp_path / "o" / "mine.safetensors").info.moe_layers == (2, 3)
