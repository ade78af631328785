"""The directory contract (expert_store/directory.py), the same tests against both implementations: in process
and in a real redis-server (tests/redis_server.py); and the placement functions it is used with."""

from __future__ import annotations

import time
from collections import Counter

import pytest

from expert_store.directory import (
    Directory,
    DirectoryUnavailable,
    HeldExpert,
    InProcessDirectory,
    ServedLayout,
    StoreNode,
)
from expert_store.keys import ExpertKey
from expert_store.placement import Shard, handoff, rendezvous, share_of, static_placement
from expert_store.store import Tier
from redis_server import RedisServer

LAYOUT = ServedLayout(hidden=8, ffn=16, dtype="float32", slot_nbytes=1536, moe_layers=2, experts=4)
KEYS = LAYOUT.keys()
TTL = 0.5  # seconds; the Redis variant really waits for expiry, so keep it short


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(params=["in_process", "redis"])
def directory(request):
    """(directory, pass(seconds)): `pass` lets time go by, on the fake clock or for real."""
    if request.param == "in_process":
        clock = _Clock()
        yield InProcessDirectory(clock=clock), lambda s: setattr(clock, "now", clock.now + s)
        return
    from expertflow.services.redis_directory import RedisDirectory

    server = request.getfixturevalue("redis_server")
    # a namespace per test: nothing one test wrote is seen by the next
    d = RedisDirectory.from_url(server.url, namespace=f"t{time.monotonic_ns()}")
    yield d, time.sleep
    d.close()


def node(name: str, incarnation: str = "i1") -> StoreNode:
    return StoreNode(name, f"10.0.0.{len(name)}:50061", f"host-{name}", incarnation)


def held(keys, tier: Tier = Tier.HOST) -> list[HeldExpert]:
    return [HeldExpert(k, LAYOUT.slot_nbytes, 1000 + 10 * k.layer + k.expert, tier) for k in keys]


def test_a_registered_node_and_its_holdings_are_in_the_snapshot(directory):
    d, _ = directory
    d.register("v1", node("a"), LAYOUT, held(KEYS[:3]), TTL * 20)
    d.register("v1", node("b"), LAYOUT, held(KEYS[2:], Tier.NVME), TTL * 20)
    snap = d.snapshot("v1")
    assert snap.layout == LAYOUT and sorted(snap.nodes) == ["a", "b"]
    assert snap.nodes["a"] == node("a")
    assert set(snap.entries) == set(KEYS) and snap.missing() == []
    both = snap.entries[KEYS[2]]
    assert (both.nbytes, both.crc32) == (LAYOUT.slot_nbytes, 1000 + 2)
    assert sorted((c.node_id, c.tier) for c in both.copies) == [("a", Tier.HOST), ("b", Tier.NVME)]
    assert snap.held_by("a") == set(KEYS[:3])
    # the best replica: on this host first, then host RAM before NVMe
    assert [n.node_id for n, _ in snap.replicas(KEYS[2])] == ["a", "b"]
    assert [n.node_id for n, _ in snap.replicas(KEYS[2], host_id="host-b")] == ["b", "a"]


def test_versions_never_mix(directory):
    d, _ = directory
    d.register("v1", node("a"), LAYOUT, held(KEYS), TTL * 20)
    d.register("v2", node("b"), LAYOUT, held(KEYS[:1]), TTL * 20)
    assert list(d.snapshot("v1").nodes) == ["a"] and list(d.snapshot("v2").nodes) == ["b"]
    assert set(d.snapshot("v2").entries) == {KEYS[0]} and len(d.snapshot("v2").missing()) == len(KEYS) - 1
    assert d.snapshot("v3").layout is None and d.snapshot("v3").nodes == {}


def test_registering_again_replaces_the_holdings_whole(directory):
    d, _ = directory
    d.register("v1", node("a", "i1"), LAYOUT, held(KEYS[:4]), TTL * 20)
    d.register("v1", node("a", "i2"), LAYOUT, held(KEYS[4:]), TTL * 20)
    snap = d.snapshot("v1")
    assert snap.nodes["a"].incarnation == "i2" and snap.held_by("a") == set(KEYS[4:])


def test_a_member_without_holdings_is_listed_and_holds_nothing(directory):
    d, _ = directory
    d.register("v1", node("a", ""), LAYOUT, [], TTL * 20)
    snap = d.snapshot("v1")
    assert list(snap.nodes) == ["a"] and snap.entries == {} and snap.missing() == KEYS
    assert d.heartbeat("v1", node("a", ""), TTL * 20)


def test_heartbeats_keep_a_node_and_silence_expires_it(directory):
    d, wait = directory
    d.register("v1", node("a"), LAYOUT, held(KEYS), TTL)
    d.register("v1", node("b"), LAYOUT, held(KEYS), TTL)
    for _ in range(3):  # longer than one ttl in all, while a heartbeats and b does not
        wait(TTL / 2)
        assert d.heartbeat("v1", node("a"), TTL)
    snap = d.snapshot("v1")
    assert list(snap.nodes) == ["a"] and all(c.node_id == "a" for e in snap.entries.values() for c in e.copies)
    assert not d.heartbeat("v1", node("b"), TTL)  # it registers again
    d.register("v1", node("b", "i2"), LAYOUT, held(KEYS[:1]), TTL)
    assert sorted(d.snapshot("v1").nodes) == ["a", "b"]


def test_a_heartbeat_of_an_older_incarnation_is_refused(directory):
    d, _ = directory
    d.register("v1", node("a", "i2"), LAYOUT, held(KEYS), TTL * 20)
    assert not d.heartbeat("v1", node("a", "i1"), TTL * 20)
    assert d.heartbeat("v1", node("a", "i2"), TTL * 20)


def test_leaving_is_at_once(directory):
    d, _ = directory
    d.register("v1", node("a"), LAYOUT, held(KEYS), TTL * 20)
    d.register("v1", node("b"), LAYOUT, held(KEYS[:2]), TTL * 20)
    d.leave("v1", node("a"))
    snap = d.snapshot("v1")
    assert list(snap.nodes) == ["b"] and set(snap.entries) == set(KEYS[:2])
    assert not d.heartbeat("v1", node("a"), TTL * 20)


def test_the_version_switch_is_compare_and_set(directory):
    d, _ = directory
    assert d.current() is None
    assert d.publish("v1", None) and d.current() == "v1"
    assert not d.publish("v2", None) and d.current() == "v1"  # someone switched first: refused
    assert d.publish("v2", "v1") and d.current() == "v2"
    d.register("v2", node("a"), LAYOUT, held(KEYS), TTL * 20)
    assert d.snapshot("v2").current == "v2"


def test_a_snapshot_keeps_the_nodes_a_reader_still_trusts(directory):
    d, _ = directory
    d.register("v1", node("a"), LAYOUT, held(KEYS[:5]), TTL * 20)
    d.register("v1", node("b"), LAYOUT, held(KEYS[3:]), TTL * 20)
    before = d.snapshot("v1")
    d.leave("v1", node("a"))
    after = d.snapshot("v1")
    assert set(after.missing()) == set(KEYS[:3])
    kept = after.keeping(before, ["a"])
    assert kept.missing() == [] and sorted(kept.nodes) == ["a", "b"]
    assert sorted(c.node_id for c in kept.entries[KEYS[4]].copies) == ["a", "b"]


def test_redis_down_is_directory_unavailable_and_back_after_a_restart(redis_server):
    from expertflow.services.redis_directory import RedisDirectory

    d = RedisDirectory.from_url(redis_server.url, namespace="restart", timeout_s=1.0)
    try:
        d.register("v1", node("a"), LAYOUT, held(KEYS), 30)
        redis_server.stop()
        with pytest.raises(DirectoryUnavailable, match="snapshot failed"):
            d.snapshot("v1")
        with pytest.raises(DirectoryUnavailable):
            d.heartbeat("v1", node("a"), 30)
        redis_server.start()  # empty: nothing was persisted
        assert not d.heartbeat("v1", node("a"), 30)  # the node hears it must register again
        assert d.snapshot("v1").nodes == {}
        d.register("v1", node("a", "i2"), LAYOUT, held(KEYS), 30)
        assert list(d.snapshot("v1").nodes) == ["a"]
    finally:
        d.close()


def test_a_directory_behind_a_password(tmp_path):
    from expertflow.services.redis_directory import RedisDirectory

    server = RedisServer(tmp_path / "redis", password="s3cret-pw").start()
    try:
        wrong = RedisDirectory.from_url(server.url.replace("s3cret-pw", "guess"), timeout_s=1.0)
        with pytest.raises(DirectoryUnavailable) as refused:
            wrong.snapshot("v1")
        assert "guess" not in str(refused.value) and ":***@" in str(refused.value)
        wrong.close()
        d = RedisDirectory.from_url(server.url, timeout_s=1.0)
        d.register("v1", node("a"), LAYOUT, held(KEYS), 30)
        assert list(d.snapshot("v1").nodes) == ["a"] and "s3cret-pw" not in d.where
        d.close()
    finally:
        server.stop()


def test_a_bad_directory_url_is_refused():
    from expertflow.services.redis_directory import RedisDirectory

    with pytest.raises(ValueError, match="give a Redis URL"):
        RedisDirectory.from_url("127.0.0.1:6379")


def test_the_contract_is_one_abc():
    assert issubclass(InProcessDirectory, Directory)


# -- placement ----------------------------------------------------------------------------------------------
def test_shard_flags():
    assert Shard.parse("auto").auto and str(Shard.parse(" 1/3 ")) == "1/3"
    for bad in ("3/3", "-1/3", "1/0", "x", "1/", ""):
        with pytest.raises(ValueError, match="--shard"):
            Shard.parse(bad)


def test_static_placement_spreads_r_copies_on_distinct_nodes():
    placement = static_placement(KEYS, nodes=3, replicas=2)
    assert all(len(set(nodes)) == 2 for nodes in placement.values())
    load = Counter(n for nodes in placement.values() for n in nodes)
    assert max(load.values()) - min(load.values()) <= 1  # each node R/N of the experts
    assert set().union(*(share_of(placement, i) for i in range(3))) == set(KEYS)
    assert all(len(nodes) == 1 for nodes in static_placement(KEYS, 1, 2).values())  # R capped at N
    with pytest.raises(ValueError, match="--replicas"):
        static_placement(KEYS, 3, 0)


def test_rendezvous_moves_only_what_a_leaving_node_held():
    many = [ExpertKey(layer, e) for layer in range(8) for e in range(16)]
    before = rendezvous(many, ["a", "b", "c", "d"], replicas=2)
    after = rendezvous(many, ["a", "b", "d"], replicas=2)
    assert all(len(set(n)) == 2 for n in after.values())
    for key in many:  # experts c did not hold keep both copies where they were
        if "c" not in before[key]:
            assert before[key] == after[key]
        else:
            assert set(before[key]) - {"c"} <= set(after[key])
    assert rendezvous(many, ["d", "b", "a"], 2) == after  # the ids decide, not their order
    with pytest.raises(ValueError, match="no live store node"):
        rendezvous(many, [], 2)


def test_handoff_keeps_an_expert_until_enough_others_hold_it():
    share, held_now = {KEYS[0]}, {KEYS[0], KEYS[1], KEYS[2]}
    kept = handoff(share, held_now, {KEYS[1]: 2, KEYS[2]: 1}, replicas=2)
    assert kept == {KEYS[0], KEYS[2]}
