"""`ClusterExpertStore`: the `ExpertStore` contract over a scaled-out expert store, found through its directory,
for `load(directory, options, store=ClusterExpertStore(RedisDirectory.from_url(url), version, device))`.

    binding    the worker binds to one model version (its own checkpoint's, store_wire.model_version) and reads
               only copies registered under it; it starts once every expert of that version has a live copy
    reading    each expert from its best live replica (DirectorySnapshot.replicas): a node on this host first,
               whose shared memory is mapped (and on a GPU registered) exactly as RemoteExpertStore maps one
               store; then copies in a node's host RAM before NVMe ones; then by rendezvous score, which spreads
               the reads. Per node one RemoteExpertStore (connection, mapping, checksummed Fetch), made at first
               use; `_fetch_from` is the one place an expert's bytes come from one node
    failover   a fetch that fails (UNAVAILABLE, DEADLINE_EXCEEDED, NOT_FOUND, a bad checksum, a node that does
               not connect or serves another version) goes on to the next replica; the node is tried last from
               then on, until the directory shows it registered anew or a probe (every `probe_s`) finds it
               answering. With no replica left, ExpertUnavailable names the expert and every node tried
    directory  read every `refresh_s` on a background thread (stopped by close). While Redis is unreachable the
               last snapshot serves on: the outage is logged once and retried with backoff. A node that vanishes
               from the directory stays in the worker's view for `grace_s` (Redis restarted empty loses every
               record at once; its nodes register again within a heartbeat), tried like any other

Clients replaced (a node registered a new share) or gone are closed on the engine's thread (`host_view`, `stage`),
never under a copy reading their mapped memory.

Not for: serving (store_server.py), a node's membership (store_node.py), or choosing what to fetch (prefetchers).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from expert_store.directory import Directory, DirectorySnapshot, DirectoryUnavailable, StoreNode
from expert_store.keys import ExpertKey
from expert_store.layout import ExpertLayout
from expert_store.store import ExpertStore, StagedRead, ThreadedRead, Tier
from expertflow.services import store_wire
from expertflow.services.security import Security, open_channel
from expertflow.services.store_client import RemoteExpertStore, StoreFetchError, check_host_buffer
from expertflow.v1 import expert_store_pb2 as pb
from expertflow.v1 import expert_store_pb2_grpc

log = logging.getLogger(__name__)


class ExpertUnavailable(IOError):
    """No live replica delivered an expert: which one, and every node tried (or that none holds it)."""


@dataclass
class _Avoided:
    incarnation: str  # avoided until the node registers anew (another incarnation) ...
    next_probe: float  # ... or answers a probe, the next one not before this time


class ClusterExpertStore(ExpertStore):
    """The experts of model version `version` over the store nodes of `directory`, for a worker on `device`
    (`host_id` None: this host's, store_wire.host_id; `security`: the TLS and token the nodes want, security.py).
    It owns `directory` and closes it."""

    def __init__(
        self,
        directory: Directory,
        version: str,
        device: str | torch.device = "cpu",
        *,
        wait_s: float = 120.0,
        refresh_s: float = 1.0,
        probe_s: float = 2.0,
        grace_s: float = 30.0,
        node_timeout_s: float = 3.0,
        fetch_timeout_s: float = 30.0,
        readers: int = 4,
        host_id: str | None = None,
        security: Security | None = None,
    ) -> None:
        self.directory, self.version, self.device = directory, version, torch.device(device)
        self.security = security or Security()
        self.host_id = host_id if host_id is not None else store_wire.host_id()
        self.refresh_s, self.probe_s, self.grace_s = refresh_s, probe_s, grace_s
        self._node_timeout_s, self._fetch_timeout_s = node_timeout_s, fetch_timeout_s
        self._reader_count = readers  # also each node client's, for the ranges of the fetches they run
        self._lock = threading.Lock()
        self._clients: dict[str, tuple[StoreNode, RemoteExpertStore]] = {}
        self._retired: list[RemoteExpertStore] = []
        self._avoided: dict[str, _Avoided] = {}
        self._epoch = 0  # sources_epoch: bumped whenever a key's preferred replica may have moved
        self._seen: dict[str, float] = {}  # node id -> when the directory last listed it
        self._holders: dict[ExpertKey, tuple[str, ...]] = {}  # the last nodes known to hold each expert
        self._missing: frozenset[ExpertKey] = frozenset()
        self._stop = threading.Event()
        self._readers: ThreadPoolExecutor | None = None
        self._refresher: threading.Thread | None = None
        self.failovers = 0  # reads that a later replica delivered
        try:
            self._snapshot = self._wait_complete(wait_s)
            self._note(self._snapshot)
            served = self._snapshot.layout
            self.layout = ExpertLayout(served.hidden, served.ffn, store_wire.dtype_of(served.dtype))
            if self.layout.slot_nbytes != served.slot_nbytes:
                raise ValueError(f"the store nodes lay experts out in {served.slot_nbytes}-byte buffers, this worker "
                                 f"in {self.layout.slot_nbytes}: another ExpertFlow version?")  # fmt: skip
            self._keys = served.keys()
            self._key_set = frozenset(self._keys)
            if self._snapshot.current not in (None, version):
                log.warning("binding to this worker's model version, not the directory's current one",
                            extra={"model_version": version, "current": self._snapshot.current})  # fmt: skip
            self._readers = ThreadPoolExecutor(readers, thread_name_prefix="expert-store-cluster")
            for node in self._snapshot.nodes.values():  # map this host's nodes now, not at the first miss
                if node.host_id == self.host_id:
                    self._connected(node)
            self._refresher = threading.Thread(target=self._refresh, name="expert-store-directory", daemon=True)
            self._refresher.start()
        except BaseException:
            self.close()
            raise

    def _wait_complete(self, wait_s: float) -> DirectorySnapshot:
        """The first snapshot in which every expert of the version has a live copy (waiting up to `wait_s` for
        nodes still loading), or a clear error."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                snapshot = self.directory.snapshot(self.version)
                problem = None
                if snapshot.layout is None:
                    problem = (f"no store node of model version {self.version} is in the directory (its current "
                               f"version: {snapshot.current}); the nodes and this worker must serve the same "
                               "checkpoint, dtype and [model] version_label")  # fmt: skip
                elif missing := snapshot.missing():
                    problem = (f"the store nodes of model version {self.version} hold {len(snapshot.entries)} of "
                               f"{len(snapshot.layout.keys())} experts; none holds {tuple(missing[0])} (and "
                               f"{len(missing) - 1} more)")  # fmt: skip
                if problem is None:
                    return snapshot
            except DirectoryUnavailable as e:
                problem = str(e)
            if time.monotonic() > deadline:
                raise ConnectionError(f"the expert store's directory after {wait_s:.0f} s: {problem}")
            time.sleep(0.25)

    # -- nodes -------------------------------------------------------------------------------------------------
    def _client(self, node: StoreNode) -> RemoteExpertStore:
        """The connection to `node` as the directory lists it now (a new incarnation gets a new one); raises
        ConnectionError if it cannot be made or serves another version."""
        with self._lock:
            have = self._clients.get(node.node_id)
            if have is not None and have[0] == node:
                return have[1]
        try:
            client = RemoteExpertStore(node.address, self.device, timeout_s=self._node_timeout_s,
                                       fetch_timeout_s=self._fetch_timeout_s, retries=0, readers=self._reader_count,
                                       host_id=self.host_id, security=self.security)  # fmt: skip
        except (ConnectionError, ValueError) as e:
            raise ConnectionError(f"cannot use it ({e})") from None
        if client.model_version != self.version or client.layout != self.layout:
            client.close()
            raise ConnectionError(f"it serves model version {client.model_version}, not {self.version}")
        with self._lock:
            have = self._clients.get(node.node_id)
            if have is not None and have[0] == node:  # another reader connected meanwhile
                self._retired.append(client)
                return have[1]
            if have is not None:
                self._retired.append(have[1])
            self._clients[node.node_id] = (node, client)
            return client

    def _connected(self, node: StoreNode) -> RemoteExpertStore | None:
        try:
            return self._client(node)
        except ConnectionError as e:
            self._avoid(node, str(e))
            return None

    @property
    def sources_epoch(self) -> int:
        return self._epoch

    def _avoid(self, node: StoreNode, why: str) -> None:
        with self._lock:
            new = node.node_id not in self._avoided
            self._avoided[node.node_id] = _Avoided(node.incarnation, time.monotonic() + self.probe_s)
            self._epoch += new  # its experts' preferred replicas (and so their sources) move
        if new:
            log.warning("store node failed; reading its experts from other replicas until it is back",
                        extra={"node_id": node.node_id, "address": node.address, "error": why})  # fmt: skip

    def _is_avoided(self, node: StoreNode) -> bool:
        avoided = self._avoided.get(node.node_id)
        return avoided is not None and avoided.incarnation == node.incarnation

    def _replicas(self, key: ExpertKey) -> list[tuple[StoreNode, Tier]]:
        """The live copies of `key` best first, nodes being avoided last (still tried: they may be back)."""
        copies = self._snapshot.replicas(key, self.host_id)
        return [c for c in copies if not self._is_avoided(c[0])] + [c for c in copies if self._is_avoided(c[0])]

    def _reap(self) -> None:
        """Close replaced connections (unmapping their memory): only on the engine's thread, between copies."""
        if not self._retired:
            return
        with self._lock:
            retired, self._retired = self._retired, []
        for client in retired:
            client.close()

    # -- the contract ------------------------------------------------------------------------------------------
    def keys(self) -> list[ExpertKey]:
        return list(self._keys)

    def tier(self, key: ExpertKey) -> Tier:
        """The tier of the replica a read would use first (NVME when none is left)."""
        replicas = self._replicas(key)
        return replicas[0][1] if replicas else Tier.NVME

    def source(self, key: ExpertKey) -> str:
        """Where a read of `key` comes from: "host" (this host's shared memory), f"remote:{node id}" (the
        preferred replica), "nvme" (that replica holds it on NVMe only, or none is left)."""
        replicas = self._replicas(key)
        if not replicas:
            return "nvme"
        node, tier = replicas[0]
        if tier is Tier.NVME:
            return "nvme"
        if node.host_id == self.host_id and self.host_view(key) is not None:
            return "host"
        return f"remote:{node.node_id}"

    @property
    def host_kind(self) -> str:
        with self._lock:
            local = sorted(n for n, (node, c) in self._clients.items() if c.host_kind.startswith("shm"))
        mapped = f"shm from {', '.join(local)}" if local else "no node on this host"
        return f"cluster of {len(self._snapshot.nodes)} nodes, version {self.version} ({mapped}; fetch from others)"

    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        self._reap()
        for node, tier in self._replicas(key):
            if node.host_id != self.host_id or tier is not Tier.HOST or self._is_avoided(node):
                continue
            client = self._connected(node)
            try:
                view = client.host_view(key) if client is not None else None
            except KeyError:  # its share moved since it was listed; the directory catches up
                view = None
            if view is not None:
                return view
        return None

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        view = self.host_view(key)
        if view is not None:
            out.copy_(view)
            return Tier.HOST
        return self._read(key, out)

    def stage(self, key: ExpertKey, out: torch.Tensor) -> StagedRead:
        if self.host_view(key) is not None or self._readers is None:
            return super().stage(key, out)
        return ThreadedRead(lambda: self._read(key, out), self._readers)

    # -- reading with failover ---------------------------------------------------------------------------------
    def _read(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        if key not in self._key_set:
            raise KeyError(f"expert {tuple(key)} is not an expert of this model (MoE layer, expert)")
        check_host_buffer(out, self.layout.slot_nbytes)
        replicas = self._replicas(key)
        if not replicas:
            last = ", ".join(self._holders.get(key, ())) or "none known"
            raise ExpertUnavailable(f"expert {tuple(key)} of model version {self.version}: no live store node "
                                    f"holds it (its last copies were on: {last})")  # fmt: skip
        tried = []
        for node, tier in replicas:
            try:
                self._fetch_from(self._client(node), key, out)
            except (StoreFetchError, ConnectionError, KeyError, ValueError) as e:
                tried.append(f"{node.node_id} at {node.address} ({e})")
                self._avoid(node, str(e))
                continue
            if tried:
                with self._lock:
                    self.failovers += 1
                log.info("failed over", extra={"key": list(key), "node_id": node.node_id, "tried": tried})
            return tier
        raise ExpertUnavailable(f"expert {tuple(key)} of model version {self.version}: every replica failed; "
                                f"tried {'; '.join(tried)}")  # fmt: skip

    def _fetch_from(self, client: RemoteExpertStore, key: ExpertKey, out: torch.Tensor) -> None:
        """One expert's bytes from one node into `out`, on this thread: the node client's fetch (store_fetch.py:
        parallel ranged streams of checksummed chunks straight into `out`, a corrupt range fetched again, the
        whole crc32 checked against the node's listing), or an error."""
        client.read_into(key, out)

    # -- the directory -----------------------------------------------------------------------------------------
    def _refresh(self) -> None:
        delay, down = self.refresh_s, False
        while not self._stop.wait(delay):
            try:
                snapshot = self.directory.snapshot(self.version)
            except DirectoryUnavailable as e:
                if not down:  # once per outage
                    log.warning("directory unreachable; serving from the last snapshot", extra={"error": str(e)})
                    down = True
                delay = min(delay * 2, 10.0)
                continue
            if down:
                log.info("directory reachable again", extra={"nodes": sorted(snapshot.nodes)})
                down, delay = False, self.refresh_s
            self._apply(snapshot)
            self._probe()

    def _note(self, snapshot: DirectorySnapshot) -> None:
        now = time.monotonic()
        for node_id in snapshot.nodes:
            self._seen[node_id] = now
        for key, entry in snapshot.entries.items():
            self._holders[key] = tuple(c.node_id for c in entry.copies)

    def _apply(self, snapshot: DirectorySnapshot) -> None:
        """Take a new snapshot: keep for `grace_s` the nodes it no longer lists, drop connections to nodes gone
        or registered anew, stop avoiding nodes registered anew."""
        self._note(snapshot)
        now, old = time.monotonic(), self._snapshot
        snapshot = snapshot.keeping(old, [n for n in old.nodes if now - self._seen.get(n, 0) < self.grace_s])
        with self._lock:
            for node_id, (node, client) in list(self._clients.items()):
                if snapshot.nodes.get(node_id) != node:
                    self._retired.append(client)
                    del self._clients[node_id]
            for node_id, avoided in list(self._avoided.items()):
                live = snapshot.nodes.get(node_id)
                if live is None or live.incarnation != avoided.incarnation:
                    del self._avoided[node_id]
                    self._epoch += 1
            if snapshot.nodes != old.nodes or snapshot.entries != old.entries:
                self._epoch += 1
            self._snapshot = snapshot
        missing = frozenset(snapshot.missing())
        if missing != self._missing:
            self._missing = missing
            log.warning("experts without a live copy", extra={"count": len(missing),
                                                               "keys": [list(k) for k in sorted(missing)[:8]]})  # fmt: skip

    def _probe(self) -> None:
        """Ask each avoided node that is due whether it answers again (and serves this version)."""
        now = time.monotonic()
        due = [self._snapshot.nodes[n] for n, a in list(self._avoided.items())
               if a.next_probe <= now and n in self._snapshot.nodes]  # fmt: skip
        for node in due:
            try:
                with open_channel(node.address, self.security) as channel:
                    stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
                    answer = stub.GetLayout(pb.LayoutRequest(), timeout=self._node_timeout_s)
                back = answer.model_version == self.version
            except grpc.RpcError:
                back = False
            with self._lock:
                if back:
                    self._avoided.pop(node.node_id, None)
                    self._epoch += 1
                elif node.node_id in self._avoided:
                    self._avoided[node.node_id].next_probe = now + self.probe_s
            if back:
                log.info("store node answers again", extra={"node_id": node.node_id, "address": node.address})

    def close(self) -> None:
        """Stop the directory thread and the readers, close every connection (unmapping) and the directory."""
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join()
            self._refresher = None
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
            self._readers = None
        with self._lock:
            clients = [c for _, c in self._clients.values()] + self._retired
            self._clients, self._retired = {}, []
        for client in clients:
            client.close()
        self.directory.close()
