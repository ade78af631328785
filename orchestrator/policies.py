"""The cache policies a user names (`--policy`): one registry for the engine, the simulator and the CLI.

A policy is an eviction rule (expert_store/eviction.py) paired with an optional prefetcher
(prefetcher.py); both run unchanged in the engine and in the simulator.

    ondemand    no reuse: load when routed, drop after use
    lru         least recently used goes first
    static      a static hot set: the experts most frequent in training pinned, LRU in the other slots
    speculate   next-layer gate speculation (mixtral-offloading); LRU eviction
    activation  activation-matrix prediction (MoE-Infinity); LRU eviction
    expertflow  learned predictions through the deadline planner, eviction by predicted next use
    belady      the offline optimum (MIN), simulator only: evicts the key used furthest in the future,
                fetches nothing early. Its bytes moved are a lower bound for every policy (prefetching
                cannot need fewer copies), its hit rate an upper bound for the demand-only ones (ondemand,
                lru); a prefetcher can hit more by copying earlier, and can stall less

Not for: the policies' logic (eviction.py, peers.py, expertflow.py) or running them (simulator.py, the
engine).
"""

from __future__ import annotations

import bisect
import heapq
from collections import defaultdict
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace

import numpy as np

from expert_store.eviction import EvictionPolicy, Lru, OnDemand
from expert_store.keys import ExpertKey
from orchestrator.expertflow import ExpertFlow, ExpertFlowConfig
from orchestrator.peers import Activation, HotSet, Speculate
from orchestrator.prefetcher import Prefetcher
from predictor.base import SessionPredictor
from traces.format import Trace


class PolicyUnavailable(ValueError):
    """The policy cannot run here (an input is missing or does not fit): why."""


@dataclass(frozen=True)
class CachePolicy:
    name: str
    eviction: EvictionPolicy
    prefetcher: Prefetcher | None = None


@dataclass(frozen=True)
class PolicyInputs:
    """What the policies may use, built by the caller (the simulator's fitted on training traces only)."""

    n_layers: int  # L: the model's MoE layers
    n_experts: int  # E
    top_k: int
    frequency: np.ndarray | None = None  # [L, E] training routing frequency (static hot set)
    activation: SessionPredictor | None = None  # activation-matrix sessions
    learned: SessionPredictor | None = None  # what expertflow plans with
    speculation: bool = False  # the server computes next-layer gate speculation (a model; a trace that has it)
    future: Trace | None = None  # the routing to come (belady: the simulator's replay only)
    empty_per_sequence: bool = False  # belady: the cache is emptied when a sequence starts
    expertflow: ExpertFlowConfig = ExpertFlowConfig()
    unavailable: tuple[tuple[str, str], ...] = ()  # (input name, why it could not be built)

    def need(self, name: str, value):
        if value is None or value is False:
            raise PolicyUnavailable(dict(self.unavailable).get(name, _MISSING.get(name, f"no {name} given")))
        if isinstance(value, SessionPredictor) and (value.n_layers, value.n_experts) != (self.n_layers, self.n_experts):
            raise PolicyUnavailable(
                f"the {name} predictor forecasts {value.n_layers} MoE layers x {value.n_experts} experts, "
                f"the model has {self.n_layers} x {self.n_experts}"
            )
        return value


_MISSING = {
    "frequency": "needs the training routing frequency (--train-traces of this model)",
    "activation": "needs an activation-matrix predictor (--train-traces of this model)",
    "learned": "needs a learned route predictor (--predictor DIR; train one with `expertflow train-predictor`)",
    "speculation": "needs next-layer gate speculation (the trace lacks hidden states)",
    "future": "knows the future: simulator only",
}


class Belady(Lru):
    """MIN: the candidate used furthest in the future of `trace` (uses are consumed in replay order).

    Victims come from a max-heap of (next use, key) with stale entries skipped, since a scan of every
    resident key per miss is too slow for the larger traces."""

    name = "belady"

    def __init__(self, trace: Trace, empty_per_sequence: bool = False) -> None:
        super().__init__()
        n_layers = trace.experts.shape[1]
        uses: dict[ExpertKey, list[int]] = defaultdict(list)
        for pos, row in enumerate(trace.experts.reshape(-1, trace.experts.shape[2]).tolist()):
            for e in row:
                uses[ExpertKey(pos % n_layers, e)].append(pos)
        self._uses = {k: v[::-1] for k, v in uses.items()}  # popped from the end: next use last
        self._seq_end = (trace.seq_offsets[1:] * n_layers).tolist()
        self._empty_per_sequence = empty_per_sequence
        self._now = 0  # position of the last use
        self._heap: list[tuple[float, ExpertKey]] = []  # (-next use, key)
        self._pushed: dict[ExpertKey, float] = {}

    def _next(self, key: ExpertKey) -> float:
        rest = self._uses.get(key)
        nxt = rest[-1] if rest else float("inf")
        if self._empty_per_sequence and nxt >= self._seq_end[bisect.bisect_right(self._seq_end, self._now)]:
            return float("inf")
        return nxt

    def _push(self, key: ExpertKey) -> None:
        nxt = self._next(key)
        self._pushed[key] = nxt
        heapq.heappush(self._heap, (-nxt, key))

    def on_load(self, key: ExpertKey) -> None:
        super().on_load(key)
        self._push(key)

    def on_use(self, key: ExpertKey) -> None:
        super().on_use(key)
        self._now = self._uses[key].pop()
        self._push(key)

    def on_evict(self, key: ExpertKey) -> None:
        super().on_evict(key)
        self._pushed.pop(key, None)

    def victim(self, candidates: Collection[ExpertKey]) -> ExpertKey | None:
        allowed = candidates if isinstance(candidates, (set, frozenset)) else set(candidates)
        aside, found = [], None
        while self._heap:
            neg, key = heapq.heappop(self._heap)
            if self._pushed.get(key) != -neg:
                continue  # stale: used or evicted since
            aside.append((neg, key))  # stays valid until on_evict drops it
            if key in allowed:
                found = key
                break
        for item in aside:
            heapq.heappush(self._heap, item)
        return found


def _ondemand(inputs: PolicyInputs) -> CachePolicy:
    return CachePolicy("ondemand", OnDemand())


def _lru(inputs: PolicyInputs) -> CachePolicy:
    return CachePolicy("lru", Lru())


def _static(inputs: PolicyInputs) -> CachePolicy:
    hot = HotSet(inputs.need("frequency", inputs.frequency), inputs.top_k)
    return CachePolicy("static", hot.eviction, hot)


def _speculate(inputs: PolicyInputs) -> CachePolicy:
    inputs.need("speculation", inputs.speculation)
    return CachePolicy("speculate", Lru(), Speculate())


def _activation(inputs: PolicyInputs) -> CachePolicy:
    return CachePolicy("activation", Lru(), Activation(inputs.need("activation", inputs.activation), inputs.top_k))


def _expertflow(inputs: PolicyInputs) -> CachePolicy:
    config = inputs.expertflow
    if not inputs.speculation and config.speculation:
        config = replace(config, speculation=False)
    flow = ExpertFlow(inputs.need("learned", inputs.learned), config)
    return CachePolicy("expertflow", flow.eviction, flow)


def _belady(inputs: PolicyInputs) -> CachePolicy:
    return CachePolicy("belady", Belady(inputs.need("future", inputs.future), inputs.empty_per_sequence))


POLICIES: dict[str, Callable[[PolicyInputs], CachePolicy]] = {
    "ondemand": _ondemand,
    "lru": _lru,
    "static": _static,
    "speculate": _speculate,
    "activation": _activation,
    "expertflow": _expertflow,
    "belady": _belady,
}
POLICY_NAMES = tuple(POLICIES)
LIVE_POLICY_NAMES = tuple(n for n in POLICIES if n != "belady")  # what a server can run


def make_policy(name: str, inputs: PolicyInputs) -> CachePolicy:
    """A fresh policy by name (policies keep state); PolicyUnavailable says why one cannot run here."""
    try:
        build = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown cache policy {name!r}; choose one of {', '.join(POLICY_NAMES)}") from None
    return build(inputs)
