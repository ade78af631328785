"""Train a byte-level BPE tokenizer on a training.corpus corpus, and encode the corpus into flat uint16 token arrays.

`python -m training.tokenizer --corpus DIR --vocab-size 4096 --out TOKDIR` trains on the train split of every domain
(never validation or test, so held-out perplexities stay honest) and writes a tokenizer that
`transformers.AutoTokenizer.from_pretrained(TOKDIR)` loads. `python -m training.tokenizer encode ...` turns each
domain's each split into `ENCDIR/<domain>/<split>.npy`: every document's ids followed by `<|endoftext|>`.

Not for: tokenising at serving time (load TOKDIR with transformers), chat templates, or vocabularies of 65536 or more
(the arrays are uint16).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from training.corpus import SPLITS, read_jsonl

EOS = "<|endoftext|>"
PAD = "<|pad|>"
_ENCODE_BATCH = 256  # documents per encode_batch call: enough to use both cores, small enough to bound memory


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 4096
    min_frequency: int = 2


@dataclass(frozen=True)
class EncodeConfig:
    max_tokens_per_split: int | None = None


def corpus_domains(corpus: Path) -> list[str]:
    manifest = json.loads((corpus / "manifest.json").read_text(encoding="utf-8"))
    return sorted(manifest["domains"])


def _train_texts(corpus: Path) -> Iterator[str]:
    for domain in corpus_domains(corpus):
        for doc in read_jsonl(corpus / domain / "train.jsonl"):
            yield doc.text


def train_tokenizer(corpus: Path, out: Path, config: TokenizerConfig) -> Tokenizer:
    """Train on the corpus's train splits and save tokenizer.json + tokenizer_config.json under `out`."""
    if not 256 + 2 <= config.vocab_size < 65536:
        raise ValueError(f"vocab size {config.vocab_size} must cover the 256 bytes + 2 specials and fit uint16")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size,
        min_frequency=config.min_frequency,
        special_tokens=[EOS, PAD],  # listed first so they get ids 0 and 1
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # An iterator keeps memory at one document, not the whole corpus.
    tok.train_from_iterator(_train_texts(corpus), trainer=trainer)
    if tok.token_to_id(EOS) != 0 or tok.token_to_id(PAD) != 1:
        raise RuntimeError("special tokens did not get ids 0 and 1")
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": EOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_prefix_space": False,
        # Older transformers apply this WordPiece space clean-up to BPE too: " ." would decode as ".".
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
    return tok


def _encode_docs(tok: Tokenizer, path: Path, limit: int | None) -> tuple[np.ndarray, int]:
    """Token array of the documents in `path` (each followed by EOS), cut at `limit` tokens; and documents used."""
    eos = tok.token_to_id(EOS)
    chunks: list[np.ndarray] = []
    total = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        for enc in tok.encode_batch(batch, add_special_tokens=False):
            chunks.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
            total += len(chunks[-1])
        batch.clear()

    for doc in read_jsonl(path):
        if limit is not None and total >= limit:
            break
        batch.append(doc.text)
        if len(batch) == _ENCODE_BATCH:
            flush()
    if batch and (limit is None or total < limit):
        flush()
    flat = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)
    if limit is None:
        return flat, len(chunks)
    # A hard cut keeps every split exactly the requested size; the last document may lose its tail. Count only
    # documents that start before the cut, not those read ahead in the last batch.
    starts = np.cumsum([0] + [len(c) for c in chunks])[:-1]
    return flat[:limit], int(np.count_nonzero(starts < limit))


def encode_corpus(corpus: Path, tokenizer_dir: Path, out: Path, config: EncodeConfig) -> dict:
    """Write ENCDIR/<domain>/<split>.npy for every domain and split; return (and write) encoded.json."""
    tok_file = tokenizer_dir / "tokenizer.json"
    tok = Tokenizer.from_file(str(tok_file))
    # A document that quotes "<|endoftext|>" must not inject a real separator into the stream.
    tok.encode_special_tokens = True
    vocab = tok.get_vocab_size(with_added_tokens=True)
    assert vocab < 65536, f"vocab {vocab} does not fit uint16"
    summary: dict = {
        "tokenizer_sha256": hashlib.sha256(tok_file.read_bytes()).hexdigest(),
        "corpus_manifest_sha256": hashlib.sha256((corpus / "manifest.json").read_bytes()).hexdigest(),
        "vocab_size": vocab,
        "eos_id": tok.token_to_id(EOS),
        "pad_id": tok.token_to_id(PAD),
        "dtype": "uint16",
        "max_tokens_per_split": config.max_tokens_per_split,
        "domains": {},
    }
    for domain in corpus_domains(corpus):
        (out / domain).mkdir(parents=True, exist_ok=True)
        summary["domains"][domain] = {}
        for split in SPLITS:
            ids, documents = _encode_docs(tok, corpus / domain / f"{split}.jsonl", config.max_tokens_per_split)
            np.save(out / domain / f"{split}.npy", ids, allow_pickle=False)
            summary["domains"][domain][split] = {"tokens": int(ids.size), "documents": documents}
            print(f"training.tokenizer: {domain}/{split}: {ids.size} tokens", file=sys.stderr)
    (out / "encoded.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return summary


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.tokenizer",
        description=__doc__.splitlines()[0],
        epilog="Subcommand: `python -m training.tokenizer encode --help` encodes a corpus with a trained tokenizer.",
    )
    parser.add_argument("--corpus", type=Path, required=True, help="directory written by training.corpus")
    parser.add_argument("--vocab-size", type=int, default=TokenizerConfig.vocab_size)
    parser.add_argument("--min-frequency", type=int, default=TokenizerConfig.min_frequency)
    parser.add_argument("--out", type=Path, required=True, help="tokenizer directory to write")
    return parser


def _encode_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.tokenizer encode", description="Encode every domain/split into uint16 .npy arrays."
    )
    parser.add_argument("--corpus", type=Path, required=True, help="directory written by training.corpus")
    parser.add_argument("--tokenizer", type=Path, required=True, help="directory written by training.tokenizer")
    parser.add_argument("--out", type=Path, required=True, help="directory for <domain>/<split>.npy")
    parser.add_argument("--max-tokens-per-split", type=int, default=None, help="cut each split to this many tokens")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Training is the default action, so `encode` is dispatched by hand rather than through argparse subparsers.
    if argv[:1] == ["encode"]:
        args = _encode_parser().parse_args(argv[1:])
        encode_corpus(args.corpus, args.tokenizer, args.out, EncodeConfig(args.max_tokens_per_split))
        return 0
    args = _train_parser().parse_args(argv[1:] if argv[:1] == ["train"] else argv)
    tok = train_tokenizer(args.corpus, args.out, TokenizerConfig(args.vocab_size, args.min_frequency))
    print(f"training.tokenizer: vocab {tok.get_vocab_size()} written to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
