"""Eviction policies: which landed expert leaves the device cache when a slot is needed.

One small interface; the device cache and the simulator both call it, with the same events:

    on_load(key)       a key got a slot (its copy is queued)
    on_use(key)        a layer used the key
    on_evict(key)      the key left its slot (evicted, or its queued copy cancelled)
    victim(candidates) one of `candidates` (landed keys the running layer does not need) to evict,
                       or None to leave them all

    ondemand        no reuse: a key leaves right after its layer used it (`keeps_experts = False`)
    lru             least recently loaded or used first
    pinned          keys in a fixed set never leave (a static hot set); LRU among the rest
    next-use        furthest predicted next use first (Belady with predictions): the prefetcher that
                    plans with predictions sets `use`; LRU until it has, and among equals

What to fetch early is a prefetcher's job (orchestrator/prefetcher.py); the policies a user names
(`--policy`) pair one of these with a prefetcher in orchestrator/policies.py, the one registry.

Not for: moving bytes or owning slots (device_cache.py), or fetching anything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Collection
from typing import ClassVar

import numpy as np

from expert_store.keys import ExpertKey


class EvictionPolicy(ABC):
    name: ClassVar[str]
    keeps_experts: ClassVar[bool] = True  # False: a key leaves right after its layer used it

    def on_load(self, key: ExpertKey) -> None:
        """`key` got a slot (its copy is queued or issued)."""

    def on_use(self, key: ExpertKey) -> None:
        """A layer used `key`."""

    def on_evict(self, key: ExpertKey) -> None:
        """`key` left its slot."""

    @abstractmethod
    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey | None:
        """One of `candidates` to evict (None: keep them all)."""


class OnDemand(EvictionPolicy):
    """No reuse: every expert is loaded when routed to and dropped after use."""

    name = "ondemand"
    keeps_experts = False

    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey | None:
        return min(candidates, default=None)


class Lru(EvictionPolicy):
    """Evict the key least recently loaded or used."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # least recently touched first

    def _touch(self, key: ExpertKey) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def on_load(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_use(self, key: ExpertKey) -> None:
        self._touch(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey | None:
        allowed = candidates if isinstance(candidates, (set, frozenset, dict)) else set(candidates)
        return next((k for k in self._order if k in allowed), min(allowed, default=None))


class Pinned(Lru):
    """Keys in `keep` never leave (a static hot set); LRU among the rest."""

    name = "pinned"

    def __init__(self, keep: Collection[ExpertKey] = ()) -> None:
        super().__init__()
        self.keep = frozenset(keep)

    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey | None:
        return super().victim([k for k in candidates if k not in self.keep])


class NextUse(Lru):
    """Belady with predictions: the candidate whose predicted next use (`use`, [L, E] ms) is furthest away;
    LRU among equals, and LRU alone until a prediction has set `use`."""

    name = "next-use"

    def __init__(self) -> None:
        super().__init__()
        self.use: np.ndarray | None = None  # set by the prefetcher with each plan

    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey | None:
        use = self.use
        if use is None or not candidates:
            return super().victim(candidates)
        keys = list(candidates)
        layers, experts = np.array(keys, np.int64).T
        values = use[layers, experts]
        furthest = values.max()
        tied = {k for k, v in zip(keys, values.tolist()) if v == furthest}
        return tied.pop() if len(tied) == 1 else super().victim(tied)
