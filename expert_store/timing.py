"""The clock and the times the device cache reports to prefetchers: measured live, fixed when injected.

    layer_ms     [L] time of each MoE layer's whole block (attention included): when each layer starts
    transfer_ms  one expert over the host link (a device copy from host RAM): when a queued copy lands
    source_ms    per source (expert_store/plan.py SOURCES: local, remote, nvme) one expert from there into a
                 slot: the read into a staging buffer (none for local) plus the device copy
    link_busy    share of recent time the link spent copying: how much an unneeded copy delays others

`MeasuredTiming` smooths what the engine measures after each step (its wall time, the copy engine's
busy time and copy count, and per source the reads' time and count); until a source's first read it
reports its starting guess. Every expert buffer of a model has one padded size, so a time per expert is a
time per byte times that size. `FixedTiming` reports constants: a test or benchmark that wants the engine
to plan with the simulator's model injects it, together with its own clock.

Not for: deciding anything from the times (orchestrator/) or timing copies (transfer.py measures them).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from expert_store.plan import SOURCES, Source

Clock = Callable[[], float]  # milliseconds, monotonic
Reads = Mapping[Source, tuple[float, int]]  # per source: (seconds its reads took, how many)


def wall_clock_ms() -> float:
    return time.perf_counter() * 1e3


class StepTiming(ABC):
    layer_ms: tuple[float, ...]
    transfer_ms: float
    link_busy: float
    source_ms: tuple[float, ...]  # () : transfer_ms for every source

    @abstractmethod
    def record_step(self, seconds: float, copy_s: float, copies: int, reads: Reads | None = None) -> None:
        """A forward pass over every MoE layer took `seconds`; `copies` experts went to the device in `copy_s`
        (the copy engine's time); `reads`: per slower source, the reads into staging buffers (on reader threads)."""


@dataclass
class FixedTiming(StepTiming):
    layer_ms: tuple[float, ...]
    transfer_ms: float
    link_busy: float = 0.0
    source_ms: tuple[float, ...] = ()

    def record_step(self, seconds: float, copy_s: float, copies: int, reads: Reads | None = None) -> None:
        return None


class MeasuredTiming(StepTiming):
    def __init__(
        self,
        n_layers: int,
        smoothing: float = 0.3,
        layer_ms: float = 1.0,
        transfer_ms: float = 1.0,
        read_ms: float = 1.0,
    ):
        """`read_ms`: the starting guess for one expert's read from a source other than local memory."""
        if not 0 < smoothing <= 1:
            raise ValueError("smoothing is the newest step's weight, in (0, 1]")
        self.n_layers = n_layers
        self.smoothing = smoothing  # weight of the newest step
        self.layer_ms = (layer_ms,) * n_layers
        self.transfer_ms = transfer_ms
        self.link_busy = 0.0
        self._read_ms = {s: 0.0 if s is Source.LOCAL else read_ms for s in SOURCES}

    @property
    def source_ms(self) -> tuple[float, ...]:
        return tuple(self.transfer_ms + self._read_ms[s] for s in SOURCES)

    def record_step(self, seconds: float, copy_s: float, copies: int, reads: Reads | None = None) -> None:
        if seconds <= 0:
            return
        a = self.smoothing
        per_layer = (1 - a) * self.layer_ms[0] + a * seconds * 1e3 / self.n_layers
        self.layer_ms = (per_layer,) * self.n_layers
        if copies and copy_s > 0:
            self.transfer_ms = (1 - a) * self.transfer_ms + a * copy_s * 1e3 / copies
        read_s = 0.0
        for source, (s, n) in (reads or {}).items():
            read_s += s
            if n and source is not Source.LOCAL:
                self._read_ms[source] = (1 - a) * self._read_ms[source] + a * s * 1e3 / n
        self.link_busy = (1 - a) * self.link_busy + a * min(1.0, (copy_s + read_s) / seconds)
