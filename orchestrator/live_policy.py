"""The ExpertFlow cache policy in the live engine: learned route predictions drive prefetch and eviction.

Per request it keeps a predictor session fed with the request's tokens and the routes
actually taken (online correction lives in the session). When a decode step starts,
every live request's next-token prediction [L, E] is merged into the probability that
any request needs each (layer, expert). As each MoE layer starts, the experts predicted
for it and the next `lookahead` layers are requested earliest deadline first (a layer's
deadline is the moment it runs), so the copy queue in front of a real miss stays short.
Victims are the experts whose predicted next use is least likely and furthest away.
Mispredictions surface as ordinary misses, loaded at once by the cache.

Not for: moving bytes (expert_store) or replaying traces (simulator.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from expert_store.layout import ExpertKey
from expert_store.policies import CachePolicy, LruPolicy
from predictor.base import PredictorSession, RoutePredictor


class _RouteCollector:
    """Receives one forward pass's routing from the model (the RouteRecorder protocol)."""

    def __init__(self) -> None:
        self.ids: dict[int, torch.Tensor] = {}

    def on_attention_out(self, layer: int, h: torch.Tensor) -> None:
        return None

    def on_route(self, layer: int, ids: torch.Tensor, scores: torch.Tensor) -> None:
        self.ids[layer] = ids

    def take(self) -> dict[int, np.ndarray]:
        out = {layer: ids.cpu().numpy() for layer, ids in self.ids.items()}
        self.ids.clear()
        return out


class ExpertFlowPolicy(CachePolicy):
    name = "expertflow"

    def __init__(
        self,
        predictor: RoutePredictor,
        moe_layers: Sequence[int],
        lookahead: int = 2,
        threshold: float = 0.15,
    ):
        self.predictor = predictor
        self.moe_layers = list(moe_layers)
        self._index = {layer: j for j, layer in enumerate(self.moe_layers)}
        self.lookahead = lookahead
        self.threshold = threshold
        self._collector = _RouteCollector()
        self._sessions: list[PredictorSession] = []
        self._step_tokens: list[list[int]] = []
        self._step_observed = False  # were this step's tokens already given to the sessions?
        self._probs: np.ndarray | None = None  # [L, E]: P(some live request uses (layer, expert))
        self._issued: set[ExpertKey] = set()
        self._window: frozenset[ExpertKey] = frozenset()  # predicted keys of the layers about to run
        self._current = 0  # MoE layer index (0-based) now running
        self._lru = LruPolicy()  # recency: the tie-break, and the whole rule before any prediction

    # -- engine hooks -------------------------------------------------------------------
    def route_observer(self) -> _RouteCollector:
        return self._collector

    def begin_step(self, new_tokens: list[list[int]], prefill: bool = False) -> None:
        routes = self._collector.take()
        if prefill or len(new_tokens) != len(self._sessions):
            self._sessions = [self.predictor.session() for _ in new_tokens]
        else:
            self._feed_routes(routes)
        self._step_tokens = [list(t) for t in new_tokens]
        self._issued.clear()
        self._window = frozenset()
        self._current = 0
        self._probs = None
        if prefill:
            # Prefill touches most experts anyway; its tokens reach the sessions with their
            # routes at the next step.
            self._step_observed = False
            return
        merged = None
        for session, tokens in zip(self._sessions, self._step_tokens):
            if not tokens:
                continue
            session.observe_token(tokens[-1])
            p = np.clip(session.predict(), 0.0, 1.0)
            merged = p if merged is None else 1.0 - (1.0 - merged) * (1.0 - p)
        self._step_observed = True
        self._probs = merged

    def _feed_routes(self, routes: dict[int, np.ndarray]) -> None:
        row = 0
        for session, tokens in zip(self._sessions, self._step_tokens):
            for i, token in enumerate(tokens):
                if not self._step_observed:
                    session.observe_token(token)
                for j, layer in enumerate(self.moe_layers):
                    if layer in routes:
                        session.observe_route(j, routes[layer][row + i].tolist())
            row += len(tokens)

    # -- cache hooks --------------------------------------------------------------------
    def _wanted(self, first: int, last: int) -> list[ExpertKey]:
        """Predicted keys of MoE layers first..last (indices), deadline order, likeliest first within a layer."""
        if self._probs is None:
            return []
        keys = []
        for j in range(first, min(last, len(self.moe_layers) - 1) + 1):
            p = self._probs[j]
            for e in np.argsort(-p, kind="stable"):
                if p[e] < self.threshold:
                    break
                keys.append((self.moe_layers[j], int(e)))
        return keys

    def prefetch(self, next_layer: int) -> list[ExpertKey]:
        self._current = self._index.get(next_layer, 0)
        wanted = self._wanted(self._current, self._current + self.lookahead)
        self._window = frozenset(wanted)
        keys = [k for k in wanted if k not in self._issued]
        self._issued.update(keys)
        return keys

    def protected(self) -> frozenset[ExpertKey]:
        return self._window

    def on_use(self, key: ExpertKey) -> None:
        self._lru.on_use(key)

    def on_evict(self, key: ExpertKey) -> None:
        self._lru.on_evict(key)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        if self._probs is None:  # no prediction yet (prefill)
            return self._lru.victim(candidates)
        n = len(self.moe_layers)
        recency = self._lru.recency()

        def keep_score(key: ExpertKey) -> tuple[float, int]:
            j = self._index[key[0]]
            steps = (j - self._current) % n  # layers until this expert's layer runs again
            p = float(self._probs[j, key[1]])
            return p / (1.0 + steps), recency.get(key, -1)

        return min(candidates, key=keep_score)
