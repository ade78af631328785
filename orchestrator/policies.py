"""Cache policies as the simulator replays them: one small interface, the peers' policies, a registry.

    ondemand    no reuse: load when routed, drop after use
    lru         least recently used goes first
    static      a static hot set: the experts most frequent in training pinned, LRU in the other slots
    speculate   next-layer gate speculation (mixtral-offloading): once layer j routes, fetch layer
                j+1's speculated experts; LRU eviction
    activation  activation-matrix prediction (MoE-Infinity): at token start, fetch the likeliest experts
                of every layer, nearest layer first; LRU eviction
    belady      the offline optimum (MIN): evicts the key used furthest in the future, fetches nothing
                early. Its bytes moved are a lower bound for every policy (prefetching cannot need
                fewer copies), its hit rate an upper bound for the demand-only ones (ondemand, lru); a
                prefetcher can hit more by copying earlier, and can stall less: Belady's stall is
                that of a demand-only cache, not a bound
    expertflow  (expertflow_policy.py) learned predictions through the planner

A policy sees the cache through the simulator's `CacheView`, returns a `Plan` (what to fetch, cancel,
evict) at token start and after each layer routes, and picks victims when a miss needs a slot.

Not for: the live engine's policies (expert_store/policies.py, orchestrator/live_policy.py) or the
clock (simulator.py).
"""

from __future__ import annotations

import heapq
from abc import ABC, abstractmethod
from collections import OrderedDict, defaultdict
from collections.abc import Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from orchestrator.planner import Key, Plan, Transfer
from predictor.base import RoutePredictor
from traces.format import Trace

if TYPE_CHECKING:
    from orchestrator.simulator import CacheView


class PolicyUnavailable(Exception):
    """The policy cannot run here (a predictor is missing or does not support the trace): why."""


@dataclass(frozen=True)
class PolicyInputs:
    """What prediction-driven policies may use, built by the caller from training traces only."""

    frequency: np.ndarray | None = None  # [L, E] training routing frequency (static hot set)
    speculation: RoutePredictor | None = None  # horizon "layer" (GateSpeculationPredictor)
    activation: RoutePredictor | None = None  # horizon "token" (ActivationMatrixPredictor)
    learned: RoutePredictor | None = None  # horizon "token": what expertflow plans with
    learned_layer: RoutePredictor | None = None  # horizon "layer": expertflow's refinement of the next layer
    unavailable: tuple[tuple[str, str], ...] = ()  # (input name, why it could not be built)

    def why_missing(self, name: str) -> str:
        return dict(self.unavailable).get(name, f"no {name} predictor given")


class SimPolicy(ABC):
    name: ClassVar[str]
    keeps_experts: ClassVar[bool] = True  # False: a key leaves right after its layer used it

    def supports(self, trace: Trace) -> str | None:
        return None

    def begin(self, trace: Trace, view: CacheView) -> None:
        """Before the first token; `view` stays valid (and live) for the whole run."""
        self.trace, self.view = trace, view

    def begin_sequence(self, s: int) -> None:
        """Sequence s starts (the cache is kept unless the simulator is told to empty it)."""

    def begin_token(self, t: int) -> Plan | None:
        """Token t (index in the sequence) enters the model; nothing has routed yet."""
        return None

    def after_route(self, t: int, layer: int, experts: Sequence[int]) -> Plan | None:
        """MoE layer `layer` of token t routed to `experts` (misses are already queued); it computes next."""
        return None

    def on_load(self, key: Key) -> None:
        """`key` got a slot (its copy is queued)."""

    def on_use(self, key: Key) -> None:
        """A layer used `key`."""

    def on_evict(self, key: Key) -> None:
        """`key` left its slot (evicted, or its queued copy cancelled)."""

    @abstractmethod
    def victim(self, protected: Set[Key]) -> Key | None:
        """A landed key outside `protected` to evict, or None if there is none."""


class OnDemand(SimPolicy):
    name = "ondemand"
    keeps_experts = False

    def victim(self, protected: Set[Key]) -> Key | None:
        layers, experts = np.nonzero(self.view.arrived)
        return next((k for k in zip(layers.tolist(), experts.tolist()) if k not in protected), None)


class Lru(SimPolicy):
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()  # least recently touched first

    def _touch(self, key: Key) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    on_load = _touch
    on_use = _touch

    def on_evict(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, protected: Set[Key]) -> Key | None:
        arrived = self.view.arrived
        return next((k for k in self._order if k not in protected and arrived[k]), None)


class Static(Lru):
    """The `share` most frequent keys (over training) are loaded once and never leave."""

    name = "static"

    def __init__(self, frequency: np.ndarray, share: float = 0.75):
        super().__init__()
        self.frequency = frequency
        self.share = share
        self.pinned: frozenset[Key] = frozenset()
        self._pending = True

    def begin(self, trace: Trace, view: CacheView) -> None:
        super().begin(trace, view)
        free = max(trace.info.top_k, round((1 - self.share) * view.n_slots))  # a layer's misses must fit
        n_pin = max(0, view.n_slots - free)
        order = np.argsort(-self.frequency, axis=None, kind="stable")[:n_pin]
        self.pinned = frozenset((int(i) // self.frequency.shape[1], int(i) % self.frequency.shape[1]) for i in order)

    def begin_token(self, t: int) -> Plan | None:
        if not self._pending:
            return None
        self._pending = False
        hot = sorted(self.pinned, key=lambda k: -self.frequency[k])
        return Plan(fetch=tuple(Transfer(k, self.view.now_ms, self.view.now_ms, 1.0) for k in hot))

    def victim(self, protected: Set[Key]) -> Key | None:
        return super().victim(protected | self.pinned if self.pinned else protected)


class Speculate(Lru):
    name = "speculate"

    def __init__(self, predictor: RoutePredictor, threshold: float = 0.5):
        super().__init__()
        self.predictor = predictor
        self.threshold = threshold

    def supports(self, trace: Trace) -> str | None:
        return self.predictor.supports(trace)

    def begin_sequence(self, s: int) -> None:
        self.probs = self.predictor.predict(self.trace, s)  # [T, L, E]

    def after_route(self, t: int, layer: int, experts: Sequence[int]) -> Plan | None:
        nxt = layer + 1
        if nxt >= self.probs.shape[1]:
            return None  # the next token's first layer is unknown until that token runs
        p = self.probs[t, nxt]
        picks = [e for e in np.argsort(-p, kind="stable").tolist() if p[e] > self.threshold]
        now = self.view.now_ms
        return Plan(fetch=tuple(Transfer((nxt, e), now, now, float(p[e])) for e in picks))


class Activation(Lru):
    """Per layer at most `per_layer` experts (default top_k) likelier than `threshold`, layer order."""

    name = "activation"

    def __init__(self, predictor: RoutePredictor, threshold: float = 0.1, per_layer: int | None = None):
        super().__init__()
        self.predictor = predictor
        self.threshold = threshold
        self.per_layer = per_layer

    def supports(self, trace: Trace) -> str | None:
        return self.predictor.supports(trace)

    def begin_sequence(self, s: int) -> None:
        self.probs = self.predictor.predict(self.trace, s)

    def begin_token(self, t: int) -> Plan | None:
        m = self.per_layer or self.trace.info.top_k
        now = self.view.now_ms
        fetch = []
        for layer, p in enumerate(self.probs[t]):
            for e in np.argsort(-p, kind="stable")[:m].tolist():
                if p[e] > self.threshold:
                    fetch.append(Transfer((layer, e), now, now, float(p[e])))
        return Plan(fetch=tuple(fetch))


class Belady(SimPolicy):
    """Knows the whole replay: each key's use positions (token x L + layer), consumed in order.

    Victims come from a max-heap of (next use, key) with stale entries skipped, since a scan of every
    resident key per miss is too slow for the larger traces."""

    name = "belady"

    def begin(self, trace: Trace, view: CacheView) -> None:
        super().begin(trace, view)
        n_layers = trace.experts.shape[1]
        uses: dict[Key, list[int]] = defaultdict(list)
        for pos, row in enumerate(trace.experts.reshape(-1, trace.experts.shape[2]).tolist()):
            for e in row:
                uses[(pos % n_layers, e)].append(pos)
        self._uses = {k: v[::-1] for k, v in uses.items()}  # popped from the end: next use last
        self._seq_end = (trace.seq_offsets[1:] * n_layers).tolist()
        self._s = 0
        self._heap: list[tuple[float, Key]] = []  # (-next use, key)
        self._pushed: dict[Key, float] = {}

    def begin_sequence(self, s: int) -> None:
        self._s = s

    def _next(self, key: Key) -> float:
        rest = self._uses.get(key)
        nxt = rest[-1] if rest else float("inf")
        if self.view.empties_per_sequence and nxt >= self._seq_end[self._s]:
            return float("inf")
        return nxt

    def _push(self, key: Key) -> None:
        nxt = self._next(key)
        self._pushed[key] = nxt
        heapq.heappush(self._heap, (-nxt, key))

    def on_load(self, key: Key) -> None:
        self._push(key)

    def on_use(self, key: Key) -> None:
        self._uses[key].pop()
        self._push(key)

    def on_evict(self, key: Key) -> None:
        self._pushed.pop(key, None)

    def victim(self, protected: Set[Key]) -> Key | None:
        aside, found = [], None
        while self._heap:
            neg, key = heapq.heappop(self._heap)
            if self._pushed.get(key) != -neg:
                continue  # stale: used or evicted since
            if key in protected or not self.view.arrived[key]:
                aside.append((neg, key))
                continue
            found = key
            aside.append((neg, key))  # stays valid until on_evict drops it
            break
        for item in aside:
            heapq.heappush(self._heap, item)
        return found


def make_policy(name: str, inputs: PolicyInputs = PolicyInputs()) -> SimPolicy:
    """A fresh policy by name; raises PolicyUnavailable (with the reason) when its predictor is missing."""
    from orchestrator.expertflow_policy import ExpertFlow

    def need(value, what: str):
        if value is None:
            raise PolicyUnavailable(inputs.why_missing(what))
        return value

    factories = {
        "ondemand": OnDemand,
        "lru": Lru,
        "static": lambda: Static(need(inputs.frequency, "frequency")),
        "speculate": lambda: Speculate(need(inputs.speculation, "speculation")),
        "activation": lambda: Activation(need(inputs.activation, "activation")),
        "expertflow": lambda: ExpertFlow(need(inputs.learned, "learned"), refiner=inputs.learned_layer),
        "belady": Belady,
    }
    if name not in factories:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICY_NAMES)}")
    return factories[name]()


POLICY_NAMES = ("ondemand", "lru", "static", "speculate", "activation", "expertflow", "belady")
