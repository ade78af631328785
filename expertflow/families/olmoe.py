"""OLMoE: q/k RMSNorm over the whole projection, optional qkv clipping, 64 experts top-8."""

from __future__ import annotations

from expertflow.families.common import COMMON_RENAMES, head_dim, model_spec, namer
from expertflow.spec import AttentionSpec, Family, LayerSpec, ModelSpec, MoESpec, RouterSpec, expert_names_for


def build_spec(config) -> ModelSpec:
    router = RouterSpec(
        n_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        norm_topk=bool(getattr(config, "norm_topk_prob", False)),
    )
    attention = AttentionSpec(
        "gqa",
        config.num_attention_heads,
        config.num_key_value_heads,
        head_dim(config),
        qkv_bias=bool(getattr(config, "attention_bias", False)),
        out_bias=bool(getattr(config, "attention_bias", False)),
        qk_norm="full",
        clip_qkv=getattr(config, "clip_qkv", None),
    )
    moe = MoESpec(router, expert_ffn=config.intermediate_size)
    return model_spec(config, "olmoe", attention, [LayerSpec(moe)] * config.num_hidden_layers, head_dim(config))


FAMILY = Family(
    name="olmoe",
    architectures=("OlmoeForCausalLM",),
    build_spec=build_spec,
    checkpoint_name=namer((*COMMON_RENAMES, (".moe.router.", ".mlp.gate."))),
    expert_names=expert_names_for("model.layers.{layer}.mlp.experts.{expert}", "gate_proj", "up_proj", "down_proj"),
)
