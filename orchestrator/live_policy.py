"""The ExpertFlow cache policy in the live engine: learned route predictions through the deadline planner.

Per request it keeps a predictor session fed with the request's tokens and the routes actually
taken. When a decode step starts, every live request's next-token prediction [L, E] is merged into
the probability that any request needs each (layer, expert). As the first MoE layer is about to route,
and again once each layer has routed, the policy hands the probabilities to `orchestrator.planner.plan`,
the same code the simulator runs (the next layer, about to route, reuses that plan); once layer j has
routed, layer j+1's row is first refined with the predictor's layer
head (the requests' routes at layers <= j and the model's next-layer gate speculation when the loader bound
it), a layer before it runs, as in the simulator. The planner sets deadlines from measured per-layer
times, orders transfers earliest deadline first, and drops those that cannot land in time or became unlikely. The plan's fetch list becomes the cache's prefetch queue (the cache
cancels queued keys no longer listed, and loads misses at top priority); victims are the resident
keys whose expected next use is furthest away (the planner's Belady estimate).

The planner sees the cache as it is: landed keys as resident, copies the cache issued but has not yet
seen land as in flight (landing one transfer after another), so it only admits transfers that can still
make their layer. A refined layer replaces that layer's token-horizon row, online correction included:
the layer head already reads the request's own routes.

Times are measured, not assumed: per-layer time is the decode step's wall time over the MoE layers,
the transfer time the copy engine's time per copy, both smoothed over steps; until the first decode
step has been measured the policy plans with `LivePlanConfig`'s starting values.

Not for: moving bytes (expert_store) or replaying traces (simulator.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from expert_store.layout import ExpertKey
from expert_store.policies import CachePolicy, LruPolicy
from expert_store.stats import CacheStats
from orchestrator.planner import InFlight, PlanConfig, PlanInput, due_probabilities, next_use_ms, plan
from predictor.base import PredictorSession, RoutePredictor


@dataclass(frozen=True)
class LivePlanConfig:
    plan: PlanConfig = field(default_factory=PlanConfig)
    recent_half_life: float = 4.0  # tokens; the requests' own recent routing, for the next token's layers
    next_token_model_weight: float = 0.5  # next token's p = w * this token's prediction + (1 - w) * recent
    smoothing: float = 0.3  # weight of the newest step in the measured times
    speculation: bool = True  # feed the model's next-layer gate speculation to the layer head
    layer_ms: float = 1.0  # starting guesses, replaced by measurements
    transfer_ms: float = 1.0


class _RouteCollector:
    """Receives one forward pass's routing from the model (the RouteRecorder protocol), and gate
    speculation for the next MoE layer while `live` (decode steps) if a speculation function is bound."""

    def __init__(self, on_layer: Callable[[int, np.ndarray], None]) -> None:
        self.ids: dict[int, np.ndarray] = {}
        self.spec: dict[int, torch.Tensor] = {}  # MoE layer -> speculated ids [N, K] of this step (on device)
        self.speculate = None
        self.live = False
        self._on_layer = on_layer

    def on_attention_out(self, layer: int, h: torch.Tensor) -> None:
        if self.live and self.speculate is not None:
            speculated = self.speculate(layer, h)
            if speculated is not None:
                self.spec[speculated[0]] = speculated[1]  # read on the host only when used: no sync here

    def on_route(self, layer: int, ids: torch.Tensor, scores: torch.Tensor) -> None:
        # The MoE block reads these ids on the host right after this call anyway.
        self.ids[layer] = ids.cpu().numpy()
        self._on_layer(layer, self.ids[layer])

    def take(self) -> dict[int, np.ndarray]:
        out, self.ids, self.spec = self.ids, {}, {}
        return out


class ExpertFlowPolicy(CachePolicy):
    name = "expertflow"

    def __init__(self, predictor: RoutePredictor, moe_layers: Sequence[int], config: LivePlanConfig = LivePlanConfig()):
        self.predictor = predictor
        self.config = config
        self.moe_layers = list(moe_layers)
        self._index = {layer: j for j, layer in enumerate(self.moe_layers)}
        self._collector = _RouteCollector(self._routed)
        self._sessions: list[PredictorSession] = []
        self._step_tokens: list[list[int]] = []
        self._decoding = False
        self._probs: np.ndarray | None = None  # [L, E]: P(some live request uses (layer, expert)) this token
        self._request_probs: list[np.ndarray | None] = []
        self._recent: np.ndarray | None = None  # [L, E] decayed routing of the live requests
        self._use: np.ndarray | None = None  # [L, E] expected next use (ms) from the last plan
        self._window: frozenset[ExpertKey] = frozenset()
        # (MoE layer, keys) of the plan made when the layer before it routed
        self._replanned: tuple[int, list[ExpertKey]] | None = None
        self._resident: set[ExpertKey] = set()  # in a slot, landed or still copying
        self._copying: dict[ExpertKey, float] = {}  # issued copies not known to have landed -> issue time (ms)
        self._n_slots = 0
        self._layer_ms = config.layer_ms
        self._transfer_ms = config.transfer_ms
        self._link_busy = 0.0
        self._decay = 0.5 ** (1.0 / config.recent_half_life)
        self._lru = LruPolicy()  # the whole rule before any prediction (prefill)
        self.plans = 0  # how many times the planner ran (for tests and reports)

    # -- engine hooks -------------------------------------------------------------------
    def attach(self, n_slots: int) -> None:
        self._n_slots = n_slots

    def route_observer(self) -> _RouteCollector:
        return self._collector

    def bind_speculation(self, speculate: Callable[[int, torch.Tensor], tuple[int, torch.Tensor] | None]) -> None:
        if self.config.speculation:
            self._collector.speculate = speculate

    def begin_step(self, new_tokens: list[list[int]], prefill: bool = False) -> None:
        routes = self._collector.take()
        if prefill or len(new_tokens) != len(self._sessions):
            self._sessions = [self.predictor.session() for _ in new_tokens]
            self._recent = None
        elif not self._decoding:
            self._feed_prefill(routes)  # the prompts' routes reach the sessions now
        self._step_tokens = [list(t) for t in new_tokens]
        self._decoding = not prefill
        self._collector.live = self._decoding
        self._window = frozenset()
        self._probs = self._use = None
        self._replanned = None
        if prefill:
            return  # prefill touches most experts anyway: LRU until the first prediction
        self._request_probs = []
        for session, tokens in zip(self._sessions, self._step_tokens):
            if tokens:
                session.observe_token(tokens[-1])
                self._request_probs.append(np.clip(session.predict(), 0.0, 1.0))
            else:
                self._request_probs.append(None)
        self._probs = self._merge(self._request_probs)

    def end_step(self, seconds: float, stats: CacheStats) -> None:
        if not self._decoding or seconds <= 0:
            return
        a = self.config.smoothing
        self._layer_ms = (1 - a) * self._layer_ms + a * seconds * 1e3 / len(self.moe_layers)
        copies = stats.prefetches + stats.misses
        if copies and stats.copy_s > 0:
            self._transfer_ms = (1 - a) * self._transfer_ms + a * stats.copy_s * 1e3 / copies
        self._link_busy = (1 - a) * self._link_busy + a * min(1.0, stats.copy_s / seconds)

    def _feed_prefill(self, routes: dict[int, np.ndarray]) -> None:
        row = 0
        for session, tokens in zip(self._sessions, self._step_tokens):
            for i, token in enumerate(tokens):
                session.observe_token(token)
                for j, layer in enumerate(self.moe_layers):
                    if layer in routes:
                        session.observe_route(j, routes[layer][row + i].tolist())
            row += len(tokens)

    def _routed(self, layer: int, ids: np.ndarray) -> None:
        """A decode step's layer just routed (row r = request r's token): tell the sessions at once,
        so the next layer's refinement sees it."""
        if not self._decoding or layer not in self._index:
            return
        j = self._index[layer]
        n_experts = self._probs.shape[1] if self._probs is not None else int(ids.max()) + 1
        if self._recent is None:
            self._recent = np.zeros((len(self.moe_layers), n_experts), np.float32)
        self._recent[j] *= self._decay
        row = 0
        for session, tokens in zip(self._sessions, self._step_tokens):
            if tokens:
                session.observe_route(j, ids[row].tolist())
                self._recent[j, ids[row]] += 1.0 - self._decay
                row += 1

    @staticmethod
    def _merge(rows: list[np.ndarray | None]) -> np.ndarray | None:
        merged = None
        for p in rows:
            if p is not None:
                merged = p if merged is None else 1.0 - (1.0 - merged) * (1.0 - p)
        return merged

    # -- cache hooks --------------------------------------------------------------------
    def prefetch(self, next_layer: int) -> list[ExpertKey]:
        if self._probs is None or next_layer not in self._index:
            return []
        replanned, self._replanned = self._replanned, None
        if replanned is not None and replanned[0] == next_layer:
            # The plan made when the layer before routed already had this layer next. Since then only copies
            # landed and that layer's demand misses evicted (perhaps something this plan counted on): planning
            # again would see those, but costs host time on the critical path, between the device's layers,
            # for every layer. The simulator does not replan here either.
            return replanned[1]
        return self._plan(self._index[next_layer], time.perf_counter() * 1e3)

    def after_route(self, layer: int) -> list[ExpertKey] | None:
        """Layer j routed: refine layer j+1 with the routes of layers <= j and its gate speculation (both
        known now, a layer before it runs) and replan, with layer j+1 due once layer j has computed."""
        if self._probs is None or layer not in self._index or self._index[layer] + 1 >= len(self.moe_layers):
            return None
        j = self._index[layer] + 1
        spec = self._collector.spec.get(self.moe_layers[j])
        spec = None if spec is None else spec.cpu().numpy()  # rows: live requests in order, as the routes
        refined, row = [], 0
        for session, p in zip(self._sessions, self._request_probs):
            if p is None:
                refined.append(None)
                continue
            refined.append(session.refine(j, None if spec is None else spec[row].tolist()))
            row += 1
        if all(r is None for r in refined):
            return None
        self._probs[j] = self._merge(refined)
        keys = self._plan(j, time.perf_counter() * 1e3 + self._layer_ms)
        self._replanned = (self.moe_layers[j], keys)
        return keys

    def _plan(self, j: int, start_ms: float) -> list[ExpertKey]:
        """The planner's fetch list with MoE layer j (index) next to run, starting at `start_ms`."""
        probs = due_probabilities(self._probs, self._recent, j, self.config.next_token_model_weight)
        now = time.perf_counter() * 1e3
        resident = np.zeros(probs.shape, bool)
        for layer, e in self._resident - self._copying.keys():
            resident[self._index[layer], e] = True
        # The copy stream serves issued copies in order: each lands a transfer after the one before it
        # (or after its own issue, if the stream was idle then).
        in_flight, landed = [], -np.inf
        for (layer, e), issued in sorted(self._copying.items(), key=lambda item: item[1]):
            landed = max(landed, issued) + self._transfer_ms
            in_flight.append(InFlight((self._index[layer], e), max(landed, now), started=True))
        inp = PlanInput(
            probs=probs,
            layer=j,
            next_start_ms=max(start_ms, now),
            now_ms=now,
            layer_ms=(self._layer_ms,) * len(self.moe_layers),
            transfer_ms=self._transfer_ms,
            n_slots=self._n_slots,
            resident=resident,
            in_flight=tuple(in_flight),
            rate=None if self._recent is None else np.maximum(self._recent, probs),
            link_busy=self._link_busy,
        )
        self._use = next_use_ms(inp)
        planned = plan(inp, self.config.plan, self._use)
        self.plans += 1
        keys = [(self.moe_layers[t.key[0]], t.key[1]) for t in planned.fetch]
        soon = [(self.moe_layers[j], int(e)) for e in np.flatnonzero(probs[j] > self.config.plan.threshold)]
        self._window = frozenset(keys) | frozenset(soon)
        return keys

    def protected(self) -> frozenset[ExpertKey]:
        return self._window

    def on_use(self, key: ExpertKey) -> None:
        self._copying.pop(key, None)  # compute waited for it: landed
        self._lru.on_use(key)

    def on_load(self, key: ExpertKey) -> None:
        self._resident.add(key)
        self._copying[key] = time.perf_counter() * 1e3

    def on_landed(self, key: ExpertKey) -> None:
        self._copying.pop(key, None)

    def on_evict(self, key: ExpertKey) -> None:
        self._resident.discard(key)
        self._copying.pop(key, None)
        self._lru.on_evict(key)

    def victim(self, candidates: Sequence[ExpertKey]) -> ExpertKey:
        if self._use is None:  # no prediction yet (prefill)
            return self._lru.victim(candidates)
        recency = self._lru.recency()
        return max(candidates, key=lambda k: (self._use[self._index[k[0]], k[1]], -recency.get(k, -1)))
