"""Qwen2-MoE (shared expert with a sigmoid gate, qkv bias) and Qwen3-MoE (per-head q/k norm).

Both may interleave dense MLP layers (`mlp_only_layers`, `decoder_sparse_step`).
"""

from __future__ import annotations

from expertflow.families.common import COMMON_RENAMES, head_dim, model_spec, namer
from expertflow.spec import AttentionSpec, Family, LayerSpec, ModelSpec, MoESpec, RouterSpec, expert_names_for


def _layers(config, moe: MoESpec) -> tuple[LayerSpec, ...]:
    sparse_step = getattr(config, "decoder_sparse_step", 1) or 1
    dense_only = set(getattr(config, "mlp_only_layers", None) or [])
    return tuple(
        LayerSpec(moe)
        if i not in dense_only and config.num_experts > 0 and (i + 1) % sparse_step == 0
        else LayerSpec(None, dense_ffn=config.intermediate_size)
        for i in range(config.num_hidden_layers)
    )


def _spec(config, family: str, qwen3: bool) -> ModelSpec:
    dim = head_dim(config)
    router = RouterSpec(
        n_experts=config.num_experts,
        top_k=config.num_experts_per_tok,
        norm_topk=bool(getattr(config, "norm_topk_prob", False)),
    )
    shared = 0 if qwen3 else getattr(config, "shared_expert_intermediate_size", 0)
    moe = MoESpec(router, expert_ffn=config.moe_intermediate_size, shared_ffn=shared, shared_gate=bool(shared))
    attention = AttentionSpec(
        "gqa",
        config.num_attention_heads,
        config.num_key_value_heads,
        dim,
        qkv_bias=bool(getattr(config, "attention_bias", False)) if qwen3 else bool(getattr(config, "qkv_bias", True)),
        out_bias=bool(getattr(config, "attention_bias", False)) if qwen3 else False,
        qk_norm="per_head" if qwen3 else "none",
    )
    return model_spec(config, family, attention, _layers(config, moe), dim)


_RENAMES = (
    *COMMON_RENAMES,
    (".moe.router.", ".mlp.gate."),
    (".moe.shared_gate.", ".mlp.shared_expert_gate."),
    (".moe.shared.", ".mlp.shared_expert."),
)
_EXPERTS = expert_names_for("model.layers.{layer}.mlp.experts.{expert}", "gate_proj", "up_proj", "down_proj")


def _family(name: str, architecture: str, qwen3: bool) -> Family:
    build = lambda config: _spec(config, name, qwen3=qwen3)  # noqa: E731
    return Family(name, (architecture,), build, namer(_RENAMES), _EXPERTS)


QWEN2_MOE = _family("qwen2_moe", "Qwen2MoeForCausalLM", qwen3=False)
QWEN3_MOE = _family("qwen3_moe", "Qwen3MoeForCausalLM", qwen3=True)
