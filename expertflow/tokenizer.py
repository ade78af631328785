"""Text <-> token ids through the checkpoint's own tokenizer.json (Hugging Face `tokenizers`).

Not for: chat templates or anything model-specific beyond the tokenizer file.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class TextCodec:
    def __init__(self, directory: Path):
        path = Path(directory) / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{directory}: no tokenizer.json; pass token ids instead of text")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exceptions
            raise ValueError(f"{path}: unreadable tokenizer ({e})") from None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
