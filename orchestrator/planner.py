"""The prefetch planner: which experts to copy next, in which order, and what to cancel and evict.

A pure function of one `PlanInput` (predictions, residency, the copy queue, measured times) to one
`Plan`; no torch, no CUDA, no clock of its own, so the simulator and the live engine run this exact code.

    deadline      a key (MoE layer l, expert e) is due when layer l next starts: this token for layers
                  >= `PlanInput.layer`, the next token for the layers before it
    transfer      each key's own time from its source into a slot (`PlanInput.key_ms`: local memory, another
                  node, an NVMe file, as measured per source), or one link time for all (`transfer_ms`)
    admission     keys likelier than `threshold`, latest start first (deadline less the key's transfer:
                  a remote key is fetched before a local one due at the same time; with one transfer time
                  for all keys this is earliest deadline first), likeliest first within a layer, each
                  admitted only if its transfer behind the queue still lands by its
                  deadline plus the allowed lateness, and if it is worth its link time: p x (stall a
                  demand load would cost, less the lateness) > (1 - p) x transfer x (link busy share
                  + q), q the probability that the key it evicts is used at its next chance (it would
                  have to come back), so a saturated link (transfers slower than layers) or a cache
                  full of likely keys only takes likely keys
    cancellation  queued, not yet started transfers whose key fell to the threshold or below, or that can
                  no longer land in time; started copies cannot be recalled
    eviction      Belady with predictions: a key's expected next use is its deadline if used then (p),
                  else a geometric wait at its per-token rate q (`rate`, default p): deadline + (1-p)/q
                  tokens; the victim is the resident key used furthest away, only if that is a margin
                  later than the fetched key's use and it is not predicted (p > threshold) before the
                  fetched key's deadline

The caller executes a plan in order: cancel, evict, then queue `fetch` behind any demand loads, keeping
its queue by latest start (deadline less the key's transfer time), as here. Misses at execution time are
the caller's (loaded at top priority).

Not for: predicting routes (predictor/), moving bytes or owning slots (expert_store/), measuring time.
The frozen types it trades in (`Plan`, `Transfer`, `InFlight`, `CacheView`) are expert_store/plan.py's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from expert_store.keys import ExpertKey
from expert_store.plan import CacheView, InFlight, Plan, Transfer

_P_FLOOR = 1e-6  # keeps "never predicted" finite, so such keys still order by deadline


@dataclass(frozen=True)
class PlanConfig:
    # Fetch only keys likelier than this; queued keys at or below it are cancelled. 0.35 did best for
    # stall and bytes on the validation traces in the simulator (0.1-0.5 tried, activation-matrix
    # predictions standing in for the learned ones): lower thresholds mostly add wasted copies.
    threshold: float = 0.35
    # How late a prefetch may land after its layer starts. None: its own transfer time, since a prefetch
    # landing later than that saves nothing over the demand load issued when the layer starts.
    max_lateness_ms: float | None = None
    # A resident key is evicted for a fetch only if its expected next use is this many tokens later than
    # the fetched key's: probabilities are estimates, and swapping two keys of nearly equal promise
    # costs a transfer for no expected gain.
    swap_margin_tokens: float = 1.0


@dataclass(frozen=True)
class PlanInput:
    """Everything the planner knows; arrays are read, never written. L = MoE layers, E = experts."""

    probs: np.ndarray  # [L, E] P(key used at its next chance): this token for layers >= layer, else the next
    layer: int  # the next MoE layer to start, 0..L (L: the token's last layer is running)
    next_start_ms: float  # when MoE layer `layer` starts (>= now_ms; the next token's start if layer == L)
    now_ms: float  # the copy engine's clock
    layer_ms: tuple[float, ...]  # [L] measured time of each MoE layer's whole block
    transfer_ms: float  # one expert over the host link
    n_slots: int
    resident: np.ndarray  # [L, E] bool: landed in a slot
    in_flight: tuple[InFlight, ...] = ()  # slot taken, not landed: the copy queue, demand loads included
    pinned: frozenset[ExpertKey] = field(default_factory=frozenset)  # never evicted nor cancelled (the running layer's)
    # [L, E] per-token use rate after the next chance (e.g. recent routing); None: `probs` again. Only
    # eviction reads it: a key not predicted for the next chance but used every few tokens should stay.
    rate: np.ndarray | None = None
    link_busy: float = 0.0  # share of recent time the link spent copying, 0..1 (measured by the caller)
    # [L, E] each key's time from its source into a slot (CacheView.key_ms()); None: `transfer_ms` for every key
    key_ms: np.ndarray | None = None

    def __post_init__(self) -> None:
        n_layers = self.probs.shape[0]
        if self.resident.shape != self.probs.shape or len(self.layer_ms) != n_layers:
            raise ValueError("plan input: probs, resident and layer_ms disagree on the number of layers/experts")
        if self.key_ms is not None and self.key_ms.shape != self.probs.shape:
            raise ValueError(f"plan input: key_ms {self.key_ms.shape} for {self.probs.shape} experts")
        if not 0 <= self.layer <= n_layers:
            raise ValueError(f"plan input: layer {self.layer} outside 0..{n_layers}")

    @cached_property
    def starts(self) -> np.ndarray:
        """[L] when each MoE layer next starts (`layer_starts`); computed once, next_use_ms and plan both read it."""
        return layer_starts(self.layer, self.next_start_ms, self.layer_ms)

    @cached_property
    def token_ms(self) -> float:
        """One token's time through every MoE layer."""
        return float(sum(self.layer_ms))

    def transfer(self, key: ExpertKey) -> float:
        """`key`'s expected time from its source into a slot."""
        return self.transfer_ms if self.key_ms is None else float(self.key_ms[key])

    @classmethod
    def of(
        cls, view: CacheView, probs: np.ndarray, layer: int, next_start_ms: float, rate: np.ndarray | None = None
    ) -> PlanInput:
        """The input for planning with `probs` on the cache as `view` shows it."""
        return cls(
            probs=probs,
            layer=layer,
            next_start_ms=max(next_start_ms, view.now_ms),
            now_ms=view.now_ms,
            layer_ms=view.layer_ms,
            transfer_ms=view.transfer_ms,
            n_slots=view.n_slots,
            resident=view.resident,
            in_flight=view.in_flight,
            pinned=view.pinned,
            rate=rate,
            link_busy=view.link_busy,
            key_ms=view.key_ms(),
        )


def due_probabilities(current: np.ndarray, recent: np.ndarray | None, layer: int, weight: float) -> np.ndarray:
    """`PlanInput.probs` from this token's [L, E] prediction: layers >= `layer` are still due with this token;
    those before come back with the next, whose use is guessed as weight x this token's prediction +
    (1 - weight) x the request's recent routing (`recent`; None: this token's prediction alone)."""
    probs = current.copy()
    if recent is not None:
        probs[:layer] = weight * current[:layer] + (1.0 - weight) * recent[:layer]
    return probs


def layer_starts(layer: int, next_start_ms: float, layer_ms: Sequence[float]) -> np.ndarray:
    """[L] when each MoE layer next starts, given that layer `layer` starts at `next_start_ms`."""
    ms = np.asarray(layer_ms, np.float64)
    before = np.concatenate([[0.0], np.cumsum(ms)])  # before[l] = time from a token's start to layer l
    starts = next_start_ms + before[:-1] - before[layer]
    starts[:layer] += before[-1]  # those layers come back with the next token
    return starts


def next_use_ms(inp: PlanInput) -> np.ndarray:
    """[L, E] expected time of each key's next use: its next chance (deadline) if used then (p), else
    a geometric wait of 1/q more tokens (q = rate): deadline + (1 - p) / q tokens."""
    p = np.clip(inp.probs, 0.0, 1.0)
    q = np.clip(p if inp.rate is None else inp.rate, _P_FLOOR, 1.0)
    return inp.starts[:, None] + inp.token_ms * (1.0 - p) / q


def plan(inp: PlanInput, config: PlanConfig = PlanConfig(), use_ms: np.ndarray | None = None) -> Plan:
    """`use_ms`: `next_use_ms(inp)` if the caller already has it (it keeps it to pick victims for misses)."""
    probs = inp.probs
    starts = inp.starts
    use = next_use_ms(inp) if use_ms is None else use_ms
    margin = config.swap_margin_tokens * inp.token_ms
    free = inp.n_slots - int(inp.resident.sum()) - len(inp.in_flight)
    # The queue is served in order, so new transfers land one transfer apart after the started ones.
    clock = max([f.eta_ms for f in inp.in_flight if f.started], default=inp.now_ms)
    cancel: list[ExpertKey] = []
    # (latest start, deadline, -p, new, key): the deadline breaks ties the subtraction's rounding makes, so one
    # transfer time for all keys orders exactly by deadline
    queue: list[tuple[float, float, float, bool, ExpertKey]] = []
    flying = set()
    for f in inp.in_flight:
        flying.add(f.key)
        if f.started:
            continue
        p = float(probs[f.key])
        if f.key in inp.pinned:
            queue.append((-np.inf, -np.inf, -1.0, False, f.key))  # a demand load: first in any queue
        elif p <= config.threshold:
            cancel.append(f.key)
            free += 1
        else:
            deadline = float(starts[f.key[0]])
            queue.append((deadline - inp.transfer(f.key), deadline, -p, False, f.key))
    layers, experts = np.nonzero((probs > config.threshold) & ~inp.resident)
    for key in map(ExpertKey, layers.tolist(), experts.tolist()):
        if key not in flying:
            deadline = float(starts[key[0]])
            queue.append((deadline - inp.transfer(key), deadline, -float(probs[key]), True, key))
    queue.sort()

    fetch: list[Transfer] = []
    evict: list[ExpertKey] = []
    order: list[ExpertKey] | None = None  # resident keys, furthest expected use first; built when first needed
    for _, deadline, neg_p, new, key in queue:
        transfer = inp.transfer(key)
        eta = clock + transfer
        lateness = transfer if config.max_lateness_ms is None else config.max_lateness_ms
        if eta > deadline + lateness and key not in inp.pinned:
            if not new:
                cancel.append(key)
                free += 1
            continue
        if new:
            out = None
            if free <= 0:
                if order is None:
                    order = _eviction_order(inp, use)
                at = _pick_victim(order, key, deadline, use, starts, probs, config.threshold, margin)
                if at is None:
                    continue
                out = order[at]
            # Worth its link time? Used (p), it saves the demand load's stall less its own lateness;
            # unused, it holds up the copies behind it as far as the link is busy anyway, and the key it
            # evicted must come back if that one is used at its next chance (q): one more transfer.
            p = -neg_p
            q = 0.0 if out is None else float(probs[out])
            saved = transfer - max(0.0, eta - deadline)
            if p * saved < (1.0 - p) * transfer * (inp.link_busy + q):
                continue
            if out is None:
                free -= 1
            else:
                evict.append(order.pop(at))
            fetch.append(Transfer(key, deadline, eta, p))
        clock = eta
    return Plan(tuple(fetch), tuple(cancel), tuple(evict))


def _eviction_order(inp: PlanInput, use: np.ndarray) -> list[ExpertKey]:
    layers, experts = np.nonzero(inp.resident)
    order = np.argsort(-use[layers, experts], kind="stable")
    keys = [ExpertKey(int(layers[i]), int(experts[i])) for i in order]
    return [k for k in keys if k not in inp.pinned]


def _pick_victim(
    order: list[ExpertKey],
    key: ExpertKey,
    deadline: float,
    use: np.ndarray,
    starts: np.ndarray,
    probs: np.ndarray,
    threshold: float,
    margin: float,
) -> int | None:
    """Where in `order` the first resident key is that may make room for `key`, if any."""
    for i, r in enumerate(order):
        if use[r] <= use[key] + margin:
            return None  # sorted: every later candidate is used even sooner
        if probs[r] <= threshold or starts[r[0]] >= deadline:  # not needed before `key`
            return i
    return None
