"""The MoE block: router, routed experts through the hot-expert cache, optional shared expert.

Shape legend: N = routed tokens, D = hidden, E = experts, K = experts per token,
F = expert FFN size, n = tokens of one expert.

Routed experts are executed grouped (all tokens of one expert in one GEMM) in whatever
order the cache makes them available. Each (token, k) result is written to its own
row and the rows are combined in a fixed order afterwards, so the output is
bit-identical whatever the cache budget, policy or arrival order.

Not for: deciding residency (expert_store) or the dense parts of a layer (layers.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from expert_store.device_cache import ExpertCache
from expertflow.layers import ACTIVATIONS, MLP
from expertflow.spec import MoESpec, RouterSpec


class RouteRecorder(Protocol):
    """Receives routing as it happens (for traces); the model never depends on what it does."""

    def on_route(self, layer: int, ids: torch.Tensor, scores: torch.Tensor) -> None: ...

    def on_attention_out(self, layer: int, h: torch.Tensor) -> None: ...


class Router(nn.Module):
    def __init__(self, spec: RouterSpec, hidden: int):
        super().__init__()
        self.spec = spec
        self.weight = nn.Parameter(torch.zeros(spec.n_experts, hidden))
        if spec.correction_bias:
            self.bias = nn.Parameter(torch.zeros(spec.n_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, K], combine weights [N, K], router scores of the picks [N, K]), float32."""
        s = self.spec
        logits = x.float() @ self.weight.float().t()  # N E
        scores = logits.softmax(-1) if s.scoring == "softmax" else logits.sigmoid()
        choice = scores + self.bias.float() if s.correction_bias else scores
        if s.group_select != "none":
            grouped = choice.view(-1, s.n_group, s.n_experts // s.n_group)
            if s.group_select == "max":
                group_scores = grouped.max(-1).values
            else:
                group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(s.topk_group, dim=-1).indices, 1.0)
            keep = keep.bool()[..., None].expand_as(grouped).reshape_as(choice)
            choice = choice.masked_fill(~keep, 0.0 if s.masked_fill_zero else float("-inf"))
        ids = choice.topk(s.top_k, dim=-1).indices  # N K
        picked = weights = scores.gather(1, ids)
        if s.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if s.scoring == "sigmoid" else 0.0))
        return ids, weights * s.scaling, picked


class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, layer: int, hidden: int, act: str):
        super().__init__()
        self.spec = spec
        self.layer = layer
        self.router = Router(spec.router, hidden)
        self.act = ACTIVATIONS[act]
        if spec.shared_ffn:
            self.shared = MLP(hidden, spec.shared_ffn, act)
        if spec.shared_gate:
            self.shared_gate = nn.Linear(hidden, 1, bias=False)
        self.cache: ExpertCache | None = None  # attached by the loader

    def forward(self, x: torch.Tensor, recorder: RouteRecorder | None = None) -> torch.Tensor:
        """x [N, D] (valid tokens only) -> [N, D]."""
        if self.cache is None:
            raise RuntimeError("MoE block has no expert cache attached")
        n, d = x.shape
        policy = self.cache.policy
        # Prefetches go out before this layer's routing is known, so they overlap the router
        # and every expert this layer finds resident.
        self.cache.before_route(self.layer)
        ids, weights, picked = self.router(x)  # N K
        if recorder is not None:
            recorder.on_route(self.layer, ids, picked)
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # (token, k) rows grouped by expert
        experts, counts = flat[order].unique_consecutive(return_counts=True)
        experts_list, counts_list = experts.tolist(), counts.tolist()
        rows_of = dict(zip(experts_list, order.split(counts_list)))
        policy.observe_route(self.layer, experts_list)
        self.cache.after_route(self.layer, experts_list)  # next-layer copies overlap this layer's experts
        rows_out = x.new_empty(n * k, d)
        for e, gate_up, down in self.cache.acquire(self.layer, experts_list):
            rows = rows_of[e]
            xe = x[rows // k]  # n D
            g, u = (xe @ gate_up.t()).chunk(2, dim=-1)  # n F each
            rows_out[rows] = (self.act(g) * u) @ down.t()
        y = (rows_out.view(n, k, d).float() * weights[..., None]).sum(1).to(x.dtype)
        if self.spec.shared_ffn:
            shared = self.shared(x)
            if self.spec.shared_gate:
                shared = torch.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        return y
