"""Helpers the family files share: rotary frequencies, tensor-name mapping, config reading.

Not for: anything family-specific.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

_STATIC_ROPE = {"default", "linear", "yarn", "llama3", "proportional"}

# Internal parameter names -> the names most Hugging Face MoE checkpoints use.
COMMON_RENAMES: tuple[tuple[str, str], ...] = (
    (".attn_norm.", ".input_layernorm."),
    (".mlp_norm.", ".post_attention_layernorm."),
    (".attn.", ".self_attn."),
)


def rope(config, dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [dim/2], cos/sin scale) for the config's rotary type."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _STATIC_ROPE:
        raise ValueError(f"rope type {rope_type!r} is not supported (supported: {', '.join(sorted(_STATIC_ROPE))})")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    return inv_freq.float(), float(scale)


def namer(renames: Sequence[tuple[str, str]]) -> Callable[[str], str]:
    """internal name -> checkpoint name: add `model.` and apply the substring renames in order."""

    def checkpoint_name(name: str) -> str:
        if name.startswith("lm_head."):
            return name
        name = "model." + name.replace("embed.", "embed_tokens.", 1) if name.startswith("embed.") else "model." + name
        for old, new in renames:
            name = name.replace(old, new)
        return name

    return checkpoint_name


def eos_ids(config) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


def checkpoint_dtype(config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype


def base_fields(config) -> dict:
    """Spec fields every family reads the same way."""
    return dict(
        vocab_size=config.vocab_size,
        hidden=config.hidden_size,
        rms_eps=config.rms_norm_eps,
        max_positions=config.max_position_embeddings,
        act=config.hidden_act,
        tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        eos_token_ids=eos_ids(config),
        bos_token_id=getattr(config, "bos_token_id", None),
        pad_token_id=getattr(config, "pad_token_id", None),
        dtype=checkpoint_dtype(config),
    )


def model_spec(config, family: str, attention, layers, rope_dim: int):
    """The ModelSpec every family ends with: its own attention and layers, the shared rest."""
    from expertflow.spec import ModelSpec

    inv_freq, scale = rope(config, rope_dim)
    return ModelSpec(
        family=family,
        attention=attention,
        layers=tuple(layers),
        inv_freq=inv_freq,
        rope_scale=scale,
        **base_fields(config),
    )


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
