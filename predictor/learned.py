"""The learned predictor offline (`LearnedPredictor`, a TracePredictor) and online (`LearnedSessions`).

Both paths read a sequence in the same windows of the model's context (token t is predicted from the
window starting at `window_start(t)`, which gives it at least half a context of history), so a session
fed a recorded sequence token by token predicts what `predict(trace, s)` does for it. `LearnedSession`
follows one request; `LearnedSessions` keeps one per request id behind the batched SessionPredictor calls.

With `online` set, the model's probabilities pass through the request's OnlineCorrector (online.py).

Not for: the network or its checkpoints (model.py), training (train.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from predictor.base import RequestId, SessionPredictor, TracePredictor
from predictor.baselines import multi_hot, ranked_hot
from predictor.model import RouteTransformer, load_model
from predictor.numpy_model import NumpyRouteModel, from_torch
from predictor.online import OnlineConfig, OnlineCorrector, correct_sequence
from traces.format import Trace


def window_start(t: int, context: int) -> int:
    """First position of the window that predicts position t: 0, then steps of half a context."""
    half = context // 2
    return 0 if t < context else ((t - context) // half + 1) * half


@torch.no_grad()
def sequence_probs(
    model: RouteTransformer,
    tokens: np.ndarray,  # [T]
    experts: np.ndarray,  # [T, L, K] observed routes (row t = token t's)
    spec: np.ndarray | None = None,  # [T, L, K] gate speculation (sentinel ids where absent), layer horizon only
    layer_horizon: bool = False,
    batch: int = 32,
) -> np.ndarray:
    """[T, L, E] probabilities for one sequence, at the token horizon or (with the layer head) the layer horizon."""
    ctx, half = model.cfg.context, model.cfg.context // 2
    n, n_exp = len(tokens), model.cfg.n_experts
    device = model.token_map.device
    own = multi_hot(experts, n_exp)  # [T, L, E]
    prev = np.concatenate([np.zeros((1, own[0].size), np.float32), own[:-1].reshape(n - 1, own[0].size)])  # t-1's
    hot_spec = None if spec is None or not layer_horizon else ranked_hot(spec, n_exp)
    starts = [0] + [i * half for i in range(1, max(1, -(-n // half) - 1))]
    out = np.empty((n, model.cfg.moe_layers, n_exp), np.float32)
    for b in range(0, len(starts), batch):
        group = starts[b : b + batch]
        width = min(ctx, n - group[0])
        tok = np.zeros((len(group), width), np.int64)
        rte = np.zeros((len(group), width, prev.shape[1]), np.float32)
        for i, w in enumerate(group):  # windows shorter than `width` are padded at the end: causal, so harmless
            m = min(width, n - w)
            tok[i, :m], rte[i, :m] = tokens[w : w + m], prev[w : w + m]
        state, logits = model.encode(torch.from_numpy(tok).to(device), torch.from_numpy(rte).to(device))
        for i, w in enumerate(group):
            lo = 0 if w == 0 else half  # the window's own positions: after its first half
            hi = min(ctx, n - w)
            x, lg = state[i, lo:hi], logits[i, lo:hi]
            if layer_horizon:
                routes = torch.from_numpy(own[w + lo : w + hi]).to(device)
                sp = None if hot_spec is None else torch.from_numpy(hot_spec[w + lo : w + hi]).to(device)
                lg = model.refine(x, lg, routes, sp)
            out[w + lo : w + hi] = model.probabilities(lg).float().cpu().numpy()
    return out


class LearnedPredictor(TracePredictor):
    name: ClassVar[str] = "learned"
    horizon = "token"

    def __init__(
        self, model: RouteTransformer, online: OnlineConfig | None = None, layer_horizon: bool = False
    ) -> None:
        if layer_horizon and model.layer_head is None:
            raise ValueError("this route predictor has no layer head (trained with layer_dim 0)")
        self.model = model.eval()
        self.online = None if layer_horizon else online  # the layer head already reads the request's routes
        self.layer_horizon = layer_horizon
        self.horizon = "layer" if layer_horizon else "token"
        self.label = "learned@layer" if layer_horizon else "learned+online" if online is not None else "learned"

    @classmethod
    def load(
        cls, directory: str | Path, online: OnlineConfig | None = None, layer_horizon: bool = False
    ) -> LearnedPredictor:
        return cls(load_model(directory), online, layer_horizon)

    def supports(self, trace: Trace) -> str | None:
        cfg = self.model.cfg
        if (len(trace.info.moe_layers), trace.info.n_experts) != (cfg.moe_layers, cfg.n_experts):
            return f"trained for {cfg.moe_layers} MoE layers x {cfg.n_experts} experts, trace has other routing"
        return None

    def predict(self, trace: Trace, s: int) -> np.ndarray:
        sl = trace.sequence(s)
        experts = trace.experts[sl]
        spec = None if trace.spec_experts is None else trace.spec_experts[sl]
        probs = sequence_probs(self.model, trace.tokens[sl].astype(np.int64), experts, spec, self.layer_horizon)
        return probs if self.online is None else correct_sequence(probs, experts, self.online)

    def sessions(self) -> LearnedSessions:
        """The same model following live requests (token and, with a layer head, layer horizon)."""
        return LearnedSessions(self.model, self.online, self.label)


class LearnedSession:
    """One request's token and route history. predict() extends the transformer's key/value cache by the new
    token (rereading the whole window only when a new window starts, every half context), and refine(j)
    reuses that pass's state for the layer head. It computes in numpy (numpy_model.py): a live step is a
    hundred tiny operations, which torch's per-call overhead would make several times slower."""

    def __init__(self, model: RouteTransformer | NumpyRouteModel, online: OnlineConfig | None = None) -> None:
        self.model = model if isinstance(model, NumpyRouteModel) else from_torch(model)
        cfg = self.model.cfg
        self.tokens: list[int] = []
        self.routes: list[np.ndarray] = []  # [L*E] per token, filled as observe_route reports layers
        self.corrector = None if online is None else OnlineCorrector(online, cfg.moe_layers, cfg.n_experts, cfg.top_k)
        self._encoded: tuple[np.ndarray, np.ndarray] | None = None  # last token's (state [D], logits [L, E])
        self._kv: list | None = None  # the transformer's keys and values over the current window
        self._kv_window = (-1, -1)  # (first, last) position the cache covers

    def observe_token(self, token_id: int) -> None:
        self.tokens.append(int(token_id))
        self._encoded = None  # refine() needs this token's predict() first
        self.routes.append(np.zeros(self.model.cfg.moe_layers * self.model.cfg.n_experts, np.float32))

    def observe_route(self, layer_index: int, experts: list[int], back: int = 0) -> None:
        """The token observed `back` tokens before the last was routed to `experts` at MoE layer `layer_index`
        (a prompt's routes arrive after all its tokens). Each token's routes are observed in token order."""
        if len(self.tokens) <= back:
            raise RuntimeError("observe_route for a token not observed yet")
        e = self.model.cfg.n_experts
        self.routes[-1 - back][layer_index * e + np.asarray(experts, np.int64)] = 1.0
        if self.corrector is not None:
            self.corrector.observe(layer_index, experts)

    def predict(self) -> np.ndarray:
        if not self.tokens:
            raise RuntimeError("predict before any observe_token")
        t = len(self.tokens) - 1
        w = window_start(t, self.model.cfg.context)
        zero = np.zeros_like(self.routes[0])
        if self._kv is not None and self._kv_window == (w, t - 1):
            # One new position: the window's earlier positions are cached (their inputs never change,
            # since position i reads the routes of token i-1, complete before i was predicted).
            prev = self.routes[t - 1] if t > 0 else zero
            state, logits = self.model.step(self.tokens[t], prev, t - w, self._kv)
        else:  # a new window: read it whole
            prev = np.stack([self.routes[i - 1] if i > 0 else zero for i in range(w, t + 1)])
            states, window_logits, self._kv = self.model.read_window(np.array(self.tokens[w : t + 1]), prev)
            state, logits = states[-1], window_logits[-1]
        self._kv_window = (w, t)
        self._encoded = state, logits
        probs = self.model.probabilities(logits).astype(np.float32)
        return probs if self.corrector is None else self.corrector.blend(probs)

    def read_prompt(self) -> None:
        """Every token so far has been routed (a prompt's step ended): read the window the next token will be
        predicted in, up to the last token, so that the next predict() extends it by one position instead of
        reading it whole. The read then happens at the prompt's step, which runs the model over all its tokens
        anyway, not at the first decode step, where it cost more host time than the rest of the step's policy."""
        t = len(self.tokens)  # the next token's position
        w = window_start(t, self.model.cfg.context)
        if t <= w or (self._kv is not None and self._kv_window == (w, t - 1)):
            return  # the next token starts a window of its own, or it is read already
        zero = np.zeros_like(self.routes[0])
        prev = np.stack([self.routes[i - 1] if i > 0 else zero for i in range(w, t)])
        _, _, self._kv = self.model.read_window(np.array(self.tokens[w:t]), prev)
        self._kv_window = (w, t - 1)

    def refine(self, layer_index: int, spec: list[int] | None = None) -> np.ndarray | None:
        """`spec`: gate speculation's experts for the layer, best first."""
        if self.model.layer_head is None or self._encoded is None:
            return None
        cfg = self.model.cfg
        state, logits = self._encoded
        routes = self.routes[-1].reshape(cfg.moe_layers, cfg.n_experts)
        hot = None
        if spec is not None:  # ranked_hot for one row, without its numpy calls (this runs for every layer)
            hot = np.zeros(cfg.n_experts, np.float32)
            k = len(spec)
            for rank, e in enumerate(spec):
                if 0 <= e < cfg.n_experts:
                    hot[e] = (k - rank) / k
        refined = self.model.refine(layer_index, state, logits, routes, hot)
        return self.model.probabilities(refined).astype(np.float32)


class LearnedSessions(SessionPredictor):
    """One LearnedSession per live request; a request's first step may bring its whole prompt."""

    def __init__(self, model: RouteTransformer, online: OnlineConfig | None = None, label: str = "learned") -> None:
        self.model = from_torch(model)  # one copy of the weights, shared by every request's session
        self.online = online
        self.label = label
        self.n_layers, self.n_experts = model.cfg.moe_layers, model.cfg.n_experts
        self._sessions: dict[RequestId, LearnedSession] = {}
        self._new: dict[RequestId, int] = {}  # tokens each request brought this step

    def step(self, tokens: Mapping[RequestId, Sequence[int]]) -> dict[RequestId, np.ndarray]:
        out = {}
        self._new = {}
        for rid, new in tokens.items():
            session = self._sessions.get(rid)
            if session is None:
                session = self._sessions[rid] = LearnedSession(self.model, self.online)
            for token in new:
                session.observe_token(token)
            self._new[rid] = len(new)
            if len(new) == 1:
                out[rid] = np.clip(session.predict(), 0.0, 1.0)
        return out

    def layer(
        self,
        layer: int,
        routes: Mapping[RequestId, np.ndarray],
        speculation: Mapping[RequestId, np.ndarray] | None = None,
    ) -> dict[RequestId, np.ndarray]:
        out = {}
        refine = self.model.layer_head is not None and layer + 1 < self.n_layers
        for rid, rows in routes.items():
            session = self._sessions[rid]
            for back, experts in zip(range(len(rows) - 1, -1, -1), rows):
                session.observe_route(layer, [int(e) for e in experts], back)
            if layer + 1 == self.n_layers and self._new.get(rid, 0) > 1:
                session.read_prompt()  # its routes are complete: read the window now, not at its next token
            if refine and self._new.get(rid) == 1:
                spec = None if speculation is None or rid not in speculation else speculation[rid].tolist()
                refined = session.refine(layer + 1, spec)
                if refined is not None:
                    out[rid] = np.clip(refined, 0.0, 1.0)
        return out

    def finish(self, request_ids: Iterable[RequestId]) -> None:
        for rid in request_ids:
            self._sessions.pop(rid, None)
            self._new.pop(rid, None)
