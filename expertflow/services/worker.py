"""The gpu worker: the model, its hot-expert cache and the continuous batch behind the inference API.

    Generate(request) -> validated, tokenized, queued; the engine thread admits it when a cache row and the
                         step's token budget allow, streams each new token (and its text) back as it is
                         sampled, and ends the stream with the finish reason
    Cancel(id)        -> the request leaves the batch at the next step; its stream ends "cancelled"
    a client gone     -> its request is cancelled, so its row serves the next one
    an expert lost    -> (every store node holding it is gone) the requests that need it end with UNAVAILABLE
                         and the expert named; their rows serve the next ones, the others carry on

One thread (`_EngineLoop`) owns the model and steps the BatchEngine; the gRPC threads only hand it requests and
read their events. Stopping: new requests are refused (UNAVAILABLE, health NOT_SERVING), requests in flight get
`drain_s` to finish, then the rest end "cancelled".

Shape legend: none (token ids only).

Not for: the batching itself (expertflow/batching.py), prefetch decisions (orchestrator), HTTP (http_api.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from expertflow.batching import BatchEngine, Running, StepReport
from expertflow.loader import LoadedModel
from expertflow.requests import RequestError, SamplingParams
from expertflow.services.config import ServicesConfig, WorkerConfig
from expertflow.services.security import Security
from expertflow.tokenizer import IncrementalText, TextCodec
from expertflow.v1 import inference_pb2, inference_pb2_grpc

FINISH = {"eos": "stop", "length": "length", "cancelled": "cancelled"}


class ExpertsUnavailable(Exception):
    """A request ended because an expert it needs could not be read (batching.py: finish reason "error")."""


@dataclass
class Event:
    tokens: list[int]
    text: str = ""
    finish_reason: str = ""  # "" while running


@dataclass
class Ticket:
    """A request as the API side sees it: its events arrive on `events` from the engine thread."""

    id: str
    prompt: list[int]
    params: SamplingParams
    text: IncrementalText | None
    events: queue.Queue = field(default_factory=queue.Queue)
    generated: int = 0
    done: bool = False


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("expertflow_requests", "requests by outcome", ["outcome"], registry=registry)
        self.queue = Gauge("expertflow_queue_depth", "requests waiting for a cache row", registry=registry)
        self.running = Gauge("expertflow_running", "requests in the batch", registry=registry)
        self.batch = Histogram(
            "expertflow_step_requests", "requests per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
        )
        self.ttft = Histogram("expertflow_time_to_first_token_seconds", "time to first token", registry=registry)
        self.itl = Histogram(
            "expertflow_inter_token_seconds",
            "time between a request's tokens",
            buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
            registry=registry,
        )
        self.tokens = Counter("expertflow_generated_tokens", "tokens sampled", registry=registry)
        self.lookups = Counter("expertflow_expert_lookups", "expert lookups by outcome", ["outcome"], registry=registry)
        self.stall = Counter("expertflow_stall_seconds", "compute time spent waiting for experts", registry=registry)
        self.bytes = Counter("expertflow_expert_bytes", "bytes brought to the device by tier", ["tier"], registry=registry)
        self.plan = Counter("expertflow_plan_seconds", "host time deciding prefetches", registry=registry)
        self.prefetch = Counter("expertflow_prefetches", "prefetch copies by fate", ["fate"], registry=registry)
        self.recall = Gauge(
            "expertflow_prediction_recall",
            "routed experts among the k the prefetcher rated likeliest (NaN: planned elsewhere, see the orchestrator's)",
            registry=registry,
        )
        self.recall.set(float("nan"))

    def step(self, report: StepReport) -> None:
        if not report.ran:  # a step that failed reading an expert: nothing ran
            return
        s = report.stats
        self.batch.observe(len(report.ran))
        self.tokens.inc(len(report.ran))
        self.lookups.labels("hit").inc(s.hits)
        self.lookups.labels("late").inc(s.late)
        self.lookups.labels("miss").inc(s.misses)
        self.stall.inc(s.stall_s)
        self.bytes.labels("host").inc(s.bytes_from_host)
        self.bytes.labels("nvme").inc(s.bytes_from_nvme)
        self.plan.inc(s.plan_s)
        self.prefetch.labels("issued").inc(s.prefetches)
        self.prefetch.labels("used").inc(s.prefetch_used)
        self.prefetch.labels("wasted").inc(s.prefetch_wasted)


class _EngineLoop:
    """The thread that owns the model: takes requests and cancels from the API threads, steps the batch."""

    def __init__(self, loaded: LoadedModel, config: WorkerConfig, metrics: WorkerMetrics, log: logging.Logger):
        self.engine = BatchEngine(
            loaded,
            rows=config.rows,
            max_len=config.max_len or None,
            max_batch=config.max_batch,
            token_budget=config.token_budget,
            scheduler=config.scheduler,
            max_wait=config.max_wait,
        )
        self.metrics, self.log = metrics, log
        self._inbox: queue.Queue = queue.Queue()
        self._tickets: dict[str, Ticket] = {}
        self._last_token: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def submit(self, ticket: Ticket) -> None:
        self._inbox.put(("submit", ticket))

    def cancel(self, request_id: str) -> None:
        self._inbox.put(("cancel", request_id))

    def stop(self) -> None:
        """Cancel whatever is left and end the thread (after drain, see Worker.stop)."""
        self._stop.set()
        self._inbox.put(("wake", None))
        self._thread.join()

    @property
    def active(self) -> int:
        return len(self._tickets)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._take(block=self.engine.idle)
                report = self.engine.step()
                if report is not None:
                    self.metrics.step(report)
                    self._recall()
                self.metrics.queue.set(self.engine.waiting)
                self.metrics.running.set(self.engine.running)
        except BaseException as e:  # noqa: BLE001 - every waiting client gets the error, not a hang
            self.error = e
            self.log.exception("engine failed")
            for ticket in list(self._tickets.values()):
                ticket.events.put(RuntimeError(f"the worker's engine failed: {e}"))
        finally:
            self.engine.close()

    def _recall(self) -> None:
        prefetcher = self.engine.runner.prefetcher
        flow = getattr(prefetcher, "inner", prefetcher)  # through a planning thread
        total = getattr(flow, "recall_total", 0)
        if total:
            self.metrics.recall.set(flow.recall_hits / total)

    def _take(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, value = item
            if kind == "submit":
                self._admit(value)
            elif kind == "cancel":
                self.engine.cancel(value)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _admit(self, ticket: Ticket) -> None:
        try:
            self.engine.submit(ticket.prompt, ticket.params, ticket.id, self._on_tokens)
            self._tickets[ticket.id] = ticket
        except RequestError as e:
            ticket.events.put(e)

    def _on_tokens(self, request: Running, tokens: list[int]) -> None:
        """Called on this thread as the request samples (and with no tokens when it finishes)."""
        ticket = self._tickets.get(request.id)
        if ticket is None:
            return
        now = time.perf_counter()
        if tokens:
            if request.first_token_s is not None and len(request.tokens) == 1:
                self.metrics.ttft.observe(request.first_token_s)
            elif request.id in self._last_token:
                self.metrics.itl.observe(now - self._last_token[request.id])
            self._last_token[request.id] = now
        if request.finish_reason == "error":
            ticket.events.put(ExpertsUnavailable(request.error))
            self.metrics.requests.labels("error").inc()
            del self._tickets[request.id]
            self._last_token.pop(request.id, None)
            return
        if request.finish_reason is None:
            text = ticket.text.push(tokens) if ticket.text is not None else ""
            if ticket.text is not None and ticket.text.stopped:  # a stop string: the request is done
                ticket.events.put(Event(tokens, text))
                self.engine.cancel(request.id)
                return
            ticket.events.put(Event(tokens, text))
            return
        reason = "stop" if ticket.text is not None and ticket.text.stopped else FINISH[request.finish_reason]
        text = ticket.text.push(tokens, final=True) if ticket.text is not None else ""
        ticket.events.put(Event(tokens, text, reason))
        self.metrics.requests.labels(reason).inc()
        del self._tickets[request.id]
        self._last_token.pop(request.id, None)


class Worker(inference_pb2_grpc.InferenceServicer):
    """The inference API over one loaded model."""

    def __init__(
        self, loaded: LoadedModel, config: WorkerConfig, registry: CollectorRegistry, log: logging.Logger
    ) -> None:
        self.loaded, self.config, self.log = loaded, config, log
        self.metrics = WorkerMetrics(registry)
        # a scaled-out store's reads that a later replica delivered (ClusterExpertStore.failovers; 0 for others)
        Gauge("expertflow_store_failovers", "expert reads failed over to another replica", registry=registry
              ).set_function(lambda: getattr(loaded.store, "failovers", 0))  # fmt: skip
        try:
            self.codec: TextCodec | None = TextCodec(loaded.directory)
        except (FileNotFoundError, ValueError):
            self.codec = None
        self.loop = _EngineLoop(loaded, config, self.metrics, log)
        self._accepting = True

    def start(self) -> Worker:
        self.loop.start()
        return self

    # -- the API ----------------------------------------------------------------------------------------
    def Generate(self, request, context) -> Iterator[inference_pb2.GenerateResponse]:
        if not self._accepting:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is shutting down")
        if self.loop.error is not None:
            context.abort(grpc.StatusCode.INTERNAL, f"the worker's engine failed: {self.loop.error}")
        ticket = self._ticket(request, context)
        if self.loop.active + self.loop.engine.waiting >= self.config.max_queue:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{self.config.max_queue} requests already queued")
        context.add_callback(lambda: None if ticket.done else self.loop.cancel(ticket.id))  # the client left
        self.loop.submit(ticket)
        prompt_tokens = len(ticket.prompt)
        while True:
            event = ticket.events.get()
            if isinstance(event, RequestError):
                ticket.done = True
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(event))
            if isinstance(event, ExpertsUnavailable):  # worth retrying once the store nodes are back
                ticket.done = True
                context.abort(grpc.StatusCode.UNAVAILABLE, str(event))
            if isinstance(event, BaseException):
                ticket.done = True
                context.abort(grpc.StatusCode.INTERNAL, str(event))
            ticket.generated += len(event.tokens)
            response = inference_pb2.GenerateResponse(
                request_id=ticket.id, token_ids=event.tokens, text=event.text, finish_reason=event.finish_reason
            )
            if event.finish_reason:
                ticket.done = True
                response.usage.prompt_tokens = prompt_tokens
                response.usage.completion_tokens = ticket.generated
                yield response
                return
            yield response

    def Cancel(self, request, context) -> inference_pb2.CancelResponse:
        found = request.request_id in self.loop._tickets
        if found:
            self.loop.cancel(request.request_id)
        return inference_pb2.CancelResponse(found=found)

    def GetModelInfo(self, request, context) -> inference_pb2.ModelInfo:
        loaded, spec = self.loaded, self.loaded.spec
        space = spec.experts
        template = (loaded.directory / "tokenizer_config.json").exists() and "chat_template" in (
            loaded.directory / "tokenizer_config.json"
        ).read_text()
        return inference_pb2.ModelInfo(
            model=str(loaded.directory),
            family=spec.family,
            vocab_size=spec.vocab_size,
            max_positions=self.loop.engine.max_len,
            moe_layers=space.n_layers,
            experts=space.n_experts,
            top_k=space.top_k,
            device=str(loaded.device),
            dtype=str(loaded.dtype).removeprefix("torch."),
            policy=loaded.policy.name,
            has_tokenizer=self.codec is not None,
            has_chat_template=template,
            eos_token_ids=list(spec.eos_token_ids),
        )

    # -- requests ---------------------------------------------------------------------------------------
    def _ticket(self, request, context) -> Ticket:
        s = request.sampling
        kind = request.WhichOneof("prompt")
        if kind is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the request has no prompt (text or token_ids)")
        if kind == "text":
            if self.codec is None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this model has no tokenizer: send token_ids")
            prompt = self.codec.encode(request.text)
        else:
            prompt = list(request.token_ids.ids)
        if not prompt:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        cap = self.config.max_new_tokens
        if s.max_new_tokens > cap:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"max_new_tokens {s.max_new_tokens} is over this server's {cap}")
        if s.stop and self.codec is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "stop strings need a tokenizer; use stop_token_ids")
        try:
            params = SamplingParams(
                max_new_tokens=s.max_new_tokens or cap,
                temperature=s.temperature,
                top_p=s.top_p if 0 < s.top_p <= 1 else 1.0,
                seed=s.seed,
                stop_on_eos=not s.ignore_eos,
                stop_token_ids=tuple(s.stop_token_ids),
            )
        except RequestError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        text = IncrementalText(self.codec, tuple(s.stop)) if self.codec is not None else None
        return Ticket(request.request_id or f"req-{uuid.uuid4().hex[:12]}", prompt, params, text)

    # -- stopping ---------------------------------------------------------------------------------------
    def stop(self, drain_s: float = 30.0) -> None:
        """Refuse new requests, give those in flight `drain_s` to finish, then cancel the rest."""
        self._accepting = False
        deadline = time.monotonic() + drain_s
        while self.loop.active and time.monotonic() < deadline and self.loop.error is None:
            time.sleep(0.05)
        self.loop.stop()


def load_model(config: ServicesConfig, security: Security | None = None) -> LoadedModel:
    """The worker's model as [model] says: its experts from the expert-store service when [worker] store is
    set (else an in-process store), its prefetches from the orchestrator when [worker] orchestrator is set
    (else planned in process, with the model's predictor for the expertflow policy). A policy that prefetches
    nothing (lru, ondemand) runs in process either way. Both services are called as `security` says (None:
    as [security] does)."""
    from expertflow.default_model import default_model_dir
    from expertflow.loader import LoadOptions, load, policy_inputs

    m = config.model
    security = security or Security.load(config.security)
    directory = Path(m.dir) if m.dir else default_model_dir()
    device = m.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if m.dtype and m.dtype not in dtypes:
        raise ValueError(f"[model] dtype {m.dtype!r}: one of {', '.join(dtypes)}")

    def inputs(space):
        values = {}
        if m.policy == "expertflow":
            values["learned"] = _predictor(directory, m.predictor).sessions()
        return policy_inputs(space, **values)

    factory = None
    if config.worker.orchestrator and m.policy not in ("lru", "ondemand"):  # planned by the orchestrator service
        from expertflow.services.orchestrator_client import remote_policy

        wait_ms = config.worker.plan_timeout_ms
        factory = remote_policy(config.worker.orchestrator, m.policy, wait_ms=wait_ms, security=security)
    options = LoadOptions(
        device=device,
        dtype=dtypes.get(m.dtype),
        expert_budget=m.expert_budget,
        host_budget=m.host_budget,
        policy=m.policy,
        policy_inputs=inputs,
        policy_factory=factory,
    )
    if not config.worker.store:
        return load(directory, options)
    store = _expert_store(config, directory, device, security)
    try:
        loaded = load(directory, options, store=store)
    except BaseException:
        store.close()
        raise
    loaded.owns_store = True  # the worker's own connection: closed with the model
    return loaded


def _expert_store(config: ServicesConfig, directory: Path, device: str, security: Security):
    """[worker] store: one expert-store node at host:port, or a scaled-out store through its directory
    (redis://...), bound to this worker's own model version: the content of its checkpoint, the dtype it computes
    in and [model] version_label, computed as every store node computes it; the nodes called as `security` says."""
    if not config.worker.store.startswith(("redis://", "rediss://", "unix://")):
        from expertflow.services.store_client import RemoteExpertStore

        return RemoteExpertStore(config.worker.store, device, security=security)
    from expertflow.services.redis_directory import RedisDirectory
    from expertflow.services.store_cluster import ClusterExpertStore
    from expertflow.services.store_server import ServedModel, served_dtype

    served = ServedModel.open(directory, "0", served_dtype(config), config.model.version_label)
    directory_client = RedisDirectory.from_url(config.worker.store)
    return ClusterExpertStore(directory_client, served.version, device, security=security)


def _predictor(model_dir: Path, given: str):
    from predictor.learned import LearnedPredictor
    from predictor.locate import find_predictor
    from predictor.online import OnlineConfig

    directory = Path(given) if given else find_predictor(model_dir)
    if directory is None:
        raise FileNotFoundError(
            f"no route predictor for {model_dir}: make one with `expertflow prepare --model {model_dir} --data ...`, "
            "set [model] predictor, or choose another [model] policy"
        )
    return LearnedPredictor.load(directory, OnlineConfig())
