"""The embedded mode's engine: prefill prompts, or generate for a batch of requests until each stops.

    generate(prompts) -> every request admitted at the first step (its prompt), then one token per live
                         request per step (batching.py's BatchEngine, one cache row per request)

A request stops on one of its EOS ids or after `max_new_tokens` and leaves the batch. Every forward
pass is one step of the prefetching protocol (batching.StepRunner): `begin_step` with the live requests
by id and their new tokens before the pass, `after_layer` as each MoE layer's work is issued, `finish`
when a request stops; each call gets the cache's view and the cache executes the plan it returns.

Shape legend: B = requests in the batch, T = new tokens this step, V = vocab.

Not for: serving many clients (batching.py, expertflow/services), text (tokenizer.py), loading
(loader.py), residency (expert_store) or what to prefetch (orchestrator).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch

from expert_store.stats import RunStats
from expertflow.batching import BatchEngine, Running, StepRunner
from expertflow.loader import LoadedModel
from expertflow.moe import ForwardHooks
from expertflow.requests import GenerationResult, MemoryReport, RequestError, RequestOutput, SamplingParams
from orchestrator.prefetcher import StepRequest


class Engine:
    """One batch of requests at a time, run to completion (the embedded mode): a BatchEngine with a row per
    request, every request admitted at the first step and decoding at every step after."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.model = loaded.model
        self.cache = loaded.cache
        self.spec = loaded.spec
        self.device = loaded.device
        self.runner = StepRunner(loaded)
        self._ids = itertools.count()

    def _validate(self, prompts: list[list[int]]) -> None:
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

    def prefill(self, prompts: list[list[int]], recorder: ForwardHooks | None = None) -> list[torch.Tensor]:
        """Run prompts through the model once; logits [T_i, V] of every position of each prompt."""
        self._validate(prompts)
        device = self.device
        b, t = len(prompts), max(len(p) for p in prompts)
        pad = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        tokens = torch.full((b, t), pad, dtype=torch.long, device=device)
        compute = torch.zeros((b, t), dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, device=device)
            compute[i, : len(p)] = True
        caches = self.model.new_caches(b, t)
        cols = torch.arange(t, device=device).expand(b, t)
        first = torch.zeros(b, dtype=torch.long, device=device)
        ids = [f"prefill-{next(self._ids)}" for _ in prompts]
        requests = [StepRequest(i, tuple(p)) for i, p in zip(ids, prompts)]
        try:
            logits, _, _ = self.runner.run(
                requests, lambda hooks: self.model(tokens, caches, cols, first, compute, hooks), recorder
            )
        finally:
            self.runner.finish(ids)
        return [logits[i, : len(p)] for i, p in enumerate(prompts)]

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams = SamplingParams(),
        recorder: ForwardHooks | None = None,
        on_tokens: Callable[[list[tuple[int, int]]], None] | None = None,
    ) -> GenerationResult:
        """Run the requests to completion; `on_tokens` gets each step's (request index, token id) pairs as sampled,
        `recorder` (optional) every routing decision of every pass, as trace recording does."""
        self._validate(prompts)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        longest = max(len(p) for p in prompts)
        max_new = min(params.max_new_tokens, self.spec.max_positions - longest)
        batch = BatchEngine(self.loaded, rows=len(prompts), max_len=longest + max(max_new, 1), recorder=recorder)
        index = {}
        step_tokens: list[tuple[int, int]] = []

        def collect(request: Running, tokens: list[int]) -> None:
            step_tokens.extend((index[request.id], t) for t in tokens)

        requests = []
        for i, prompt in enumerate(prompts):
            request = batch.submit(prompt, params, f"g{next(self._ids)}", collect if on_tokens else None)
            index[request.id] = i
            requests.append(request)
        stats, step_s = RunStats(), []
        try:
            while not batch.idle:
                report = batch.step()
                stats.record(report.stats)
                step_s.append(report.seconds)
                if on_tokens is not None and step_tokens:
                    emitted, step_tokens[:] = sorted(step_tokens), []
                    on_tokens(emitted)
        finally:
            batch.close()
        outputs = [RequestOutput(list(r.prompt), r.tokens, "length" if r.finish_reason == "length" else "eos")
                   for r in requests]  # fmt: skip
        return GenerationResult(
            outputs=outputs,
            stats=stats,
            memory=self._memory(batch.caches),
            prefill_s=step_s[0] if step_s else 0.0,
            decode_s=sum(step_s[1:]),
            new_tokens=sum(len(o.token_ids) for o in outputs),
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
