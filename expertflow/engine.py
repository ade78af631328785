"""Prefill and decode a batch of requests over token ids, with greedy or top-p sampling.

    prefill(all prompts, left-padded) -> sample -> decode one token per live request -> ... -> stop

A request stops on one of its EOS ids or after `max_new_tokens`; finished requests
stay in the batch for attention but no longer route through the experts.

Every forward pass is one step of the prefetching protocol, and the engine makes its calls
explicitly: `begin_step` with the live requests by id and their new tokens before the pass,
`after_layer` from the pass's hooks as each MoE layer routes, `finish` when a request stops; each
call gets the cache's view and the cache executes the plan it returns.

Shape legend: B = requests in the batch, T = new tokens this step, V = vocab, N = routed tokens
(not padding, not finished), K = experts per token.

Not for: text (tokenizer.py), loading (loader.py), residency (expert_store) or what to prefetch
(orchestrator).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from expert_store.device_cache import ExpertCache
from expert_store.stats import CacheStats, RunStats
from expertflow.loader import LoadedModel
from expertflow.model import MoETransformer
from expertflow.moe import ForwardHooks
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest


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


class _StepHooks:
    """One forward pass's hooks: hands each MoE layer's routes (rows split by request) and the next layer's
    gate speculation to the prefetcher, and executes its plan; forwards everything to a recorder."""

    def __init__(
        self,
        model: MoETransformer,
        cache: ExpertCache,
        prefetcher: Prefetcher | None,
        requests: Sequence[StepRequest],
        recorder: ForwardHooks | None,
    ):
        self.model, self.cache, self.prefetcher, self.recorder = model, cache, prefetcher, recorder
        self.rows: list[tuple[str, int, int]] = []  # (request, first row, end row) of the routed tokens
        row = 0
        for r in requests:
            self.rows.append((r.id, row, row + len(r.new_tokens)))
            row += len(r.new_tokens)
        # Speculation costs a router pass per layer; prompts would not use it (their routes are unknown).
        decode = all(len(r.new_tokens) == 1 for r in requests)
        self.speculate = prefetcher is not None and prefetcher.wants_speculation and decode
        # MoE layer index -> (speculated ids [N, K] on their way to the host, an event when they are there)
        self.spec: dict[int, tuple[torch.Tensor, torch.cuda.Event | None]] = {}
        # Host time spent deciding what to prefetch: views, gate speculation, the prefetcher's calls. Executing
        # the plans (issuing copies, as for any miss) is the cache's work and is not counted.
        self.plan_s = 0.0

    def on_attention_out(self, layer: int, h: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.on_attention_out(layer, h)
        if self.prefetcher is not None:
            t0 = time.perf_counter()
            plan = self.prefetcher.poll()  # an asynchronous prefetcher's plan, if one is ready
            self.plan_s += time.perf_counter() - t0
            self.cache.execute(plan)
        if self.speculate:
            t0 = time.perf_counter()
            speculated = self.model.speculate(layer, h)
            if speculated is not None:
                # Start the copy to the host now, ahead of this layer's experts in the device's queue; wait
                # for it (`ready`) only when the next layer is planned.
                ids = speculated[1].to("cpu", non_blocking=True)
                ready = torch.cuda.Event() if ids.is_pinned() else None
                if ready is not None:
                    ready.record()
                self.spec[speculated[0]] = (ids, ready)
            self.plan_s += time.perf_counter() - t0

    def on_route(self, moe_layer: int, ids: torch.Tensor, scores: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.on_route(moe_layer, ids, scores)
        if self.prefetcher is None:
            return
        t0 = time.perf_counter()
        rows = ids.cpu().numpy()  # the MoE block hands them over on the host
        routes = {rid: rows[a:b] for rid, a, b in self.rows}
        spec = self.spec.pop(moe_layer + 1, None)
        speculation = None
        if spec is not None:
            spec_ids, ready = spec
            if ready is not None:
                ready.synchronize()
            spec_rows = spec_ids.numpy()
            speculation = {rid: spec_rows[b - 1] for rid, a, b in self.rows}
        plan = self.prefetcher.after_layer(LayerRoutes(moe_layer, routes, speculation), self.cache.view())
        self.plan_s += time.perf_counter() - t0
        self.cache.execute(plan)


class Engine:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.cache = loaded.cache
        self.prefetcher = loaded.policy.prefetcher
        self.spec = loaded.spec
        self.device = loaded.device
        self._ids = itertools.count()

    def _validate(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if not prompts:
            raise RequestError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RequestError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= t < self.spec.vocab_size]
            if bad:
                raise RequestError(
                    f"prompt {i} has token id {bad[0]} outside the vocabulary (0..{self.spec.vocab_size - 1})"
                )
            if len(p) > self.spec.max_positions:
                raise RequestError(
                    f"prompt {i} has {len(p)} tokens, longer than the model's context of {self.spec.max_positions}"
                )

    def _batch(self, prompts: list[list[int]], room: int):
        """Left-pad prompts into one batch with cache room for `room` more tokens."""
        device = self.device
        b, longest = len(prompts), max(len(p) for p in prompts)
        pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        pads = torch.tensor([longest - len(p) for p in prompts], device=device)
        tokens = torch.full((b, longest), pad_id, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            tokens[i, longest - len(p) :] = torch.tensor(p, device=device)
        compute = torch.arange(longest, device=device)[None, :] >= pads[:, None]  # B T
        return tokens, pads, compute, self.model.new_caches(b, longest + room)

    def _step(
        self,
        requests: list[StepRequest],
        forward: Callable[[ForwardHooks | None], torch.Tensor],
        recorder: ForwardHooks | None = None,
    ) -> tuple[torch.Tensor, CacheStats, float]:
        """One forward pass as a prefetching step: (its output, the cache's counters, wall seconds)."""
        t0 = time.perf_counter()
        plan_s = 0.0
        if self.prefetcher is not None:
            plan = self.prefetcher.begin_step(requests, self.cache.view())
            plan_s = time.perf_counter() - t0
            self.cache.execute(plan)
        hooks = None
        if self.prefetcher is not None or recorder is not None:
            hooks = _StepHooks(self.model, self.cache, self.prefetcher, requests, recorder)
        out = forward(hooks)
        seconds = time.perf_counter() - t0
        decode = all(len(r.new_tokens) == 1 for r in requests)
        stats = self.cache.end_step(seconds if decode else None)
        stats.plan_s = plan_s + (hooks.plan_s if hooks is not None else 0.0)
        return out, stats, seconds

    def _finish(self, ids: list[str]) -> None:
        if self.prefetcher is not None and ids:
            self.prefetcher.finish(ids)

    def prefill(self, prompts: list[list[int]], recorder: ForwardHooks | None = None) -> list[torch.Tensor]:
        """Run prompts through the model once; logits [T_i, V] of every position of each prompt."""
        self._validate(prompts, SamplingParams())
        tokens, pads, compute, caches = self._batch(prompts, 0)
        ids = [str(next(self._ids)) for _ in prompts]
        requests = [StepRequest(i, tuple(p)) for i, p in zip(ids, prompts)]
        try:
            logits, _, _ = self._step(
                requests, lambda hooks: self.model(tokens, caches, 0, pads, compute, hooks), recorder
            )
        finally:
            self._finish(ids)
        return [logits[i, int(pads[i]) :] for i in range(len(prompts))]

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams = SamplingParams(),
        recorder: ForwardHooks | None = None,
        on_tokens: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> GenerationResult:
        """Run the requests to completion; `on_tokens` gets each step's (request index, token id) pairs as sampled,
        `recorder` (optional) every routing decision of every pass, as trace recording does."""
        self._validate(prompts, params)
        device = self.device
        b = len(prompts)
        longest = max(len(p) for p in prompts)
        max_new = min(params.max_new_tokens, self.spec.max_positions - longest)
        tokens, pads, compute, caches = self._batch(prompts, max(max_new, 1))
        generator = torch.Generator().manual_seed(params.seed)
        eos = set(params.stop_token_ids) | (set(self.spec.eos_token_ids) if params.stop_on_eos else set())
        stats = RunStats()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        ids = [str(next(self._ids)) for _ in prompts]
        alive = [True] * b
        try:
            t0 = time.perf_counter()
            prompt_step = [StepRequest(i, tuple(p)) for i, p in zip(ids, prompts)]
            logits, step_stats, _ = self._step(
                prompt_step,
                lambda hooks: self.model(tokens, caches, 0, pads, compute, hooks, last_only=True)[:, -1],  # B V
                recorder,
            )
            stats.record(step_stats)
            prefill_s = time.perf_counter() - t0

            step_s = [prefill_s]
            outs: list[list[int]] = [[] for _ in range(b)]
            reasons = ["length"] * b
            t0 = time.perf_counter()
            for step in range(max_new):
                next_ids = sample(logits, params, generator)  # B
                sampled = next_ids.tolist()
                emitted = [(i, sampled[i]) for i in range(b) if alive[i]]
                stopped = []
                for i in range(b):
                    if alive[i]:
                        outs[i].append(sampled[i])
                        if sampled[i] in eos:
                            reasons[i], alive[i] = "eos", False
                            stopped.append(ids[i])
                self._finish(stopped)
                if on_tokens is not None:
                    on_tokens(emitted)
                if step == max_new - 1 or not any(alive):
                    break
                live = torch.tensor(alive, device=device)
                requests = [StepRequest(ids[i], (sampled[i],)) for i in range(b) if alive[i]]
                logits, step_stats, seconds = self._step(
                    requests,
                    lambda hooks: self.model(
                        next_ids[:, None], caches, longest + step, pads, live[:, None], hooks, last_only=True
                    )[:, -1],
                    recorder,
                )
                stats.record(step_stats)
                step_s.append(seconds)
        finally:  # also when a step or a callback raises: the prefetcher forgets every request
            self._finish([ids[i] for i in range(b) if alive[i]])
        decode_s = time.perf_counter() - t0

        outputs = [RequestOutput(list(p), o, r) for p, o, r in zip(prompts, outs, reasons)]
        return GenerationResult(
            outputs=outputs,
            stats=stats,
            memory=self._memory(caches),
            prefill_s=prefill_s,
            decode_s=decode_s,
            new_tokens=sum(len(o) for o in outs),
            step_s=step_s,
            max_new_tokens_capped_to=max_new if max_new < params.max_new_tokens else None,
        )

    def logits(self, prompt: list[int]) -> torch.Tensor:
        """Logits [T, V] for every position of one prompt (for checking against a reference)."""
        return self.prefill([prompt])[0]

    def _memory(self, caches) -> MemoryReport:
        kv = sum(t.numel() * t.element_size() for c in caches for t in c.t.values())
        dense, experts = self.loaded.dense_bytes, self.cache.nbytes
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = dense + experts + kv
        return MemoryReport(dense, experts, kv, dense + self.loaded.expert_bytes_total, peak)
