"""The expert store: (layer, expert) -> that expert's flat buffer, from the fastest host tier holding it.

`ExpertStore` is the contract the GPU worker's cache reads through. `LocalExpertStore`
implements it in process (the embedded mode); the services later put the same
contract behind shared memory (same host) and gRPC (other hosts), so callers never
change.

Placement is static: experts fill the host arena in (layer, expert) order until the
host budget is spent; the rest are served from the NVMe files.

Not for: the GPU cache, eviction, or prefetch decisions.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping

import torch
from tqdm import tqdm

from expert_store.checkpoint import CheckpointFiles
from expert_store.layout import ExpertKey, ExpertLayout, ExpertTensorNames
from expert_store.tiers import HostArena, NvmeTier


class Tier(enum.Enum):
    HOST = "host"
    NVME = "nvme"


class ExpertStore(ABC):
    """Read-only source of routed experts, in tiers below the device."""

    layout: ExpertLayout

    @abstractmethod
    def keys(self) -> list[ExpertKey]: ...

    @abstractmethod
    def tier(self, key: ExpertKey) -> Tier: ...

    @abstractmethod
    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        """The expert's flat buffer in host RAM (page-locked where possible), or None if not in RAM."""

    @abstractmethod
    def read_into(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        """Write the expert into a flat host buffer `out`; returns the tier it came from."""

    def close(self) -> None:
        """Release host memory; the store is unusable afterwards."""


class LocalExpertStore(ExpertStore):
    def __init__(
        self,
        files: CheckpointFiles,
        experts: Mapping[ExpertKey, ExpertTensorNames],
        layout: ExpertLayout,
        host_budget_bytes: int,
        pin_for_cuda: bool,
        progress: bool = False,
    ):
        self.layout = layout
        self._names = dict(experts)
        self._nvme = NvmeTier(files, layout)
        for names in self._names.values():
            self._nvme.check(names)
        ordered = sorted(self._names)
        capacity = min(len(ordered), max(0, host_budget_bytes) // layout.slot_nbytes)
        self._arena = HostArena(layout, capacity, pin_for_cuda)
        self._host_slot: dict[ExpertKey, int] = {}
        load: Iterable[ExpertKey] = ordered[:capacity]
        if progress and capacity:
            load = tqdm(load, desc="experts -> host RAM", unit="expert", leave=False)
        for slot, key in enumerate(load):
            self._nvme.read_into(self._names[key], self._arena.slots[slot])
            self._host_slot[key] = slot

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

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        view = self.host_view(key)
        if view is not None:
            out.copy_(view)
            return Tier.HOST
        self._nvme.read_into(self._names[key], out)
        return Tier.NVME

    def _check(self, key: ExpertKey) -> None:
        if key not in self._names:
            raise KeyError(f"expert {key} is not in this store (layer, expert)")

    def close(self) -> None:
        self._arena.close()
        self._host_slot.clear()
