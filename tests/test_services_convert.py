"""The wire messages carry the contracts exactly: every conversion round-trips, and malformed messages are
refused with the reason before they reach a prefetcher or a predictor."""

from __future__ import annotations

import numpy as np
import pytest

from expert_store.keys import ExpertKey
from expert_store.plan import CacheView, InFlight, Plan, Transfer
from expertflow.services import convert
from expertflow.v1 import common_pb2, orchestrator_pb2
from orchestrator.prefetcher import LayerRoutes, StepRequest


def _view(n_layers: int = 3, n_experts: int = 5) -> CacheView:
    rng = np.random.default_rng(0)
    return CacheView(
        now_ms=1234.567891234,
        n_slots=7,
        resident=rng.random((n_layers, n_experts)) < 0.4,
        in_flight=(InFlight(ExpertKey(0, 4), 1235.1, True), InFlight(ExpertKey(2, 1), float("inf"), False)),
        pinned=frozenset({ExpertKey(0, 4), ExpertKey(1, 0)}),
        layer_ms=(0.1, 1 / 3, 2.5e-7),
        transfer_ms=0.30000000000000004,
        link_busy=0.25,
    )


def _same_view(a: CacheView, b: CacheView) -> None:
    assert b.resident.dtype == bool and np.array_equal(a.resident, b.resident)
    for name in ("now_ms", "n_slots", "in_flight", "pinned", "layer_ms", "transfer_ms", "link_busy"):
        assert getattr(a, name) == getattr(b, name), name


def test_contracts_round_trip_exactly():
    view = _view()
    msg = convert.view_to_proto(view)
    back = convert.view_from_proto(orchestrator_pb2.CacheView.FromString(msg.SerializeToString()), (3, 5))
    _same_view(view, back)
    assert all(isinstance(f.key, ExpertKey) for f in back.in_flight)

    p32 = float(np.float32(0.7312))  # the planner's probabilities are float32 values
    plan = Plan(
        fetch=(Transfer(ExpertKey(1, 2), 10.25, 9.125, p32), Transfer(ExpertKey(2, 4), 11.0, 10.0, 1.0)),
        cancel=(ExpertKey(0, 3),),
        evict=(ExpertKey(2, 0), ExpertKey(1, 1)),
    )
    use = np.random.default_rng(1).random((3, 5)) * 100
    use[0, 0] = np.inf
    wire = orchestrator_pb2.Plan.FromString(convert.plan_to_proto(plan, use).SerializeToString())
    back_plan, back_use = convert.plan_from_proto(wire, (3, 5))
    assert back_plan == plan and np.array_equal(back_use, use) and back_use.dtype == np.float64
    empty, none = convert.plan_from_proto(convert.plan_to_proto(None, clear_next_use=True), (3, 5))
    assert not empty and none is None and convert.plan_to_proto(None, clear_next_use=True).clear_next_use

    requests = [StepRequest("a", (5, 6, 7)), StepRequest("b", (9,)), StepRequest("c", ())]
    assert convert.requests_from_proto(convert.requests_to_proto(requests)) == requests

    routed = LayerRoutes(
        1,
        {"a": np.array([[0, 4], [2, 3], [1, 0]]), "b": np.array([[3, 1]], np.int32)},
        {"b": np.array([4, 2])},
    )
    back_routes = convert.routes_from_proto(1, convert.routes_to_proto(routed), (3, 5))
    assert back_routes.layer == 1 and back_routes.routes.keys() == routed.routes.keys()
    for rid, rows in routed.routes.items():
        assert np.array_equal(back_routes.routes[rid], rows) and back_routes.routes[rid].dtype == np.int64
    assert back_routes.speculation.keys() == {"b"} and np.array_equal(back_routes.speculation["b"], [4, 2])
    no_spec = convert.routes_from_proto(0, convert.routes_to_proto(LayerRoutes(0, {"a": np.array([[1, 2]])})), (3, 5))
    assert no_spec.speculation is None
    known = convert.routes_from_proto(1, convert.routes_to_proto(routed), (3, 5), known={"a"})
    assert known.routes.keys() == {"a"} and known.speculation is None  # the others are left out

    probs = {"a": np.random.default_rng(2).random((3, 5)).astype(np.float32), "b": np.zeros((3, 5), np.float32)}
    back_probs = convert.probabilities_from_proto(convert.probabilities_to_proto(probs), (3, 5))
    assert back_probs.keys() == probs.keys() and all(np.array_equal(back_probs[k], probs[k]) for k in probs)
    row = {"a": np.array([0.5, 0.25, 1e-8, 1.0, 0.0], np.float32)}
    assert np.array_equal(convert.probabilities_from_proto(convert.probabilities_to_proto(row), (5,))["a"], row["a"])

    assert convert.key_from_proto(convert.key_to_proto((2, 4)), (3, 5)) == ExpertKey(2, 4)


def test_malformed_messages_are_refused_with_the_reason():
    good = convert.view_to_proto(_view())
    cases = []
    short = orchestrator_pb2.CacheView()
    short.CopyFrom(good)
    short.resident = good.resident[:-1]
    cases.append((lambda: convert.view_from_proto(short), "resident has 14 bytes, 3 x 5 experts need 15"))
    cases.append((lambda: convert.view_from_proto(good, (3, 6)), "cache view of 3 x 5 experts, the model has 3 x 6"))
    times = orchestrator_pb2.CacheView()
    times.CopyFrom(good)
    del times.layer_ms[-1]
    cases.append((lambda: convert.view_from_proto(times), "2 layer times for 3 MoE layers"))
    outside = orchestrator_pb2.CacheView()
    outside.CopyFrom(good)
    outside.pinned.add(layer=3, expert=0)
    cases.append((lambda: convert.view_from_proto(outside), "pinned key (3, 0) is outside the model's 3 x 5 experts"))
    cases.append((lambda: convert.view_from_proto(orchestrator_pb2.CacheView()), "0 MoE layers x 0 experts"))

    def routes(**kw):
        return [common_pb2.RequestRoutes(request_id="a", **kw)]

    cases.append((lambda: convert.routes_from_proto(3, routes(experts=[1], top_k=1), (3, 5)), "has 3 MoE layers"))
    cases.append((lambda: convert.routes_from_proto(0, routes(experts=[1, 2, 3], top_k=2), (3, 5)), "top_k 2"))
    cases.append((lambda: convert.routes_from_proto(0, routes(experts=[1, 5], top_k=2), (3, 5)), "expert 5 is outside"))
    cases.append(
        (lambda: convert.routes_from_proto(0, routes(experts=[1, 2], top_k=2, speculation=[9]), (3, 5)), "speculation")
    )
    twice = routes(experts=[1], top_k=1) * 2
    cases.append((lambda: convert.routes_from_proto(0, twice, (3, 5)), "request 'a' appears twice"))
    cases.append(
        (lambda: convert.requests_from_proto([common_pb2.RequestTokens(request_id="x")] * 2), "'x' appears twice")
    )
    few = [common_pb2.RequestProbabilities(request_id="a", values=[0.5] * 14)]
    cases.append((lambda: convert.probabilities_from_proto(few, (3, 5)), "14 values, expected 15"))
    ranking = orchestrator_pb2.Plan(next_use_ms=[1.0] * 4)
    cases.append((lambda: convert.plan_from_proto(ranking, (3, 5)), "next_use_ms has 4 values for 3 x 5"))
    fetch = orchestrator_pb2.Plan(fetch=[orchestrator_pb2.Transfer(key=common_pb2.ExpertKey(layer=0, expert=7))])
    cases.append((lambda: convert.plan_from_proto(fetch, (3, 5)), "fetched key (0, 7) is outside"))
    for call, message in cases:
        with pytest.raises(convert.MessageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            call()
