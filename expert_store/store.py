"""The expert store: (layer, expert) -> that expert's flat buffer, from the fastest host tier holding it.

`ExpertStore` is the contract the GPU worker's cache reads through; `load()` takes any implementation.
`LocalExpertStore` implements it in process (the embedded mode); the services put the same contract
behind shared memory (same host) and gRPC (other hosts), so callers never change.

Two ways to get bytes that are not already in host RAM (`host_view` is None):

    read_into(key, out)   blocking: returns once `out` holds the expert
    stage(key, out)       asynchronous: starts the read and returns a `StagedRead` at once; the cache
                          starts it when it issues a copy (a demand load, or a prefetch among the few
                          issued at a time) and waits only when the layer needs the expert, so a slow
                          tier (NVMe, another host) is not a blocking call inside the MoE block

Placement is static: experts fill the host arena in key order until the host budget is spent; the
rest are served from the NVMe files. `source(key)` says where a key's bytes come from as the planner
sees it (expert_store/plan.py Source: local memory, another node, an NVMe file), so it plans each key
with that source's measured time.

Not for: the GPU cache, eviction, or prefetch decisions.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from tqdm import tqdm

from expert_store.checkpoint import CheckpointFiles
from expert_store.keys import ExpertKey
from expert_store.layout import ExpertLayout, ExpertTensorNames
from expert_store.plan import Source
from expert_store.tiers import HostArena, NvmeTier


class Tier(enum.Enum):
    HOST = "host"
    NVME = "nvme"


class StagedRead(ABC):
    """A read into a host buffer that may still be running."""

    seconds: float = 0.0  # how long the read itself took, once done (0 if it was not timed)

    @abstractmethod
    def done(self) -> bool: ...

    @abstractmethod
    def wait(self) -> Tier:
        """Block until the buffer holds the expert; the tier it came from (re-raises the read's error)."""


class _Finished(StagedRead):
    """A read that already ended: its tier, or (`error`) why it failed, raised by `wait` as a threaded read's."""

    def __init__(self, tier: Tier | None, seconds: float = 0.0, error: Exception | None = None) -> None:
        self._tier, self._error = tier, error
        self.seconds = seconds

    def done(self) -> bool:
        return True

    def wait(self) -> Tier:
        if self._error is not None:
            raise self._error
        return self._tier


class ThreadedRead(StagedRead):
    """A read running on a reader thread (any store's: a file, a remote fetch); `seconds` is set there when it
    finishes."""

    def __init__(self, read: Callable[[], Tier], readers: ThreadPoolExecutor) -> None:
        self._future: Future[Tier] = readers.submit(self._timed, read)

    def _timed(self, read: Callable[[], Tier]) -> Tier:
        t0 = time.perf_counter()
        try:
            return read()
        finally:
            self.seconds = time.perf_counter() - t0

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> Tier:
        return self._future.result()


class ExpertStore(ABC):
    """Read-only source of routed experts, in tiers below the device."""

    layout: ExpertLayout

    @abstractmethod
    def keys(self) -> list[ExpertKey]: ...

    @abstractmethod
    def tier(self, key: ExpertKey) -> Tier: ...

    def source(self, key: ExpertKey) -> Source:
        """Where the key's bytes come from: LOCAL if they are in host memory here, else this default's NVME (a
        store that fetches from another node says REMOTE)."""
        return Source.LOCAL if self.tier(key) is Tier.HOST else Source.NVME

    @property
    def sources_epoch(self) -> int:
        """A number that changes whenever `source()` may answer differently than before (a scaled-out store's
        node failed or came back, its directory moved experts); a cache reads every key's source again then.
        A store whose sources never change keeps this default."""
        return 0

    @abstractmethod
    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        """The expert's flat buffer in host RAM (page-locked where possible), or None if not in RAM."""

    @abstractmethod
    def read_into(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        """Write the expert into a flat host buffer `out`; returns the tier it came from."""

    def stage(self, key: ExpertKey, out: torch.Tensor) -> StagedRead:
        """Start writing the expert into `out` and return at once. This default reads synchronously;
        stores with a slow tier override it. A read that fails fails at `wait`, whichever way it ran."""
        try:
            return _Finished(self.read_into(key, out))
        except Exception as e:  # noqa: BLE001 - handed to the caller at wait(), as ThreadedRead does
            return _Finished(None, error=e)

    def close(self) -> None:
        """Release host memory and stop any reader; the store is unusable afterwards."""


class LocalExpertStore(ExpertStore):
    """Host arena + NVMe files in this process; NVMe reads for `stage` run on `readers` threads."""

    def __init__(
        self,
        files: CheckpointFiles,
        experts: Mapping[ExpertKey, ExpertTensorNames],
        layout: ExpertLayout,
        host_budget_bytes: int,
        pin_for_cuda: bool,
        progress: bool = False,
        readers: int = 2,
        shared_host: bool = False,
    ):
        """`shared_host`: the host arena is POSIX shared memory other processes on this host can map (the
        expert-store service; see `host_placement`)."""
        self.layout = layout
        self._names = {ExpertKey(*k): v for k, v in experts.items()}
        self._nvme = NvmeTier(files, layout)
        for names in self._names.values():
            self._nvme.check(names)
        ordered = sorted(self._names)
        capacity = min(len(ordered), max(0, host_budget_bytes) // layout.slot_nbytes)
        self._arena = HostArena(layout, capacity, pin_for_cuda, shared=shared_host)
        self._host_slot: dict[ExpertKey, int] = {}
        load: Iterable[ExpertKey] = ordered[:capacity]
        if progress and capacity:
            load = tqdm(load, desc="experts -> host RAM", unit="expert", leave=False)
        for slot, key in enumerate(load):
            self._nvme.read_into(self._names[key], self._arena.slots[slot])
            self._host_slot[key] = slot
        # Only experts outside RAM need a reader; closed (and joined) by close().
        self._readers = (
            ThreadPoolExecutor(readers, thread_name_prefix="expert-store-nvme") if len(ordered) > capacity else None
        )

    @property
    def host_kind(self) -> str:
        return self._arena.kind

    @property
    def host_bytes(self) -> int:
        return len(self._host_slot) * self.layout.slot_nbytes

    def keys(self) -> list[ExpertKey]:
        return sorted(self._names)

    def tier(self, key: ExpertKey) -> Tier:
        self._check(key)
        return Tier.HOST if key in self._host_slot else Tier.NVME

    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        self._check(key)
        slot = self._host_slot.get(key)
        return None if slot is None else self._arena.slots[slot]

    def host_placement(self, key: ExpertKey) -> tuple[str, int] | None:
        """(shared-memory segment name, byte offset) of a host-tier expert, for another process on this host to
        map; None if the expert is not in host RAM or the arena is private memory."""
        self._check(key)
        slot, name = self._host_slot.get(key), self._arena.shm_name
        return None if slot is None or name is None else (name, slot * self.layout.slot_nbytes)

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        view = self.host_view(key)
        if view is not None:
            out.copy_(view)
            return Tier.HOST
        self._nvme.read_into(self._names[key], out)
        return Tier.NVME

    def stage(self, key: ExpertKey, out: torch.Tensor) -> StagedRead:
        if self.host_view(key) is not None or self._readers is None:
            return _Finished(self.read_into(key, out))
        return ThreadedRead(lambda: self.read_into(key, out), self._readers)

    def _check(self, key: ExpertKey) -> None:
        if key not in self._names:
            raise KeyError(f"expert {tuple(key)} is not in this store (MoE layer, expert)")

    def close(self) -> None:
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
            self._readers = None
        self._arena.close()
        self._host_slot.clear()
