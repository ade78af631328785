"""Where a model's route predictor lives by default, and how paths recorded in saved metadata are written and read.

A model directory's predictor is `<model dir>/expertflow-predictor/` when that directory can be written (the
embedded default model ships its predictor there); for a read-only model directory (a hub cache, a shared
mount) it is `$XDG_CACHE_HOME/expertflow/predictors/<model id>/` (default `~/.cache`), where the id is the
folder's name and a hash of the model's config.json, its safetensors index and the names and sizes of its
safetensors files: the same checkpoint copied elsewhere (in a folder of the same name) finds the same
predictor, a changed one does not. `expertflow prepare` writes to `default_predictor_dir`; `generate --policy
expertflow` (and anything else that serves a model) reads `find_predictor`: keep every such lookup here, so
that the two cannot drift apart.

Paths inside metadata files (a predictor's train.json, prepare.json) are stored relative to the file that
records them and resolved relative to it when read, so the files can move with what they point at and be
read from any working directory.

Not for: loading or saving predictors (model.py, learned.py) or deciding whether a predictor fits a model
(the policy checks its shape against the model's spec).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

PREDICTOR_DIRNAME = "expertflow-predictor"
_FILES = ("config.json", "model.safetensors")  # what makes a directory a saved predictor (model.py)


def model_id(model_dir: str | Path) -> str:
    """A stable id of the checkpoint in `model_dir`: its folder name and a hash of config.json, the safetensors
    index and the safetensors files' names and sizes (not their contents: hashing many GB would take minutes)."""
    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json (not a model directory)")
    h = hashlib.blake2b(digest_size=8)
    h.update(config.read_bytes())
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        h.update(index.read_bytes())
    for shard in sorted(model_dir.glob("*.safetensors")):
        h.update(f"\0{shard.name}\0{shard.stat().st_size}".encode())
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_dir.resolve().name) or "model"
    return f"{name}-{h.hexdigest()}"


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/expertflow/predictors`, `~/.cache/expertflow/predictors` without it."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "expertflow" / "predictors"


def _writable(directory: Path) -> bool:
    """Whether a predictor can be written at `directory`: into it if it exists, else into its parent."""
    target = directory if directory.exists() else directory.parent
    return target.is_dir() and os.access(target, os.W_OK | os.X_OK)


def default_predictor_dir(model_dir: str | Path) -> Path:
    """Where `expertflow prepare` writes the predictor of the model in `model_dir`."""
    model_dir = Path(model_dir)
    own = model_dir / PREDICTOR_DIRNAME
    return own if _writable(own) else cache_root() / model_id(model_dir)


def candidate_dirs(model_dir: str | Path) -> list[Path]:
    """Where a predictor of `model_dir` is looked for, in order: where `prepare` writes one now (so the newest
    wins over, say, a predictor shipped in a model directory that has since become read-only), then next to
    the model, then the user's cache."""
    model_dir = Path(model_dir)
    own = model_dir / PREDICTOR_DIRNAME
    try:
        cached = cache_root() / model_id(model_dir)
    except FileNotFoundError:  # no config.json: the loader will say so; there is no cache entry to look at
        return [own]
    first = own if _writable(own) else cached
    return [first, *(d for d in (own, cached) if d != first)]


def is_predictor_dir(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _FILES)


def find_predictor(model_dir: str | Path) -> Path | None:
    """The saved predictor of the model in `model_dir`, or None when `expertflow prepare` has not made one."""
    return next((d for d in candidate_dirs(model_dir) if is_predictor_dir(d)), None)


def record_path(path: str | Path, file: str | Path) -> str:
    """`path` as written into the metadata file `file`: relative to the file's folder (absolute only where no
    relative path exists, e.g. another drive), with forward slashes so the file reads the same everywhere."""
    target, base = Path(path).resolve(), Path(file).resolve().parent
    try:
        return Path(os.path.relpath(target, base)).as_posix()
    except ValueError:
        return target.as_posix()


def resolve_recorded(text: str, file: str | Path) -> Path:
    """A path read from the metadata file `file`: relative ones are relative to the file's folder."""
    path = Path(text)
    return path if path.is_absolute() else Path(os.path.normpath(Path(file).parent / path))
