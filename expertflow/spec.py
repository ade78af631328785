"""The one internal description of a supported MoE transformer, filled in by a family file.

Every family (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3) reduces to this
spec plus a tensor-name mapping; the model code reads only the spec, never a
Hugging Face config.

Not for: loading tensors (loader) or running anything (model).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from expert_store.keys import ExpertSpace
from expert_store.layout import ExpertTensorNames


@dataclass(frozen=True)
class AttentionSpec:
    kind: Literal["gqa", "mla"]
    n_heads: int
    n_kv_heads: int  # gqa only; mla expands to n_heads
    head_dim: int  # gqa: q/k/v head size; mla: qk_nope + qk_rope
    qkv_bias: bool = False
    out_bias: bool = False
    qk_norm: Literal["none", "per_head", "full"] = "none"
    clip_qkv: float | None = None
    # MLA (DeepSeek): low-rank q and kv with a decoupled rotary part
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_dim: int = 0
    qk_rope_dim: int = 0
    v_head_dim: int = 0
    rope_interleaved: bool = False  # rotary pairs are (x0, x1), (x2, x3), ... instead of halves
    softmax_scale: float = 0.0


@dataclass(frozen=True)
class RouterSpec:
    n_experts: int
    top_k: int
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk: bool = False
    # group-limited routing (DeepSeek): keep the best `topk_group` of `n_group` groups
    group_select: Literal["none", "max", "top2_sum"] = "none"
    n_group: int = 1
    topk_group: int = 1
    correction_bias: bool = False  # DeepSeek-V3 e_score_correction_bias, used for choice only
    scaling: float = 1.0
    masked_fill_zero: bool = False  # V2 zeroes dropped groups' scores instead of -inf


@dataclass(frozen=True)
class MoESpec:
    router: RouterSpec
    expert_ffn: int
    shared_ffn: int = 0  # 0: no shared expert
    shared_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert's output


@dataclass(frozen=True)
class LayerSpec:
    moe: MoESpec | None  # None: a dense MLP layer
    dense_ffn: int = 0


@dataclass(frozen=True)
class ModelSpec:
    family: str
    vocab_size: int
    hidden: int
    attention: AttentionSpec
    layers: tuple[LayerSpec, ...]
    rms_eps: float
    max_positions: int
    act: str
    tie_embeddings: bool
    inv_freq: torch.Tensor = field(compare=False, repr=False)  # rotary inverse frequencies
    rope_scale: float = 1.0  # multiplies cos/sin (YaRN attention factor)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    dtype: torch.dtype = torch.float32

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.layers) if layer.moe is not None]

    @property
    def experts(self) -> ExpertSpace:
        """The routed experts' key space: MoE layer index <-> model layer number, experts per layer."""
        routers = {(ls.moe.router.n_experts, ls.moe.router.top_k) for ls in self.layers if ls.moe is not None}
        if not routers:
            raise ValueError("the model has no MoE layer")
        if len(routers) != 1:
            raise ValueError(f"MoE layers with different expert counts or top-k ({sorted(routers)}) are not supported")
        (n_experts, top_k), = routers
        return ExpertSpace.of(self.moe_layers, n_experts, top_k)


@dataclass(frozen=True)
class Family:
    """What a family file provides."""

    name: str
    architectures: tuple[str, ...]
    build_spec: object  # Callable[[PretrainedConfig], ModelSpec]
    checkpoint_name: object  # Callable[[str], str]: internal parameter name -> checkpoint name
    expert_names: object  # Callable[[int, int], ExpertTensorNames]


def expert_names_for(prefix: str, gate: str, up: str, down: str):
    """Per-expert tensor names of the usual `{prefix}.{e}.{proj}.weight` form."""

    def names(layer: int, expert: int) -> ExpertTensorNames:
        p = prefix.format(layer=layer, expert=expert)
        return ExpertTensorNames(f"{p}.{gate}.weight", f"{p}.{up}.weight", f"{p}.{down}.weight")

    return names
