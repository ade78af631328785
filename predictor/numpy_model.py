"""The route predictor's inference in numpy: what a live session computes for every token and every layer.

The network is tiny (d_model 128-256, a handful of layers), so in torch a live step is mostly per-call
overhead: each module call and each small kernel cost several microseconds, and a step runs about a hundred
of them, on the engine's critical path. `step` is the same arithmetic as `RouteTransformer.encode` for one
position with its key/value cache, and `refine` as `LayerHead.one_layer`, on float32 numpy arrays copied once
from the trained model; a whole window (a prompt, every half context) is read by the torch model itself.
The tests hold the two equal. GELU uses an erf approximation good to 1.5e-7 (Abramowitz & Stegun
7.1.26); everything else is exact float32 arithmetic in another order.

Shapes: T = positions, L = MoE layers, E = experts, D = d_model, H = heads, dh = D / H, K = layer head width.

Not for: training or offline replay (model.py, learned.py run torch there, batched).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from predictor.model import RouteTransformer

_LN_EPS = 1e-5  # nn.LayerNorm's default


def _erf(x: np.ndarray) -> np.ndarray:
    """Abramowitz-Stegun 7.1.26. In place on its own temporaries (this runs for every token and layer, where
    numpy's per-call cost is most of the work); the operations and their order are those of
    s * (1 - ((((a5 t + a4) t + a3) t + a2) t + a1) t exp(-z z)), t = 1 / (1 + p z), z = |x|, s = sign(x)."""
    a1, a2, a3, a4, a5, p = 0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429, 0.3275911
    z = np.abs(x)
    t = p * z
    t += 1.0
    np.divide(1.0, t, out=t)
    y = a5 * t
    for a in (a4, a3, a2, a1):
        y += a
        y *= t
    z *= z  # exp(-z z): (-z) z and -(z z) are the same number
    np.negative(z, out=z)
    np.exp(z, out=z)
    y *= z
    np.subtract(1.0, y, out=y)
    y *= np.sign(x)
    return y


def gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x * (1.0 / math.sqrt(2.0))))


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """nn.LayerNorm's arithmetic, as x.mean() would do it (a float32 sum, divided by the count) without its
    per-call overhead."""
    n = x.shape[-1]
    centred = x - np.add.reduce(x, -1, keepdims=True) / n
    var = np.add.reduce(centred * centred, -1, keepdims=True) / n
    return centred / np.sqrt(var + _LN_EPS) * weight + bias


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class NumpyRouteModel:
    """A trained RouteTransformer's weights as numpy arrays, and its inference for one request."""

    def __init__(self, model: RouteTransformer) -> None:
        self.model = model  # for window reads
        self.device = model.token_map.device
        self.cfg = cfg = model.cfg
        w = {k: v.detach().float().cpu().numpy() for k, v in model.state_dict().items()}
        self.token_map = w["token_map"].astype(np.int64)
        self.tok, self.pos = w["tok.weight"], w["pos.weight"]
        self.route_in = w["route_in.weight"].T.copy()  # [L*E, D]
        self.blocks = [
            dict(
                n1=(w[f"blocks.{i}.norm1.weight"], w[f"blocks.{i}.norm1.bias"]),
                n2=(w[f"blocks.{i}.norm2.weight"], w[f"blocks.{i}.norm2.bias"]),
                qkv=(w[f"blocks.{i}.qkv.weight"].T.copy(), w[f"blocks.{i}.qkv.bias"]),
                proj=(w[f"blocks.{i}.proj.weight"].T.copy(), w[f"blocks.{i}.proj.bias"]),
                fc1=(w[f"blocks.{i}.mlp.0.weight"].T.copy(), w[f"blocks.{i}.mlp.0.bias"]),
                fc2=(w[f"blocks.{i}.mlp.2.weight"].T.copy(), w[f"blocks.{i}.mlp.2.bias"]),
            )
            for i in range(cfg.n_layers)
        ]
        self.norm = (w["norm.weight"], w["norm.bias"])
        self.head = (w["head.weight"].T.copy(), w["head.bias"])
        self.table = w.get("table.weight")
        self.layer_head = None
        if model.layer_head is not None:
            h = "layer_head."
            cross = w.get(h + "cross")
            self.layer_head = dict(
                down=(w[h + "down.weight"].T.copy(), w[h + "down.bias"]),
                layer=w[h + "layer"],  # [L, K]
                earlier=w[h + "earlier"],  # [L, E, K]
                last=w[h + "last.weight"].T.copy(),  # [E, K]
                spec=w[h + "spec.weight"].T.copy(),
                base=w[h + "base.weight"].T.copy(),
                spec_gain=w[h + "spec_gain"],
                rank_gain=w[h + "rank_gain"],
                fc1=(w[h + "mlp.1.weight"].T.copy(), w[h + "mlp.1.bias"]),
                fc2=(w[h + "mlp.3.weight"].T.copy(), w[h + "mlp.3.bias"]),
                cross=cross,  # [L, L, E, E] or None
            )

    def _rows(self, tokens: np.ndarray) -> np.ndarray:
        v = self.cfg.vocab_size
        idx = tokens % v if self.cfg.hash_tokens else np.clip(tokens, 0, v)
        return self.token_map[idx]

    def read_window(self, tokens: np.ndarray, prev_routes: np.ndarray) -> tuple[np.ndarray, np.ndarray, list]:
        """A whole window at once: tokens [T], prev_routes [T, L*E] -> (state [T, D], logits [T, L, E], each
        block's (keys, values) [H, T, dh]). Batched, so in torch, through the model itself: numpy's BLAS would
        run a matrix this size on its own threads, which then spin against torch's on a small machine."""
        kv: list = [None] * self.cfg.n_layers
        with torch.inference_mode():
            state, logits = self.model.encode(
                torch.from_numpy(tokens[None]).to(self.device),
                torch.from_numpy(prev_routes[None]).to(self.device),
                kv=kv,
            )
        return (
            state[0].float().cpu().numpy(),
            logits[0].float().cpu().numpy(),
            [(k[0].float().cpu().numpy(), v[0].float().cpu().numpy()) for k, v in kv],
        )

    def step(self, token: int, prev_route: np.ndarray, position: int, kv: list) -> tuple[np.ndarray, np.ndarray]:
        """One new position after those cached in `kv` (each block's (keys, values) [H, T, dh], extended in
        place): token, prev_route [L*E] -> (state [D], logits [L, E])."""
        cfg = self.cfg
        d, heads = cfg.d_model, cfg.n_heads
        dh = d // heads
        row = self._rows(np.array([token]))[0]
        x = self.tok[row] + self.pos[position] + prev_route @ self.route_in  # D
        for i, b in enumerate(self.blocks):
            qkv = layer_norm(x, *b["n1"]) @ b["qkv"][0] + b["qkv"][1]  # 3D
            q, k, v = (qkv[j * d : (j + 1) * d].reshape(heads, 1, dh) for j in range(3))
            k = np.concatenate([kv[i][0], k], 1)  # H T dh
            v = np.concatenate([kv[i][1], v], 1)
            kv[i] = (k, v)
            scores = (q @ k.transpose(0, 2, 1))[:, 0] * (1.0 / math.sqrt(dh))  # H T
            scores = np.exp(scores - np.maximum.reduce(scores, -1, keepdims=True))  # .max() less its wrapper
            att = (scores / np.add.reduce(scores, -1, keepdims=True))[:, None] @ v  # H 1 dh
            x = x + att.reshape(d) @ b["proj"][0] + b["proj"][1]
            hidden = gelu(layer_norm(x, *b["n2"]) @ b["fc1"][0] + b["fc1"][1])
            x = x + hidden @ b["fc2"][0] + b["fc2"][1]
        x = layer_norm(x, *self.norm)
        logits = (x @ self.head[0] + self.head[1]).reshape(cfg.moe_layers, cfg.n_experts)
        if self.table is not None:
            logits = logits + self.table[row].reshape(logits.shape)
        return x, logits

    def probabilities(self, logits: np.ndarray) -> np.ndarray:
        if self.cfg.loss == "bce":
            return sigmoid(logits)
        z = np.exp(logits - logits.max(-1, keepdims=True))
        return np.minimum(self.cfg.top_k * z / z.sum(-1, keepdims=True), 1.0)

    def refine(
        self, j: int, state: np.ndarray, logits: np.ndarray, routes: np.ndarray, spec: np.ndarray | None
    ) -> np.ndarray:
        """Layer j's logits [E] of one token: state [D], logits and routes [L, E] (routes of layers < j read),
        spec [E] (ranked_hot) or None. LayerHead.one_layer's arithmetic."""
        h = self.layer_head
        u = state @ h["down"][0] + h["down"][1] + h["layer"][j] + sigmoid(logits[j]) @ h["base"]
        out = logits[j]
        if j > 0:
            u = u + np.einsum("ie,ieh->h", routes[:j], h["earlier"][:j]) + routes[j - 1] @ h["last"]
            if h["cross"] is not None:
                out = out + np.einsum("ie,ief->f", routes[:j], h["cross"][j, :j])
        boost = 0.0
        if spec is not None:
            u = u + spec @ h["spec"]
            boost = h["spec_gain"][j] * (spec > 0) + h["rank_gain"][j] * spec
        hidden = gelu(gelu(u) @ h["fc1"][0] + h["fc1"][1])
        return out + hidden @ h["fc2"][0] + h["fc2"][1] + boost


def from_torch(model: RouteTransformer) -> NumpyRouteModel:
    with torch.no_grad():
        return NumpyRouteModel(model)
