"""The prefetcher contract, and the peers' prefetchers: what to copy before a layer asks for it.

The engine (and the simulator, in the same order) calls a prefetcher explicitly:

    begin_step(requests, view)   once per forward pass, with the batch's live requests by id and the
                                 tokens each brings (its prompt at its first step, then one token)
    after_layer(routed, view)    once per MoE layer, once its experts' work is issued (misses first on the
                                 copy stream; on a GPU the experts may still be running): the layer's routes
                                 per request, and the next layer's gate speculation where the server
                                 computes it (`wants_speculation`)
    finish(ids)                  requests that left the batch
    poll()                       a plan finished since (asynchronous prefetchers: planning_thread.py)
    route_estimate(id)           what it expects a request's next token to use
    schedule(waiting, ...)       the token scheduler's next micro-batch, from those estimates

Each call gets a fresh `CacheView` (expert_store/plan.py) and may return a `Plan`, which the cache
executes whole. A prefetcher that ranks victims by its own predictions brings its `eviction` policy;
the others leave eviction to the policy they are paired with (orchestrator/policies.py). The peers'
prefetchers are in peers.py, ExpertFlow's in expertflow.py.

Not for: executing plans (expert_store/device_cache.py, simulator.py), predicting (predictor/), or any
prefetcher's logic.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from expert_store.eviction import EvictionPolicy
from expert_store.plan import CacheView, Plan
from orchestrator.scheduler import Request, SchedulerConfig, form_batch
from predictor.base import RequestId


@dataclass(frozen=True)
class StepRequest:
    id: RequestId
    new_tokens: tuple[int, ...]  # tokens entering the model this step, in order


@dataclass(frozen=True)
class LayerRoutes:
    """MoE layer `layer` routed this step's tokens. K = experts per token."""

    layer: int
    routes: Mapping[RequestId, np.ndarray]  # [T, K] per request, its new tokens in order
    # [K] per request, best first: MoE layer `layer + 1`'s router on this layer's hidden state, for the
    # request's last token; None where the server did not compute it
    speculation: Mapping[RequestId, np.ndarray] | None = None


class Prefetcher(ABC):
    name: ClassVar[str]
    wants_speculation: bool = False  # the engine computes next-layer gate speculation for it
    eviction: EvictionPolicy | None = None  # the eviction policy it plans with, if it needs its own

    @abstractmethod
    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None: ...

    @abstractmethod
    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None: ...

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        """These requests left the batch."""

    def poll(self) -> Plan | None:
        """A plan finished since the last call, for prefetchers that plan asynchronously (the engine polls
        at every layer); None for those that answer each call directly."""
        return None

    def route_estimate(self, request_id: RequestId) -> np.ndarray | None:
        """[L, E] what the prefetcher expects the request's next token to use (the token scheduler groups
        requests by it); None where it has no view of the request."""
        return None

    def schedule(
        self, waiting: Sequence[tuple[RequestId, int]], config: SchedulerConfig, neutral: np.ndarray
    ) -> list[RequestId] | None:
        """The method's token scheduler: which of the `waiting` requests (id, steps left out) decode together next,
        grouped by `route_estimate` (`neutral` [L, E] where it has none; with none at all: oldest first). None: the
        caller decides (a remote prefetcher that could not answer)."""
        queue = [Request(i, waited, self._estimate(rid, neutral)) for i, (rid, waited) in enumerate(waiting)]
        return [waiting[i][0] for i in form_batch(queue, config)]

    def _estimate(self, request_id: RequestId, neutral: np.ndarray) -> np.ndarray:
        estimate = self.route_estimate(request_id)
        return neutral if estimate is None else estimate

    def close(self) -> None:
        """Stop any worker; the prefetcher is unusable afterwards."""


def merge_requests(rows: Iterable[np.ndarray]) -> np.ndarray | None:
    """P(some request uses a key) from each request's own probabilities, taken as independent."""
    merged = None
    for p in rows:
        merged = p.copy() if merged is None else 1.0 - (1.0 - merged) * (1.0 - p)
    return merged
