"""What a request asks for and what it gets back: sampling parameters, outputs, the run's statistics.

Not for: running requests (batching.py, engine.py) or their text (tokenizer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from expert_store.stats import RunStats


class RequestError(ValueError):
    """A request the model cannot serve, with the reason."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    stop_on_eos: bool = True  # the model's EOS ids end a request
    stop_token_ids: tuple[int, ...] = ()  # extra ids that end a request

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise RequestError("max_new_tokens must be >= 0")
        # NaN passes every comparison below and inf makes softmax NaN: both fail deep in torch otherwise
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise RequestError(f"temperature must be a finite number >= 0, not {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], not {self.top_p}")


@dataclass
class RequestOutput:
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str  # "eos" | "length"


@dataclass
class MemoryReport:
    dense_bytes: int
    expert_cache_bytes: int
    kv_cache_bytes: int
    resident_weight_bytes: int  # dense + every routed expert: the fully resident model
    peak_device_bytes: int

    @property
    def weight_bytes_saved(self) -> float:
        used = self.dense_bytes + self.expert_cache_bytes
        return 1.0 - used / self.resident_weight_bytes

    @property
    def peak_saved(self) -> float:
        """Peak memory reduction against the same run with every expert resident."""
        extra = self.resident_weight_bytes - self.dense_bytes - self.expert_cache_bytes
        return extra / (self.peak_device_bytes + extra) if self.peak_device_bytes + extra > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return dict(
            dense_bytes=self.dense_bytes,
            expert_cache_bytes=self.expert_cache_bytes,
            kv_cache_bytes=self.kv_cache_bytes,
            resident_weight_bytes=self.resident_weight_bytes,
            peak_device_bytes=self.peak_device_bytes,
            weight_bytes_saved=self.weight_bytes_saved,
            peak_saved=self.peak_saved,
        )


@dataclass
class GenerationResult:
    outputs: list[RequestOutput]
    stats: RunStats
    memory: MemoryReport
    prefill_s: float
    decode_s: float
    new_tokens: int = field(default=0)
    step_s: list[float] = field(default_factory=list)  # wall time of each forward, prefill first
    # the max_new_tokens that ran when the model's context left less room than asked; None if not capped
    max_new_tokens_capped_to: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / (self.prefill_s + self.decode_s) if self.prefill_s + self.decode_s > 0 else 0.0


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> torch.Tensor:
    """logits [B, V] -> token ids [B]."""
    if params.temperature == 0:
        return logits.argmax(-1)
    probs = (logits.float() / params.temperature).softmax(-1).cpu()
    if params.top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
