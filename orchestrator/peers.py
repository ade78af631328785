"""The peers' prefetchers, as the systems users know them do it, behind the one Prefetcher interface.

    HotSet      a static hot set: the most frequent keys in training, fetched once and never evicted
    Speculate   next-layer gate speculation (mixtral-offloading): once layer j routes, fetch the
                experts layer j+1's router picks on layer j's hidden state
    Activation  activation-matrix prediction (MoE-Infinity): at each step, the likeliest experts of
                every layer, nearest layer first

Each runs unchanged in the simulator and the engine; eviction is LRU unless it brings its own.

Not for: ExpertFlow's prefetcher (expertflow.py) or pairing prefetchers with eviction (policies.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np

from expert_store.eviction import Pinned
from expert_store.keys import ExpertKey
from expert_store.plan import CacheView, Plan, Transfer
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest, merge_requests
from predictor.base import RequestId, SessionPredictor


def _now_transfers(keys: Iterable[ExpertKey], view: CacheView, probs: Sequence[float] | None = None) -> Plan:
    """Fetch `keys` in the given order, all due now (first in, first out)."""
    now = view.now_ms
    keys = list(keys)
    probs = probs if probs is not None else [1.0] * len(keys)
    return Plan(fetch=tuple(Transfer(k, now, now, float(p)) for k, p in zip(keys, probs)))


class HotSet(Prefetcher):
    """The `share` of the slots most frequent in training (`frequency` [L, E]) are fetched at the first step
    and pinned; the other slots serve misses by LRU (at least `top_k`, so a layer's misses always fit)."""

    name = "static"

    def __init__(self, frequency: np.ndarray, top_k: int, share: float = 0.75) -> None:
        self.frequency = frequency
        self.top_k = top_k
        self.share = share
        self.eviction = Pinned()
        self._fetched = False

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        if self._fetched:
            return None
        self._fetched = True
        free = max(self.top_k, round((1 - self.share) * view.n_slots))
        n_pin = max(0, view.n_slots - free)
        order = np.argsort(-self.frequency, axis=None, kind="stable")[:n_pin]
        hot = [ExpertKey(*divmod(int(i), self.frequency.shape[1])) for i in order]
        self.eviction.keep = frozenset(hot)
        return _now_transfers(hot, view)

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        return None


class Speculate(Prefetcher):
    """Once layer j has routed, fetch layer j+1's speculated experts (most requests first, then by id)."""

    name = "speculate"
    wants_speculation = True

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        return None

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        if not routed.speculation:
            return None  # the last layer, or a step the server did not speculate for
        votes = Counter(int(e) for spec in routed.speculation.values() for e in spec)
        picks = sorted(votes, key=lambda e: (-votes[e], e))
        return _now_transfers((ExpertKey(routed.layer + 1, e) for e in picks), view)


class Activation(Prefetcher):
    """Per layer at most `per_layer` experts likelier than `threshold` for some request, layer order."""

    name = "activation"

    def __init__(self, sessions: SessionPredictor, per_layer: int, threshold: float = 0.1) -> None:
        self.sessions = sessions
        self.per_layer = per_layer
        self.threshold = threshold

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        merged = merge_requests(self.sessions.step({r.id: r.new_tokens for r in requests}).values())
        if merged is None:
            return None
        keys, probs = [], []
        for layer, p in enumerate(merged):
            for e in np.argsort(-p, kind="stable")[: self.per_layer].tolist():
                if p[e] > self.threshold:
                    keys.append(ExpertKey(layer, e))
                    probs.append(p[e])
        return _now_transfers(keys, view, probs)

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        self.sessions.layer(routed.layer, routed.routes, routed.speculation)
        return None

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        self.sessions.finish(request_ids)
