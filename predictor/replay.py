"""A trace predictor's offline predictions served through the online interface: the simulator's fast path.

The simulator replays a trace's sequences as requests (request id = the sequence index as text) and
drives every prefetcher through `SessionPredictor` calls, exactly as the engine does. A live session
predictor (`LearnedSessions`) works there too, one token at a time; this adapter instead computes each
sequence's predictions in one batched `predict(trace, s)` when the sequence first appears and answers
the calls from them, which is much faster and gives the same numbers (learned.py keeps the two equal).

Not for: live requests (their tokens are not in a trace) or evaluating predictors (evaluate.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from predictor.base import RequestId, SessionPredictor, TracePredictor
from traces.format import Trace


class ReplaySessions(SessionPredictor):
    """`token` (horizon "token") answers `step`; `layer` (horizon "layer"), if given, answers `layer`."""

    def __init__(self, trace: Trace, token: TracePredictor, layer: TracePredictor | None = None) -> None:
        if token.horizon != "token":
            raise ValueError(f"{token.name} predicts one layer ahead; step() needs a token-horizon predictor")
        if layer is not None and layer.horizon != "layer":
            raise ValueError(f"{layer.name} is not a layer-horizon predictor")
        for p in (token, layer):
            reason = None if p is None else p.supports(trace)
            if reason is not None:
                raise ValueError(f"{p.name}: {reason}")
        self.trace = trace
        self.token, self.layer_predictor = token, layer
        self.n_layers, self.n_experts = len(trace.info.moe_layers), trace.info.n_experts
        self.label = getattr(token, "label", None) or token.name
        self._pos: dict[RequestId, int] = {}  # tokens of the sequence seen so far
        self._token_probs: dict[RequestId, np.ndarray] = {}  # [T, L, E]
        self._layer_probs: dict[RequestId, np.ndarray] = {}
        self._new: dict[RequestId, int] = {}

    def _sequence(self, rid: RequestId) -> int:
        try:
            s = int(rid)
        except ValueError:
            raise KeyError(f"request {rid!r} is not a sequence of the replayed trace") from None
        if not 0 <= s < self.trace.n_sequences:
            raise KeyError(f"request {rid!r}: the trace has {self.trace.n_sequences} sequences")
        return s

    def step(self, tokens: Mapping[RequestId, Sequence[int]]) -> dict[RequestId, np.ndarray]:
        out = {}
        self._new = {}
        for rid, new in tokens.items():
            s = self._sequence(rid)
            pos = self._pos.get(rid, 0)
            sl = self.trace.sequence(s)
            expected = self.trace.tokens[sl][pos : pos + len(new)]
            if list(expected) != list(new):
                raise ValueError(f"request {rid}: tokens {list(new)} at {pos} are not the trace's {list(expected)}")
            if rid not in self._token_probs:
                self._token_probs[rid] = self.token.predict(self.trace, s)
                if self.layer_predictor is not None:
                    self._layer_probs[rid] = self.layer_predictor.predict(self.trace, s)
            self._pos[rid] = pos + len(new)
            self._new[rid] = len(new)
            if len(new) == 1:
                out[rid] = np.clip(self._token_probs[rid][pos], 0.0, 1.0)
        return out

    def layer(
        self,
        layer: int,
        routes: Mapping[RequestId, np.ndarray],
        speculation: Mapping[RequestId, np.ndarray] | None = None,
    ) -> dict[RequestId, np.ndarray]:
        if self.layer_predictor is None or layer + 1 >= self.n_layers:
            return {}
        return {
            rid: np.clip(self._layer_probs[rid][self._pos[rid] - 1, layer + 1], 0.0, 1.0)
            for rid in routes
            if self._new.get(rid) == 1
        }

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        for rid in request_ids:
            for table in (self._pos, self._token_probs, self._layer_probs, self._new):
                table.pop(rid, None)
