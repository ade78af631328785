"""Cache policies: what stays in the device cache, what leaves, what to fetch early.

One small interface and a name registry. A policy sees every routing decision as it
happens (`observe_route`), is told about uses, loads and evictions, picks victims,
and may ask for prefetches before a layer runs. The predictive policies of the
method plug in here; v0 ships `ondemand` (no reuse) and `lru`.

Not for: moving bytes or owning slots (device_cache does both).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch

from expert_store.layout import ExpertKey
from expert_store.stats import CacheStats


class CachePolicy(ABC):
    name: ClassVar[str]
    keeps_experts: ClassVar[bool] = True  # False: an expert leaves the cache right after its use

    def attach(self, n_slots: int) -> None:
        """The cache this policy serves holds `n_slots` experts."""

    def bind_speculation(self, speculate: Callable[[int, torch.Tensor], tuple[int, torch.Tensor] | None]) -> None:
        """The model's next-layer gate speculation (`MoETransformer.speculate`), for policies that use it."""

    def end_step(self, seconds: float, stats: CacheStats) -> None:
        """A forward pass took `seconds` (wall clock) with these cache counters: measured times for planning."""

    def begin_step(self, new_tokens: list[list[int]], prefill: bool = False) -> None:
        """A forward pass starts; `new_tokens[r]` are request r's tokens entering it (none if finished).

        `prefill` marks the first pass of a new batch of requests."""

    def route_observer(self) -> object | None:
        """An `expertflow.moe.RouteRecorder` that wants every token's routing, or None."""
        return None

    def observe_route(self, layer: int, experts: Sequence[int]) -> None:
        """The router of `layer` just picked these experts for the current batch."""

    def on_use(self, key: ExpertKey) -> None:
        """Compute is about to use `key` (hit or freshly loaded)."""

    def on_load(self, key: ExpertKey) -> None:
        """`key` was placed in a slot."""

    def on_landed(self, key: ExpertKey) -> None:
        """A prefetched `key`'s copy has finished (seen when the cache next polls its copies)."""

    def on_evict(self, key: ExpertKey) -> None:
        """`key` left the cache."""

    def prefetch(self, next_layer: int) -> list[ExpertKey]:
        """The whole prefetch queue wanted now, as `next_layer` is about to route, earliest deadline first.
        The cache issues it a few copies at a time; queued keys a later call no longer lists are cancelled."""
        return []

    def after_route(self, layer: int) -> list[ExpertKey] | None:
        """`layer` has routed (its experts are about to run): a new prefetch queue, as for `prefetch`,
        or None to keep the current one."""
        return None

    def protected(self) -> frozenset[ExpertKey]:
        """Keys a prefetch must not evict (e.g. predicted for the layers about to run)."""
        return frozenset()

    @abstractmethod
    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        """Pick one of `candidates` (never empty) to evict."""


class OnDemandPolicy(CachePolicy):
    """No reuse: every expert is loaded when routed to and dropped after use."""

    name = "ondemand"
    keeps_experts = False

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        return candidates[0]


class LruPolicy(CachePolicy):
    """Evict the least recently used expert within the byte budget."""

    name = "lru"

    def __init__(self) -> None:
        self._last_use: OrderedDict[ExpertKey, None] = OrderedDict()

    def on_use(self, key: ExpertKey) -> None:
        self._last_use[key] = None
        self._last_use.move_to_end(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._last_use.pop(key, None)

    def recency(self) -> dict[ExpertKey, int]:
        """Rank of each used key, 0 = least recently used."""
        return {key: i for i, key in enumerate(self._last_use)}

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        allowed = set(candidates)
        for key in self._last_use:  # oldest first
            if key in allowed:
                return key
        return candidates[0]  # loaded but never used yet (e.g. a prefetch)


POLICIES: dict[str, type[CachePolicy]] = {p.name: p for p in (OnDemandPolicy, LruPolicy)}


def make_policy(name: str) -> CachePolicy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(sorted(POLICIES))}") from None
