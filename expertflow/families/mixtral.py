"""Mixtral: GQA attention, 8 experts of w1/w3/w2, top-2 softmax routing renormalised."""

from __future__ import annotations

from expertflow.families.common import COMMON_RENAMES, head_dim, model_spec, namer
from expertflow.spec import AttentionSpec, Family, LayerSpec, ModelSpec, MoESpec, RouterSpec, expert_names_for


def build_spec(config) -> ModelSpec:
    moe = MoESpec(
        router=RouterSpec(n_experts=config.num_local_experts, top_k=config.num_experts_per_tok, norm_topk=True),
        expert_ffn=config.intermediate_size,
    )
    dim = head_dim(config)
    attention = AttentionSpec("gqa", config.num_attention_heads, config.num_key_value_heads, dim)
    return model_spec(config, "mixtral", attention, [LayerSpec(moe)] * config.num_hidden_layers, dim)


FAMILY = Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    build_spec=build_spec,
    checkpoint_name=namer((*COMMON_RENAMES, (".moe.router.", ".block_sparse_moe.gate."))),
    expert_names=expert_names_for("model.layers.{layer}.block_sparse_moe.experts.{expert}", "w1", "w3", "w2"),
)
