"""Dense building blocks shared by every family: RMSNorm, rotary embeddings, attention (GQA and MLA), MLP.

Shape legend: B = batch, T = new tokens, S = cached positions (keys), H = query heads,
K = key/value heads, Dh = head dim, D = hidden, R = MLA latent rank, P = rotary dims.

All of these stay resident on the compute device. Not for: routed experts (moe.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from expertflow.spec import AttentionSpec

ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "relu": F.relu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, scale: float, dtype: torch.dtype):
    """cos, sin [B, T, P] for positions [B, T]; frequencies repeated over both halves."""
    freqs = positions[..., None].float() * inv_freq.float()  # B T P/2
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [B, heads, T, P]. Interleaved pairs come out de-interleaved, identically for q and k."""
    cos, sin = cos[:, None], sin[:, None]
    if interleaved:
        half = x.shape[-1] // 2
        x1, x2 = x[..., 0::2], x[..., 1::2]
        c, s = cos[..., :half], sin[..., :half]
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Per-layer cache tensors [R, ..., S, ...], preallocated: one row per request slot, one column per position."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = tensors

    def write(self, cols: torch.Tensor, rows: torch.Tensor | None, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new entries [B, ..., T, ...] at columns cols [B, T] of cache rows `rows` [B] (None: rows 0..B-1)
        and return each row's entries up to the last column written, [B, ..., S, ...]."""
        b = cols.shape[0]
        index = torch.arange(b, device=cols.device) if rows is None else rows
        end = int(cols.max()) + 1
        out = {}
        for name, value in new.items():
            buf = self.t[name]
            # advanced indices around a slice: the indexed region is [B, T, <sliced>, last]
            buf[index[:, None], :, cols] = value.transpose(1, 2)
            out[name] = (buf[:b] if rows is None else buf[rows])[..., :end, :]
        return out


class Attention(nn.Module):
    """Grouped-query attention with optional qkv bias, q/k norms and qkv clipping."""

    def __init__(self, spec: AttentionSpec, hidden: int, eps: float):
        super().__init__()
        self.spec = spec
        h, k, d = spec.n_heads, spec.n_kv_heads, spec.head_dim
        self.q_proj = nn.Linear(hidden, h * d, bias=spec.qkv_bias)
        self.k_proj = nn.Linear(hidden, k * d, bias=spec.qkv_bias)
        self.v_proj = nn.Linear(hidden, k * d, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(h * d, hidden, bias=spec.out_bias)
        if spec.qk_norm == "per_head":
            self.q_norm, self.k_norm = RMSNorm(d, eps), RMSNorm(d, eps)
        elif spec.qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(h * d, eps), RMSNorm(k * d, eps)

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        shape = (batch, self.spec.n_kv_heads, length, self.spec.head_dim)
        return KVCache(
            {"k": torch.zeros(shape, dtype=dtype, device=device), "v": torch.zeros(shape, dtype=dtype, device=device)}
        )

    def forward(self, x, cos, sin, mask, cache: KVCache, cols, rows) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # B T H*Dh, B T K*Dh
        if s.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if s.clip_qkv is not None:
            q, k, v = (z.clamp(-s.clip_qkv, s.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, s.n_heads, s.head_dim)
        k = k.view(b, t, s.n_kv_heads, s.head_dim)
        if s.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # B H T Dh, B K T Dh
        v = v.view(b, t, s.n_kv_heads, s.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin, False), apply_rotary(k, cos, sin, False)
        kv = cache.write(cols, rows, k=k, v=v)  # B K S Dh
        out = F.scaled_dot_product_attention(q, kv["k"], kv["v"], attn_mask=mask, enable_gqa=s.n_heads != s.n_kv_heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLAttention(nn.Module):
    """DeepSeek multi-head latent attention; the cache holds the latent and the rotary key only."""

    def __init__(self, spec: AttentionSpec, hidden: int, eps: float):
        super().__init__()
        self.spec = spec
        h, qk = spec.n_heads, spec.qk_nope_dim + spec.qk_rope_dim
        if spec.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, h * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, spec.q_lora_rank, bias=spec.qkv_bias)
            self.q_a_norm = RMSNorm(spec.q_lora_rank, eps)
            self.q_b_proj = nn.Linear(spec.q_lora_rank, h * qk, bias=False)
        self.kv_a_proj = nn.Linear(hidden, spec.kv_lora_rank + spec.qk_rope_dim, bias=spec.qkv_bias)
        self.kv_a_norm = RMSNorm(spec.kv_lora_rank, eps)
        self.kv_b_proj = nn.Linear(spec.kv_lora_rank, h * (spec.qk_nope_dim + spec.v_head_dim), bias=False)
        self.o_proj = nn.Linear(h * spec.v_head_dim, hidden, bias=spec.out_bias)

    def new_cache(self, batch: int, length: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        s = self.spec
        return KVCache(
            {
                "latent": torch.zeros(batch, 1, length, s.kv_lora_rank, dtype=dtype, device=device),
                "k_rope": torch.zeros(batch, 1, length, s.qk_rope_dim, dtype=dtype, device=device),
            }
        )

    def forward(self, x, cos, sin, mask, cache: KVCache, cols, rows) -> torch.Tensor:
        s = self.spec
        b, t, _ = x.shape
        q = self.q_proj(x) if s.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x)))
        q = q.view(b, t, s.n_heads, -1).transpose(1, 2)  # B H T Dh
        q_nope, q_rope = q.split([s.qk_nope_dim, s.qk_rope_dim], dim=-1)
        latent, k_rope = self.kv_a_proj(x).split([s.kv_lora_rank, s.qk_rope_dim], dim=-1)  # B T R, B T P
        latent = self.kv_a_norm(latent)[:, None]  # B 1 T R
        q_rope = apply_rotary(q_rope, cos, sin, s.rope_interleaved)
        k_rope = apply_rotary(k_rope[:, None], cos, sin, s.rope_interleaved)  # B 1 T P
        kv = cache.write(cols, rows, latent=latent, k_rope=k_rope)
        n = kv["latent"].shape[2]
        kv_full = self.kv_b_proj(kv["latent"][:, 0]).view(b, n, s.n_heads, -1).transpose(1, 2)  # B H S nope+v
        k_nope, v = kv_full.split([s.qk_nope_dim, s.v_head_dim], dim=-1)
        k = torch.cat((k_nope, kv["k_rope"].expand(-1, s.n_heads, -1, -1)), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s.softmax_scale)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """Gated MLP: dense layers and shared experts."""

    def __init__(self, hidden: int, ffn: int, act: str):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.up_proj = nn.Linear(hidden, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, hidden, bias=False)
        self.act = ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
