"""The MoE block: router, routed experts through the hot-expert cache, optional shared expert.

Shape legend: N = routed tokens, D = hidden, E = experts, K = experts per token,
F = expert FFN size, n = tokens of one expert.

Routed experts are executed grouped (all tokens of one expert in one GEMM) in whatever
order the cache makes them available. Each (token, k) result is written to its own
row and the rows are combined in a fixed order afterwards, so the output is
bit-identical whatever the cache budget, policy or arrival order.

Per forward the block asks the cache for its routed experts (`demand`, so misses go to the
copy stream first), runs them as the cache yields them, then tells the caller's hooks (the
engine plans the next prefetches there, while the device computes this layer). It knows its MoE layer index, the key space
every expert store, cache and prefetcher uses.

Not for: deciding residency or prefetches (expert_store, orchestrator) or the dense parts of a
layer (layers.py).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from expert_store.device_cache import ExpertCache
from expertflow.layers import ACTIVATIONS, MLP
from expertflow.spec import MoESpec, RouterSpec


class ForwardHooks(Protocol):
    """Told what a forward pass does as it happens (the engine's prefetching, trace recording); the
    model never depends on what it does."""

    def on_attention_out(self, layer: int, h: torch.Tensor) -> None:
        """Model layer `layer`'s post-attention state h [N, D] of the tokens that compute."""

    def on_route(self, moe_layer: int, ids: torch.Tensor, scores: torch.Tensor) -> None:
        """MoE layer `moe_layer` (index) routed: ids [N, K] (on the host), router scores [N, K] (on the device);
        its experts' work is issued (on a GPU it may still be running: reading `scores` waits for it)."""


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
        ids, scores = self.select(x)
        picked = weights = scores.gather(1, ids)
        if s.norm_topk:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if s.scoring == "sigmoid" else 0.0))
        return ids, weights * s.scaling, picked

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, D] -> (expert ids [N, K], every expert's router score [N, E]): the choice alone, which is all that
        gate speculation needs (the engine runs it for every layer of every decode step)."""
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
        return choice.topk(s.top_k, dim=-1).indices, scores  # N K, N E


class MoEBlock(nn.Module):
    def __init__(self, spec: MoESpec, index: int, hidden: int, act: str):
        super().__init__()
        self.spec = spec
        self.index = index  # MoE layer index: the layer of this block's ExpertKeys
        self.router = Router(spec.router, hidden)
        self.act = ACTIVATIONS[act]
        if spec.shared_ffn:
            self.shared = MLP(hidden, spec.shared_ffn, act)
        if spec.shared_gate:
            self.shared_gate = nn.Linear(hidden, 1, bias=False)
        self.cache: ExpertCache | None = None  # attached by the loader

    def forward(self, x: torch.Tensor, hooks: ForwardHooks | None = None) -> torch.Tensor:
        """x [N, D] (valid tokens only) -> [N, D]."""
        if self.cache is None:
            raise RuntimeError("MoE block has no expert cache attached")
        n, d = x.shape
        ids, weights, picked = self.router(x)  # N K
        k = ids.shape[1]
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)  # (token, k) rows grouped by expert
        experts, counts = flat[order].unique_consecutive(return_counts=True)
        experts_list, counts_list = experts.tolist(), counts.tolist()
        # The host has waited for the routing already; read the ids now too, while the device has nothing
        # queued behind them: read later, they would wait for this layer's experts (and their copies).
        ids_host = ids.cpu() if hooks is not None else ids
        rows_of = dict(zip(experts_list, order.split(counts_list)))
        self.cache.demand(self.index, experts_list)  # misses go to the copy stream before anything else
        rows_out = x.new_empty(n * k, d)
        for e, gate_up, down in self.cache.acquire(self.index, experts_list):
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
        # Told once this layer's work is issued: on a GPU the caller's host work (planning the next layers'
        # copies) then overlaps this layer's expert compute instead of delaying it.
        if hooks is not None:
            hooks.on_route(self.index, ids_host, picked)
        return y
