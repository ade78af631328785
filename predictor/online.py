"""Online correction: the misprediction fallback of a request whose routing the model does not know.

Out of its training distribution the model's predictions can be worse than the plainest signal a server
has: which experts this very request used recently. The corrector keeps, per MoE layer, the request's
recency-weighted expert frequency (exponential decay, half-life `half_life` tokens) and blends it in:

    p = (1 - w_j) * p_model + w_j * p_own,      w_j = max_weight * sigmoid(gain * (r_own_j - r_model_j))

where r_model_j and r_own_j are moving averages of the recall@k each source had on this request's
recent tokens at layer j. The weight grows as the model's recent recall falls (and only when the
request's own frequency did better: blending in a worse source cannot help). It starts from r_model =
`prior_recall`, r_own = 0, so a fresh request trusts the model.

Not for: the model itself (model.py, learned.py); it works on any [L, E] probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class OnlineConfig:
    half_life: float = 16.0  # tokens; recency weighting of the request's own routes
    recall_half_life: float = 8.0  # tokens; how fast the recall estimates follow the request
    max_weight: float = 0.9
    gain: float = 10.0  # how sharply the weight moves with the recall difference
    prior_recall: float = 0.5  # the model's assumed recall before anything is observed


class OnlineCorrector:
    """One request's correction state; L = MoE layers, E = experts."""

    def __init__(self, config: OnlineConfig, n_layers: int, n_experts: int, top_k: int) -> None:
        self.config = config
        self.k = top_k
        self.decay = 0.5 ** (1.0 / config.half_life)
        self.recall_decay = 0.5 ** (1.0 / config.recall_half_life)
        self.counts = np.zeros((n_layers, n_experts), np.float64)  # decayed picks
        self.mass = np.zeros(n_layers, np.float64)  # decayed tokens observed
        self.r_model = np.full(n_layers, config.prior_recall)
        self.r_own = np.zeros(n_layers)
        self._top_model: np.ndarray | None = None  # [L, k] last prediction's top-k, to score on observe
        self._top_own: np.ndarray | None = None

    def own(self) -> np.ndarray:
        """[L, E] the request's recency-weighted P(expert picked) (rows sum to k once anything is seen)."""
        return self.counts / np.maximum(self.mass, 1e-12)[:, None]

    def weights(self) -> np.ndarray:
        cfg = self.config
        return cfg.max_weight / (1.0 + np.exp(-cfg.gain * (self.r_own - self.r_model)))

    def blend(self, model_probs: np.ndarray) -> np.ndarray:
        """[L, E] corrected probabilities for the next token; remembers both sources' top-k to score later."""
        own = self.own()
        k = self.k
        self._top_model = np.argpartition(-model_probs, k - 1, axis=-1)[:, :k]
        self._top_own = np.argpartition(-own, k - 1, axis=-1)[:, :k]
        w = np.where(self.mass > 0, self.weights(), 0.0)[:, None]
        return ((1.0 - w) * model_probs + w * own).astype(np.float32)

    def observe(self, layer: int, experts: np.ndarray | list[int]) -> None:
        """The token last predicted was routed to `experts` at `layer`: score both sources, then count it.
        `_update`'s arithmetic for one layer in plain Python: the live engine calls this for every layer of
        every token, where a dozen tiny numpy calls cost more than the work."""
        ids = [int(e) for e in experts]
        if self._top_model is not None:
            a = self.recall_decay
            top_model, top_own = set(self._top_model[layer].tolist()), set(self._top_own[layer].tolist())
            hit_model = sum(e in top_model for e in ids) / len(ids)
            hit_own = sum(e in top_own for e in ids) / len(ids) if self.mass[layer] > 0 else 0.0
            self.r_model[layer] = a * self.r_model[layer] + (1 - a) * hit_model
            self.r_own[layer] = a * self.r_own[layer] + (1 - a) * hit_own
        row = self.counts[layer]
        row *= self.decay
        self.mass[layer] = self.decay * self.mass[layer] + 1.0
        for e in ids:
            row[e] += 1.0

    def observe_all(self, experts: np.ndarray) -> None:
        """observe() of every layer at once: experts [L, K] (layers are independent, so the result is the same)."""
        self._update(np.arange(len(experts)), np.asarray(experts, np.int64))

    def _update(self, layers: np.ndarray, experts: np.ndarray) -> None:
        """layers [M], experts [M, K]."""
        if self._top_model is not None:
            a = self.recall_decay
            hit_model = (experts[:, :, None] == self._top_model[layers][:, None, :]).any(-1).mean(-1)
            hit_own = (experts[:, :, None] == self._top_own[layers][:, None, :]).any(-1).mean(-1)
            hit_own = np.where(self.mass[layers] > 0, hit_own, 0.0)  # an empty history ranks nothing
            self.r_model[layers] = a * self.r_model[layers] + (1 - a) * hit_model
            self.r_own[layers] = a * self.r_own[layers] + (1 - a) * hit_own
        self.counts[layers] *= self.decay
        self.mass[layers] = self.decay * self.mass[layers] + 1.0
        np.add.at(self.counts, (np.repeat(layers, experts.shape[1]), experts.ravel()), 1.0)


def correct_sequence(probs: np.ndarray, experts: np.ndarray, config: OnlineConfig) -> np.ndarray:
    """Replay a recorded sequence through a fresh corrector: probs [T, L, E], experts [T, L, K] -> [T, L, E]."""
    t, n_layers, n_experts = probs.shape
    corrector = OnlineCorrector(config, n_layers, n_experts, experts.shape[-1])
    out = np.empty_like(probs, dtype=np.float32)
    for i in range(t):
        out[i] = corrector.blend(probs[i])
        corrector.observe_all(experts[i])
    return out
