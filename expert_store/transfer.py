"""Moving expert bytes onto the compute device, and timing it.

`CudaCopier` copies on its own stream: each copy waits for an event saying compute is
done with the destination slot, and records an event compute waits on before it
reads the expert, so compute stalls only for the expert it needs. `CpuCopier` has the
same interface with CPU memory as the "device": copies are synchronous and their
time is the stall.

Not for: deciding what to copy (device_cache) or where experts come from (store).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from typing import Any

import torch


class Copier(ABC):
    @abstractmethod
    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any | None) -> Any | None:
        """Copy src into dst once `after` (a compute-done marker) has passed; returns a ready marker."""

    @abstractmethod
    def wait(self, ready: Any | None) -> None:
        """Make compute wait until the copy behind `ready` has landed."""

    @abstractmethod
    def landed(self, ready: Any | None) -> bool:
        """Has the copy behind `ready` finished (without waiting for it)?"""

    @abstractmethod
    def compute_done(self) -> Any | None:
        """A marker that passes once compute issued so far has finished."""

    @abstractmethod
    def host_wait(self, marker: Any | None) -> None:
        """Block the host until `marker` has passed (before reusing a host staging buffer)."""

    @abstractmethod
    def drain(self) -> tuple[float, float]:
        """(stall seconds, copy seconds) accumulated since the last drain; may synchronise."""


class CpuCopier(Copier):
    def __init__(self) -> None:
        self._copy_s = 0.0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any | None) -> None:
        t0 = time.perf_counter()
        dst.copy_(src)
        self._copy_s += time.perf_counter() - t0
        return None

    def wait(self, ready: Any | None) -> None:
        return None

    def landed(self, ready: Any | None) -> bool:
        return True  # copies are synchronous

    def compute_done(self) -> None:
        return None

    def host_wait(self, marker: Any | None) -> None:
        return None

    def drain(self) -> tuple[float, float]:
        # Synchronous copies block compute for exactly their duration.
        s, self._copy_s = self._copy_s, 0.0
        return s, s


class CudaCopier(Copier):
    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self._stall_probes: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._copy_probes: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def _compute_stream(self) -> torch.cuda.Stream:
        return torch.cuda.current_stream(self.device)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: torch.cuda.Event | None) -> torch.cuda.Event:
        start, ready = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start.record(self.stream)
            dst.copy_(src, non_blocking=True)
            ready.record(self.stream)
        self._copy_probes.append((start, ready))
        return ready

    def wait(self, ready: torch.cuda.Event | None) -> None:
        if ready is None:
            return
        compute = self._compute_stream()
        before, after = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        before.record(compute)
        compute.wait_event(ready)
        after.record(compute)
        self._stall_probes.append((before, after))

    def landed(self, ready: torch.cuda.Event | None) -> bool:
        return ready is None or ready.query()

    def compute_done(self) -> torch.cuda.Event:
        ev = torch.cuda.Event()
        ev.record(self._compute_stream())
        return ev

    def host_wait(self, marker: torch.cuda.Event | None) -> None:
        if marker is not None:
            marker.synchronize()

    def drain(self) -> tuple[float, float]:
        stall = copy = 0.0
        for a, b in self._stall_probes:
            b.synchronize()
            stall += a.elapsed_time(b) / 1e3
        for a, b in self._copy_probes:
            b.synchronize()
            copy += a.elapsed_time(b) / 1e3
        self._stall_probes.clear()
        self._copy_probes.clear()
        return stall, copy


def make_copier(device: torch.device) -> Copier:
    return CudaCopier(device) if device.type == "cuda" else CpuCopier()
