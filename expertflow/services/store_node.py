"""One node of a scaled-out expert store: it holds its share of the experts and keeps the directory right about it.

    node = ClusterNode(directory, served, servicer, NodeOptions(...), log)
    node.start()    register as a member holding nothing; the share (static I/N, or rendezvous over the members
                    once they have had `settle_s` to appear); load it (host RAM up to the host budget, the rest
                    read from the files) into the servicer
    node.announce() (the gRPC server answers now) register the share; publish the version if it is complete
    ...             a heartbeat thread renews the records every ttl/3 and registers again when they are gone (they
                    expired, or Redis restarted empty); a Redis outage is logged once and retried at that pace
                    (never slower, or the records would expire once Redis is back)
                    in auto mode a placement thread reads the members every ttl/3 and, once they have been the same
                    for two reads in a row, loads the share they imply (placement.handoff: experts it drops stay
                    until enough other nodes have registered them)
    node.stop()     both threads stop; the node leaves the directory at once (workers move away within their
                    refresh interval, before the gRPC server stops)

How quickly placement follows membership: a node that joins is seen by the others at their next read, acted on
at the one after (2 x ttl/3), then each loads its new share (a reload costs what a start costs: reading the share
and its crc32s). A node that dies without leaving is seen once its record expires (ttl), then the same.

Not for: serving RPCs (store_server.py), the directory's storage (redis_directory.py), or choosing nodes for a
worker's reads (store_cluster.py).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import dataclass, replace

from expert_store.directory import Directory, DirectorySnapshot, DirectoryUnavailable, StoreNode
from expert_store.keys import ExpertKey
from expert_store.placement import Shard, handoff, rendezvous, share_of, static_placement


@dataclass(frozen=True)
class NodeOptions:
    shard: Shard
    replicas: int
    ttl_s: float = 10.0
    settle_s: float | None = None  # auto: how long members get to appear before the first placement (None: ttl/3)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas}: at least 1")
        if self.ttl_s <= 0:
            raise ValueError(f"--ttl {self.ttl_s}: a positive number of seconds")

    @property
    def beat_s(self) -> float:
        return self.ttl_s / 3


class ClusterNode:
    """The directory side of one store node: `served` is its model, `servicer` (an ExpertStoreServicer) serves
    whatever share this class loads into it, `node` names it (its incarnation is set here)."""

    def __init__(self, directory: Directory, served, servicer, node: StoreNode, options: NodeOptions,
                 log: logging.Logger) -> None:  # fmt: skip
        self.directory, self.served, self.servicer, self.options, self.log = directory, served, servicer, options, log
        self.version = served.version
        self.layout = served.served_layout()
        self.keys: list[ExpertKey] = sorted(served.names)
        self._node = node
        self._lock = threading.Lock()  # one registration at a time (heartbeat thread, placement thread)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._published = False
        self._announced = False  # holdings are registered only once the server answers
        self.reloads = 0

    @property
    def node(self) -> StoreNode:
        return self._node

    # -- starting ----------------------------------------------------------------------------------------------
    def start(self, wait_s: float = 60.0) -> None:
        """Join as a member holding nothing (waiting up to `wait_s` for the directory), then load the first share
        into the servicer. The caller starts its gRPC server next, then calls `announce`."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self._register()
                break
            except DirectoryUnavailable as e:
                if time.monotonic() > deadline:
                    raise
                self.log.warning("directory not reachable yet; retrying", extra={"error": str(e)})
                self._stop.wait(1.0)
        self._spawn(self._beat, "expert-store-heartbeat")
        if self.options.shard.auto:
            settle = self.options.settle_s if self.options.settle_s is not None else self.options.beat_s
            self._stop.wait(settle)
            share = self._auto_share(self.directory.snapshot(self.version), held=set()) or set()
        else:
            shard = self.options.shard
            share = share_of(static_placement(self.keys, shard.count, self.options.replicas), shard.index)
        self._load(share, register=False)

    def announce(self) -> None:
        """Register the loaded share (the server answers by now) and, in auto mode, follow membership."""
        self._announced = True
        try:
            self._register()
        except DirectoryUnavailable as e:  # the heartbeat thread registers it once the directory is back
            self.log.warning("directory unreachable; registering later", extra={"error": str(e)})
        if self.options.shard.auto:
            self._spawn(self._follow, "expert-store-placement")

    def _spawn(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- registering -------------------------------------------------------------------------------------------
    def _register(self) -> None:
        """(Re-)register what the servicer serves now (nothing before `announce`), as a new incarnation; publish
        the version if it is complete."""
        with self._lock:
            experts = self.servicer.held() if self._announced else []
            # the new incarnation first: if registering fails, the next heartbeat finds no holdings under it
            # and registers again
            self._node = replace(self._node, incarnation=uuid.uuid4().hex[:12] if experts else "")
            self.directory.register(self.version, self._node, self.layout, experts, self.options.ttl_s)
        if experts:
            self._publish()

    def _publish(self) -> None:
        """Make this version current once it is complete: the first time this node sees it complete, or whenever
        the current one is unset or incomplete (so a node registering again after an outage never switches the
        workers' version back)."""
        if self.directory.snapshot(self.version).missing():
            return
        current = self.directory.current()
        if current == self.version:
            self._published = True
            return
        if self._published and current is not None and not self.directory.snapshot(current).missing():
            return
        if self.directory.publish(self.version, current):
            self._published = True
            self.log.info("published", extra={"model_version": self.version, "replaces": current})

    def _load(self, share: set[ExpertKey], register: bool = True) -> None:
        t0 = time.perf_counter()
        self.servicer.replace(self.served.load(share))
        stats = self.servicer.stats()
        self.log.info("loaded", extra={
            "model": str(self.served.directory), "model_version": self.version, "node_id": self._node.node_id,
            "experts_host": stats.experts_host, "experts_nvme": stats.experts_nvme, "bytes_host": stats.bytes_host,
            "seconds": round(time.perf_counter() - t0, 3)})  # fmt: skip
        if register:
            self._register()

    # -- the threads -------------------------------------------------------------------------------------------
    def _beat(self) -> None:
        down = False
        while not self._stop.wait(self.options.beat_s):
            try:
                if not self.directory.heartbeat(self.version, self._node, self.options.ttl_s):
                    self.log.warning("the directory lost this node's records; registering again",
                                     extra={"node_id": self._node.node_id})  # fmt: skip
                    self._register()
                if down:
                    self.log.info("directory reachable again")
                    down = False
            except DirectoryUnavailable as e:
                if not down:  # once per outage
                    self.log.warning("directory unreachable; serving on, retrying", extra={"error": str(e)})
                    down = True

    def _follow(self) -> None:
        members: tuple[str, ...] = ()
        while not self._stop.wait(self.options.beat_s):
            try:
                snapshot = self.directory.snapshot(self.version)
            except DirectoryUnavailable:
                continue  # the heartbeat thread says so
            seen = tuple(sorted(snapshot.nodes))
            if seen != members or self._node.node_id not in seen:
                members = seen  # act once the same members were read twice in a row
                continue
            held = set(self.servicer.tiers)
            share = self._auto_share(snapshot, held)
            if share is not None and share != held:
                self.log.info("placement moved", extra={"members": list(seen), "experts": len(share),
                                                        "was": len(held)})  # fmt: skip
                self._load(share)
                self.reloads += 1

    def _auto_share(self, snapshot: DirectorySnapshot, held: set[ExpertKey]) -> set[ExpertKey] | None:
        """What this node should hold under rendezvous placement over the snapshot's members (None if it is not
        among them)."""
        me = self._node.node_id
        if me not in snapshot.nodes:
            return None
        placement = rendezvous(self.keys, sorted(snapshot.nodes), self.options.replicas)
        return handoff(share_of(placement, me), held, snapshot.copies_elsewhere(me), self.options.replicas)

    # -- stopping ----------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop both threads and leave the directory (best effort: an unreachable one lets the records expire)."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        try:
            self.directory.leave(self.version, self._node)
            self.log.info("left the directory", extra={"node_id": self._node.node_id})
        except DirectoryUnavailable as e:
            self.log.warning("could not leave the directory; its records expire instead", extra={"error": str(e)})
