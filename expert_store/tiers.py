"""The two host tiers that hold routed experts: a host-RAM arena and the NVMe files.

`HostArena` is one contiguous buffer of equal expert slots. On a CUDA machine it is
POSIX shared memory registered with cudaHostRegister, so the GPU copies from it at
pinned speed. On a CPU-only machine it is ordinary memory. The expert-store service
asks for shared memory without registration (`shared`): it never touches CUDA, and the
worker that maps the same pages registers them in its own process.

`NvmeTier` reads experts straight out of the memory-mapped safetensors files.

Not for: deciding what goes where (the store does) or anything on the device.
"""

from __future__ import annotations

import logging
import os
from multiprocessing import shared_memory

import torch

from expert_store.checkpoint import CheckpointFiles
from expert_store.layout import ExpertLayout, ExpertTensorNames

log = logging.getLogger(__name__)


class HostArena:
    """`capacity` expert slots in one host buffer; call `close()` to release it."""

    def __init__(self, layout: ExpertLayout, capacity: int, pin_for_cuda: bool, shared: bool = False):
        """`pin_for_cuda`: page-locked for this process's GPU copies (shared memory, registered; private pinned
        memory if /dev/shm is too small). `shared`: POSIX shared memory (mode 0600) another process of this user
        on this host can map, registered only if `pin_for_cuda`; a /dev/shm too small for it is an error."""
        self.layout = layout
        self.capacity = capacity
        self._shm: shared_memory.SharedMemory | None = None
        self._registered_ptr: int | None = None
        nbytes = max(capacity, 1) * layout.slot_nbytes
        self.kind = "ram"
        raw: torch.Tensor
        if (pin_for_cuda or shared) and capacity > 0:
            raw = self._shared(nbytes, register=pin_for_cuda, required=shared)
        else:
            raw = torch.empty(nbytes, dtype=torch.uint8)
        self._raw = raw
        self.slots = raw.view(layout.dtype).view(max(capacity, 1), layout.padded_numel)

    def _shared(self, nbytes: int, register: bool, required: bool) -> torch.Tensor:
        shm_dir = "/dev/shm"
        free = os.statvfs(shm_dir).f_bavail * os.statvfs(shm_dir).f_frsize if os.path.isdir(shm_dir) else 0
        if free < nbytes and required:
            raise ValueError(
                f"the host tier needs {nbytes} bytes of shared memory and /dev/shm has {free} free: lower the host "
                "budget or give /dev/shm more room (docker: --shm-size)"
            )
        if free < nbytes:
            # Writing past a too-small /dev/shm would SIGBUS; page-locked private memory
            # is as fast for this process, only not shareable.
            log.warning("/dev/shm has %d bytes free, %d needed: using private pinned memory", free, nbytes)
            self.kind = "pinned"
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self._shm = shared_memory.SharedMemory(create=True, size=nbytes)
        raw = torch.frombuffer(self._shm.buf, dtype=torch.uint8, count=nbytes)
        if not register:
            self.kind = "shm"
            return raw
        err = torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), nbytes, 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister of {nbytes} bytes of shared memory failed with CUDA error {int(err)}")
        self._registered_ptr = raw.data_ptr()
        self.kind = "shm+cudaHostRegister"
        return raw

    @property
    def shm_name(self) -> str | None:
        """Name of the shared-memory segment, for a process that maps the same pages."""
        return self._shm.name if self._shm is not None else None

    def close(self) -> None:
        if self._registered_ptr is not None:
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_ptr = None
        self.slots = self._raw = None  # type: ignore[assignment]
        if self._shm is not None:
            self._shm.unlink()  # first: the name goes even if a view still held somewhere keeps the pages mapped
            self._shm.close()
            self._shm = None


class NvmeTier:
    """Experts read on demand from the checkpoint's memory-mapped safetensors files."""

    def __init__(self, files: CheckpointFiles, layout: ExpertLayout):
        self.files = files
        self.layout = layout

    def check(self, names: ExpertTensorNames) -> None:
        """Fail early, naming the tensor, if an expert is missing or mis-shaped."""
        f, d = self.layout.ffn, self.layout.hidden
        for name, shape in ((names.gate, (f, d)), (names.up, (f, d)), (names.down, (d, f))):
            got = self.files.info(name).shape
            if got != shape:
                raise ValueError(f"{self.files.directory}: tensor {name!r} has shape {got}, the config implies {shape}")

    def read_into(self, names: ExpertTensorNames, out: torch.Tensor) -> None:
        self.layout.pack(self.files.get(names.gate), self.files.get(names.up), self.files.get(names.down), out)
