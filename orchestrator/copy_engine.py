"""A modelled copy engine for the simulator: one queue of equal-sized transfers, one at a time, each taking its
key's time from its source (one link time for all, or per key: local memory, another node, an NVMe file).

Demand loads (a layer waits on them) go before prefetches; within each class the queue is served by latest
start (deadline less the key's transfer time, as the live cache does; with one time for all keys, earliest
deadline first), ties in submission order (policies without deadlines pass the submission time, which makes
their prefetches first in, first out). A transfer from a remote node or NVMe holds the queue for its read and
its device copy: the conservative side, since live reads run on reader threads beside the copies. A started
transfer runs to the end, as a copy already on a CUDA stream does; only queued ones can be cancelled. Time only
moves when the caller advances it.

Not for: deciding what to copy (policies, planner) or the slots (the simulator keeps those).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass

import numpy as np

from expert_store.keys import ExpertKey
from expert_store.plan import InFlight


@dataclass
class _Entry:
    key: ExpertKey
    deadline_ms: float
    submitted_ms: float
    prefetch: bool  # issued before the key was needed (stays True if later promoted)
    demand: bool
    seq: int
    finish_ms: float | None = None  # set when it starts


class CopyEngine:
    def __init__(self, transfer_ms: float, key_ms: np.ndarray | None = None, by_latest_start: bool = True):
        """`key_ms`: [L, E] each key's transfer time (None: `transfer_ms` for every key); `by_latest_start` False:
        serve by deadline alone, as a cache that knows one link time for all keys does."""
        self.transfer_ms = transfer_ms
        self.key_ms = key_ms
        self.by_latest_start = by_latest_start
        # (not demand, latest start, deadline, seq, key)
        self._heap: list[tuple[bool, float, float, int, ExpertKey]] = []
        self._queued: dict[ExpertKey, _Entry] = {}
        self._current: _Entry | None = None
        self._free_at = 0.0
        self._seq = itertools.count()
        self.started = 0  # transfers started (bytes moved = started x expert bytes)
        self.started_prefetch = 0
        self._busy_ms = 0.0  # the started transfers' times, summed (per-key times only)

    def __contains__(self, key: ExpertKey) -> bool:
        return key in self._queued or (self._current is not None and self._current.key == key)

    def __len__(self) -> int:
        return len(self._queued) + (self._current is not None)

    def submit(self, key: ExpertKey, now_ms: float, deadline_ms: float, demand: bool) -> None:
        if key in self:
            raise RuntimeError(f"{key} is already being copied")
        entry = _Entry(key, deadline_ms, now_ms, not demand, demand, next(self._seq))
        self._queued[key] = entry
        heapq.heappush(self._heap, (not demand, self._start_by(key, deadline_ms), deadline_ms, entry.seq, key))

    def promote(self, key: ExpertKey) -> None:
        """A queued prefetch is needed now: serve it with the demand loads."""
        entry = self._queued.get(key)
        if entry is None or entry.demand:
            return
        entry.demand, entry.seq = True, next(self._seq)
        heapq.heappush(self._heap, (False, self._start_by(key, entry.deadline_ms), entry.deadline_ms, entry.seq, key))

    def cancel(self, key: ExpertKey) -> bool:
        """Drop a queued transfer; False if it already started (or is unknown)."""
        return self._queued.pop(key, None) is not None

    def last_prefetch(self, exclude: set[ExpertKey] | frozenset[ExpertKey]) -> ExpertKey | None:
        """The queued prefetch that would be served last (to give up its slot), if any."""
        entries = [e for e in self._queued.values() if not e.demand and e.key not in exclude]
        return (
            max(entries, key=lambda e: (self._start_by(e.key, e.deadline_ms), e.deadline_ms, e.seq)).key
            if entries
            else None
        )

    def advance(self, to_ms: float) -> list[tuple[ExpertKey, float, bool]]:
        """Run the link until `to_ms`; returns (key, landed at, was a prefetch) of each transfer that landed."""
        landed = []
        while True:
            if self._current is None and not self._start_next():
                break
            cur = self._current
            if cur.finish_ms > to_ms:
                break
            landed.append((cur.key, cur.finish_ms, cur.prefetch))
            self._free_at, self._current = cur.finish_ms, None
        return landed

    def next_landing(self) -> float | None:
        """When the transfer on the link (started now if the link is idle) lands; None if nothing is queued."""
        if self._current is None and not self._start_next():
            return None
        return self._current.finish_ms

    def pending(self, now_ms: float) -> tuple[InFlight, ...]:
        """Every transfer not landed, with the time it lands if the queue runs in order."""
        out = []
        clock = now_ms
        if self._current is not None:
            clock = self._current.finish_ms
            out.append(InFlight(self._current.key, clock, True))
        for *_, seq, key in sorted(self._heap):
            entry = self._queued.get(key)
            if entry is None or entry.seq != seq:
                continue
            clock = max(clock, entry.submitted_ms) + self.transfer(key)
            out.append(InFlight(key, clock, False))
        return tuple(out)

    @property
    def busy_ms(self) -> float:
        """Time the started transfers take in all."""
        return self.started * self.transfer_ms if self.key_ms is None else self._busy_ms

    def transfer(self, key: ExpertKey) -> float:
        """`key`'s time on the queue."""
        return self.transfer_ms if self.key_ms is None else float(self.key_ms[key])

    def _start_by(self, key: ExpertKey, deadline_ms: float) -> float:
        """The order key: when the transfer must start to land by its deadline (or the deadline itself)."""
        return deadline_ms - self.transfer(key) if self.by_latest_start else deadline_ms

    def _start_next(self) -> bool:
        while self._heap:
            *_, seq, key = heapq.heappop(self._heap)
            entry = self._queued.get(key)
            if entry is None or entry.seq != seq:
                continue  # cancelled or promoted: a stale heap entry
            del self._queued[key]
            start = max(self._free_at, entry.submitted_ms)
            entry.finish_ms = start + self.transfer(key)
            self._busy_ms += entry.finish_ms - start
            self._current = entry
            self.started += 1
            self.started_prefetch += entry.prefetch
            return True
        return False
