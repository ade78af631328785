"""Text <-> token ids through the checkpoint's own tokenizer.json (Hugging Face `tokenizers`), and the text of
a token stream as it grows (`IncrementalText`).

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


class IncrementalText:
    """The text of a growing list of token ids, handed out in pieces as it becomes final.

    The whole output is decoded each time and only the new suffix handed out, so a character split over several
    tokens comes out once it is whole; with `stops`, text from the first stop string on is never handed out.
    """

    def __init__(self, codec: TextCodec, stops: tuple[str, ...] = ()):
        self._codec = codec
        self._ids: list[int] = []
        self._shown = 0  # characters handed out
        self.stops = tuple(s for s in stops if s)
        self.stopped = False  # a stop string appeared

    def push(self, ids: list[int], final: bool = False) -> str:
        """Add tokens; the text that is now final (all of it with `final`)."""
        self._ids += ids
        text = self._codec.decode(self._ids)
        end = len(text)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                end, self.stopped = min(end, at), True
        if not self.stopped and not final:
            # an unfinished multi-byte character decodes as U+FFFD until its last byte arrives, and the start of
            # a stop string must not go out before it is known not to be one
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            hold = max((len(s) - 1 for s in self.stops), default=0)
            end = max(self._shown, min(end, len(text) - hold))
        piece = text[self._shown : end]
        self._shown = max(self._shown, end)
        return piece
