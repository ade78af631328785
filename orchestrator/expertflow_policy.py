"""The ExpertFlow policy in the simulator: token-horizon predictions for every layer, through the planner.

At token start the predictor's [L, E] probabilities for the token go to the planner (deadlines, EDF,
cancellation, Belady eviction with predictions); after each layer routes, the planner runs again with
what is now known: the layers already run are due again with the next token, whose probability is
taken as a mix of this token's prediction and the request's own recent routing (decayed counts of
the routes actually taken), so the link keeps working on the next token's first layers while this
token's last layers compute. Past the next chance, eviction estimates a key's use from the request's
own per-token rate of use (decayed counts with a longer half-life). Misses evict the resident key with
the furthest expected next use. With a `refiner` (a layer-horizon predictor: the learned one's layer head),
the next layer's probabilities are replaced, once a layer has routed, by the refined ones.

Not for: the live engine (live_policy.py) or the plan itself (planner.py).
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.planner import Key, Plan, PlanConfig, PlanInput, due_probabilities, next_use_ms, plan
from orchestrator.policies import SimPolicy
from predictor.base import RoutePredictor
from traces.format import Trace

if TYPE_CHECKING:
    from orchestrator.simulator import CacheView


@dataclass(frozen=True)
class ExpertFlowConfig:
    plan: PlanConfig = field(default_factory=PlanConfig)
    recent_half_life: float = 4.0  # tokens; how fast the request's own routing history forgets
    # Eviction looks past the next token with the request's own per-token use rate (half-life in tokens).
    # Measured on the validation traces: blending in a slower rate of all requests changed nothing, while
    # on requests with disjoint experts it kept the last request's experts too long.
    rate_half_life: float = 8.0
    next_token_model_weight: float = 0.5  # next token's p = w * this token's prediction + (1 - w) * recent


class ExpertFlow(SimPolicy):
    name = "expertflow"

    def __init__(
        self,
        predictor: RoutePredictor,
        config: ExpertFlowConfig = ExpertFlowConfig(),
        refiner: RoutePredictor | None = None,
    ):
        if refiner is not None and refiner.horizon != "layer":
            raise ValueError(f"{refiner.name} is not a layer-horizon predictor")
        self.predictor = predictor
        self.refiner = refiner
        self.config = config
        self._decay = 0.5 ** (1.0 / config.recent_half_life)
        self._rate_decay = 0.5 ** (1.0 / config.rate_half_life)

    def supports(self, trace: Trace) -> str | None:
        if self.predictor.horizon != "token":
            return f"{self.predictor.name} predicts one layer ahead; the planner needs whole tokens"
        return self.predictor.supports(trace)

    def begin(self, trace: Trace, view: CacheView) -> None:
        super().begin(trace, view)
        self.recent = np.zeros((len(trace.info.moe_layers), trace.info.n_experts), np.float32)
        self.rate = np.zeros_like(self.recent)
        self._use = np.zeros_like(self.recent, dtype=np.float64)

    def begin_sequence(self, s: int) -> None:
        self.probs = self.predictor.predict(self.trace, s)  # [T, L, E]
        refine = self.refiner is not None and self.refiner.supports(self.trace) is None
        self.layer_probs = self.refiner.predict(self.trace, s) if refine else None  # [T, L, E]
        self.recent[:] = 0.0  # a new request: its own history starts empty
        self.rate[:] = 0.0

    def begin_token(self, t: int) -> Plan | None:
        self.current = np.clip(self.probs[t], 0.0, 1.0)
        return self._plan(0, self.view.now_ms)

    def after_route(self, t: int, layer: int, experts: Sequence[int]) -> Plan | None:
        for rows, decay in ((self.recent, self._decay), (self.rate, self._rate_decay)):
            row = rows[layer]
            row *= decay
            row[list(experts)] += 1.0 - decay
        if self.layer_probs is not None and layer + 1 < len(self.current):
            self.current[layer + 1] = np.clip(self.layer_probs[t, layer + 1], 0.0, 1.0)
        return self._plan(layer + 1, self.view.ready_ms() + self.view.layer_ms[layer])

    def _plan(self, layer: int, next_start_ms: float) -> Plan:
        v = self.view
        probs = due_probabilities(self.current, self.recent, layer, self.config.next_token_model_weight)
        inp = PlanInput(
            probs=probs,
            layer=layer,
            next_start_ms=next_start_ms,
            now_ms=v.now_ms,
            layer_ms=v.layer_ms,
            transfer_ms=v.transfer_ms,
            n_slots=v.n_slots,
            resident=v.arrived,
            in_flight=v.in_flight(),
            pinned=v.pinned,
            rate=np.maximum(self.rate, probs),
            link_busy=v.link_busy,
        )
        self._use = next_use_ms(inp)
        return plan(inp, self.config.plan, self._use)

    def victim(self, protected: Set[Key]) -> Key | None:
        mask = self.view.arrived.copy()
        for key in protected:
            mask[key] = False
        if not mask.any():
            return None
        i = int(np.argmax(np.where(mask, self._use, -np.inf)))
        return divmod(i, mask.shape[1])
