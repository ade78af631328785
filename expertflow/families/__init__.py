"""Model families: each maps a Hugging Face architecture onto the internal spec and layout.

A new family is one small file exporting `FAMILY` and one line in `_FAMILIES`.

Not for: model code (the families only describe; model.py runs).
"""

from __future__ import annotations

from expertflow.families import deepseek, mixtral, olmoe, qwen_moe
from expertflow.spec import Family

_FAMILIES: tuple[Family, ...] = (
    mixtral.FAMILY,
    qwen_moe.QWEN2_MOE,
    qwen_moe.QWEN3_MOE,
    olmoe.FAMILY,
    deepseek.DEEPSEEK_V2,
    deepseek.DEEPSEEK_V3,
)

BY_ARCHITECTURE: dict[str, Family] = {arch: fam for fam in _FAMILIES for arch in fam.architectures}


class UnsupportedArchitecture(ValueError):
    pass


def family_for(architectures: list[str] | None, model_type: str | None) -> Family:
    for arch in architectures or []:
        if arch in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[arch]
    for fam in _FAMILIES:
        if model_type == fam.name:
            return fam
    raise UnsupportedArchitecture(
        f"unsupported architecture {architectures or model_type!r}; supported: {', '.join(sorted(BY_ARCHITECTURE))}"
    )
