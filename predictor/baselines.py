"""The peers' routing predictors, fitted from training traces only: what the learned predictor must beat.

    FrequencyPredictor          a static hot set: each layer's expert frequency over the training traces,
                                the same for every token (what a frequency-based cache pins)
    GateSpeculationPredictor    next-layer gate speculation (mixtral-offloading): layer j's router applied
                                to layer j-1's hidden state, replayed from the trace's `spec_experts`
    ActivationMatrixPredictor   MoE-Infinity's expert activation matrix matching: the request's own
                                layer x expert counts so far, matched by cosine similarity against the
                                training sequences' matrices

Probabilities are P(expert picked) per (token, layer), so each layer's row sums to about top_k.

Not for: the learned predictor (model.py, learned.py) or scoring predictions (evaluate.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from predictor.base import RequestId, SessionPredictor, TracePredictor
from traces.format import Trace


def multi_hot(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[..., K] expert ids -> [..., E] float32 0/1 (sentinel ids >= E are dropped)."""
    out = np.zeros(experts.shape[:-1] + (n_experts + 1,), np.float32)
    ids = np.minimum(experts.astype(np.int64), n_experts)  # sentinels land in the spare column
    np.put_along_axis(out, ids, 1.0, axis=-1)
    return out[..., :n_experts]


def ranked_hot(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[..., K] expert ids, best first -> [..., E] float32: (K - rank) / K for each listed expert, 0 elsewhere
    (sentinel ids >= E dropped). Keeps a top-k's order, which a multi-hot loses."""
    k = experts.shape[-1]
    out = np.zeros(experts.shape[:-1] + (n_experts + 1,), np.float32)
    ids = np.minimum(experts.astype(np.int64), n_experts)
    rank_value = np.broadcast_to(((k - np.arange(k)) / k).astype(np.float32), experts.shape)
    np.put_along_axis(out, ids, rank_value, axis=-1)
    return out[..., :n_experts]


def layer_frequency(trace: Trace) -> np.ndarray:
    """[L, E] share of tokens routed to each expert in each layer (rows sum to top_k)."""
    n_exp = trace.info.n_experts
    counts = np.zeros((len(trace.info.moe_layers), n_exp + 1), np.float64)
    e = np.minimum(trace.experts.astype(np.int64), n_exp)  # [N, L, K]
    for j in range(e.shape[1]):
        counts[j] = np.bincount(e[:, j].ravel(), minlength=n_exp + 1)
    return (counts[:, :n_exp] / max(len(trace.tokens), 1)).astype(np.float32)


class FrequencyPredictor(TracePredictor):
    name: ClassVar[str] = "frequency"
    horizon = "token"

    def __init__(self, train: Trace) -> None:
        self.freq = layer_frequency(train)

    def predict(self, trace: Trace, s: int) -> np.ndarray:
        n = trace.seq_offsets[s + 1] - trace.seq_offsets[s]
        return np.broadcast_to(self.freq, (n,) + self.freq.shape).copy()


class TrueRoutes(TracePredictor):
    """Not a predictor: each token's actual routes, read from the trace being replayed. For bounds only
    (what the planner would reach if the token-horizon prediction were perfect); never for evaluation."""

    name: ClassVar[str] = "true-routes"
    horizon = "token"

    def predict(self, trace: Trace, s: int) -> np.ndarray:
        return multi_hot(trace.experts[trace.sequence(s)], trace.info.n_experts)


class GateSpeculationPredictor(TracePredictor):
    """Probability 1 for the speculated experts, at most `epsilon` for the rest (scaled by training frequency,
    so that a top-2k cut beyond the speculated experts is not decided by expert id); the first MoE layer has no
    earlier hidden state, so it falls back to the training frequency (mixtral-offloading loads it on demand)."""

    name: ClassVar[str] = "gate-speculation"
    horizon = "layer"

    def __init__(self, train: Trace, epsilon: float = 1e-3) -> None:
        self.freq = layer_frequency(train)
        self.epsilon = epsilon

    def supports(self, trace: Trace) -> str | None:
        if trace.spec_experts is None or (trace.spec_experts[:, 1:] == trace.sentinel).all():
            return "trace lacks hidden states (no next-layer gate speculation recorded)"
        return None

    def predict(self, trace: Trace, s: int) -> np.ndarray:
        reason = self.supports(trace)
        if reason is not None:
            raise ValueError(f"{self.name}: {reason}")
        spec = trace.spec_experts[trace.sequence(s)]
        hot = multi_hot(spec, trace.info.n_experts)  # [T, L, E]
        rest = self.epsilon * self.freq / np.maximum(self.freq.max(1, keepdims=True), 1e-12)  # [L, E]
        probs = np.where(hot > 0, 1.0, rest[None]).astype(np.float32)
        probs[:, 0] = self.freq[0]
        return probs


@dataclass(frozen=True)
class MatchConfig:
    top_matches: int = 4  # stored matrices mixed per match, weighted by their cosine similarity
    match_every: int = 8  # re-match after this many tokens (matching every token changes little, costs T x more)
    own_weight_tokens: float = 32.0  # own counts get weight t / (t + this): trust the request once it has history


class ActivationMatrixPredictor(TracePredictor):
    """MoE-Infinity's expert activation matrix (EAM) matching at token horizon.

    Each training sequence is stored as its [L, E] activation counts divided by its length. For token t of
    a request, the request's own matrix (tokens < t) is matched against them by cosine similarity; the
    prediction mixes the top matches with the request's own normalised counts. MoE-Infinity also decays
    scores by layer distance when predicting later layers from a token's partial trace; at token horizon
    nothing of token t is known yet, so that decay has nothing to act on and is left out.
    """

    name: ClassVar[str] = "activation-matrix"
    horizon = "token"

    def __init__(self, train: Trace, config: MatchConfig = MatchConfig()) -> None:
        self.config = config
        self.k = train.info.top_k
        self.freq = layer_frequency(train)
        rows = []
        for s in range(train.n_sequences):
            sl = train.sequence(s)
            rows.append(multi_hot(train.experts[sl], train.info.n_experts).sum(0).ravel() / (sl.stop - sl.start))
        self.stored = np.stack(rows).astype(np.float32)  # [S, L*E], each layer's block sums to top_k
        self.stored_unit = self.stored / np.maximum(np.linalg.norm(self.stored, axis=1, keepdims=True), 1e-12)

    def predict(self, trace: Trace, s: int) -> np.ndarray:
        cfg = self.config
        sl = trace.sequence(s)
        n_layers, n_exp = self.freq.shape
        hot = multi_hot(trace.experts[sl], n_exp).reshape(sl.stop - sl.start, -1)  # [T, L*E]
        own = np.concatenate([np.zeros((1, hot.shape[1]), np.float32), np.cumsum(hot, 0)[:-1]])  # tokens < t
        seen = np.arange(len(own), dtype=np.float32)[:, None]
        out = np.empty_like(own)
        out[0] = self.freq.ravel()  # nothing to match before the first route
        for start in range(1, len(own), cfg.match_every):
            stop = min(start + cfg.match_every, len(own))
            matched = self.match(own[start])
            alpha = seen[start:stop] / (seen[start:stop] + cfg.own_weight_tokens)
            out[start:stop] = alpha * own[start:stop] / seen[start:stop] + (1 - alpha) * matched
        return np.clip(out, 0.0, 1.0).reshape(-1, n_layers, n_exp)

    def match(self, own: np.ndarray) -> np.ndarray:
        """[L*E] the stored matrices most like a request's own counts `own` [L*E], mixed by similarity."""
        cfg = self.config
        sim = self.stored_unit @ (own / max(float(np.linalg.norm(own)), 1e-12))
        best = np.argpartition(-sim, min(cfg.top_matches, len(sim) - 1))[: cfg.top_matches]
        weights = np.maximum(sim[best], 1e-6)
        return weights @ self.stored[best] / weights.sum()  # rows sum to top_k

    def sessions(self) -> ActivationSessions:
        return ActivationSessions(self)


class ActivationSessions(SessionPredictor):
    """The activation-matrix predictor following live requests: what `predict` gives for a recorded one."""

    label = "activation-matrix"

    def __init__(self, matcher: ActivationMatrixPredictor) -> None:
        self.matcher = matcher
        self.n_layers, self.n_experts = matcher.freq.shape
        self._rows: dict[RequestId, list[np.ndarray]] = {}  # per token: [L*E] its routes (filled per layer)
        self._matched: dict[RequestId, tuple[int, np.ndarray]] = {}  # (block start, matched)
        self._summed: dict[RequestId, tuple[int, np.ndarray]] = {}  # (n, counts over tokens < n)

    def step(self, tokens: Mapping[RequestId, Sequence[int]]) -> dict[RequestId, np.ndarray]:
        out = {}
        for rid, new in tokens.items():
            rows = self._rows.setdefault(rid, [])
            t = len(rows)  # tokens before the first new one, all routed
            rows.extend(np.zeros(self.n_layers * self.n_experts, np.float32) for _ in new)
            if len(new) == 1:
                out[rid] = self._predict(rid, t)
        return out

    def _predict(self, rid: RequestId, t: int) -> np.ndarray:
        if t == 0:
            return np.clip(self.matcher.freq, 0.0, 1.0)
        cfg, rows = self.matcher.config, self._rows[rid]
        start = 1 + (t - 1) // cfg.match_every * cfg.match_every  # matched once per block, as `predict` does
        if self._matched.get(rid, (None,))[0] != start:
            self._matched[rid] = (start, self.matcher.match(self._own(rid, start)))
        alpha = t / (t + cfg.own_weight_tokens)
        probs = alpha * self._own(rid, t) / t + (1 - alpha) * self._matched[rid][1]
        return np.clip(probs, 0.0, 1.0).reshape(self.n_layers, self.n_experts).astype(np.float32)

    def _own(self, rid: RequestId, t: int) -> np.ndarray:
        """[L*E] the request's counts over its tokens < t, summed on from the last call (t never decreases
        by more than a block, so the running sum is rebuilt only then)."""
        n, total = self._summed.get(rid, (0, None))
        if total is None or n > t:
            n, total = 0, np.zeros(self.n_layers * self.n_experts, np.float64)
        for row in self._rows[rid][n:t]:
            total = total + row
        self._summed[rid] = (t, total)
        return total

    def layer(
        self,
        layer: int,
        routes: Mapping[RequestId, np.ndarray],
        speculation: Mapping[RequestId, np.ndarray] | None = None,
    ) -> dict[RequestId, np.ndarray]:
        for rid, experts in routes.items():
            rows = self._rows[rid]
            for row, picked in zip(rows[len(rows) - len(experts) :], experts):
                ids = np.asarray(picked, np.int64)
                row[layer * self.n_experts + ids[ids < self.n_experts]] = 1.0
        return {}  # token horizon only

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        for rid in request_ids:
            self._rows.pop(rid, None)
            self._matched.pop(rid, None)
            self._summed.pop(rid, None)
