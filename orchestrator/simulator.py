"""Replay routing traces through cache policies on a modelled clock: bytes moved, hit rate, stall.

The model, per decode step (one token of one sequence; sequences replayed in trace order):

    token start        the policy may plan (token-horizon predictions are known now)
    each MoE layer j   its route is known at once; landed keys hit, keys still being copied are late
                       (pulled forward to demand priority), other keys miss and are loaded at top
                       priority into a free slot or one the policy frees; then the policy may plan;
                       the layer waits for all its keys (stall), then computes for `layer_ms`
    copy engine        one link: a transfer takes expert_bytes / bandwidth, one at a time, demand loads
                       first, prefetches by deadline (copy_engine.py)
    cache              budget x (MoE layers x experts) slots, global across layers as in the live
                       engine; a slot is taken when its copy is queued. The cache is NOT emptied when a
                       sequence starts (a server's cache outlives requests) unless `empty_per_sequence`

Compute does not overlap a layer's own misses (mixtral-offloading overlaps hits with them), so stall
is a slight overestimate for every policy alike. Prefetches still unused at the end count as wasted.

Not for: the planner (planner.py), the policies (policies.py), tables and plots (report.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from orchestrator.copy_engine import CopyEngine
from orchestrator.planner import InFlight, Key, Plan
from orchestrator.policies import PolicyInputs, PolicyUnavailable, SimPolicy, make_policy
from traces.format import Trace


_LINK_WEIGHT = 0.25  # weight of the last token in the link's busy share (about a 2.4-token half-life)


@dataclass(frozen=True)
class SimConfig:
    budget: float = 0.25  # share of all routed experts (MoE layers x experts) the cache holds
    bandwidth: float = 55e9  # bytes/s, host to device
    expert_bytes: int = 3 * 256 * 320 * 2
    layer_ms: float = 0.05  # compute time of one MoE layer's whole block (attention included)
    empty_per_sequence: bool = False

    @property
    def transfer_ms(self) -> float:
        return self.expert_bytes / self.bandwidth * 1e3

    def n_slots(self, trace: Trace) -> int:
        """Whole slots within the budget, but never fewer than one layer's top_k (a layer must fit)."""
        total = len(trace.info.moe_layers) * trace.info.n_experts
        return max(trace.info.top_k, int(self.budget * total + 1e-9))


@dataclass(frozen=True)
class SimResult:
    policy: str
    trace: str
    budget: float
    n_slots: int
    expert_bytes: int
    bandwidth: float
    layer_ms: float
    predictor: str = ""
    na: str | None = None  # why the policy could not run on this trace
    tokens: int = 0
    uses: int = 0  # (token, layer, expert) uses
    hits: int = 0  # landed when needed
    late: int = 0  # being copied when needed (a prefetch not yet landed)
    misses: int = 0  # neither: mispredicted, loaded on demand
    prefetches: int = 0  # prefetch copies started
    prefetch_used: int = 0  # ... whose key was used before it left
    transfers: int = 0  # copies started, prefetch or demand
    stall_ms: float = 0.0
    time_ms: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / max(self.uses, 1)

    @property
    def bytes_moved(self) -> int:
        return self.transfers * self.expert_bytes

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_moved / max(self.tokens, 1)

    @property
    def prefetch_accuracy(self) -> float | None:
        return self.prefetch_used / self.prefetches if self.prefetches else None

    @property
    def wasted_bytes(self) -> int:
        return (self.prefetches - self.prefetch_used) * self.expert_bytes

    @property
    def stall_per_token_ms(self) -> float:
        return self.stall_ms / max(self.tokens, 1)

    @property
    def time_per_token_ms(self) -> float:
        return self.time_ms / max(self.tokens, 1)

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("hit_rate", "bytes_moved", "bytes_per_token", "prefetch_accuracy", "wasted_bytes"):
            out[name] = getattr(self, name)
        out["stall_per_token_ms"], out["time_per_token_ms"] = self.stall_per_token_ms, self.time_per_token_ms
        return out


class CacheView:
    """What a policy may read about the cache; the simulator updates it in place (policies never write)."""

    def __init__(self, trace: Trace, config: SimConfig, engine: CopyEngine):
        n_layers = len(trace.info.moe_layers)
        self.n_slots = config.n_slots(trace)
        self.transfer_ms = config.transfer_ms
        self.layer_ms = (float(config.layer_ms),) * n_layers
        self.empties_per_sequence = config.empty_per_sequence
        self.arrived = np.zeros((n_layers, trace.info.n_experts), bool)  # [L, E] landed in a slot
        self.now_ms = 0.0
        self.pinned: frozenset[Key] = frozenset()  # the running layer's keys
        self.link_busy = 0.0  # share of recent time the link was copying (decayed over tokens)
        self._engine = engine

    def in_flight(self) -> tuple[InFlight, ...]:
        return self._engine.pending(self.now_ms)

    def ready_ms(self) -> float:
        """When every pinned key will have landed, if the queue runs as planned."""
        etas = [f.eta_ms for f in self.in_flight() if f.key in self.pinned]
        return max(etas, default=self.now_ms)


class _Replay:
    def __init__(self, trace: Trace, policy: SimPolicy, config: SimConfig):
        self.trace, self.policy, self.config = trace, policy, config
        self.engine = CopyEngine(config.transfer_ms)
        self.view = CacheView(trace, config, self.engine)
        self.used = 0  # slots taken: landed or being copied
        self.unused_prefetch: set[Key] = set()
        self.counts = dict(tokens=0, uses=0, hits=0, late=0, misses=0, prefetch_used=0)
        self.stall_ms = 0.0
        self._mark = (0.0, 0.0)  # (time, link busy time) when the last token started

    def run(self) -> dict:
        trace, policy, view = self.trace, self.policy, self.view
        policy.begin(trace, view)
        for s in range(trace.n_sequences):
            if s and self.config.empty_per_sequence:
                self._empty()
            policy.begin_sequence(s)
            for t, row in enumerate(trace.experts[trace.sequence(s)].tolist()):
                self._advance(view.now_ms)
                self._measure_link()
                view.pinned = frozenset()
                self._execute(policy.begin_token(t), frozenset())
                for j, experts in enumerate(row):
                    self._layer(t, j, experts)
                self.counts["tokens"] += 1
        return dict(
            **self.counts,
            prefetches=self.engine.started_prefetch,
            transfers=self.engine.started,
            stall_ms=self.stall_ms,
            time_ms=view.now_ms,
        )

    def _layer(self, t: int, j: int, experts: list[int]) -> None:
        view, engine, counts = self.view, self.engine, self.counts
        self._advance(view.now_ms)
        start = view.now_ms
        keys = [(j, e) for e in experts]
        view.pinned = protected = frozenset(keys)
        for key in keys:
            if view.arrived[key]:
                counts["hits"] += 1
            elif key in engine:
                counts["late"] += 1
                engine.promote(key)
            else:
                counts["misses"] += 1
                self._make_room(protected, wait=True)
                self._load(key, view.now_ms, demand=True)
        counts["uses"] += len(keys)
        self._execute(self.policy.after_route(t, j, experts), protected)
        while not all(view.arrived[k] for k in keys):
            view.now_ms = max(view.now_ms, engine.next_landing())
            self._advance(view.now_ms)
        self.stall_ms += view.now_ms - start
        for key in keys:
            if key in self.unused_prefetch:
                self.unused_prefetch.discard(key)
                counts["prefetch_used"] += 1
            self.policy.on_use(key)
        view.now_ms += view.layer_ms[j]
        if not self.policy.keeps_experts:
            for key in keys:
                self._evict(key)

    def _measure_link(self) -> None:
        """Update the link's busy share with the last token's: copies started over time elapsed."""
        busy = self.engine.started * self.view.transfer_ms
        elapsed = self.view.now_ms - self._mark[0]
        if elapsed > 0:
            share = min(1.0, (busy - self._mark[1]) / elapsed)
            self.view.link_busy += _LINK_WEIGHT * (share - self.view.link_busy)
        self._mark = (self.view.now_ms, busy)

    def _execute(self, plan: Plan | None, protected: frozenset[Key]) -> None:
        if plan is None:
            return
        for key in plan.cancel:
            if key not in protected and self.engine.cancel(key):
                self._release(key)
        for key in plan.evict:
            if key in protected or not self.view.arrived[key]:
                raise RuntimeError(f"plan evicts {key}, which is not a landed, unprotected key")
            self._evict(key)
        keep = protected | {f.key for f in plan.fetch}
        for f in plan.fetch:
            if self.view.arrived[f.key] or f.key in self.engine:
                continue
            if not self._make_room(keep, wait=False):
                break
            self._load(f.key, f.deadline_ms, demand=False)

    def _make_room(self, protected: frozenset[Key], wait: bool) -> bool:
        """Free a slot if none is: a victim, else (for a miss) a queued prefetch, else the next landing."""
        view = self.view
        while self.used >= view.n_slots:
            victim = self.policy.victim(protected)
            if victim is not None:
                self._evict(victim)
            elif not wait:
                return False
            elif (queued := self.engine.last_prefetch(protected)) is not None:
                self.engine.cancel(queued)
                self._release(queued)
            else:
                landing = self.engine.next_landing()
                if landing is None:
                    raise RuntimeError("no slot can be freed: every slot holds a key the running layer needs")
                view.now_ms = max(view.now_ms, landing)
                self._advance(view.now_ms)
        return True

    def _load(self, key: Key, deadline_ms: float, demand: bool) -> None:
        self.used += 1
        self.engine.submit(key, self.view.now_ms, deadline_ms, demand)
        self.policy.on_load(key)

    def _evict(self, key: Key) -> None:
        self.view.arrived[key] = False
        self.unused_prefetch.discard(key)
        self._release(key)

    def _release(self, key: Key) -> None:
        self.used -= 1
        self.policy.on_evict(key)

    def _advance(self, to_ms: float) -> None:
        for key, _, prefetch in self.engine.advance(to_ms):
            self.view.arrived[key] = True
            if prefetch:
                self.unused_prefetch.add(key)

    def _empty(self) -> None:
        for f in self.engine.pending(self.view.now_ms):
            if not f.started and self.engine.cancel(f.key):
                self._release(f.key)
        while (landing := self.engine.next_landing()) is not None:
            self.view.now_ms = max(self.view.now_ms, landing)
            self._advance(landing)
        layers, experts = np.nonzero(self.view.arrived)
        for key in zip(layers.tolist(), experts.tolist()):
            self._evict(key)


def _predictor_label(policy: SimPolicy) -> str:
    """What a predictive policy plans with, as tables name it (e.g. "learned+online")."""
    predictor = getattr(policy, "predictor", None)
    return getattr(predictor, "label", None) or getattr(predictor, "name", "")


def simulate(trace: Trace, policy: SimPolicy, config: SimConfig, label: str = "") -> SimResult:
    """Replay `trace` through `policy` (a fresh instance: policies keep state)."""
    head = dict(
        policy=policy.name,
        trace=label or trace.info.model,
        budget=config.budget,
        n_slots=config.n_slots(trace),
        expert_bytes=config.expert_bytes,
        bandwidth=config.bandwidth,
        layer_ms=config.layer_ms,
        predictor=_predictor_label(policy),
    )
    reason = policy.supports(trace)
    if reason is not None:
        return SimResult(**head, na=reason)
    return SimResult(**head, **_Replay(trace, policy, config).run())


def compare(
    trace: Trace,
    policies: Sequence[str],
    config: SimConfig,
    inputs: PolicyInputs = PolicyInputs(),
    label: str = "",
) -> list[SimResult]:
    """Every named policy on the same trace and config; unavailable ones come back with `na` set."""
    results = []
    for name in policies:
        try:
            policy = make_policy(name, inputs)
        except PolicyUnavailable as why:
            results.append(
                SimResult(
                    name,
                    label or trace.info.model,
                    config.budget,
                    config.n_slots(trace),
                    config.expert_bytes,
                    config.bandwidth,
                    config.layer_ms,
                    na=str(why),
                )
            )
            continue
        results.append(simulate(trace, policy, config, label))
    return results
