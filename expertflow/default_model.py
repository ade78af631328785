"""The embedded default checkpoint: what `expertflow` serves when no `--model` is given.

It is the coarse model trained here (training/train.py, preset `coarse`): a
Mixtral-architecture MoE, 8 experts, top-2, 4 MoE layers, hidden 256, trained on
Python source, Python documentation, the King James Bible and a dictionary, saved in
bf16 in the real on-disk format (config.json, sharded safetensors, tokenizer.json).
It ships inside the package, so the README's first command works offline on a fresh
machine.

`default_predictor(model)` is where a model's route predictor is found (the one `expertflow prepare` made, or
the one shipped with the default model), for `generate` and the services alike.

Not for: tests of correctness (they build their own checkpoints with transformers).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_NAME = "expertflow-coarse-8x2"


def default_model_dir() -> Path:
    directory = Path(__file__).parent / "assets" / DEFAULT_NAME
    if not (directory / "config.json").exists():
        raise FileNotFoundError(
            f"{directory}: the embedded default model is missing from this installation; "
            "reinstall ExpertFlow or pass --model DIR"
        )
    return directory


def default_predictor(model: Path | None) -> Path:
    """The predictor `expertflow prepare` made for the model (predictor/locate.py), or an error naming the
    command that makes one. `model` None: the embedded default model."""
    from predictor.locate import candidate_dirs, find_predictor

    directory = model if model is not None else default_model_dir()
    found = find_predictor(directory)
    if found is None:
        looked = " or ".join(str(d) for d in candidate_dirs(directory))
        flag = f" --model {model}" if model is not None else ""
        raise FileNotFoundError(
            f"no route predictor for {directory} (looked in {looked}); make one with "
            f"`expertflow prepare{flag} --data FILE...`, or pass --predictor DIR"
        )
    return found
