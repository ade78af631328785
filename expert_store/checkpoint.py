"""Read-only, memory-mapped access to a Hugging Face safetensors checkpoint directory.

This is the NVMe tier's view of the files: every tensor is a zero-copy view into a
memory map, so nothing is read until it is touched and the whole model is never
materialised in RAM. Headers are validated up front (truncated files, offsets past
the end, unknown dtypes) so a bad checkpoint fails here with its file named, not
later with a bus error inside torch.

Not for: knowing what a tensor *means* (the model families do that) or caching.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import torch

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be served, with the reason and the file."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def _read_header(path: Path) -> dict[str, TensorInfo]:
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path}: file is truncated ({size} bytes, no safetensors header)")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len <= 0 or header_len > _MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: file is truncated or not safetensors (header of {header_len} bytes, file of {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = _DTYPES[meta["dtype"]]
            begin, end = meta["data_offsets"]
            shape = tuple(int(s) for s in meta["shape"])
        except KeyError as e:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported or missing header field {e}") from None
        expected = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if end - begin != expected:
            raise CheckpointError(
                f"{path}: tensor {name!r} holds {end - begin} bytes but its shape {shape} needs {expected}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: file is truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}"
            )
        tensors[name] = TensorInfo(path, dtype, shape, data_start + begin, end - begin)
    return tensors


def _refuse_pickles(directory: Path) -> None:
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory}: only pickle checkpoints found ({', '.join(pickles)}); ExpertFlow never unpickles. "
            "Convert them to safetensors first (for example with transformers: "
            "model.save_pretrained(dir, safe_serialization=True) in a trusted environment)."
        )
    raise CheckpointError(f"{directory}: no *.safetensors files found")


class CheckpointFiles:
    """All tensors of one checkpoint directory, by their checkpoint names."""

    def __init__(self, directory: str | os.PathLike[str]):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise CheckpointError(f"{self.directory}: not a directory")
        index_path = self.directory / "model.safetensors.index.json"
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index_path}: corrupt index ({e})") from None
            files = sorted({self.directory / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(f"{index_path}: lists shard(s) that are missing: {', '.join(missing)}")
        else:
            weight_map = None
            files = sorted(self.directory.glob("*.safetensors"))
            if not files:
                _refuse_pickles(self.directory)
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            self.tensors.update(_read_header(f))
        if weight_map is not None:
            absent = [n for n in weight_map if n not in self.tensors]
            if absent:
                raise CheckpointError(
                    f"{index_path}: {len(absent)} indexed tensor(s) not in their shard, e.g. {absent[0]!r}"
                )
        self._maps: dict[Path, mmap.mmap] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.directory}: tensor {name!r} is missing from the checkpoint") from None

    def get(self, name: str) -> torch.Tensor:
        """A zero-copy view of one tensor in its memory map (copy-on-write, never written back)."""
        info = self.info(name)
        mm = self._maps.get(info.file)
        if mm is None:
            with open(info.file, "rb") as f:
                mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[info.file] = mm
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        flat = torch.frombuffer(mm, dtype=torch.uint8, count=info.nbytes, offset=info.start)
        return flat.view(info.dtype).view(info.shape)

    def close(self) -> None:
        # Views handed out keep their map alive through the buffer protocol; closing
        # one that is still exported would raise, so drop our references instead.
        self._maps.clear()
