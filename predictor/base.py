"""The one interface every routing predictor implements: the learned one and the peers' baselines.

A predictor gives, for each token of a sequence and each MoE layer, a probability per
expert, using only what a server would know at the time:

    horizon "token": when token t enters the model, from tokens <= t and the routes of
                     tokens < t (all layers at once: the learned predictor, frequency,
                     activation-matrix matching);
    horizon "layer": when layer j-1 of token t has run, for layer j only (next-layer gate
                     speculation, which needs that hidden state).

Two ways to use it: `predict(trace, s)` replays a recorded sequence (evaluation, the
simulator); `session()` follows one live request inside the engine.

Not for: deciding what to fetch or evict (orchestrator/) or moving bytes (expert_store/).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import numpy as np

from traces.format import Trace


class PredictorSession(ABC):
    """Online prediction for one request, fed as the request runs."""

    @abstractmethod
    def observe_token(self, token_id: int) -> None:
        """The next token entered the model (a prompt token or a sampled one)."""

    @abstractmethod
    def observe_route(self, layer_index: int, experts: list[int]) -> None:
        """The token just observed was routed to `experts` at MoE layer number `layer_index` (0-based)."""

    @abstractmethod
    def predict(self) -> np.ndarray:
        """[L, E] probabilities for the token observed last (call after observe_token)."""

    def refine(self, layer_index: int, spec: list[int] | None = None) -> np.ndarray | None:
        """[E] probabilities for MoE layer `layer_index` of the last token, given its routes observed so far
        (layers < layer_index) and, if the server computed it, gate speculation's experts for that layer;
        None where the predictor has no layer horizon. Call after predict() for the same token."""
        return None


class RoutePredictor(ABC):
    name: ClassVar[str]
    horizon: ClassVar[Literal["token", "layer"]] = "token"

    @abstractmethod
    def predict(self, trace: Trace, s: int) -> np.ndarray:
        """[T, L, E] float32 probabilities for every token of sequence s of `trace`."""

    def session(self) -> PredictorSession:
        raise NotImplementedError(f"{self.name} has no online mode")

    def supports(self, trace: Trace) -> str | None:
        """None if this predictor can run on `trace`, else why not (e.g. the trace lacks hidden states)."""
        return None
