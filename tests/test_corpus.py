"""training.corpus and training.tokenizer on a small python_src-only corpus: splits, manifest, determinism, BPE."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.corpus import SPLITS, CorpusConfig, build_corpus, read_jsonl
from training.tokenizer import EOS, PAD, EncodeConfig, TokenizerConfig, encode_corpus, train_tokenizer

CONFIG = CorpusConfig(max_bytes_per_domain=300_000, install=False, domains=("python_src",))
SAMPLE = 'def f(x: int) -> str:\n    """Doc — ünïcode , it \'s x .y"""\n\treturn  f"{x!r:>8}"  # trailing  \n\n'


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    return out, build_corpus(out, CONFIG, log=lambda _: None)


@pytest.fixture(scope="module")
def tokenizer_dir(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(corpus[0], out, TokenizerConfig(vocab_size=512))
    return out


def test_splits_are_disjoint_non_empty_and_match_the_manifest(corpus):
    root, manifest = corpus
    assert set(manifest["domains"]) == {"python_src"}
    entry = manifest["domains"]["python_src"]
    ids: dict[str, set[str]] = {}
    for split in SPLITS:
        path = root / "python_src" / f"{split}.jsonl"
        docs = list(read_jsonl(path))
        ids[split] = {d.id for d in docs}
        assert docs, f"{split} is empty"
        assert len(ids[split]) == len(docs)
        counted = entry["splits"][split]
        assert counted["documents"] == len(docs)
        assert counted["bytes"] == sum(len(d.text.encode("utf-8")) for d in docs)
        assert counted["file_bytes"] == path.stat().st_size
    assert not ids["train"] & ids["validation"] and not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    assert entry["total"]["documents"] == sum(len(v) for v in ids.values())
    assert 0 < entry["total"]["bytes"] <= CONFIG.max_bytes_per_domain
    # The cap must sample the whole stdlib, not its alphabetical start.
    tops = {i.split("/")[0] for v in ids.values() for i in v}
    assert any(t < "h" for t in tops) and any(t > "s" for t in tops)
    assert not any(i.startswith(("test/", "idlelib/")) or "/tests/" in i for v in ids.values() for i in v)
    assert json.loads((root / "manifest.json").read_text()) == manifest


def test_build_is_byte_identical(corpus, tmp_path):
    build_corpus(tmp_path / "again", CONFIG, log=lambda _: None)
    assert _files(tmp_path / "again") == _files(corpus[0])
    # A fresh interpreter has a different hash() salt: catches any use of Python's hash() for sampling or splitting.
    cli = [sys.executable, "-m", "training.corpus", "--no-install", "--domains", "python_src"]
    cli += ["--max-bytes-per-domain", str(CONFIG.max_bytes_per_domain), "--out", str(tmp_path / "cli")]
    subprocess.run(cli, check=True, capture_output=True, cwd=Path(__file__).parents[1])
    assert _files(tmp_path / "cli") == _files(corpus[0])


def test_no_install_skips_missing_packages_with_a_warning(tmp_path, monkeypatch):
    import training.corpus as corpus_module

    monkeypatch.setattr(corpus_module, "_dpkg_version", lambda package: None)
    warnings: list[str] = []
    manifest = build_corpus(tmp_path, CorpusConfig(install=False, domains=("bible",)), log=warnings.append)
    assert manifest["domains"] == {} and "bible" in manifest["skipped"]
    assert any("WARNING" in w and "bible" in w for w in warnings)


def test_tokenizer_round_trips_and_loads_in_transformers(tokenizer_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 512
    assert tok.token_to_id(EOS) == 0 and tok.token_to_id(PAD) == 1
    ids = tok.encode(SAMPLE).ids
    assert tok.decode(ids) == SAMPLE
    assert len(ids) < len(SAMPLE.encode("utf-8"))  # merges were learned

    auto = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (auto.eos_token_id, auto.bos_token_id, auto.pad_token_id) == (0, 0, 1)
    assert auto(SAMPLE)["input_ids"] == ids
    assert auto.decode(ids) == SAMPLE
    fast = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json"))
    assert fast.encode(SAMPLE) == ids


def test_tokenizer_training_is_deterministic(corpus, tokenizer_dir, tmp_path):
    train_tokenizer(corpus[0], tmp_path, TokenizerConfig(vocab_size=512))
    assert _files(tmp_path) == _files(tokenizer_dir)


def test_encoded_arrays_match_tokenizer_encode(corpus, tokenizer_dir, tmp_path):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    summary = encode_corpus(corpus[0], tokenizer_dir, tmp_path, EncodeConfig())
    assert summary["vocab_size"] == 512 and summary["eos_id"] == 0
    for split in SPLITS:
        arr = np.load(tmp_path / "python_src" / f"{split}.npy")
        assert arr.dtype == np.uint16
        expected = []
        for doc in read_jsonl(corpus[0] / "python_src" / f"{split}.jsonl"):
            expected += tok.encode(doc.text).ids + [0]
        assert arr.tolist() == expected
        assert summary["domains"]["python_src"][split] == {"tokens": len(expected), "documents": expected.count(0)}

    capped = encode_corpus(corpus[0], tokenizer_dir, tmp_path / "capped", EncodeConfig(max_tokens_per_split=1000))
    arr = np.load(tmp_path / "capped" / "python_src" / "train.npy")
    assert arr.size == 1000 == capped["domains"]["python_src"]["train"]["tokens"]
    assert arr.tolist() == np.load(tmp_path / "python_src" / "train.npy")[:1000].tolist()
    assert capped["domains"]["python_src"]["train"]["documents"] == int(np.count_nonzero(arr[:-1] == 0)) + 1
