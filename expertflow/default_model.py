"""The embedded default checkpoint: what `expertflow generate` serves when no `--model` is given.

Until a model trained here ships, it is a small Mixtral-architecture MoE with random
weights, created deterministically on first use and cached under
`~/.cache/expertflow` in the real on-disk format (config.json, safetensors,
tokenizer.json), so the README's first command works offline on a fresh machine.
Its text is gibberish by construction.

Not for: tests of correctness (they build their own checkpoints).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_NAME = "tiny-mixtral-random-v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("EXPERTFLOW_CACHE", Path.home() / ".cache" / "expertflow"))


def _byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is one token, plus three specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<s>", "</s>", "<pad>"]
    alphabet = ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    directory = (cache_dir or default_cache_dir()) / DEFAULT_NAME
    if (directory / "config.json").exists():
        return directory
    import torch
    import transformers as T

    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=".building-"))
    try:
        tok = _byte_tokenizer()
        cfg = T.MixtralConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=256,
            intermediate_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=2048,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=2,
            initializer_range=0.05,
        )
        torch.manual_seed(0)
        T.AutoModelForCausalLM.from_config(cfg).save_pretrained(str(tmp))
        tok.save(str(tmp / "tokenizer.json"))
        try:
            tmp.rename(directory)
        except OSError:  # another process finished first
            if not (directory / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory
