"""What the expert-store server and its client agree on besides the messages: how an expert travels as chunks,
dtype names, keys on the wire, and the host id that says whether two processes see the same shared memory.

    chunks(buffer, chunk_bytes, start, stop)       the sender: bytes [start, stop) of a buffer as chunks, each
                                                   with its offset in the buffer, its crc32 and the buffer's total
    range_error(offset, length, total)             why a requested byte range is refused (None: it is fine)
    BadStream                                      a stream that arrived, but wrong (the receiver, store_fetch.py,
                                                   checks every chunk before it writes it)
    dtype_name(torch.bfloat16) == "bfloat16"       dtype_of("bfloat16") is torch.bfloat16
    key_to_proto((1, 5)) / key_from_proto(msg)     ExpertKey <-> expertflow.v1.ExpertKey
    host_id()                                      equal in two processes only if they share /dev/shm
    model_version(files, dtype, label)             the same for the same weights on any host (see there)

Not for: serving (store_server.py) or reading (store_client.py), or any other service's messages.
"""

from __future__ import annotations

import hashlib
import os
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from expert_store.checkpoint import CheckpointFiles
from expert_store.keys import ExpertKey
from expertflow.v1 import common_pb2
from expertflow.v1 import expert_store_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20  # large enough that per-message costs vanish, small enough to pipeline
MIN_CHUNK_BYTES = 4 << 10
MAX_CHUNK_BYTES = 32 << 20  # under the 64 MiB message limit both ends set (services/common.py, the client)
MAX_MESSAGE_BYTES = 64 << 20

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in _DTYPES.items():
        if d == dtype:
            return name
    raise ValueError(f"the expert store serves {sorted(_DTYPES)}, not {dtype}")


def dtype_of(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"expert dtype {name!r} is not one of {sorted(_DTYPES)}") from None


def key_to_proto(key: tuple[int, int]) -> common_pb2.ExpertKey:
    return common_pb2.ExpertKey(layer=int(key[0]), expert=int(key[1]))


def key_from_proto(key: common_pb2.ExpertKey) -> ExpertKey:
    return ExpertKey(int(key.layer), int(key.expert))


def chunk_size_error(chunk_bytes: int) -> str | None:
    """Why a requested chunk size is refused, or None if it is fine (0: the server's default)."""
    if chunk_bytes == 0 or MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES:
        return None
    return f"chunk_bytes {chunk_bytes}: 0 (the default, {DEFAULT_CHUNK_BYTES}) or {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}"


class BadStream(Exception):
    """A stream of chunks that arrived, but wrong: worth fetching again."""


def range_error(offset: int, length: int, total: int) -> str | None:
    """Why bytes [offset, offset + length) (length 0: to the end) of a buffer of `total` bytes cannot be served, or
    None if they can. An empty range is refused: a stream of no chunks is indistinguishable from a cut one."""
    if offset >= total:
        return f"byte range at offset {offset}: the expert buffer holds {total} bytes (offsets 0..{total - 1})"
    if offset + length > total:
        return f"byte range [{offset}, {offset + length}) runs past the expert buffer's {total} bytes"
    return None


def chunks(data: np.ndarray, chunk_bytes: int, start: int = 0, stop: int | None = None) -> Iterator[pb.ExpertChunk]:
    """Bytes [start, stop) of one buffer (uint8; stop None: its end) as chunks cut from `start` on, each with its
    offset in the buffer, its crc32 and the buffer's total."""
    total = len(data)
    stop = total if stop is None else stop
    for offset in range(start, stop, chunk_bytes):
        piece = data[offset : min(offset + chunk_bytes, stop)].tobytes()
        yield pb.ExpertChunk(offset=offset, data=piece, crc32=zlib.crc32(piece), total=total)


def host_id() -> str:
    """This kernel boot and this /dev/shm mount. Processes on other machines differ in the first; containers on
    one machine that do not share /dev/shm (each its own tmpfs) differ in the second, so equal ids mean that a
    segment name one of them gives can be opened by the other."""
    boot = Path("/proc/sys/kernel/random/boot_id")
    machine = boot.read_text().strip() if boot.exists() else socket.gethostname()
    shm = os.stat("/dev/shm").st_dev if os.path.isdir("/dev/shm") else 0
    return f"{machine}/{shm}"


_SAMPLE_BYTES = 256  # read at a tensor's start, middle and end


def model_version(files: CheckpointFiles, dtype: torch.dtype, label: str = "") -> str:
    """What the served weights are, from their content: the index, every shard's safetensors header (names,
    dtypes, shapes, offsets), a few bytes sampled from each tensor, the dtype served and an optional label.

    Content, not file metadata: two copies of one checkpoint on two machines (or in two images) have different
    modification times but must get the same version, or a worker would refuse the store nodes of another host.
    The headers alone would give two fine-tunes of one base model the same version, so a few hundred bytes of
    every tensor are read too (a fine-tune changes them); that is a few reads per tensor, never the weights
    themselves. `label` ([model] version_label) tells apart weights that differ only where nothing is sampled.
    Every fetched expert is still checked end to end against the crc32 its node computed from all of its bytes.
    """
    digest = hashlib.sha256(f"{dtype_name(dtype)}\0{label}\0".encode())
    index = files.directory / "model.safetensors.index.json"
    if index.exists():
        digest.update(index.read_bytes())
    by_file: dict[Path, list] = {}
    for name, info in files.tensors.items():
        by_file.setdefault(info.file, []).append((name, info))
    for path in sorted(by_file):
        fd = os.open(path, os.O_RDONLY)
        try:
            header_len = int.from_bytes(os.pread(fd, 8, 0), "little")  # CheckpointFiles validated it
            digest.update(f"\0{path.name}\0".encode() + os.pread(fd, header_len, 8))
            for name, info in sorted(by_file[path], key=lambda t: t[0]):
                n = info.nbytes
                for at in sorted({0, max(0, n // 2 - _SAMPLE_BYTES // 2), max(0, n - _SAMPLE_BYTES)}):
                    digest.update(os.pread(fd, min(_SAMPLE_BYTES, n), info.start + at))
        finally:
            os.close(fd)
    return digest.hexdigest()[:16]
