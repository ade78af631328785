"""The two interfaces of routing predictors: offline over recorded traces, online over live requests.

A prediction is, per token and MoE layer, a probability per expert, from what a server knows then:

    horizon "token": when token t enters the model, from tokens <= t and the routes of tokens < t
                     (all layers at once: the learned predictor, frequency, activation-matrix matching);
    horizon "layer": when MoE layer j-1 of token t has run, for layer j only (the learned layer head,
                     next-layer gate speculation, which needs that layer's hidden state).

`TracePredictor` replays a recorded sequence whole: `predict(trace, s)` -> [T, L, E] (evaluation,
training, the simulator's fast path). `SessionPredictor` follows the live requests of a batch, keyed by
request id, with one call per step and one per MoE layer, so a predictor service can implement it
over the network:

    step({id: new tokens})               -> {id: [L, E]}   each request's next token, token horizon
    layer(j, {id: routes}, {id: spec})   -> {id: [E]}      MoE layer j+1 of it, layer horizon
    finish(ids)                                            requests that left the batch

Not for: deciding what to fetch or evict (orchestrator/) or moving bytes (expert_store/).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar, Literal

import numpy as np

from traces.format import Trace

RequestId = str


class TracePredictor(ABC):
    name: ClassVar[str]
    horizon: ClassVar[Literal["token", "layer"]] = "token"

    @abstractmethod
    def predict(self, trace: Trace, s: int) -> np.ndarray:
        """[T, L, E] float32 probabilities for every token of sequence s of `trace`."""

    def supports(self, trace: Trace) -> str | None:
        """None if this predictor can run on `trace`, else why not (e.g. the trace lacks hidden states)."""
        return None


class SessionPredictor(ABC):
    """Online predictions for the live requests of a batch. L = MoE layers, E = experts, K = top-k."""

    n_layers: int
    n_experts: int
    label: str = ""  # what tables call it (e.g. "learned+online")

    @abstractmethod
    def step(self, tokens: Mapping[RequestId, Sequence[int]]) -> dict[RequestId, np.ndarray]:
        """The tokens entering the model this step for each live request (its prompt at its first step, then
        one token). Returns [L, E] P(expert used) for the last token of each request it can predict: one new
        token whose predecessors' routes were all observed. Requests it cannot predict are left out."""

    @abstractmethod
    def layer(
        self,
        layer: int,
        routes: Mapping[RequestId, np.ndarray],
        speculation: Mapping[RequestId, np.ndarray] | None = None,
    ) -> dict[RequestId, np.ndarray]:
        """MoE layer `layer` routed this step's tokens: routes[id] is [T, K] (rows in token order). Returns
        [E] for MoE layer `layer + 1` of each request's last token where the predictor has a layer horizon,
        given `speculation[id]` ([K], best first: that layer's router on this layer's hidden state) where
        the server computed it; empty otherwise."""

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        """These requests left: forget them."""
