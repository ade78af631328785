"""What a prefetcher asks of the device cache, and what the cache reports back: frozen contracts.

    Source      where a key's bytes come from: local host RAM / shared memory, another store node, an NVMe
                file; each takes its own measured time to reach the device
    CacheView   a read-only snapshot of the cache a prefetcher plans for: resident keys, the copy queue
                with arrival estimates, slot count, the clock and the measured times (each key's source
                and each source's time for one expert: `key_ms()`). The live cache
                (device_cache.ExpertCache) and the simulator's replay both produce it, so a prefetcher
                cannot tell them apart; being frozen, it can cross a thread or a process boundary.
    Plan        what to do next: cancel queued copies, evict landed keys, fetch keys earliest deadline
                first. The cache executes a whole plan, in that order.

Times are milliseconds on the clock of whoever made the view (modelled in the simulator, measured in
the engine); a prefetcher only compares them with each other.

Not for: deciding a plan (orchestrator/) or executing it (device_cache.py, the simulator).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from expert_store.keys import ExpertKey


class Source(enum.StrEnum):
    """Where a key's bytes come from on their way to the device (`CacheView.sources` holds indexes in SOURCES).
    A store may say it as text: "host", "remote" or "remote:NODE" (which node), "nvme" (`Source.of`)."""

    LOCAL = "host"  # host RAM of this process or shared memory on this host: one device copy
    REMOTE = "remote"  # another store node: a network fetch into a staging buffer, then the device copy
    NVME = "nvme"  # a file (on the store's host): a read into a staging buffer, then the device copy

    @classmethod
    def of(cls, value: Source | str) -> Source:
        """`value` as a Source; "remote:NODE" is REMOTE. Anything else is a clear error."""
        if isinstance(value, Source):
            return value
        try:
            return cls(value.split(":", 1)[0])
        except ValueError:
            raise ValueError(f"expert source {value!r}: one of host, remote, remote:NODE, nvme") from None


SOURCES = tuple(Source)  # the order of `CacheView.source_ms` and the codes of `CacheView.sources`


def source_codes(shape: tuple[int, int], source_of: Callable[[int, int], Source | str | None]) -> np.ndarray:
    """[L, E] uint8 codes (indexes in SOURCES) of `source_of(layer, expert)`: a Source, its text, or None (LOCAL)."""
    codes = np.zeros(shape, np.uint8)
    for layer in range(shape[0]):
        for expert in range(shape[1]):
            source = source_of(layer, expert)
            codes[layer, expert] = SOURCES.index(Source.of(source)) if source is not None else 0
    return codes


@dataclass(frozen=True)
class InFlight:
    key: ExpertKey
    eta_ms: float  # when it is expected to land
    started: bool  # already copying: it cannot be cancelled


@dataclass(frozen=True)
class Transfer:
    key: ExpertKey
    deadline_ms: float  # when its layer starts
    eta_ms: float  # when it lands if the queue runs as planned
    prob: float


@dataclass(frozen=True)
class Plan:
    fetch: tuple[Transfer, ...] = ()  # earliest deadline first
    cancel: tuple[ExpertKey, ...] = ()  # queued, not started copies to drop
    evict: tuple[ExpertKey, ...] = ()  # landed keys to free, one per fetch that found no free slot

    def __bool__(self) -> bool:
        return bool(self.fetch or self.cancel or self.evict)


@dataclass(frozen=True)
class CacheView:
    """The cache as a prefetcher may see it. L = MoE layers, E = experts; arrays are never written."""

    now_ms: float
    n_slots: int
    resident: np.ndarray  # [L, E] bool: landed in a slot
    in_flight: tuple[InFlight, ...] = ()  # slot taken, not landed (demand loads included), in service order
    # the running layer's keys: never evicted nor cancelled (after a layer's work is issued, those of its own
    # copies still under way)
    pinned: frozenset[ExpertKey] = field(default_factory=frozenset)
    layer_ms: tuple[float, ...] = ()  # [L] time of each MoE layer's whole block
    transfer_ms: float = 0.0  # one expert over the link
    link_busy: float = 0.0  # share of recent time the link spent copying, 0..1
    # [L, E] uint8: each key's source, an index in SOURCES; None: every key is LOCAL
    sources: np.ndarray | None = None
    # per source in SOURCES order: one expert from there into a device slot (read + copy); (): transfer_ms for all
    source_ms: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.layer_ms) != self.resident.shape[0]:
            raise ValueError(f"cache view: {len(self.layer_ms)} layer times for {self.resident.shape[0]} MoE layers")
        if self.sources is not None and self.sources.shape != self.resident.shape:
            raise ValueError(f"cache view: sources {self.sources.shape}, resident {self.resident.shape}")
        if self.sources is not None and self.sources.size and int(self.sources.max()) >= len(SOURCES):
            raise ValueError(f"cache view: a source code {int(self.sources.max())} outside 0..{len(SOURCES) - 1}")
        if self.source_ms and len(self.source_ms) != len(SOURCES):
            raise ValueError(f"cache view: {len(self.source_ms)} source times, one per source ({len(SOURCES)}) please")

    def key_ms(self) -> np.ndarray | None:
        """[L, E] expected time of each key from its source into a slot; None: every key takes `transfer_ms`."""
        return key_ms(self.sources, self.source_ms)

    def ready_ms(self) -> float:
        """When every pinned key will have landed, if the queue runs as estimated."""
        return max((f.eta_ms for f in self.in_flight if f.key in self.pinned), default=self.now_ms)


def key_ms(sources: np.ndarray | None, source_ms: tuple[float, ...]) -> np.ndarray | None:
    """[L, E] each key's time from its source (`sources`: SOURCES codes), or None where either is missing (the
    caller's one link time holds for every key)."""
    if sources is None or not source_ms:
        return None
    return np.asarray(source_ms, np.float64)[sources]
