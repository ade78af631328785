"""Placement-aware prefetch: each key's source (local memory, another store node, NVMe) and that source's time, from
the stores through the cache's view, the wire and the timing to the planner and the simulator; checked by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_orchestrator import CYCLE, HAND, plan_input, policy
from test_store_service import serving

from expert_store.device_cache import ExpertCache
from expert_store.eviction import Lru
from expert_store.keys import ExpertKey
from expert_store.plan import SOURCES, CacheView, Source
from expert_store.timing import MeasuredTiming
from expert_store.transfer import CpuCopier
from expertflow.services import convert
from expertflow.services.store_client import RemoteExpertStore
from expertflow.v1 import orchestrator_pb2
from orchestrator.copy_engine import CopyEngine
from orchestrator.planner import PlanConfig, PlanInput, plan
from orchestrator.simulator import SimConfig, TierLink, simulate

LOW = PlanConfig(threshold=0.1)
LOCAL, REMOTE, NVME = (SOURCES.index(s) for s in (Source.LOCAL, Source.REMOTE, Source.NVME))


def _key_ms(shape, remote=(), local_ms=0.1, remote_ms=0.5) -> np.ndarray:
    out = np.full(shape, local_ms)
    for key in remote:
        out[key] = remote_ms
    return out


# -- planner -----------------------------------------------------------------------------------------------------


def test_a_remote_fetch_is_issued_before_a_local_one_due_at_the_same_time():
    # Layer 1 starts at 2.0. (1, 0) is local (0.1 ms) and likelier; (1, 1) is remote (0.5 ms): it must start by 1.5,
    # the local one only by 1.9, so the remote one goes first and both land in time (0.5, then 0.6).
    p = np.zeros((2, 2))
    p[1, 0], p[1, 1] = 0.9, 0.5
    out = plan(plan_input(p, key_ms=_key_ms(p.shape, remote=[(1, 1)])), LOW)
    assert [t.key for t in out.fetch] == [(1, 1), (1, 0)]
    assert [t.deadline_ms for t in out.fetch] == [2.0, 2.0]
    assert np.allclose([t.eta_ms for t in out.fetch], [0.5, 0.6])
    # One link speed for both: earliest deadline, then likeliest first, as before.
    same = plan(plan_input(p, transfer_ms=0.1), LOW)
    assert [t.key for t in same.fetch] == [(1, 0), (1, 1)]
    assert np.allclose([t.eta_ms for t in same.fetch], [0.1, 0.2])


def test_a_remote_key_that_cannot_land_in_time_is_dropped_while_a_local_one_is_fetched():
    # Layer 0 starts at 0.5: the local key (0.1 ms) makes it, the remote one (2 ms) does not and takes no queue
    # time; layer 1's local key lands right behind the first. Lateness by default is the key's own transfer time:
    # then the remote key (latest start -1.5) goes first and lands at 2.0 <= 0.5 + 2.0, and the local keys, each
    # allowed 0.1 late, cannot land in time behind it.
    p = np.zeros((2, 3))
    p[0, 0], p[0, 1], p[1, 2] = 0.9, 0.9, 0.9
    key_ms = _key_ms(p.shape, remote=[(0, 1)], remote_ms=2.0)
    strict = plan(plan_input(p, next_start_ms=0.5, key_ms=key_ms), PlanConfig(threshold=0.1, max_lateness_ms=0.0))
    assert [t.key for t in strict.fetch] == [(0, 0), (1, 2)]
    assert np.allclose([t.eta_ms for t in strict.fetch], [0.1, 0.2])
    lenient = plan(plan_input(p, next_start_ms=0.5, key_ms=key_ms), LOW)
    assert [t.key for t in lenient.fetch] == [(0, 1)]  # the local keys behind it (2.1) are past 0.6 and 1.6
    assert lenient.fetch[0].eta_ms == 2.0


def test_one_time_for_every_key_plans_exactly_as_one_link_speed():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = rng.random((4, 6))
        resident = rng.random((4, 6)) < 0.3
        kw = {"n_slots": 12, "layer": int(rng.integers(0, 5)), "link_busy": float(rng.random()), "transfer_ms": 0.3}
        one = plan(plan_input(p, resident, **kw), LOW)
        per_key = plan(plan_input(p, resident, key_ms=np.full(p.shape, 0.3), **kw), LOW)
        assert one == per_key


def test_plan_input_takes_each_keys_time_from_the_view():
    sources = np.zeros((2, 3), np.uint8)
    sources[1, 2], sources[0, 1] = REMOTE, NVME
    view = CacheView(
        0.0, 4, np.zeros((2, 3), bool), layer_ms=(1.0, 1.0), transfer_ms=0.1, sources=sources, source_ms=(0.1, 0.7, 0.4)
    )
    inp = PlanInput.of(view, np.zeros((2, 3)), 0, 1.0)
    assert (inp.transfer(ExpertKey(0, 0)), inp.transfer(ExpertKey(1, 2)), inp.transfer(ExpertKey(0, 1))) == (
        0.1,
        0.7,
        0.4,
    )
    assert (
        PlanInput.of(CacheView(0.0, 4, np.zeros((2, 3), bool), layer_ms=(1.0, 1.0)), np.zeros((2, 3)), 0, 1).key_ms
        is None
    )
    with pytest.raises(ValueError, match="one per source"):
        CacheView(0.0, 4, np.zeros((2, 3), bool), layer_ms=(1.0, 1.0), sources=sources, source_ms=(0.1,))
    with pytest.raises(ValueError, match="sources"):
        CacheView(0.0, 4, np.zeros((2, 3), bool), layer_ms=(1.0, 1.0), sources=np.zeros((3, 2), np.uint8))


# -- the wire ----------------------------------------------------------------------------------------------------


def test_sources_cross_the_wire_exactly_and_malformed_ones_are_refused():
    sources = np.array([[LOCAL, REMOTE, NVME], [REMOTE, LOCAL, LOCAL]], np.uint8)
    view = CacheView(1.5, 4, np.zeros((2, 3), bool), layer_ms=(1.0, 2.0), sources=sources, source_ms=(0.1, 2.5, 1 / 3))
    back = convert.view_from_proto(
        orchestrator_pb2.CacheView.FromString(convert.view_to_proto(view).SerializeToString()), (2, 3)
    )
    assert np.array_equal(back.sources, sources) and back.source_ms == view.source_ms
    plain = convert.view_from_proto(convert.view_to_proto(CacheView(0.0, 4, np.zeros((2, 3), bool), layer_ms=(1, 1))))
    assert plain.sources is None and plain.source_ms == ()
    msg = convert.view_to_proto(view)
    msg.sources = b"\x00" * 5
    with pytest.raises(convert.MessageError, match="sources has 5 bytes"):
        convert.view_from_proto(msg)
    msg.sources = bytes([0, 0, 0, 0, 0, 7])
    with pytest.raises(convert.MessageError, match="source code 7"):
        convert.view_from_proto(msg)
    msg.sources = b""
    del msg.source_ms[:]
    msg.source_ms.append(1.0)
    with pytest.raises(convert.MessageError, match="1 source times"):
        convert.view_from_proto(msg)


# -- timing ------------------------------------------------------------------------------------------------------


def test_measured_timing_keeps_one_time_per_source():
    t = MeasuredTiming(n_layers=2, smoothing=0.5, transfer_ms=1.0, read_ms=4.0)
    assert t.source_ms == (1.0, 5.0, 5.0)  # before any read: the guesses
    # A step: 4 device copies in 8 ms (2 each); 2 remote reads in 20 ms (10 each); no NVMe read.
    t.record_step(0.1, 0.008, 4, {Source.REMOTE: (0.02, 2)})
    assert t.transfer_ms == pytest.approx(1.5)
    assert t.source_ms == pytest.approx((1.5, 1.5 + 7.0, 1.5 + 4.0))
    assert t.link_busy == pytest.approx(0.5 * 0.028 / 0.1)


# -- the simulator -----------------------------------------------------------------------------------------------


def test_copy_engine_serves_a_remote_key_first_and_for_its_own_time():
    engine = CopyEngine(1.0, _key_ms((1, 4), remote=[(0, 3)], local_ms=1.0, remote_ms=3.0))
    engine.submit(ExpertKey(0, 0), 0.0, 10.0, demand=False)
    engine.submit(ExpertKey(0, 3), 0.0, 10.0, demand=False)
    assert [(f.key, f.eta_ms) for f in engine.pending(0.0)] == [((0, 3), 3.0), ((0, 0), 4.0)]
    assert [(k, at) for k, at, _ in engine.advance(10.0)] == [((0, 3), 3.0), ((0, 0), 4.0)]
    assert engine.busy_ms == 4.0


def test_simulator_stall_by_hand_with_experts_on_another_node():
    remote = TierLink(bandwidth=1e9, latency_ms=0.5)  # 1.5 ms to read 1 MB, then 1 ms to the device
    config = SimConfig(**{**HAND.__dict__, "remote_share": 1.0, "remote": remote})
    r = simulate(CYCLE, policy("lru", CYCLE), config)
    assert (r.misses, r.remote_share) == (9, 1.0)
    assert r.stall_ms == pytest.approx(9 * 2.5)  # LRU misses every key of the cycle; each waits 2.5 ms
    half = SimConfig(**{**HAND.__dict__, "remote_share": 0.5, "remote": remote})
    sources = half.sources((1, 4))
    assert (sources == REMOTE).sum() == 2 and (sources == LOCAL).sum() == 2
    expected = sum(2.5 if sources[0, e] == REMOTE else 1.0 for e in [0, 1, 2] * 3)
    assert simulate(CYCLE, policy("lru", CYCLE), half).stall_ms == pytest.approx(expected)
    assert HAND.sources((1, 4)) is None  # every expert local: the one-link model
    with pytest.raises(ValueError, match="remote_share"):
        SimConfig(remote_share=0.7, nvme_share=0.5)


# -- the stores and the cache ------------------------------------------------------------------------------------


def test_stores_report_ram_shm_file_and_fetched_sources_and_the_cache_shows_them(mixtral_dir):
    with serving(mixtral_dir, "50%") as (address, svc, _):
        store = svc.store
        keys = store.keys()
        local = {Source.LOCAL if store.tier(k).value == "host" else Source.NVME for k in keys}
        assert local == {Source.LOCAL, Source.NVME}  # the embedded store: its RAM and its files
        assert all(store.source(k) is (Source.LOCAL if store.host_view(k) is not None else Source.NVME) for k in keys)
        same_host = RemoteExpertStore(address, "cpu")
        other_host = RemoteExpertStore(address, "cpu", host_id="another-host")
        try:
            # this host: the shared memory mapped (LOCAL), the store's files streamed over loopback (NVME)
            assert [same_host.source(k) for k in keys] == [store.source(k) for k in keys]
            assert {other_host.source(k) for k in keys} == {Source.REMOTE}  # every expert fetched
            cache = ExpertCache(other_host, 4, torch.device("cpu"), Lru(), CpuCopier(), timing=MeasuredTiming(3))
            view = cache.view()
            assert view.sources is not None and (view.sources == REMOTE).all()
            before = view.source_ms[REMOTE]
            list(cache.acquire(0, [0, 1]))  # two fetches, timed
            cache.end_step(1.0)
            assert cache.view().source_ms[REMOTE] != before  # measured now, not the starting guess
            cache = ExpertCache(same_host, 4, torch.device("cpu"), Lru(), CpuCopier())
            codes = cache.view().sources
            assert all(SOURCES[codes[k]] is same_host.source(k) for k in keys)
        finally:
            same_host.close()
            other_host.close()


def test_cli_sweeps_remote_shares_aware_and_blind_and_refuses_bad_shares(tmp_path, capsys):
    from test_orchestrator import random_trace

    from orchestrator.cli import main as cli_main

    path = tmp_path / "t.safetensors"
    random_trace(3, n_seq=2, length=10).save(path)
    code = cli_main(
        ["simulate", "--traces", str(path), "--budget", "0.5", "--policy", "lru", "--expert-bytes", "1000000",
         "--remote-share", "0,1", "--remote-bandwidth", "1GB/s", "--remote-latency-ms", "0.5", "--placement-blind",
         "--json"]
    )  # fmt: skip
    rows = json.loads(capsys.readouterr().out)
    assert code == 0
    assert [(r["remote_share"], r["placement_aware"]) for r in rows] == [(0.0, True), (1.0, True), (1.0, False)]
    local, remote = rows[0], rows[1]
    # every copy from the other node: 1.5 ms read + the 1e6 / 55e9 s device copy instead of the copy alone
    assert remote["misses"] == local["misses"] > 0
    assert remote["stall_ms"] == pytest.approx(local["stall_ms"] + remote["transfers"] * 1.5)
    for bad in ("2", "x", "0.6 --nvme-share 0.6"):
        argv = ["simulate", "--traces", str(path), "--expert-bytes", "1000000", "--remote-share", *bad.split()]
        assert cli_main(argv) == 2, bad
        assert "share" in capsys.readouterr().err


def test_a_source_said_as_text_is_read_and_a_wrong_one_refused():
    assert [Source.of(t) for t in ("host", "remote", "remote:node-2", "nvme")] == [
        Source.LOCAL,
        Source.REMOTE,
        Source.REMOTE,
        Source.NVME,
    ]
    assert Source.of(Source.NVME) is Source.NVME
    with pytest.raises(ValueError, match="expert source 'disk'"):
        Source.of("disk")


def test_the_orchestrator_service_plans_with_each_keys_source_as_in_process():
    """The view crosses the real gRPC/ZMQ boundary with its sources: the service's plan equals the in-process one, and
    in each layer the remote expert is fetched before the local one due with it."""
    from test_orchestrator_service import FixedRoutes, _by_group, _Services

    from expert_store.keys import ExpertSpace
    from expertflow.services.orchestrator_client import RemotePrefetcher
    from orchestrator.expertflow import ExpertFlow
    from orchestrator.prefetcher import StepRequest

    sources = np.zeros((4, 8), np.uint8)
    sources[:, 1] = REMOTE  # request "a" uses experts 0 (local) and 1 (remote) at every layer
    view = CacheView(
        0.0, 8, np.zeros((4, 8), bool), layer_ms=(1.0,) * 4, transfer_ms=0.1, sources=sources, source_ms=(0.1, 0.4, 0.3)
    )
    services = _Services("expertflow", lambda: FixedRoutes(4, 8, _by_group))
    remote = RemotePrefetcher(services.address, ExpertSpace.of(range(4), 8, 2), wait_ms=5000)
    local = ExpertFlow(FixedRoutes(4, 8, _by_group))
    try:
        plans = []
        for prefetcher in (remote, local):
            prefetcher.begin_step([StepRequest("a", (5, 6))], view)  # a prompt: nothing predicted yet
            plans.append(prefetcher.begin_step([StepRequest("a", (7,))], view))
        assert plans[0] == plans[1] and plans[0].fetch
        order = [t.key for t in plans[0].fetch]
        # layer 0 starts now: behind the remote copy (0.4 ms) the local one (0.5) is past its 0.1 ms of lateness
        assert order == [(0, 1), (1, 1), (1, 0), (2, 1), (2, 0), (3, 1), (3, 0)]
    finally:
        remote.close()
        services.close()
