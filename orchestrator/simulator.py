"""Replay routing traces through cache policies on a modelled clock: bytes moved, hit rate, stall.

The model, per decode step (one token of one sequence; sequences replayed in trace order, each sequence
a request whose id is its index):

    token start        the prefetcher's begin_step (token-horizon predictions are known now)
    each MoE layer j   its route is known at once; landed keys hit, keys still being copied are late
                       (pulled forward to demand priority), other keys miss and are loaded at top
                       priority into a free slot or one the eviction policy frees; the layer waits
                       for all its keys (stall), then computes for `layer_ms`, and as it starts the
                       prefetcher's after_layer plans (with the trace's gate speculation for layer j+1)
    copy engine        one queue: a transfer takes expert_bytes / bandwidth from local memory, and from another
                       store node or an NVMe file that tier's latency + expert_bytes / its bandwidth more
                       (SimConfig.remote, .nvme; which experts sit there: remote_share, nvme_share, a seeded
                       draw), one at a time, demand loads first, prefetches by latest start (copy_engine.py);
                       the view carries each key's source and each source's time, as the live cache's does
    cache              budget x (MoE layers x experts) slots, global across layers as in the live
                       engine; a slot is taken when its copy is queued. The cache is NOT emptied when a
                       sequence starts (a server's cache outlives requests) unless `empty_per_sequence`

Compute does not overlap a layer's own misses (mixtral-offloading overlaps hits with them), so stall
is a slight overestimate for every policy alike. Prefetches still unused at the end count as wasted.

The policies are the engine's own (eviction policies, prefetchers, the registry in policies.py), called
in the engine's order with the same `CacheView` snapshots; only the clock and the copy engine are modelled.

Not for: the planner (planner.py), the policies (policies.py), tables and plots (report.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from expert_store.keys import ExpertKey
from expert_store.plan import SOURCES, CacheView, Plan, Source, key_ms
from orchestrator.copy_engine import CopyEngine
from orchestrator.expertflow import ExpertFlowConfig
from orchestrator.policies import CachePolicy, PolicyInputs, PolicyUnavailable, make_policy
from orchestrator.prefetcher import LayerRoutes, StepRequest
from predictor.base import SessionPredictor, TracePredictor
from predictor.replay import ReplaySessions
from traces.format import Trace


_LINK_WEIGHT = 0.25  # weight of the last token in the link's busy share (about a 2.4-token half-life)


@dataclass(frozen=True)
class TierLink:
    """How a tier below host memory delivers one expert into a host staging buffer."""

    bandwidth: float  # bytes/s
    latency_ms: float = 0.0  # per expert: a request's round trip, an NVMe read's setup

    def read_ms(self, nbytes: int) -> float:
        return self.latency_ms + nbytes / self.bandwidth * 1e3


@dataclass(frozen=True)
class SimConfig:
    budget: float = 0.25  # share of all routed experts (MoE layers x experts) the cache holds
    bandwidth: float = 55e9  # bytes/s, host to device
    expert_bytes: int = 3 * 256 * 320 * 2
    layer_ms: float = 0.05  # compute time of one MoE layer's whole block (attention included)
    empty_per_sequence: bool = False
    # Shares of the experts (a seeded draw over every key) served from another store node and from NVMe; the
    # rest are in local memory. A remote or NVMe expert takes its tier's read, then the device copy.
    remote_share: float = 0.0
    nvme_share: float = 0.0
    # 25 GbE between hosts (3.1 GB/s at best; bench/fetch_transport.py measures what gRPC gets of a link) and a
    # round trip; a PCIe 4 NVMe drive's sequential read and its setup
    remote: TierLink = TierLink(bandwidth=3e9, latency_ms=0.1)
    nvme: TierLink = TierLink(bandwidth=6e9, latency_ms=0.1)
    placement_seed: int = 0
    # False: the prefetcher and the queue see one link time for every key (the planner before tiers) while the
    # copies still take their tier's time; what planning with each key's source buys
    placement_aware: bool = True

    def __post_init__(self) -> None:
        if not (0 <= self.remote_share <= 1 and 0 <= self.nvme_share <= 1 and self.remote_share + self.nvme_share <= 1):
            raise ValueError(f"remote_share {self.remote_share} + nvme_share {self.nvme_share}: each and both in 0..1")

    @property
    def transfer_ms(self) -> float:
        return self.expert_bytes / self.bandwidth * 1e3

    @property
    def source_ms(self) -> tuple[float, ...]:
        """One expert into a slot from each source (SOURCES order): the device copy, after the tier's read."""
        reads = {Source.LOCAL: 0.0, Source.REMOTE: self.remote.read_ms(self.expert_bytes)}
        reads[Source.NVME] = self.nvme.read_ms(self.expert_bytes)
        return tuple(self.transfer_ms + reads[s] for s in SOURCES)

    def sources(self, shape: tuple[int, int]) -> np.ndarray | None:
        """[L, E] each key's source (SOURCES codes): `remote_share` of the keys remote, `nvme_share` on NVMe, drawn
        with `placement_seed`; None when every expert is local (the one-link model, exactly as before tiers)."""
        if not self.remote_share and not self.nvme_share:
            return None
        total = shape[0] * shape[1]
        order = np.random.default_rng(self.placement_seed).permutation(total)
        codes = np.zeros(total, np.uint8)
        n_remote, n_nvme = round(self.remote_share * total), round(self.nvme_share * total)
        codes[order[:n_remote]] = SOURCES.index(Source.REMOTE)
        codes[order[n_remote : n_remote + n_nvme]] = SOURCES.index(Source.NVME)
        return codes.reshape(shape)

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
    remote_share: float = 0.0  # of the experts, served by another store node
    nvme_share: float = 0.0  # of the experts, read from NVMe
    placement_aware: bool = True  # the planner saw each key's source and time (SimConfig.placement_aware)
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


class _Replay:
    """The simulated cache: what the engine's ExpertCache does, on a modelled clock. It makes the same
    `CacheView` snapshots and executes plans the same way (cancel, evict, fetch), so a prefetcher or
    eviction policy runs here exactly as it does live."""

    def __init__(self, trace: Trace, policy: CachePolicy, config: SimConfig):
        self.trace, self.config = trace, config
        self.eviction, self.prefetcher = policy.eviction, policy.prefetcher
        n_layers = len(trace.info.moe_layers)
        self.sources = config.sources((n_layers, trace.info.n_experts))
        self.source_ms = config.source_ms if self.sources is not None else ()
        self.engine = CopyEngine(
            config.transfer_ms, key_ms(self.sources, self.source_ms), by_latest_start=config.placement_aware
        )
        self.n_slots = config.n_slots(trace)
        self.layer_ms = (float(config.layer_ms),) * n_layers
        self.arrived = np.zeros((n_layers, trace.info.n_experts), bool)  # [L, E] landed in a slot
        self.landed: set[ExpertKey] = set()  # the same, as keys
        self.now_ms = 0.0
        self.pinned: frozenset[ExpertKey] = frozenset()  # the running layer's keys
        self.link_busy = 0.0  # share of recent time the link was copying (decayed over tokens)
        self.used = 0  # slots taken: landed or being copied
        self.unused_prefetch: set[ExpertKey] = set()
        self.counts = dict(tokens=0, uses=0, hits=0, late=0, misses=0, prefetch_used=0)
        self.stall_ms = 0.0
        self._mark = (0.0, 0.0)  # (time, link busy time) when the last token started
        spec = trace.spec_experts
        self._speculate = (
            self.prefetcher is not None and self.prefetcher.wants_speculation and spec is not None and n_layers > 1
        )

    def view(self) -> CacheView:
        return CacheView(
            now_ms=self.now_ms,
            n_slots=self.n_slots,
            resident=self.arrived.copy(),
            in_flight=self.engine.pending(self.now_ms),
            pinned=self.pinned,
            layer_ms=self.layer_ms,
            transfer_ms=self.config.transfer_ms,
            link_busy=self.link_busy,
            sources=self.sources if self.config.placement_aware else None,
            source_ms=self.source_ms if self.config.placement_aware else (),
        )

    def run(self) -> dict:
        trace, prefetcher = self.trace, self.prefetcher
        for s in range(trace.n_sequences):
            if s and self.config.empty_per_sequence:
                self._empty()
            rid = str(s)
            sl = trace.sequence(s)
            for t, (token, row) in enumerate(zip(trace.tokens[sl].tolist(), trace.experts[sl].tolist())):
                self._advance(self.now_ms)
                self._measure_link()
                self.pinned = frozenset()
                if prefetcher is not None:
                    self._execute(prefetcher.begin_step([StepRequest(rid, (token,))], self.view()))
                for j, experts in enumerate(row):
                    self._layer(rid, sl.start + t, j, experts)
                self.counts["tokens"] += 1
            if prefetcher is not None:
                prefetcher.finish([rid])
        return dict(
            **self.counts,
            prefetches=self.engine.started_prefetch,
            transfers=self.engine.started,
            stall_ms=self.stall_ms,
            time_ms=self.now_ms,
        )

    def _layer(self, rid: str, row: int, j: int, experts: list[int]) -> None:
        engine, counts = self.engine, self.counts
        self._advance(self.now_ms)
        start = self.now_ms
        keys = [ExpertKey(j, e) for e in sorted(experts)]  # the engine's order: its experts by id
        self.pinned = protected = frozenset(keys)
        for key in keys:
            if self.arrived[key]:
                counts["hits"] += 1
            elif key in engine:
                counts["late"] += 1
                engine.promote(key)
            else:
                counts["misses"] += 1
                self._make_room(protected, wait=True)
                self._load(key, self.now_ms, demand=True)
        counts["uses"] += len(keys)
        while not all(self.arrived[k] for k in keys):
            self.now_ms = max(self.now_ms, engine.next_landing())
            self._advance(self.now_ms)
        self.stall_ms += self.now_ms - start
        for key in keys:
            if key in self.unused_prefetch:
                self.unused_prefetch.discard(key)
                counts["prefetch_used"] += 1
            self.eviction.on_use(key)
        if not self.eviction.keeps_experts:
            for key in keys:
                self._evict(key)
        self.pinned = frozenset()
        if self.prefetcher is not None:  # as in the engine: once the layer's experts are running
            spec = None
            if self._speculate and j + 1 < self.arrived.shape[0]:
                guess = self.trace.spec_experts[row, j + 1]
                spec = {rid: guess} if (guess != self.trace.sentinel).all() else None
            routed = LayerRoutes(j, {rid: np.asarray(experts)[None]}, spec)
            self._execute(self.prefetcher.after_layer(routed, self.view()))
        self.now_ms += self.layer_ms[j]

    def _measure_link(self) -> None:
        """Update the link's busy share with the last token's: copies started over time elapsed."""
        busy = self.engine.busy_ms
        elapsed = self.now_ms - self._mark[0]
        if elapsed > 0:
            share = min(1.0, (busy - self._mark[1]) / elapsed)
            self.link_busy += _LINK_WEIGHT * (share - self.link_busy)
        self._mark = (self.now_ms, busy)

    def _execute(self, plan: Plan | None) -> None:
        """As ExpertCache.execute: cancel, evict, then queue the fetches (slots taken now). The view here is
        exact, so a plan that evicts a key the cache cannot give up is a prefetcher's bug."""
        if not plan:
            return
        for key in plan.cancel:
            if key not in self.pinned and self.engine.cancel(key):
                self._release(key)
        for key in plan.evict:
            if key in self.pinned or not self.arrived[key]:
                raise RuntimeError(f"plan evicts {key}, which is not a landed, unpinned key")
            self._evict(key)
        keep = self.pinned | {f.key for f in plan.fetch}
        for f in plan.fetch:
            if self.arrived[f.key] or f.key in self.engine:
                continue
            if not self._make_room(keep, wait=False):
                break
            self._load(f.key, f.deadline_ms, demand=False)

    def _make_room(self, protected: frozenset[ExpertKey], wait: bool) -> bool:
        """Free a slot if none is: a victim, else (for a miss) a queued prefetch, else the next landing."""
        while self.used >= self.n_slots:
            candidates = self.landed - protected
            victim = self.eviction.victim(candidates) if candidates else None
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
                self.now_ms = max(self.now_ms, landing)
                self._advance(self.now_ms)
        return True

    def _load(self, key: ExpertKey, deadline_ms: float, demand: bool) -> None:
        self.used += 1
        self.engine.submit(key, self.now_ms, deadline_ms, demand)
        self.eviction.on_load(key)

    def _evict(self, key: ExpertKey) -> None:
        self.arrived[key] = False
        self.landed.discard(key)
        self.unused_prefetch.discard(key)
        self._release(key)

    def _release(self, key: ExpertKey) -> None:
        self.used -= 1
        self.eviction.on_evict(key)

    def _advance(self, to_ms: float) -> None:
        for key, _, prefetch in self.engine.advance(to_ms):
            self.arrived[key] = True
            self.landed.add(key)
            if prefetch:
                self.unused_prefetch.add(key)

    def _empty(self) -> None:
        for f in self.engine.pending(self.now_ms):
            if not f.started and self.engine.cancel(f.key):
                self._release(f.key)
        while (landing := self.engine.next_landing()) is not None:
            self.now_ms = max(self.now_ms, landing)
            self._advance(landing)
        for key in sorted(self.landed):
            self._evict(key)


def _predictor_label(policy: CachePolicy) -> str:
    """What a predictive policy plans with, as tables name it (e.g. "learned+online")."""
    sessions = getattr(policy.prefetcher, "sessions", None)
    return getattr(sessions, "label", "") or ""


def simulate(trace: Trace, policy: CachePolicy, config: SimConfig, label: str = "") -> SimResult:
    """Replay `trace` through `policy` (a fresh one: policies keep state)."""
    head = dict(
        policy=policy.name,
        trace=label or trace.info.model,
        budget=config.budget,
        n_slots=config.n_slots(trace),
        expert_bytes=config.expert_bytes,
        bandwidth=config.bandwidth,
        layer_ms=config.layer_ms,
        predictor=_predictor_label(policy),
        remote_share=config.remote_share,
        nvme_share=config.nvme_share,
        placement_aware=config.placement_aware,
    )
    return SimResult(**head, **_Replay(trace, policy, config).run())


def compare(
    trace: Trace,
    policies: Sequence[str],
    config: SimConfig,
    inputs: PolicyInputs,
    label: str = "",
) -> list[SimResult]:
    """Every named policy on the same trace and config; unavailable ones come back with `na` set.
    Session predictors in `inputs` are shared by the runs: each run finishes every request it starts."""
    results = []
    inputs = replace(inputs, empty_per_sequence=config.empty_per_sequence)
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
                    remote_share=config.remote_share,
                    nvme_share=config.nvme_share,
                    placement_aware=config.placement_aware,
                )
            )
            continue
        results.append(simulate(trace, policy, config, label))
    return results


def trace_inputs(
    trace: Trace,
    learned: TracePredictor | SessionPredictor | None = None,
    learned_layer: TracePredictor | None = None,
    activation: TracePredictor | SessionPredictor | None = None,
    frequency: np.ndarray | None = None,
    unavailable: Sequence[tuple[str, str]] = (),
    expertflow: ExpertFlowConfig = ExpertFlowConfig(),
) -> PolicyInputs:
    """PolicyInputs for replaying `trace`: its shape, its gate speculation if recorded, its future (belady).
    Trace predictors are served through ReplaySessions (`learned_layer` refines `learned`'s next layer);
    one that cannot run on this trace makes its policy unavailable, with the predictor's reason."""
    missing = dict(unavailable)
    sessions: dict[str, SessionPredictor | None] = {}
    for name, token, layer in (("learned", learned, learned_layer), ("activation", activation, None)):
        if token is None or isinstance(token, SessionPredictor):
            sessions[name] = token
            continue
        reasons = [r for r in (p.supports(trace) for p in (token, layer) if p is not None) if r is not None]
        if reasons:
            missing[name] = reasons[0]
            sessions[name] = None
        else:
            sessions[name] = ReplaySessions(trace, token, layer)
    has_spec = trace.spec_experts is not None and not (trace.spec_experts[:, 1:] == trace.sentinel).all()
    return PolicyInputs(
        n_layers=len(trace.info.moe_layers),
        n_experts=trace.info.n_experts,
        top_k=trace.info.top_k,
        frequency=frequency,
        activation=sessions["activation"],
        learned=sessions["learned"],
        speculation=has_spec,
        future=trace,
        expertflow=expertflow,
        unavailable=tuple(missing.items()),
    )
