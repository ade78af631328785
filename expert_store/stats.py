"""Counters of the hot-expert cache, per step and for a whole run.

Not for: timing model compute or anything outside the cache.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class CacheStats:
    hits: int = 0  # landed when its layer needed it
    late: int = 0  # its copy was queued or under way when its layer needed it
    misses: int = 0  # not in the cache at all: loaded on demand
    prefetches: int = 0
    prefetch_used: int = 0  # prefetched experts that compute then used
    prefetch_wasted: int = 0  # prefetched experts evicted before any use
    prefetch_cancelled: int = 0  # queued prefetches dropped before their copy started
    bytes_from_host: int = 0
    bytes_from_nvme: int = 0
    stall_s: float = 0.0  # compute time spent waiting for expert copies
    copy_s: float = 0.0  # time the copy engine spent copying
    read_s: float = 0.0  # time reads from a slower tier (NVMe, another host) took, on their reader threads
    failed_reads: int = 0  # reads of a slower tier that failed (a prefetch dropped, or a demand load's error)
    plan_s: float = 0.0  # host time the engine spent deciding prefetches: views, speculation, prefetcher calls

    @property
    def accesses(self) -> int:
        return self.hits + self.late + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def prefetch_accuracy(self) -> float:
        decided = self.prefetch_used + self.prefetch_wasted
        return self.prefetch_used / decided if decided else 0.0

    @property
    def bytes_moved(self) -> int:
        return self.bytes_from_host + self.bytes_from_nvme

    @property
    def load_gbps(self) -> float:
        return self.bytes_moved / self.copy_s / 1e9 if self.copy_s > 0 else 0.0

    def add(self, other: CacheStats) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def to_dict(self) -> dict[str, float | int]:
        d: dict[str, float | int] = asdict(self)
        d.update(
            hit_rate=self.hit_rate,
            bytes_moved=self.bytes_moved,
            load_gbps=self.load_gbps,
            prefetch_accuracy=self.prefetch_accuracy,
        )
        return d


@dataclass
class RunStats:
    """One run: a summary plus the per-step records it was summed from."""

    total: CacheStats = field(default_factory=CacheStats)
    steps: list[CacheStats] = field(default_factory=list)

    def record(self, step: CacheStats) -> None:
        self.steps.append(step)
        self.total.add(step)
