"""The learned routing predictor's network: a small causal transformer over tokens and their observed routes.

    input at position t   embedding(token t) + position + W_route @ multi_hot(routes of token t-1)
                          (all L x E layer-expert pairs of the previous token; zeros before the first)
    output at position t  logits [L, E] for token t's experts at every MoE layer, in one forward pass

Attention is causal, so position t sees tokens <= t and routes of tokens < t: exactly what a server knows
when token t enters the model (the "token horizon").

The layer head refines layer j's logits once token t has run MoE layers < j (the "layer horizon", what
next-layer gate speculation sees): it adds, per layer, a small MLP over the transformer's state, the
token's own routes at layers < j (the last one also on its own), a linear map from each earlier layer's
routes (one E x E map per pair of layers i < j), and, where the server computes it,
gate speculation's top-k for layer j, best first (layer j's router on layer j-1's hidden state; given as
(K - rank) / K per listed expert, zeros when absent).
All L refinements come out of the same pass as the token-horizon logits.

Checkpoints are safetensors + config.json, loaded without pickle.

Shapes: B = windows, T = positions, L = MoE layers, E = experts, D = d_model, H = layer_dim.

Not for: training (train.py), turning logits into per-request predictions (learned.py).
"""

from __future__ import annotations

import json
import math
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
    layer_dim: int = 128  # H: width of the layer-horizon head; 0 = no layer head
    cross_layers: bool = True  # the layer head's per layer-pair route transitions (L x L x E x E weights)

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
        return self.cached(x, mask)[0]

    def cached(
        self, x: torch.Tensor, mask: torch.Tensor | None, past: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Also returns this block's keys and values [B, heads, T, dh]. With `past` (the keys and values of
        the positions before), x holds one new position, which attends to all of them and to itself."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            if t != 1:
                raise ValueError("a cached step takes one new position")
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
            att = F.scaled_dot_product_attention(q, k, v)
        elif mask is None:
            att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.drop(self.proj(att.transpose(1, 2).reshape(b, t, d)))
        return x + self.drop(self.mlp(self.norm2(x))), (k, v)


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
        self.layer_head = LayerHead(cfg) if cfg.layer_dim else None
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
        return self.encode(tokens, prev_routes, positions, mask)[1]

    def encode(
        self,
        tokens: torch.Tensor,
        prev_routes: torch.Tensor,
        positions: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        table_logits: torch.Tensor | None = None,  # [B, T, L, E] in place of the table's rows (training)
        kv: list | None = None,  # per block: (keys, values) of the positions before, or None; updated in place
    ) -> tuple[torch.Tensor, torch.Tensor]:  # state [B, T, D], token-horizon logits [B, T, L, E]
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        if kv is not None and mask is not None:
            raise ValueError("encode: a key/value cache runs causal windows only, without a mask")
        rows = self.rows(tokens)
        x = self.drop(self.tok(rows) + self.pos(positions) + self.route_in(prev_routes))
        for i, block in enumerate(self.blocks):
            if kv is None:
                x = block(x, mask)
            else:  # keep (or extend) each block's keys and values for the next step
                x, kv[i] = block.cached(x, None, kv[i])
        x = self.norm(x)
        logits = self.head(x).view(b, t, self.cfg.moe_layers, self.cfg.n_experts)
        if table_logits is not None:
            logits = logits + table_logits
        elif self.table is not None:
            logits = logits + self.table(rows).view_as(logits)
        return x, logits

    def refine(
        self,
        state: torch.Tensor,  # [..., D] from encode
        logits: torch.Tensor,  # [..., L, E] token-horizon logits from encode
        routes: torch.Tensor,  # [..., L, E] multi-hot of the token's own routes (only layers < j are read for j)
        spec: torch.Tensor | None = None,  # [..., L, E] gate speculation per layer (ranked_hot), zeros = absent
    ) -> torch.Tensor:  # [..., L, E] layer-horizon logits
        if self.layer_head is None:
            raise ValueError("this route predictor was trained without a layer head")
        return self.layer_head(state, logits, routes, spec)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """P(expert picked) from logits: sigmoid for BCE, k x softmax (capped at 1) for the softmax loss."""
        if self.cfg.loss == "bce":
            return torch.sigmoid(logits)
        return (self.cfg.top_k * torch.softmax(logits, -1)).clamp(max=1.0)


class LayerHead(nn.Module):
    """Layer j's logits given the token's routes at layers < j: logits_j + MLP(state, layer j, those
    routes, speculation for j) + the layer-pair maps of those routes + speculation's boost. Inputs for layer j
    never read routes of layers >= j (exclusive sums, a strictly lower-triangular mask)."""

    def __init__(self, cfg: RouteModelConfig) -> None:
        super().__init__()
        h, n_layers, e = cfg.layer_dim, cfg.moe_layers, cfg.n_experts
        self.down = nn.Linear(cfg.d_model, h)
        self.layer = nn.Parameter(torch.zeros(n_layers, h))
        self.earlier = nn.Parameter(torch.randn(n_layers, e, h) / math.sqrt(e))  # route of layer i, for every later j
        self.last = nn.Linear(e, h, bias=False)  # route of layer j-1, on its own
        self.spec = nn.Linear(e, h, bias=False)
        self.base = nn.Linear(e, h, bias=False)  # the token-horizon probabilities of layer j
        # Speculation also goes straight to the logits with a per-layer gain: through the MLP alone the head
        # learned to trust it less than speculation deserves (below speculation's own recall in deep layers).
        # The boost is spec_gain for any listed expert plus rank_gain x (K - rank) / K.
        self.spec_gain = nn.Parameter(torch.full((n_layers,), 1.0))  # log-odds; learned from there
        self.rank_gain = nn.Parameter(torch.full((n_layers,), 1.0))
        self.mlp = nn.Sequential(nn.GELU(), nn.Linear(h, 2 * h), nn.GELU(), nn.Linear(2 * h, e))
        nn.init.zeros_(self.mlp[-1].weight)  # start as the token-horizon prediction
        nn.init.zeros_(self.mlp[-1].bias)
        # cross[j, i, e, f]: how expert e at layer i < j moves layer j's expert f, straight to the logits. The
        # summed embeddings above share one code per source layer across all later layers; on DeepSeek-V2-Lite
        # that head added 0.03 recall over the token horizon, while a linear map per layer pair alone reaches
        # 0.66 from the earlier routes. Entries with i >= j are masked.
        if cfg.cross_layers:
            self.cross = nn.Parameter(torch.zeros(n_layers, n_layers, e, e))
            self.register_buffer(
                "before_mask", torch.tril(torch.ones(n_layers, n_layers), -1)[..., None, None], persistent=False
            )
        else:
            self.cross = None

    def forward(
        self, state: torch.Tensor, logits: torch.Tensor, routes: torch.Tensor, spec: torch.Tensor | None
    ) -> torch.Tensor:
        per_layer = torch.einsum("...le,leh->...lh", routes, self.earlier)
        shifted = torch.cat([torch.zeros_like(per_layer[..., :1, :]), per_layer[..., :-1, :]], -2)
        before = torch.cumsum(shifted, -2)  # [..., L, H]: sum over layers < j
        last = torch.cat([torch.zeros_like(routes[..., :1, :]), routes[..., :-1, :]], -2)
        u = self.down(state).unsqueeze(-2) + self.layer + before + self.last(last)
        u = u + self.base(torch.sigmoid(logits.detach()))
        if self.cross is not None:
            logits = logits + torch.einsum("...ie,jief->...jf", routes, self.cross * self.before_mask)
        if spec is None:
            return logits + self.mlp(u)
        boost = self.spec_gain[:, None] * (spec > 0) + self.rank_gain[:, None] * spec
        return logits + self.mlp(u + self.spec(spec)) + boost

    def one_layer(
        self, j: int, state: torch.Tensor, logits: torch.Tensor, routes: torch.Tensor, spec: torch.Tensor | None
    ) -> torch.Tensor:
        """forward(...)[..., j, :] for one token at a time (state [D], logits and routes [L, E], spec [E]),
        computing layer j only: what a live session needs as each layer is about to route."""
        u = self.down(state) + self.layer[j] + self.base(torch.sigmoid(logits[j]))
        out = logits[j]
        if j > 0:
            u = u + torch.einsum("ie,ieh->h", routes[:j], self.earlier[:j]) + self.last(routes[j - 1])
            if self.cross is not None:
                out = out + torch.einsum("ie,ief->f", routes[:j], self.cross[j, :j])
        if spec is None:
            return out + self.mlp(u)
        boost = self.spec_gain[j] * (spec > 0) + self.rank_gain[j] * spec
        return out + self.mlp(u + self.spec(spec)) + boost


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
    fields = json.loads(config_path.read_text())
    fields.setdefault("layer_dim", 0)  # saved before the layer head existed
    fields.setdefault("cross_layers", False)  # saved before the layer-pair transitions existed
    model = RouteTransformer(RouteModelConfig(**fields))
    model.load_state_dict(load_file(str(directory / "model.safetensors")))
    return model.eval()
