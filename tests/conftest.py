"""Shared fixtures: tiny random checkpoints of every family, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from expertflow.tiny import FAMILIES, build_tiny

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")]),
]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    """family -> (checkpoint directory, the transformers model that wrote it)."""
    out = {}
    for family in FAMILIES:
        directory = tmp_path_factory.mktemp(family)
        out[family] = (directory, build_tiny(family, directory))
    return out


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine slows multi-threaded torch many times over.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mixtral_dir(tiny_models) -> Path:
    return tiny_models["mixtral"][0]


def prompt_ids(seed: int, length: int, vocab: int = 96) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()
