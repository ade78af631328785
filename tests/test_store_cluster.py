"""The expert store scaled out on loopback: real redis-server, real `expertflow expert-store --directory` node
processes, real gRPC; a worker-side ClusterExpertStore reads every expert from them, generation through it equals
the embedded mode, and a node that stops or dies is failed over. The namespace test (test_failover_netns.py)
does the same across hosts."""

from __future__ import annotations

import pytest
import torch

from expert_store.keys import ExpertKey
from expertflow.cli import main
from expertflow.services.redis_directory import RedisDirectory
from expertflow.services.store_cluster import ClusterExpertStore, ExpertUnavailable
from expertflow.services.store_server import ServedModel
from redis_server import RedisServer, free_port
from store_nodes import NodeProcess, wait_until
from test_store_service import assert_serves_the_checkpoint, embedded, generate  # noqa: F401 - a fixture too

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def start_nodes(model_dir, url: str, shards: list[str], replicas: int = 2, ttl_s: float = 3.0) -> list[NodeProcess]:
    nodes = [NodeProcess(model_dir, url, f"node{i}", f"127.0.0.1:{free_port()}", shard=shard, replicas=replicas,
                         ttl_s=ttl_s).start() for i, shard in enumerate(shards)]  # fmt: skip
    for n in nodes:
        n.wait_for("serving", 90)
    return nodes


def copies(url: str, version: str) -> dict[ExpertKey, list[str]]:
    """Each expert's holders once `version` is complete and published (the switch workers see); {} before."""
    directory = RedisDirectory.from_url(url)
    try:
        snap = directory.snapshot(version)
        if snap.current != version:
            return {}
        return {k: sorted(c.node_id for c in e.copies) for k, e in snap.entries.items()}
    finally:
        directory.close()


def cluster(url: str, version: str, **kwargs) -> ClusterExpertStore:
    return ClusterExpertStore(RedisDirectory.from_url(url), version, wait_s=60, refresh_s=0.2, **kwargs)


def test_three_static_shards_serve_every_expert_and_fail_over(mixtral_dir, redis_server, embedded):
    version = ServedModel.open(mixtral_dir, "0", torch.float32).version
    nodes = start_nodes(mixtral_dir, redis_server.url, ["0/3", "1/3", "2/3"])
    try:
        held = wait_until(lambda: (c := copies(redis_server.url, version)) and len(c) == 24 and c, 30, "24 experts")
        assert all(len(n) == 2 for n in held.values())  # replication 2, on two distinct nodes
        assert {n for ns in held.values() for n in ns} == {"node0", "node1", "node2"}
        # another host: every expert fetched (ranged checksummed streams), from its best replica
        remote = cluster(redis_server.url, version, host_id="another-host")
        try:
            assert remote.source(ExpertKey(0, 0)).startswith("remote:node")
            assert_serves_the_checkpoint(remote, mixtral_dir)
            assert generate(mixtral_dir, remote)[0] == embedded["mixtral"][0]
            epoch = remote.sources_epoch
            nodes[0].stop()  # leaves the directory; its experts come from their other replica
            # the directory's next read moves sources: a cache reads them again (ExpertStore.sources_epoch)
            wait_until(lambda: remote.sources_epoch > epoch, 15, "sources moved after node0 left")
            assert generate(mixtral_dir, remote)[0] == embedded["mixtral"][0]
            nodes[1].kill()  # dies without leaving: the worker fails over at the first read that fails
            lost = [k for k, ns in held.items() if set(ns) <= {"node0", "node1"}]
            kept = [k for k, ns in held.items() if "node2" in ns]
            out = torch.empty(remote.layout.padded_numel)
            epoch = remote.sources_epoch
            remote.read_into(kept[0], out)
            with pytest.raises(ExpertUnavailable, match=rf"expert \({lost[0][0]}, {lost[0][1]}\)"):
                remote.read_into(lost[0], out)
            assert remote.sources_epoch > epoch  # node1 failed a read: avoided, its experts' sources moved
        finally:
            remote.close()
        # this host: node2's shared memory is mapped, no copy over the wire
        local = cluster(redis_server.url, version)
        try:
            assert local.source(kept[0]) == "host" and local.host_view(kept[0]) is not None
        finally:
            local.close()
    finally:
        for n in nodes:
            n.kill()


def test_a_worker_of_another_version_is_told_so(mixtral_dir, redis_server):
    nodes = start_nodes(mixtral_dir, redis_server.url, ["0/1"], replicas=1)
    try:
        with pytest.raises(ConnectionError, match="no store node of model version v-other"):
            ClusterExpertStore(RedisDirectory.from_url(redis_server.url), "v-other", wait_s=0.5)
    finally:
        for n in nodes:
            n.kill()


@pytest.mark.slow
def test_auto_placement_follows_the_members(mixtral_dir, redis_server):
    version = ServedModel.open(mixtral_dir, "0", torch.float32).version
    nodes = start_nodes(mixtral_dir, redis_server.url, ["auto"] * 3, ttl_s=1.5)
    try:
        def placed(members: set[str]):
            c = copies(redis_server.url, version)
            return len(c) == 24 and all(len(n) == 2 and set(n) <= members for n in c.values()) and c

        held = wait_until(lambda: placed({"node0", "node1", "node2"}), 60, "auto placement over 3 nodes")
        assert {n for ns in held.values() for n in ns} == {"node0", "node1", "node2"}
        nodes[2].kill()  # its record expires; the other two take over its experts, two copies each again
        wait_until(lambda: placed({"node0", "node1"}), 60, "auto placement over the 2 left")
        nodes[2].start().wait_for("serving", 90)  # back: it re-registers and gets a share again
        held = wait_until(lambda: (c := placed({"node0", "node1", "node2"})) and
                          any("node2" in n for n in c.values()) and c, 60, "node2 back in the placement")  # fmt: skip
    finally:
        for n in nodes:
            n.kill()


def test_the_command_refuses_bad_cluster_flags(mixtral_dir, capsys):
    listen = f"127.0.0.1:{free_port()}"  # not the default port, which another store may hold

    def refused(*args: str) -> str:
        command = ["expert-store", "--model", str(mixtral_dir), "--listen", listen, "--metrics-port", "0", *args]
        assert main(command) == 2
        err = capsys.readouterr().err
        assert err.startswith("expertflow: error: ") and "Traceback" not in err
        return err

    assert "give --directory too" in refused("--shard", "0/3")
    assert "give I/N with 0 <= I < N" in refused("--directory", "redis://127.0.0.1:1", "--shard", "3/3")
    assert "give a Redis URL" in refused("--directory", "127.0.0.1:6379")
    assert "--replicas 0: at least 1" in refused("--directory", "redis://127.0.0.1:1", "--replicas", "0")
    assert "give host:port" in refused("--directory", "redis://127.0.0.1:1", "--advertise", "nowhere")
