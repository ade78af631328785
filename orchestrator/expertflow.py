"""The ExpertFlow prefetcher: learned route predictions through the deadline planner. One implementation,
run by the simulator and by the engine alike.

    begin_step     the session predictor forecasts every live request's next token, all MoE layers at
                   once (token horizon); merged over the batch into P(some request uses (layer, expert)),
                   they go to the planner with MoE layer 0 next
    after_layer j  the requests' routes at layer j go to the predictor, which refines layer j+1 (layer
                   horizon, with the server's gate speculation for it where computed); unless every key it
                   then wants is resident or coming, the planner runs again with layer j+1 due once layer j
                   has computed (after the last layer, always: for the next token). Layers already run are due again
                   with the next token, guessed as a mix of this token's prediction and each request's own
                   recent routing (decayed counts of the routes it took)
    eviction       `NextUse`: the victim is the key whose expected next use (the planner's estimate, over
                   several tokens through each request's per-token use rate) is furthest away

The planner (planner.py) sets deadlines from the view's per-layer times, orders transfers earliest deadline
first, cancels queued ones that can no longer land in time or became unlikely, and evicts by predicted next
use. The view is the cache's own snapshot: modelled in the simulator, measured in the engine.

Not for: moving bytes (expert_store/), predicting (predictor/), or the clock (whoever makes the view).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from expert_store.eviction import NextUse
from expert_store.plan import CacheView, Plan
from orchestrator.planner import PlanConfig, PlanInput, due_probabilities, next_use_ms, plan
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest, merge_requests
from predictor.base import RequestId, SessionPredictor


@dataclass(frozen=True)
class ExpertFlowConfig:
    plan: PlanConfig = field(default_factory=PlanConfig)
    recent_half_life: float = 4.0  # tokens; how fast a request's own routing history forgets
    # Eviction looks past the next token with each request's own per-token use rate (half-life in tokens).
    # Measured on the validation traces: blending in a slower rate of all requests changed nothing, while
    # on requests with disjoint experts it kept the last request's experts too long.
    rate_half_life: float = 8.0
    next_token_model_weight: float = 0.5  # next token's p = w * this token's prediction + (1 - w) * recent
    speculation: bool = True  # hand the server's next-layer gate speculation to the predictor's layer head
    # After a layer routes, plan again only if the next layer's (refined) prediction wants a key that is neither
    # resident nor on its way; the plan after the token's last layer always runs (it starts the next token).
    # In the simulator on the coarse model's test traces this halved the plans at the same hit rate and
    # stall (within 0.5 %), and planning is the policy's main host cost.
    replan_covered: bool = False


class ExpertFlow(Prefetcher):
    name = "expertflow"

    def __init__(self, sessions: SessionPredictor, config: ExpertFlowConfig = ExpertFlowConfig()):
        self.sessions = sessions
        self.config = config
        self.wants_speculation = config.speculation
        self.eviction = NextUse()
        self._decay = 0.5 ** (1.0 / config.recent_half_life)
        self._rate_decay = 0.5 ** (1.0 / config.rate_half_life)
        self._live: list[RequestId] = []
        self._current: dict[RequestId, np.ndarray] = {}  # [L, E] this step's prediction, refined rows replaced
        self._recent: dict[RequestId, np.ndarray] = {}  # [L, E] decayed routing counts
        self._rate: dict[RequestId, np.ndarray] = {}  # [L, E] the same, slower: per-token use rate
        self.plans = 0  # how many times the planner ran (for tests and reports)
        # routed experts among the k likeliest of the prediction the layer was planned with (prediction recall)
        self.recall_hits = self.recall_total = 0

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        self._live = [r.id for r in requests]
        predicted = self.sessions.step({r.id: r.new_tokens for r in requests})
        shape = view.resident.shape
        for r in requests:
            if r.id not in self._recent:
                self._recent[r.id] = np.zeros(shape, np.float32)
                self._rate[r.id] = np.zeros(shape, np.float32)
            p = predicted.get(r.id)
            if p is None:
                self._current.pop(r.id, None)  # e.g. a prompt: its routes are unknown until it has run
            else:
                self._current[r.id] = np.array(p, np.float32)
        return self._plan(0, view.now_ms, view)

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        j = routed.layer
        for rid, rows in routed.routes.items():
            current = self._current.get(rid)
            if current is not None and len(rows) == 1:  # recall@k of what it planned layer j with
                k = len(rows[0])
                top = np.argpartition(-current[j], k - 1)[:k]
                self.recall_hits += len(set(top.tolist()) & {int(e) for e in rows[0]})
                self.recall_total += k
            for experts in rows:  # each of the request's tokens this step, in order
                for table, decay in ((self._recent, self._decay), (self._rate, self._rate_decay)):
                    row = table[rid][j]
                    row *= decay
                    row[np.asarray(experts, np.int64)] += 1.0 - decay
        spec = routed.speculation if self.config.speculation else None
        for rid, p in self.sessions.layer(j, routed.routes, spec).items():
            current = self._current.get(rid)
            if current is not None and j + 1 < len(current):
                current[j + 1] = p
        if j + 1 < view.resident.shape[0] and not self.config.replan_covered and self._covered(j + 1, view):
            return None
        return self._plan(j + 1, view.ready_ms() + view.layer_ms[j], view)

    def _covered(self, layer: int, view: CacheView) -> bool:
        """Is every key the live requests are predicted to use at `layer` resident or on its way?"""
        rows = [self._current[rid][layer] for rid in self._live if rid in self._current]
        if not rows:
            return True
        wanted = np.flatnonzero(_merged(rows) > self.config.plan.threshold)
        missing = [e for e in wanted.tolist() if not view.resident[layer, e]]
        if not missing:
            return True
        flying = {f.key for f in view.in_flight}
        return all((layer, e) in flying for e in missing)

    def _plan(self, layer: int, next_start_ms: float, view: CacheView) -> Plan | None:
        """The planner's plan with MoE layer `layer` (L: none left this token) next, starting at `next_start_ms`."""
        predicted = [rid for rid in self._live if rid in self._current]
        if not predicted:
            self.eviction.use = None  # nothing predicted (prompts): LRU until a prediction
            return None
        current = _merged([self._current[rid] for rid in predicted])
        recent = _merged([self._recent[rid] for rid in predicted])
        rate = _merged([self._rate[rid] for rid in predicted])
        probs = due_probabilities(current, recent, layer, self.config.next_token_model_weight)
        inp = PlanInput.of(view, probs, layer, next_start_ms, rate=np.maximum(rate, probs))
        use = next_use_ms(inp)
        self.eviction.use = use
        self.plans += 1
        return plan(inp, self.config.plan, use)

    def route_estimate(self, request_id: RequestId) -> np.ndarray | None:
        """[L, E] the request's latest prediction (its last token's, refined layers included), else its decayed
        recent routing (a prompt, or a token the predictor could not predict); None for a request it does not know.
        For the token scheduler, which groups requests by the experts they are expected to use. A copy: the
        caller may be another thread, and cannot change the prefetcher's state."""
        p = self._current.get(request_id, self._recent.get(request_id))
        return None if p is None else p.copy()

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        ids = list(request_ids)
        for rid in ids:
            for table in (self._current, self._recent, self._rate):
                table.pop(rid, None)
        self.sessions.finish(ids)


def _merged(rows: list[np.ndarray]) -> np.ndarray:
    """`merge_requests(rows)`, without its copy when there is one request (batch 1, the usual decode step): the
    callers only read the result."""
    return rows[0] if len(rows) == 1 else merge_requests(rows)
