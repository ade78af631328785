"""One MoE decoder for every supported family, read top to bottom.

    h   = x + attn(attn_norm(x))
    out = h + (moe or mlp)(mlp_norm(h))

Shape legend: B = batch, T = new tokens this step, S = cache length, D = hidden,
V = vocab, N = tokens that still need computing (not padding, not finished).

Each request of a batch owns a row of the KV cache. A step's tokens write the columns
`cols[b, t]` of their row; `first[b]` is the row's first column (its position 0), so a
left-padded batch (every row writing the same columns) and a continuous batch (each row at
its own length, rows joining and leaving) run the same code. Keys at columns first[b]..cols[b, t]
are visible to token t; short rows of a step are padded at the end (compute False).

Not for: sampling or the request loop (engine.py), loading weights (loader.py).
"""

from __future__ import annotations

import torch
from torch import nn

from expertflow.layers import MLP, Attention, KVCache, MLAttention, RMSNorm, rotary_cos_sin
from expertflow.moe import ForwardHooks, MoEBlock
from expertflow.spec import LayerSpec, ModelSpec


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer_spec: LayerSpec, index: int):
        super().__init__()
        self.index = index
        attn_cls = MLAttention if spec.attention.kind == "mla" else Attention
        self.attn_norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.attn = attn_cls(spec.attention, spec.hidden, spec.rms_eps)
        self.mlp_norm = RMSNorm(spec.hidden, spec.rms_eps)
        if layer_spec.moe is not None:
            self.moe = MoEBlock(layer_spec.moe, spec.experts.index(index), spec.hidden, spec.act)
        else:
            self.mlp = MLP(spec.hidden, layer_spec.dense_ffn, spec.act)

    def forward(self, x, cos, sin, mask, cache: KVCache, cols, rows, compute, hooks: ForwardHooks | None):
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, cols, rows)
        if hooks is not None:
            hooks.on_attention_out(self.index, h[compute])
        y = self.mlp_norm(h)
        if hasattr(self, "mlp"):
            return h + self.mlp(y)
        # Only tokens that need an output go through the experts: padding and finished
        # requests would otherwise pull experts in for nothing.
        out = torch.zeros_like(y)
        out[compute] = self.moe(y[compute], hooks)  # N D
        return h + out


class MoETransformer(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.embed = nn.Embedding(spec.vocab_size, spec.hidden)
        self.layers = nn.ModuleList(Block(spec, ls, i) for i, ls in enumerate(spec.layers))
        self.norm = RMSNorm(spec.hidden, spec.rms_eps)
        self.lm_head = nn.Linear(spec.hidden, spec.vocab_size, bias=False)
        self.register_buffer("inv_freq", spec.inv_freq.clone(), persistent=False)
        self._next_moe = dict(zip(spec.moe_layers, spec.moe_layers[1:]))

    def speculate(self, layer: int, h: torch.Tensor) -> tuple[int, torch.Tensor] | None:
        """Next-layer gate speculation: the next MoE layer's router on model layer `layer`'s post-attention
        state h [N, D]; (that MoE layer's index, its top-k ids [N, K]), or None after the last MoE layer."""
        nxt = self._next_moe.get(layer)
        if nxt is None:
            return None
        block = self.layers[nxt]
        return block.moe.index, block.moe.router.select(block.mlp_norm(h))[0]

    def new_caches(self, batch: int, length: int) -> list[KVCache]:
        p = self.embed.weight
        return [blk.attn.new_cache(batch, length, p.dtype, p.device) for blk in self.layers]

    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,  # B T
        caches: list[KVCache],
        cols: torch.Tensor,  # B T: the cache column each token writes
        first: torch.Tensor,  # B: each row's first column (position 0)
        compute: torch.Tensor,  # B T bool: positions whose outputs matter
        hooks: ForwardHooks | None = None,
        rows: torch.Tensor | None = None,  # B: the cache rows of the batch (None: rows 0..B-1)
        last: torch.Tensor | None = None,  # B: only this position of each row goes through the LM head
    ) -> torch.Tensor:
        """Logits [B, T, V] for the new tokens, or [B, V] at `last`."""
        b, t = tokens.shape
        device = tokens.device
        positions = (cols - first[:, None]).clamp(min=0)  # B T
        keys = torch.arange(int(cols.max()) + 1, device=device)  # S
        allowed = (keys[None, None, :] <= cols[:, :, None]) & (keys[None, None, :] >= first[:, None, None])  # B T S
        # A padding query sees no key at all; let it see itself so softmax stays finite.
        allowed |= keys[None, None, :] == cols[:, :, None]
        mask = allowed[:, None]  # B 1 T S
        x = self.embed(tokens)  # B T D
        cos, sin = rotary_cos_sin(positions, self.inv_freq, self.spec.rope_scale, x.dtype)
        for blk, cache in zip(self.layers, caches):
            x = blk(x, cos, sin, mask, cache, cols, rows, compute, hooks)
        if last is not None:
            x = x[torch.arange(b, device=device), last]  # B D
        return self.lm_head(self.norm(x))
