"""What a prefetcher asks of the device cache, and what the cache reports back: frozen contracts.

    CacheView   a read-only snapshot of the cache a prefetcher plans for: resident keys, the copy queue
                with arrival estimates, slot count, the clock and the measured times. The live cache
                (device_cache.ExpertCache) and the simulator's replay both produce it, so a prefetcher
                cannot tell them apart; being frozen, it can cross a thread or a process boundary.
    Plan        what to do next: cancel queued copies, evict landed keys, fetch keys earliest deadline
                first. The cache executes a whole plan, in that order.

Times are milliseconds on the clock of whoever made the view (modelled in the simulator, measured in
the engine); a prefetcher only compares them with each other.

Not for: deciding a plan (orchestrator/) or executing it (device_cache.py, the simulator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from expert_store.keys import ExpertKey


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

    def __post_init__(self) -> None:
        if len(self.layer_ms) != self.resident.shape[0]:
            raise ValueError(f"cache view: {len(self.layer_ms)} layer times for {self.resident.shape[0]} MoE layers")

    def ready_ms(self) -> float:
        """When every pinned key will have landed, if the queue runs as estimated."""
        return max((f.eta_ms for f in self.in_flight if f.key in self.pinned), default=self.now_ms)
