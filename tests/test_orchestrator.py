"""Prefetch planner, trace simulator and token scheduler: pure bookkeeping, checked against hand counts."""

from __future__ import annotations

import json

import numpy as np
import pytest

from expert_store.plan import InFlight
from orchestrator.cli import main as cli_main
from orchestrator.peers import HotSet
from orchestrator.planner import PlanConfig, PlanInput, plan
from orchestrator.policies import CachePolicy, make_policy
from orchestrator.scheduler import Request, SchedulerConfig, fifo_batch, form_batch, replay
from orchestrator.simulator import SimConfig, compare, simulate, trace_inputs
from predictor.base import TracePredictor
from predictor.baselines import TrueRoutes
from predictor.replay import ReplaySessions
from traces.format import Trace, TraceInfo


def make_trace(experts: np.ndarray, lengths: list[int], n_experts: int) -> Trace:
    """experts [N, L, K] of sequences of the given lengths."""
    n, layers, k = experts.shape
    info = TraceInfo("hand", "test", tuple(range(layers)), n_experts, k, ("d",))
    return Trace(
        info,
        np.zeros(n, np.int32),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.zeros(len(lengths), np.int16),
        experts.astype(np.uint8),
        np.ones(experts.shape, np.float16),
    )


def random_trace(seed: int, n_seq: int = 6, length: int = 40, layers: int = 3, n_exp: int = 8, k: int = 2) -> Trace:
    """Each sequence routes within its own random subset of 2k experts per layer (requests differ)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n_seq):
        pools = [rng.choice(n_exp, 2 * k, replace=False) for _ in range(layers)]
        rows.append(np.stack([np.stack([rng.choice(p, k, replace=False) for p in pools]) for _ in range(length)]))
    return make_trace(np.concatenate(rows), [length] * n_seq, n_exp)


def multi_hot(experts: np.ndarray, n_experts: int) -> np.ndarray:
    out = np.zeros(experts.shape[:-1] + (n_experts,), np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=-1)
    return out


Oracle = TrueRoutes  # the true routes of each token, known when the token starts


class NextLayerOracle(TrueRoutes):
    """Tests only: a perfect layer-horizon predictor (each layer's true routes, once the layer before ran)."""

    name = "next-layer-oracle"
    horizon = "layer"


class Frequency(TracePredictor):
    """Tests only: every token predicted as the training frequency."""

    name = "test-frequency"

    def __init__(self, train: Trace):
        self.freq = multi_hot(train.experts, train.info.n_experts).mean(0)

    def predict(self, trace: Trace, s: int) -> np.ndarray:
        n = trace.sequence(s).stop - trace.sequence(s).start
        return np.broadcast_to(self.freq, (n,) + self.freq.shape).copy()


# -- planner -----------------------------------------------------------------------------------------


LOW = PlanConfig(threshold=0.1)  # these tests pick probabilities around it


def plan_input(probs, resident=None, **kw) -> PlanInput:
    probs = np.asarray(probs, np.float64)
    defaults = dict(
        layer=0,
        next_start_ms=1.0,
        now_ms=0.0,
        layer_ms=(1.0,) * probs.shape[0],
        transfer_ms=0.1,
        n_slots=16,
        resident=np.zeros(probs.shape, bool) if resident is None else np.asarray(resident, bool),
    )
    return PlanInput(probs=probs, **{**defaults, **kw})


def test_planner_orders_fetches_earliest_deadline_first():
    p = np.zeros((3, 4))
    p[2, 0], p[0, 1], p[1, 2], p[0, 3] = 0.9, 0.5, 0.8, 0.9
    out = plan(plan_input(p), LOW)
    assert [t.key for t in out.fetch] == [(0, 3), (0, 1), (1, 2), (2, 0)]  # by layer, likeliest first within
    assert [t.deadline_ms for t in out.fetch] == [1.0, 1.0, 2.0, 3.0]
    assert np.allclose([t.eta_ms for t in out.fetch], [0.1, 0.2, 0.3, 0.4])
    assert out.cancel == () and out.evict == ()


def test_planner_drops_keys_that_cannot_arrive_in_time():
    p = np.zeros((3, 2))
    p[0, 0], p[2, 1] = 0.9, 0.9
    out = plan(plan_input(p, next_start_ms=0.5, transfer_ms=2.0), PlanConfig(max_lateness_ms=0.0))
    assert [t.key for t in out.fetch] == [(2, 1)]  # layer 0 starts at 0.5, a copy takes 2
    assert out.fetch[0].eta_ms == 2.0  # the dropped key did not take link time
    late_ok = plan(plan_input(p, next_start_ms=0.5, transfer_ms=2.0), PlanConfig(max_lateness_ms=1.5))
    assert [t.key for t in late_ok.fetch] == [(0, 0), (2, 1)]


def test_planner_cancels_unlikely_and_hopeless_queued_transfers_only():
    p = np.zeros((3, 4))
    p[1, 0], p[1, 1], p[0, 2], p[2, 3] = 0.05, 0.0, 0.0, 0.9
    in_flight = (
        InFlight((1, 1), 0.5, started=True),  # unlikely, but already copying
        InFlight((1, 0), 0.6, started=False),  # unlikely: cancel
        InFlight((0, 2), 0.7, started=False),  # unlikely, but the running layer needs it
        InFlight((2, 3), 9.0, started=False),  # likely, but lands long after its layer starts
    )
    inp = plan_input(p, in_flight=in_flight, pinned=frozenset({(0, 2)}), next_start_ms=0.0, layer_ms=(0.1,) * 3)
    out = plan(inp, PlanConfig(max_lateness_ms=0.0))
    assert set(out.cancel) == {(1, 0), (2, 3)}
    # With time to spare, a likely key is kept and only the unlikely one goes.
    roomy = (InFlight((2, 3), 0.7, started=False), InFlight((1, 0), 0.8, started=False))
    assert plan(plan_input(p, in_flight=roomy), LOW).cancel == ((1, 0),)


def test_planner_never_evicts_a_key_needed_before_the_fetched_one():
    p = np.zeros((3, 4))
    p[0, 0], p[1, 1], p[2, 2] = 0.9, 0.9, 0.9  # (0,0) and (1,1) resident; (2,2) wanted
    resident = np.zeros((3, 4), bool)
    resident[0, 0] = resident[1, 1] = True
    out = plan(plan_input(p, resident, n_slots=2), LOW)
    assert out.fetch == () and out.evict == ()
    # With a third slot taken by an unlikely key, that key makes room; pinned, it does not.
    resident[2, 0] = True
    out = plan(plan_input(p, resident, n_slots=3), LOW)
    assert out.evict == ((2, 0),) and [t.key for t in out.fetch] == [(2, 2)]
    out = plan(plan_input(p, resident, n_slots=3, pinned=frozenset({(2, 0)})), LOW)
    assert out.evict == () and out.fetch == ()
    # Among keys not needed sooner, the victim is the one whose expected next use is furthest away.
    p2 = p.copy()
    p2[1, 1], p2[2, 0] = 0.05, 0.3  # (1,1): unlikely; (2,0): likely-ish, but due with (2,2)
    out = plan(plan_input(p2, resident, n_slots=3), LOW)
    assert out.evict == ((1, 1),)
    p2[1, 1] = 0.2  # now predicted (above the threshold) before (2,2) is due: it may not go
    out = plan(plan_input(p2, resident, n_slots=3), LOW)
    assert out.evict == ((2, 0),)


def test_planner_weighs_the_evicted_keys_chance_of_coming_back():
    # One slot, held by (0, 0), due again with the next token (q); (1, 0) is due this token with p = 0.4 on a
    # half-busy link. Fetching it risks (1 - p) x transfer x (busy + q): worth it while the victim is unlikely
    # to come back (q = 0.05), not when it is (q = 0.3), though in both cases its expected use is the later one.
    resident = np.zeros((2, 2), bool)
    resident[0, 0] = True
    for q, fetched in ((0.05, True), (0.3, False)):
        p = np.zeros((2, 2))
        p[0, 0], p[1, 0] = q, 0.4
        inp = plan_input(p, resident, n_slots=1, layer=1, next_start_ms=1.0, link_busy=0.5)
        out = plan(inp, PlanConfig(threshold=0.2, swap_margin_tokens=0.0))
        assert ([t.key for t in out.fetch] == [(1, 0)]) is fetched, q
        assert (out.evict == ((0, 0),)) is fetched, q


# -- simulator ---------------------------------------------------------------------------------------

# One layer, 4 experts, top-1, 2 slots (budget 0.5), the cyclic pattern 0 1 2 repeated 3 times.
CYCLE = make_trace(np.array([0, 1, 2] * 3).reshape(9, 1, 1), [9], 4)
HAND = SimConfig(budget=0.5, bandwidth=1e9, expert_bytes=10**6, layer_ms=1.0)  # a copy takes 1 ms


def policy(name: str, trace: Trace, **inputs) -> CachePolicy:
    return make_policy(name, trace_inputs(trace, **inputs))


@pytest.mark.parametrize(
    "name, hits, misses",
    [
        ("ondemand", 0, 9),
        ("lru", 0, 9),  # a cycle longer than the cache: LRU always evicts the next key
        ("belady", 3, 6),  # MIN: misses at 0 1 2 . 1 . 0 . 2
    ],
)
def test_simulator_hit_counts_by_hand(name, hits, misses):
    r = simulate(CYCLE, policy(name, CYCLE), HAND)
    assert (r.hits, r.misses, r.late, r.uses, r.n_slots) == (hits, misses, 0, 9, 2)
    assert r.bytes_moved == misses * 10**6
    assert r.stall_ms == pytest.approx(misses * 1.0)  # each miss waits one copy
    assert r.time_per_token_ms == pytest.approx(1.0 + misses / 9)


def test_cache_outlives_sequences_unless_emptied():
    trace = make_trace(np.array([0, 1, 0, 1]).reshape(4, 1, 1), [2, 2], 4)
    kept = simulate(trace, policy("lru", trace), HAND)
    emptied = simulate(trace, policy("lru", trace), SimConfig(**{**HAND.__dict__, "empty_per_sequence": True}))
    assert (kept.hits, emptied.hits) == (2, 0)


@pytest.mark.parametrize("seed", range(4))
def test_belady_moves_the_fewest_bytes(seed):
    trace = random_trace(seed)
    train = random_trace(seed + 100)
    inputs = trace_inputs(trace, frequency=Frequency(train).freq, activation=Frequency(train), learned=Oracle())
    for budget in (0.2, 0.5):
        config = SimConfig(budget=budget, bandwidth=1e9, expert_bytes=10**5, layer_ms=0.5)
        results = {
            r.policy: r
            for r in compare(trace, ["ondemand", "lru", "static", "activation", "expertflow", "belady"], config, inputs)
        }
        assert results["belady"].bytes_moved <= min(r.bytes_moved for r in results.values())
        assert results["belady"].hit_rate >= max(results["lru"].hit_rate, results["ondemand"].hit_rate)
        for r in results.values():
            assert r.hits + r.late + r.misses == r.uses == 3 * 2 * 240
            assert 0 <= r.prefetch_used <= r.prefetches <= r.transfers


def test_oracle_expertflow_moves_belady_like_bytes_with_almost_no_stall():
    trace = random_trace(7, n_seq=6, length=150)
    config = SimConfig(budget=0.5, bandwidth=1e9, expert_bytes=10**5, layer_ms=0.5)  # copies 0.1 ms
    ef = simulate(trace, policy("expertflow", trace, learned=Oracle()), config)
    belady, lru = simulate(trace, policy("belady", trace), config), simulate(trace, policy("lru", trace), config)
    assert ef.prefetch_accuracy == 1.0  # every copy was for a key then used
    assert ef.bytes_moved <= 1.25 * belady.bytes_moved
    # A token-horizon prediction comes as the token starts, when its first layer is already due: only
    # the first layer of a request's first tokens can stall, unless the request's recent routes cover it.
    assert ef.misses <= trace.n_sequences * trace.info.top_k
    assert ef.stall_ms < 0.5 * belady.stall_ms and ef.stall_ms < 0.5 * lru.stall_ms


def test_layer_horizon_refinement_lifts_a_weak_token_prediction():
    train, trace = random_trace(1, n_seq=4, length=60), random_trace(8, n_seq=4, length=60)
    config = SimConfig(budget=0.5, bandwidth=1e9, expert_bytes=10**5, layer_ms=0.5)
    plain = simulate(trace, policy("expertflow", trace, learned=Frequency(train)), config)
    refined = simulate(
        trace, policy("expertflow", trace, learned=Frequency(train), learned_layer=NextLayerOracle()), config
    )
    assert refined.hits > plain.hits and refined.stall_ms < plain.stall_ms
    with pytest.raises(ValueError, match="not a layer-horizon predictor"):
        ReplaySessions(trace, Frequency(train), Oracle())


def test_unavailable_and_unsupported_policies_are_reported_not_run():
    class NoTrace(Oracle):
        def supports(self, trace):
            return "needs hidden states"

    results = compare(CYCLE, ["static", "expertflow", "speculate"], HAND, trace_inputs(CYCLE, learned=NoTrace()))
    assert "training routing frequency" in results[0].na
    assert results[1].na == "needs hidden states"
    assert "lacks hidden states" in results[2].na
    with pytest.raises(ValueError):
        make_policy("nonsense", trace_inputs(CYCLE))


def test_static_pins_the_most_frequent_keys():
    freq = np.zeros((1, 4))
    freq[0, 3] = 1.0
    hot = HotSet(freq, top_k=1, share=0.5)
    r = simulate(make_trace(np.array([3, 0, 1, 2, 3]).reshape(5, 1, 1), [5], 4), CachePolicy("static", hot.eviction, hot), HAND)
    assert hot.eviction.keep == frozenset({(0, 3)})
    # The pinned key is loaded once when the replay starts (still copying at its first use), then kept.
    assert (r.late, r.hits, r.misses, r.prefetch_used) == (1, 1, 3, 1)


def test_cli_simulate_json_and_plot(tmp_path, capsys):
    path = tmp_path / "t.safetensors"
    random_trace(3, n_seq=3, length=20).save(path)
    code = cli_main(
        ["simulate", "--traces", str(path), "--train-traces", str(path), "--budget", "0.25,0.5",
         "--expert-bytes", "3*256*320*2", "--bandwidth", "55GB/s", "--json", "--plot", str(tmp_path / "p.png")]
    )  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 0
    by = {(r["policy"], r["budget"]): r for r in rows}
    assert "learned" in by[("expertflow", 0.25)]["na"] and "hidden states" in by[("speculate", 0.5)]["na"]
    assert by[("lru", 0.5)]["bytes_moved"] == by[("lru", 0.5)]["transfers"] * 3 * 256 * 320 * 2


# -- scheduler ---------------------------------------------------------------------------------------


def test_scheduler_groups_requests_with_overlapping_routes():
    sets = [{0, 1}, {2, 3}, {0, 1}, {2, 3}]
    queue = [Request(i, 4 - i, np.isin(np.arange(4), list(s))[None].astype(float)) for i, s in enumerate(sets)]
    config = SchedulerConfig(batch=2, max_wait=10)
    assert fifo_batch(queue, config) == [0, 1]
    assert form_batch(queue, config) == [0, 2]
    # Replayed: sequences 0 and 2 use experts {0, 1}, 1 and 3 use {2, 3}, at every token.
    rows = [np.array([[0, 1]]) if s % 2 == 0 else np.array([[2, 3]]) for s in range(4) for _ in range(6)]
    trace = make_trace(np.stack(rows), [6] * 4, 4)
    fifo = replay(trace, fifo_batch, config, concurrency=4)
    grouped = replay(trace, form_batch, config, concurrency=4)
    assert fifo.tokens == grouped.tokens == 24
    assert (fifo.mean_distinct, grouped.mean_distinct) == (4.0, 2.0)


@pytest.mark.parametrize("seed", range(3))
def test_scheduler_respects_the_wait_bound(seed):
    trace = random_trace(seed, n_seq=14, length=15, n_exp=16)
    for batch, max_wait in ((2, 6), (3, 3), (4, 2)):
        config = SchedulerConfig(batch=batch, max_wait=max_wait)
        report = replay(trace, form_batch, config, concurrency=batch * (max_wait + 1))
        assert report.max_wait <= max_wait and report.tokens == 14 * 15
    # A request unlike all others is not starved.
    queue = [Request(0, 0, np.eye(4)[3:4])] + [Request(i, 0, np.eye(4)[0:1]) for i in range(1, 6)]
    config = SchedulerConfig(batch=2, max_wait=2)
    waited = 0
    for _ in range(4):
        picked = form_batch(queue, config)
        if 0 in picked:
            break
        waited += 1
        queue = [Request(r.id, 0 if r.id in picked else r.waited + 1, r.probs) for r in queue]
    assert waited <= 2
