"""Continuous batching: many requests share the model, joining between steps and leaving when done.

    submit(prompt, params) -> the request waits for a cache row; then each step():
      1. decode: the running requests that take a token this step: all of them up to `max_batch` (fifo,
         longest-waiting first), or the method's token scheduler's micro-batch (requests whose predicted routes
         overlap run together; none is left out more than `max_wait` steps in a row)
      2. admit waiting requests, first come first served, while a cache row is free and the step's token budget
         (prompt tokens plus one per decode) allows; a prompt larger than the budget runs in a step of its own
      3. one forward pass for all of them, each in its own KV-cache row at its own columns (model.py)
      4. each request samples its next token with its own parameters and seeded generator, so its output never
         depends on the other requests in the batch; it stops on EOS, a stop id, its token limit, the cache
         row's end, or a cancel, and leaves the batch
    An expert that cannot be read (ExpertReadError: its store nodes are gone) fails only the requests that need
    it: a step that fails with one request finishes it "error" (`Running.error` says why) and frees its row; a
    step of several runs again one request per step, for those requests, before anything else (nothing of the
    step was kept: each re-runs its pending tokens at the same cache columns), so only the requests that route
    to the lost expert fail. The others in the engine carry on.
    Each forward pass is one step of the prefetching protocol (`StepRunner`): the prefetcher hears begin_step
    with the step's requests by id, after_layer for every MoE layer, finish for each request that leaves.

Shape legend: B = requests in the step, T = its longest new-token run, V = vocab, N = routed tokens,
K = experts per token, R = cache rows.

Not for: the model (model.py), residency (expert_store), what to prefetch (orchestrator), text (tokenizer.py).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from expert_store.device_cache import ExpertCache, ExpertReadError
from expert_store.stats import CacheStats
from expertflow.loader import LoadedModel
from expertflow.model import MoETransformer
from expertflow.moe import ForwardHooks
from expertflow.requests import RequestError, SamplingParams, sample
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest
from orchestrator.scheduler import Request, SchedulerConfig, fifo_batch

SCHEDULERS = ("fifo", "expertflow")


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


class StepRunner:
    """Runs one forward pass as a prefetching step: begin_step before it, the hooks during it, the cache's
    counters after it."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.model, self.cache = loaded.model, loaded.cache
        self.prefetcher = loaded.policy.prefetcher

    def run(
        self,
        requests: list[StepRequest],
        forward: Callable[[ForwardHooks | None], torch.Tensor],
        recorder: ForwardHooks | None = None,
    ) -> tuple[torch.Tensor, CacheStats, float]:
        """(the forward's output, the cache's counters of the step, its wall seconds)."""
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

    def finish(self, ids: Sequence[str]) -> None:
        if self.prefetcher is not None and ids:
            self.prefetcher.finish(ids)


@dataclass
class Running:
    """A request in the engine: waiting for a row, or running in one."""

    id: str
    prompt: list[int]
    params: SamplingParams
    max_new: int  # its token limit, within the cache row
    generator: torch.Generator
    on_tokens: Callable[[Running, list[int]], None] | None = None
    row: int = -1  # its cache row once admitted
    length: int = 0  # cache columns written
    pending: list[int] = field(default_factory=list)  # tokens to feed at its next step
    tokens: list[int] = field(default_factory=list)  # generated so far
    waited: int = 0  # steps since it last ran (or was admitted)
    finish_reason: str | None = None  # "eos", "length", "cancelled" or "error" once done
    error: str | None = None  # why, for "error": an expert it needs could not be read
    submitted: float = field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # time to its first token


@dataclass
class StepReport:
    ran: list[Running]  # the requests of the step, in batch order
    finished: list[Running]
    stats: CacheStats
    seconds: float
    prompt_tokens: int
    decode_tokens: int


class BatchEngine:
    """`rows` requests at most in the KV cache at once, each up to `max_len` positions; a step runs at most
    `max_batch` decodes and `token_budget` tokens."""

    def __init__(
        self,
        loaded: LoadedModel,
        rows: int,
        max_len: int | None = None,
        max_batch: int | None = None,
        token_budget: int | None = None,
        scheduler: str = "fifo",
        max_wait: int = 4,
        recorder: ForwardHooks | None = None,
    ) -> None:
        spec = loaded.spec
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {scheduler!r}: one of {', '.join(SCHEDULERS)}")
        if rows < 1 or (max_batch is not None and max_batch < 1) or (token_budget is not None and token_budget < 1):
            raise ValueError("rows, max_batch and token_budget must be at least 1")
        self.loaded, self.model, self.spec, self.device = loaded, loaded.model, spec, loaded.device
        self.runner = StepRunner(loaded)
        self.rows = rows
        self.max_len = min(max_len or spec.max_positions, spec.max_positions)
        self.max_batch = max_batch or rows
        self.token_budget = token_budget or rows * self.max_len
        self.schedule = SchedulerConfig(batch=self.max_batch, max_wait=max_wait)
        self.scheduler = scheduler
        self.recorder = recorder
        self.caches = self.model.new_caches(rows, self.max_len)
        self._free_rows = list(range(rows))
        self._waiting: deque[Running] = deque()
        self._running: list[Running] = []
        self._alone: deque[Running] = deque()  # of a step that failed reading an expert: re-run one per step
        self._ids = itertools.count()
        self._eos = set(spec.eos_token_ids)
        self._pad = spec.pad_token_id if spec.pad_token_id is not None else 0

    # -- requests ---------------------------------------------------------------------------------------
    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        on_tokens: Callable[[Running, list[int]], None] | None = None,
    ) -> Running:
        """Queue a request; RequestError if it cannot be served. `on_tokens(request, new tokens)` is called as
        it samples, and once more with no tokens when it finishes."""
        if len(prompt) == 0:
            raise RequestError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.spec.vocab_size]
        if bad:
            raise RequestError(f"token id {bad[0]} is outside the vocabulary (0..{self.spec.vocab_size - 1})")
        if len(prompt) >= self.max_len:
            raise RequestError(
                f"the prompt has {len(prompt)} tokens; this server's context holds {self.max_len} with the reply"
            )
        rid = request_id if request_id is not None else f"r{next(self._ids)}"
        if any(r.id == rid for r in self._all()):
            raise RequestError(f"request id {rid!r} is already running")
        max_new = min(params.max_new_tokens, self.max_len - len(prompt))
        request = Running(rid, list(prompt), params, max_new, torch.Generator().manual_seed(params.seed), on_tokens)
        request.pending = list(prompt)
        if max_new == 0:
            self._finish(request, "length")
            return request
        self._waiting.append(request)
        return request

    def cancel(self, request_id: str) -> bool:
        """Stop a request; False if no such request is waiting or running."""
        for request in self._all():
            if request.id == request_id:
                if request in self._waiting:
                    self._waiting.remove(request)
                self._finish(request, "cancelled")
                return True
        return False

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def _all(self) -> list[Running]:
        return list(self._waiting) + self._running

    # -- one step ---------------------------------------------------------------------------------------
    def step(self) -> StepReport | None:
        """Run one forward pass for the requests whose turn it is; None if there is nothing to run."""
        while self._alone and self._alone[0].finish_reason is not None:  # cancelled meanwhile
            self._alone.popleft()
        if self._alone:
            alone = self._alone.popleft()
            admitted, decoding = ([alone], []) if alone.length == 0 else ([], [alone])
        else:
            admitted, decoding = self._admit()
        batch = admitted + decoding
        if not batch:
            return None
        for request in self._running:
            request.waited = 0 if request in batch else request.waited + 1
        try:
            logits, stats, seconds = self._forward(batch)
        except ExpertReadError as e:
            return self._failed(batch, e)
        finished = []
        for request, row_logits in zip(batch, logits):
            request.length += len(request.pending)
            token = int(sample(row_logits[None], request.params, request.generator)[0])
            request.tokens.append(token)
            request.pending = [token]
            if request.first_token_s is None:
                request.first_token_s = time.perf_counter() - request.submitted
            reason = self._stop_reason(request, token)
            if request.on_tokens is not None:
                request.on_tokens(request, [token])  # may cancel the request (a stop string)
            if request.finish_reason is not None:
                finished.append(request)
            elif reason is not None:
                self._finish(request, reason)
                finished.append(request)
        prompt_tokens = sum(len(r.prompt) for r in admitted)
        return StepReport(batch, finished, stats, seconds, prompt_tokens, len(decoding))

    def _admit(self) -> tuple[list[Running], list[Running]]:
        """This step's requests: (prompts admitted now, decodes)."""
        decoding = self._choose_decodes()
        budget = self.token_budget - len(decoding)
        admitted: list[Running] = []
        while self._waiting and self._free_rows:
            prompt = len(self._waiting[0].pending)
            if prompt > budget and (decoding or admitted):
                break
            request = self._waiting.popleft()
            request.row = self._free_rows.pop(0)
            budget -= prompt
            admitted.append(request)
            self._running.append(request)
        return admitted, decoding

    def _failed(self, batch: list[Running], error: ExpertReadError) -> StepReport:
        """A step that could not read an expert: its one request fails, or its requests run again one by one.
        The prefetcher forgets them either way (a retried one starts afresh with its next step)."""
        if len(batch) == 1:
            batch[0].error = str(error)
            self._finish(batch[0], "error")  # the prefetcher hears it there
        else:
            self.runner.finish([r.id for r in batch])
            self._alone.extend(batch)
        stats = self.loaded.cache.take_stats()
        return StepReport([], [r for r in batch if r.finish_reason is not None], stats, 0.0, 0, 0)

    def _choose_decodes(self) -> list[Running]:
        ready = [r for r in self._running if r.row >= 0 and r.length > 0 and r not in self._alone]
        if len(ready) <= self.max_batch:
            return ready
        picked = None
        prefetcher = self.runner.prefetcher
        if self.scheduler == "expertflow" and prefetcher is not None:
            space = self.spec.experts
            neutral = np.full(space.shape, space.top_k / space.n_experts, np.float32)
            picked = prefetcher.schedule([(r.id, r.waited) for r in ready], self.schedule, neutral)
        if picked is None:  # fifo, or a scheduler that could not answer: the longest-waiting first
            queue = [Request(i, r.waited, np.zeros(0)) for i, r in enumerate(ready)]
            return [ready[i] for i in fifo_batch(queue, self.schedule)]
        by_id = {r.id: r for r in ready}
        return [by_id[rid] for rid in picked if rid in by_id][: self.max_batch]

    def _forward(self, batch: list[Running]) -> tuple[torch.Tensor, CacheStats, float]:
        """One pass over `batch`, each request's pending tokens at its own columns: last logits [B, V]."""
        device = self.device
        b, t = len(batch), max(len(r.pending) for r in batch)
        tokens = torch.full((b, t), self._pad, dtype=torch.long)
        compute = torch.zeros((b, t), dtype=torch.bool)
        for i, r in enumerate(batch):
            tokens[i, : len(r.pending)] = torch.tensor(r.pending)
            compute[i, : len(r.pending)] = True
        lengths = torch.tensor([r.length for r in batch])
        cols = (lengths[:, None] + torch.arange(t)[None, :]).to(device)  # B T
        last = torch.tensor([len(r.pending) - 1 for r in batch], device=device)
        rows = torch.tensor([r.row for r in batch], device=device)
        tokens, compute = tokens.to(device), compute.to(device)
        first = torch.zeros(b, dtype=torch.long, device=device)
        requests = [StepRequest(r.id, tuple(r.pending)) for r in batch]
        return self.runner.run(
            requests,
            lambda hooks: self.model(tokens, self.caches, cols, first, compute, hooks, rows=rows, last=last),
            self.recorder,
        )

    def _stop_reason(self, request: Running, token: int) -> str | None:
        stop = set(request.params.stop_token_ids) | (self._eos if request.params.stop_on_eos else set())
        if token in stop:
            return "eos"
        if len(request.tokens) >= request.max_new:
            return "length"
        return None

    def _finish(self, request: Running, reason: str) -> None:
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        if request in self._running:
            self._running.remove(request)
            self._free_rows.append(request.row)
            self._free_rows.sort()
        self.runner.finish([request.id])
        if request.on_tokens is not None:
            request.on_tokens(request, [])

    def close(self) -> None:
        """Finish every request still here (cancelled): the prefetcher forgets them."""
        for request in self._all():
            self._finish(request, "cancelled")
