"""The learned routing predictor's network: a small causal transformer over tokens and their observed routes.

    input at position t   embedding(token t) + position + W_route @ multi_hot(routes of token t-1)
                          (all L x E layer-expert pairs of the previous token; zeros before the first)
    output at position t  logits [L, E] for token t's experts at every MoE layer, in one forward pass

Attention is causal, so position t sees tokens <= t and routes of tokens < t: exactly what a server knows
when token t enters the model. Checkpoints are safetensors + config.json, loaded without pickle.

Shapes: B = windows, T = positions, L = MoE layers, E = experts, D = d_model.

Not for: training (train.py), turning logits into per-request predictions (learned.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

LOSSES = ("bce", "softmax")


@dataclass(frozen=True)
class RouteModelConfig:
    moe_layers: int  # L
    n_experts: int  # E
    top_k: int
    vocab_size: int  # token-id table size; one extra embedding row is the unknown token
    hash_tokens: bool = False  # ids >= vocab_size share rows by id % vocab_size (huge vocabularies), else unknown
    d_model: int = 256
    n_layers: int = 2
    n_heads: int = 4
    context: int = 256  # longest window; longer sequences are read in half-overlapping windows
    dropout: float = 0.1
    loss: str = "bce"  # "bce": independent sigmoid per expert; "softmax": per-layer softmax scaled to top_k
    token_table: bool = True  # a per-token [L, E] logit table added to the output (see RouteTransformer)

    def __post_init__(self) -> None:
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss {self.loss!r}: one of {LOSSES}")
        if self.context < 2 or self.context % 2:
            raise ValueError("context must be an even number of at least 2")


class Block(nn.Module):
    def __init__(self, cfg: RouteModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.norm1, self.norm2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(), nn.Linear(4 * cfg.d_model, cfg.d_model)
        )
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if mask is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x)))


class RouteTransformer(nn.Module):
    """With `token_table`, logits = table[token] + head(transformer): the table holds what the token alone
    says about its routing (train.py starts it from the training counts), so the transformer only learns
    what context adds. Without it the d_model bottleneck learns token identity slowly: on the fine traces a
    plain per-token count table beat a 60 s transformer by 0.2 recall at the first MoE layer."""

    def __init__(self, cfg: RouteModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        routes = cfg.moe_layers * cfg.n_experts
        self.tok = nn.Embedding(cfg.vocab_size + 1, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.route_in = nn.Linear(routes, cfg.d_model, bias=False)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, routes)
        self.table = nn.Embedding(cfg.vocab_size + 1, routes) if cfg.token_table else None
        self.drop = nn.Dropout(cfg.dropout)
        # raw id -> embedding row; ids never seen in training point at the unknown row (set by train.py)
        self.register_buffer("token_map", torch.arange(cfg.vocab_size + 1))
        with torch.no_grad():  # start from the uniform marginal k/E instead of 1/2
            p = cfg.top_k / cfg.n_experts
            self.head.bias.fill_(float(np.log(p / (1 - p))) if cfg.loss == "bce" else 0.0)

    def rows(self, tokens: torch.Tensor) -> torch.Tensor:
        v = self.cfg.vocab_size
        idx = tokens % v if self.cfg.hash_tokens else tokens.clamp(0, v)
        return self.token_map[idx]

    def forward(
        self,
        tokens: torch.Tensor,  # [B, T] raw token ids
        prev_routes: torch.Tensor,  # [B, T, L*E] multi-hot routes of the token before each position
        positions: torch.Tensor | None = None,  # [B, T], default 0..T-1
        mask: torch.Tensor | None = None,  # [B, 1, T, T] bool, True = may attend; default causal
    ) -> torch.Tensor:  # [B, T, L, E] logits
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        rows = self.rows(tokens)
        x = self.drop(self.tok(rows) + self.pos(positions) + self.route_in(prev_routes))
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.norm(x))
        if self.table is not None:
            logits = logits + self.table(rows)
        return logits.view(b, t, self.cfg.moe_layers, self.cfg.n_experts)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """P(expert picked) from logits: sigmoid for BCE, k x softmax (capped at 1) for the softmax loss."""
        if self.cfg.loss == "bce":
            return torch.sigmoid(logits)
        return (self.cfg.top_k * torch.softmax(logits, -1)).clamp(max=1.0)


def save_model(model: RouteTransformer, directory: str | Path, meta: dict | None = None) -> None:
    """directory/model.safetensors + config.json (+ train.json: how it was trained, if given)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "expertflow-route-predictor"})
    (directory / "config.json").write_text(json.dumps(asdict(model.cfg), indent=2) + "\n")
    if meta is not None:
        (directory / "train.json").write_text(json.dumps(meta, indent=2) + "\n")


def load_model(directory: str | Path) -> RouteTransformer:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory}: no config.json (not a saved route predictor)")
    model = RouteTransformer(RouteModelConfig(**json.loads(config_path.read_text())))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()
