"""DeepSeek-V2 and V3: MLA attention, dense first layers, shared plus fine-grained routed experts.

V2 routes by softmax, optionally group-limited by each group's best expert
(`group_limited_greedy`). V3 routes by sigmoid with a correction bias used only for
the choice, groups ranked by their two best experts, weights renormalised.
Both scale routed weights by `routed_scaling_factor`.
"""

from __future__ import annotations

import math

from expertflow.families.common import COMMON_RENAMES, model_spec, namer
from expertflow.spec import AttentionSpec, Family, LayerSpec, ModelSpec, MoESpec, RouterSpec, expert_names_for


def _softmax_scale(config, qk_head_dim: int) -> float:
    scale = qk_head_dim**-0.5
    params = getattr(config, "rope_parameters", None) or {}
    mscale_all_dim = params.get("mscale_all_dim", 0)
    if params.get("rope_type", "default") != "default" and mscale_all_dim and params.get("factor", 1) > 1:
        mscale = 0.1 * mscale_all_dim * math.log(params["factor"]) + 1.0
        scale *= mscale * mscale
    return scale


def _spec(config, v3: bool) -> ModelSpec:
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if v3:
        router = RouterSpec(
            n_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            scoring="sigmoid",
            norm_topk=bool(config.norm_topk_prob),
            group_select="top2_sum",
            n_group=config.n_group,
            topk_group=config.topk_group,
            correction_bias=True,
            scaling=config.routed_scaling_factor,
        )
    else:
        grouped = getattr(config, "topk_method", "greedy") == "group_limited_greedy"
        router = RouterSpec(
            n_experts=config.n_routed_experts,
            top_k=config.num_experts_per_tok,
            group_select="max" if grouped else "none",
            n_group=config.n_group if grouped else 1,
            topk_group=config.topk_group if grouped else 1,
            scaling=config.routed_scaling_factor,
            masked_fill_zero=True,
        )
    shared = config.moe_intermediate_size * (config.n_shared_experts or 0)
    moe = MoESpec(router, expert_ffn=config.moe_intermediate_size, shared_ffn=shared)
    attention = AttentionSpec(
        "mla",
        n_heads=config.num_attention_heads,
        n_kv_heads=config.num_attention_heads,
        head_dim=qk_head_dim,
        qkv_bias=bool(getattr(config, "attention_bias", False)),
        out_bias=bool(getattr(config, "attention_bias", False)),
        q_lora_rank=config.q_lora_rank,
        kv_lora_rank=config.kv_lora_rank,
        qk_nope_dim=config.qk_nope_head_dim,
        qk_rope_dim=config.qk_rope_head_dim,
        v_head_dim=config.v_head_dim,
        rope_interleaved=bool(getattr(config, "rope_interleave", True)) if v3 else True,
        softmax_scale=_softmax_scale(config, qk_head_dim),
    )
    layers = tuple(
        LayerSpec(moe) if i >= config.first_k_dense_replace else LayerSpec(None, dense_ffn=config.intermediate_size)
        for i in range(config.num_hidden_layers)
    )
    return model_spec(config, "deepseek_v3" if v3 else "deepseek_v2", attention, layers, config.qk_rope_head_dim)


_RENAMES = (
    *COMMON_RENAMES,
    (".moe.router.bias", ".mlp.gate.e_score_correction_bias"),
    (".moe.router.", ".mlp.gate."),
    (".moe.shared.", ".mlp.shared_experts."),
    (".q_a_norm.", ".q_a_layernorm."),
    (".kv_a_proj.", ".kv_a_proj_with_mqa."),
    (".kv_a_norm.", ".kv_a_layernorm."),
)
_EXPERTS = expert_names_for("model.layers.{layer}.mlp.experts.{expert}", "gate_proj", "up_proj", "down_proj")

DEEPSEEK_V2 = Family("deepseek_v2", ("DeepseekV2ForCausalLM",), lambda c: _spec(c, v3=False), namer(_RENAMES), _EXPERTS)
DEEPSEEK_V3 = Family("deepseek_v3", ("DeepseekV3ForCausalLM",), lambda c: _spec(c, v3=True), namer(_RENAMES), _EXPERTS)
