"""Tiny random checkpoints of every supported family, built and saved by `transformers`.

Used by the tests (the correctness oracle), the embedded default model and the
benchmarks: the files are exactly what `save_pretrained` writes for a real model,
so the real loading code is what gets exercised. Nothing is downloaded.

Not for: realistic routing (random routers route unrealistically; see the trained models).
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")

_COMMON = dict(vocab_size=96, hidden_size=64, num_attention_heads=4, max_position_embeddings=256)


def tiny_config(family: str, **overrides):
    import transformers as T

    if family == "mixtral":
        cfg = T.MixtralConfig(
            **_COMMON,
            intermediate_size=96,
            num_hidden_layers=3,
            num_key_value_heads=2,
            num_local_experts=8,
            num_experts_per_tok=2,
        )
    elif family == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(
            **_COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_hidden_layers=3,
            num_key_value_heads=2,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[1],
        )
    elif family == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(
            **_COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_key_value_heads=2,
            num_experts=16,
            num_experts_per_tok=4,
            head_dim=16,
            norm_topk_prob=True,
        )
    elif family == "olmoe":
        cfg = T.OlmoeConfig(
            **_COMMON,
            intermediate_size=32,
            num_hidden_layers=3,
            num_key_value_heads=4,
            num_experts=16,
            num_experts_per_tok=4,
            pad_token_id=1,
            eos_token_id=2,
            clip_qkv=8.0,
        )
    elif family == "deepseek_v2":
        cfg = T.DeepseekV2Config(
            **_COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_key_value_heads=4,
            n_routed_experts=16,
            n_shared_experts=2,
            num_experts_per_tok=4,
            first_k_dense_replace=1,
            kv_lora_rank=32,
            q_lora_rank=None,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_group=4,
            topk_group=2,
            topk_method="group_limited_greedy",
            routed_scaling_factor=1.5,
        )
    elif family == "deepseek_v3":
        cfg = T.DeepseekV3Config(
            **_COMMON,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_hidden_layers=3,
            num_key_value_heads=4,
            n_routed_experts=16,
            n_shared_experts=1,
            num_experts_per_tok=4,
            first_k_dense_replace=1,
            kv_lora_rank=32,
            q_lora_rank=24,
            qk_rope_head_dim=8,
            qk_nope_head_dim=16,
            v_head_dim=16,
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.5,
        )
    else:
        raise ValueError(f"no tiny config for family {family!r}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_tiny(family: str, directory: str | Path, seed: int = 0, init_std: float = 0.1, **overrides):
    """Save a random tiny model of `family` to `directory`; returns the transformers model (fp32, eval)."""
    import transformers as T

    cfg = tiny_config(family, initializer_range=init_std, **overrides)
    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Random-normal routers, correction biases and norms: ties and flat logits make a poor oracle.
            if (
                name.endswith("e_score_correction_bias")
                or name.endswith("norm.weight")
                or name.endswith("layernorm.weight")
            ):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    model.save_pretrained(str(directory))
    return model
