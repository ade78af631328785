"""The in-process contracts <-> their wire messages (expertflow/v1), exactly, in both directions.

    ExpertKey            <-> common.ExpertKey
    CacheView            <-> orchestrator.CacheView        resident as one byte per key, row-major
    Plan (+ next_use_ms) <-> orchestrator.Plan              the [L, E] eviction ranking rides with the plan
    StepRequest          <-> common.RequestTokens
    LayerRoutes          <-> common.RequestRoutes           [T, K] rows flattened, K in top_k
    {id: probabilities}  <-> common.RequestProbabilities    [L, E] or [E], float32

A round trip gives back equal values: keys as ExpertKey, routes as int64 arrays, probabilities as float32
(their dtype everywhere), `Transfer.prob` as the float32 the planner computed it from. Decoding checks every
shape and index against the model's (L, E) and raises `MessageError`, which the servicers answer with
INVALID_ARGUMENT, so a malformed message never reaches a prefetcher or a predictor.

Not for: any service's logic (the servers and clients), or choosing what the messages say.
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping, Sequence

import numpy as np

from expert_store.keys import ExpertKey
from expert_store.plan import SOURCES, CacheView, InFlight, Plan, Transfer
from expertflow.v1 import common_pb2, orchestrator_pb2
from orchestrator.prefetcher import LayerRoutes, StepRequest
from predictor.base import RequestId

Shape = tuple[int, int]  # (L, E): MoE layers, experts per layer


class MessageError(ValueError):
    """A message that does not fit the model or the contract: why."""


def key_to_proto(key: tuple[int, int]) -> common_pb2.ExpertKey:
    return common_pb2.ExpertKey(layer=int(key[0]), expert=int(key[1]))


def key_from_proto(msg: common_pb2.ExpertKey, shape: Shape, what: str = "key") -> ExpertKey:
    if msg.layer >= shape[0] or msg.expert >= shape[1]:
        raise MessageError(f"{what} ({msg.layer}, {msg.expert}) is outside the model's {shape[0]} x {shape[1]} experts")
    return ExpertKey(msg.layer, msg.expert)


def view_to_proto(view: CacheView) -> orchestrator_pb2.CacheView:
    n_layers, n_experts = view.resident.shape
    return orchestrator_pb2.CacheView(
        now_ms=view.now_ms,
        n_slots=view.n_slots,
        moe_layers=n_layers,
        experts=n_experts,
        resident=np.ascontiguousarray(view.resident, np.uint8).tobytes(),
        in_flight=[
            orchestrator_pb2.InFlight(key=key_to_proto(f.key), eta_ms=f.eta_ms, started=f.started)
            for f in view.in_flight
        ],
        pinned=[key_to_proto(k) for k in view.pinned],
        layer_ms=view.layer_ms,
        transfer_ms=view.transfer_ms,
        link_busy=view.link_busy,
        sources=b"" if view.sources is None else np.ascontiguousarray(view.sources, np.uint8).tobytes(),
        source_ms=view.source_ms,
    )


def view_shape(msg: orchestrator_pb2.CacheView) -> Shape:
    if msg.moe_layers < 1 or msg.experts < 1:
        raise MessageError(f"cache view of {msg.moe_layers} MoE layers x {msg.experts} experts: both must be >= 1")
    return msg.moe_layers, msg.experts


def view_from_proto(msg: orchestrator_pb2.CacheView, shape: Shape | None = None) -> CacheView:
    """`shape`: the (L, E) the view must have (None: whatever it says, at least 1 x 1)."""
    own = view_shape(msg)
    if shape is not None and own != tuple(shape):
        raise MessageError(f"cache view of {own[0]} x {own[1]} experts, the model has {shape[0]} x {shape[1]}")
    n_layers, n_experts = own
    if len(msg.resident) != n_layers * n_experts:
        raise MessageError(
            f"cache view: resident has {len(msg.resident)} bytes, {n_layers} x {n_experts} experts need "
            f"{n_layers * n_experts} (one byte per key, row-major)"
        )
    if len(msg.layer_ms) != n_layers:
        raise MessageError(f"cache view: {len(msg.layer_ms)} layer times for {n_layers} MoE layers")
    resident = np.frombuffer(msg.resident, np.uint8).reshape(n_layers, n_experts).astype(bool)
    sources = None
    if msg.sources:
        if len(msg.sources) != n_layers * n_experts:
            raise MessageError(
                f"cache view: sources has {len(msg.sources)} bytes, {n_layers} x {n_experts} experts need "
                f"{n_layers * n_experts} (one byte per key, row-major), or none (every key local)"
            )
        sources = np.frombuffer(msg.sources, np.uint8).reshape(n_layers, n_experts).copy()
        if int(sources.max()) >= len(SOURCES):
            raise MessageError(f"cache view: source code {int(sources.max())}, not one of 0..{len(SOURCES) - 1}")
    if msg.source_ms and len(msg.source_ms) != len(SOURCES):
        raise MessageError(f"cache view: {len(msg.source_ms)} source times, one per source ({len(SOURCES)}) or none")
    return CacheView(
        now_ms=msg.now_ms,
        n_slots=msg.n_slots,
        resident=resident,
        in_flight=tuple(
            InFlight(key_from_proto(f.key, own, "in-flight key"), f.eta_ms, f.started) for f in msg.in_flight
        ),
        pinned=frozenset(key_from_proto(k, own, "pinned key") for k in msg.pinned),
        layer_ms=tuple(msg.layer_ms),
        transfer_ms=msg.transfer_ms,
        link_busy=msg.link_busy,
        sources=sources,
        source_ms=tuple(msg.source_ms),
    )


def plan_to_proto(
    plan: Plan | None, next_use_ms: np.ndarray | None = None, clear_next_use: bool = False
) -> orchestrator_pb2.Plan:
    """`next_use_ms`: the [L, E] ranking the prefetcher planned with, if it changed; `clear_next_use`: it has none."""
    plan = plan or Plan()
    msg = orchestrator_pb2.Plan(
        fetch=[
            orchestrator_pb2.Transfer(key=key_to_proto(t.key), deadline_ms=t.deadline_ms, eta_ms=t.eta_ms, prob=t.prob)
            for t in plan.fetch
        ],
        cancel=[key_to_proto(k) for k in plan.cancel],
        evict=[key_to_proto(k) for k in plan.evict],
        clear_next_use=clear_next_use,
    )
    if next_use_ms is not None:
        msg.next_use_ms[:] = np.asarray(next_use_ms, np.float64).ravel().tolist()
    return msg


def plan_from_proto(msg: orchestrator_pb2.Plan, shape: Shape) -> tuple[Plan, np.ndarray | None]:
    """The plan, and the [L, E] next-use ranking it carries (None: none sent; keep the last one)."""
    plan = Plan(
        fetch=tuple(
            Transfer(key_from_proto(t.key, shape, "fetched key"), t.deadline_ms, t.eta_ms, t.prob) for t in msg.fetch
        ),
        cancel=tuple(key_from_proto(k, shape, "cancelled key") for k in msg.cancel),
        evict=tuple(key_from_proto(k, shape, "evicted key") for k in msg.evict),
    )
    if not msg.next_use_ms:
        return plan, None
    if len(msg.next_use_ms) != shape[0] * shape[1]:
        raise MessageError(f"plan: next_use_ms has {len(msg.next_use_ms)} values for {shape[0]} x {shape[1]} experts")
    return plan, np.array(msg.next_use_ms, np.float64).reshape(shape)


def requests_to_proto(requests: Iterable[StepRequest]) -> list[common_pb2.RequestTokens]:
    return [common_pb2.RequestTokens(request_id=r.id, tokens=r.new_tokens) for r in requests]


def requests_from_proto(msgs: Iterable[common_pb2.RequestTokens]) -> list[StepRequest]:
    out = [StepRequest(m.request_id, tuple(m.tokens)) for m in msgs]
    _unique_ids((r.id for r in out), "step")
    return out


def routes_to_proto(routed: LayerRoutes) -> list[common_pb2.RequestRoutes]:
    spec = routed.speculation or {}
    out = []
    for rid, rows in routed.routes.items():
        rows = np.asarray(rows)
        msg = common_pb2.RequestRoutes(request_id=rid, experts=rows.ravel().tolist(), top_k=rows.shape[-1])
        if rid in spec and spec[rid] is not None:
            msg.speculation[:] = np.asarray(spec[rid]).ravel().tolist()
        out.append(msg)
    return out


def routes_from_proto(
    layer: int, msgs: Sequence[common_pb2.RequestRoutes], shape: Shape, known: Container[RequestId] | None = None
) -> LayerRoutes:
    """speculation is None unless some request carries it (then only those requests have an entry). `known`: the
    requests to keep (None: all); the others are checked, then left out (a server that restarted, say, has not
    seen them, and starts them afresh at their next step)."""
    n_layers, n_experts = shape
    if layer >= n_layers:
        raise MessageError(f"routes of MoE layer {layer}: the model has {n_layers} MoE layers (0..{n_layers - 1})")
    routes: dict[RequestId, np.ndarray] = {}
    speculation: dict[RequestId, np.ndarray] = {}
    for m in msgs:
        if m.top_k < 1 or m.top_k > n_experts or len(m.experts) % m.top_k:
            raise MessageError(
                f"routes of request {m.request_id!r}: {len(m.experts)} experts do not make rows of top_k "
                f"{m.top_k} (1..{n_experts})"
            )
        rows = _experts(m.experts, n_experts, f"routes of request {m.request_id!r}").reshape(-1, m.top_k)
        spec = _experts(m.speculation, n_experts, f"speculation of request {m.request_id!r}") if m.speculation else None
        if known is not None and m.request_id not in known:
            continue
        routes[m.request_id] = rows
        if spec is not None:
            speculation[m.request_id] = spec
    _unique_ids((m.request_id for m in msgs), f"layer {layer}")
    return LayerRoutes(layer, routes, speculation or None)


def probabilities_to_proto(probs: Mapping[RequestId, np.ndarray]) -> list[common_pb2.RequestProbabilities]:
    return [
        common_pb2.RequestProbabilities(request_id=rid, values=np.asarray(p, np.float32).ravel().tolist())
        for rid, p in probs.items()
    ]


def probabilities_from_proto(
    msgs: Iterable[common_pb2.RequestProbabilities], shape: tuple[int, ...]
) -> dict[RequestId, np.ndarray]:
    """`shape`: (L, E) for a step's predictions, (E,) for a layer's."""
    size = int(np.prod(shape))
    out = {}
    for m in msgs:
        if len(m.values) != size:
            raise MessageError(
                f"probabilities of request {m.request_id!r}: {len(m.values)} values, expected {size} ({shape})"
            )
        out[m.request_id] = np.array(m.values, np.float32).reshape(shape)
    return out


def _experts(field: Iterable[int], n_experts: int, what: str) -> np.ndarray:
    """Expert ids as int64, each checked to be < n_experts. (Through a list: numpy reads a repeated field
    element by element, several times slower, and this runs for every request at every layer.)"""
    ids = list(field)
    if ids and max(ids) >= n_experts:
        raise MessageError(f"{what}: expert {max(ids)} is outside the model's {n_experts} experts")
    return np.array(ids, np.int64)


def _unique_ids(ids: Iterable[str], what: str) -> None:
    seen: set[str] = set()
    for rid in ids:
        if rid in seen:
            raise MessageError(f"{what}: request {rid!r} appears twice")
        seen.add(rid)
