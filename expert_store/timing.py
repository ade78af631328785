"""The clock and the times the device cache reports to prefetchers: measured live, fixed when injected.

    layer_ms     [L] time of each MoE layer's whole block (attention included): when each layer starts
    transfer_ms  one expert over the host link: when a queued copy lands
    link_busy    share of recent time the link spent copying: how much an unneeded copy delays others

`MeasuredTiming` smooths what the engine measures after each step (its wall time, the copy engine's
busy time and copy count); until the first measurement it reports its starting guesses. `FixedTiming`
reports constants: a test or benchmark that wants the engine to plan with the simulator's model injects
it, together with its own clock.

Not for: deciding anything from the times (orchestrator/) or timing copies (transfer.py measures them).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]  # milliseconds, monotonic


def wall_clock_ms() -> float:
    return time.perf_counter() * 1e3


class StepTiming(ABC):
    layer_ms: tuple[float, ...]
    transfer_ms: float
    link_busy: float

    @abstractmethod
    def record_step(self, seconds: float, copy_s: float, copies: int) -> None:
        """A forward pass over every MoE layer took `seconds`; `copies` experts came in `copy_s` (the copy
        engine's time plus the reads from slower tiers)."""


@dataclass
class FixedTiming(StepTiming):
    layer_ms: tuple[float, ...]
    transfer_ms: float
    link_busy: float = 0.0

    def record_step(self, seconds: float, copy_s: float, copies: int) -> None:
        return None


class MeasuredTiming(StepTiming):
    def __init__(self, n_layers: int, smoothing: float = 0.3, layer_ms: float = 1.0, transfer_ms: float = 1.0):
        if not 0 < smoothing <= 1:
            raise ValueError("smoothing is the newest step's weight, in (0, 1]")
        self.n_layers = n_layers
        self.smoothing = smoothing  # weight of the newest step
        self.layer_ms = (layer_ms,) * n_layers
        self.transfer_ms = transfer_ms
        self.link_busy = 0.0

    def record_step(self, seconds: float, copy_s: float, copies: int) -> None:
        if seconds <= 0:
            return
        a = self.smoothing
        per_layer = (1 - a) * self.layer_ms[0] + a * seconds * 1e3 / self.n_layers
        self.layer_ms = (per_layer,) * self.n_layers
        if copies and copy_s > 0:
            self.transfer_ms = (1 - a) * self.transfer_ms + a * copy_s * 1e3 / copies
        self.link_busy = (1 - a) * self.link_busy + a * min(1.0, copy_s / seconds)
