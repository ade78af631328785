"""The expert store's directory in Redis (expert_store/directory.py is the contract): store nodes on many hosts
register there, workers read it.

    RedisDirectory.from_url("redis://HOST:PORT")        `[expert_store] directory`, `[worker] store`

The keys, all under one namespace (default `expertflow`) and one model version:

    {ns}:current                                    the published version (switched with WATCH/MULTI/EXEC)
    {ns}:v:{version}:nodes                          SET of node ids that joined (stale ids pruned on read)
    {ns}:v:{version}:node:{id}                      JSON: address, host_id, incarnation, layout; SET ... EX ttl
    {ns}:v:{version}:held:{id}:{incarnation}        HASH "layer/expert" -> "tier nbytes crc32"; EXPIRE ttl
                                                    (the holdings of an earlier incarnation just expire)

A node's holdings are keyed by its incarnation, so a reader that got a node's record reads exactly the holdings
that record names, even while the node registers a new share: never half of two. Holdings of an incarnation
never change, so a reader fetches them once (`snapshot` keeps them by incarnation) and then reads only the small
records each refresh. Heartbeats renew both keys with EXPIRE; a key that is gone (expired, or Redis restarted
empty) answers 0, and the node registers again.

Not for: deciding placement (placement.py), serving experts (store_server.py) or a worker's failover
(store_cluster.py).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import asdict
from urllib.parse import urlsplit, urlunsplit

import redis

from expert_store.directory import (
    Directory,
    DirectorySnapshot,
    DirectoryUnavailable,
    HeldExpert,
    ServedLayout,
    StoreNode,
    assemble,
)
from expert_store.keys import ExpertKey
from expert_store.store import Tier


def _holding(field: str, value: str) -> HeldExpert:
    layer, expert = field.split("/")
    tier, nbytes, crc = value.split()
    return HeldExpert(ExpertKey(int(layer), int(expert)), int(nbytes), int(crc), Tier(tier))


class RedisDirectory(Directory):
    """One Redis client (redis-py reconnects by itself after an outage); every failure is `DirectoryUnavailable`."""

    def __init__(self, client: redis.Redis, namespace: str = "expertflow", where: str = "redis") -> None:
        self._redis, self._ns, self.where = client, namespace, where
        self._lock = threading.Lock()
        self._holdings: dict[tuple[str, str, str], tuple[HeldExpert, ...]] = {}  # (version, node, incarnation)

    @classmethod
    def from_url(cls, url: str, namespace: str = "expertflow", timeout_s: float = 2.0) -> RedisDirectory:
        """`redis://[:PASSWORD@]HOST:PORT[/DB]`, `rediss://...` (TLS) or `unix://PATH`; every call gives up after
        `timeout_s` (a Redis that is down is an error at once, a hung one after the timeout: callers keep serving
        from what they have). Errors and logs name the URL without its password."""
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"directory {url!r}: give a Redis URL, e.g. redis://127.0.0.1:6379")
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=True
        )
        return cls(client, namespace, without_password(url))

    def _key(self, version: str, *parts: str) -> str:
        return ":".join((self._ns, "v", version, *parts))

    def _held_key(self, version: str, node: StoreNode) -> str:
        return self._key(version, "held", node.node_id, node.incarnation)

    def _call(self, what: str, run):
        try:
            return run()
        except redis.RedisError as e:
            raise DirectoryUnavailable(f"the directory at {self.where}: {what} failed: {e}") from None

    # -- nodes -------------------------------------------------------------------------------------------------
    def _record(self, node: StoreNode, layout: ServedLayout) -> str:
        return json.dumps({"address": node.address, "host_id": node.host_id, "incarnation": node.incarnation,
                           "layout": asdict(layout)})  # fmt: skip

    def register(
        self, version: str, node: StoreNode, layout: ServedLayout, experts: Sequence[HeldExpert], ttl_s: float
    ) -> None:
        ttl_ms = int(ttl_s * 1000)

        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            if experts:
                held = self._held_key(version, node)
                pipe.hset(held, mapping={f"{h.key[0]}/{h.key[1]}": f"{h.tier.value} {h.nbytes} {h.crc32}"
                                         for h in experts})  # fmt: skip
                pipe.pexpire(held, ttl_ms)
            pipe.set(self._key(version, "node", node.node_id), self._record(node, layout), px=ttl_ms)
            pipe.sadd(self._key(version, "nodes"), node.node_id)
            pipe.execute()

        self._call("register", run)

    def heartbeat(self, version: str, node: StoreNode, ttl_s: float) -> bool:
        ttl_ms = int(ttl_s * 1000)

        def run() -> bool:
            record = self._key(version, "node", node.node_id)
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(record)
            pipe.pexpire(record, ttl_ms)
            pipe.pexpire(self._held_key(version, node), ttl_ms)
            text, renewed, held = pipe.execute()
            if not renewed or json.loads(text)["incarnation"] != node.incarnation:
                return False
            return bool(held) or not node.incarnation  # a node that registered nothing yet has no holdings key

        return self._call("heartbeat", run)

    def leave(self, version: str, node: StoreNode) -> None:
        def run() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._key(version, "node", node.node_id), self._held_key(version, node))
            pipe.srem(self._key(version, "nodes"), node.node_id)
            pipe.execute()

        self._call("leave", run)

    # -- reading -----------------------------------------------------------------------------------------------
    def snapshot(self, version: str) -> DirectorySnapshot:
        def run() -> DirectorySnapshot:
            pipe = self._redis.pipeline(transaction=True)
            pipe.smembers(self._key(version, "nodes"))
            pipe.get(f"{self._ns}:current")
            ids, current = pipe.execute()
            ids = sorted(ids)
            texts = self._redis.mget([self._key(version, "node", i) for i in ids]) if ids else []
            records, stale = [], []
            for node_id, text in zip(ids, texts):
                if text is None:
                    stale.append(node_id)
                    continue
                raw = json.loads(text)
                node = StoreNode(node_id, raw["address"], raw["host_id"], raw["incarnation"])
                records.append((node, ServedLayout(**raw["layout"])))
            if stale:  # expired: the set forgets them too
                self._redis.srem(self._key(version, "nodes"), *stale)
            return assemble(version, records, self._read_holdings(version, [n for n, _ in records]), current)

        return self._call("snapshot", run)

    def _read_holdings(self, version: str, nodes: list[StoreNode]) -> dict[str, tuple[HeldExpert, ...]]:
        """Each node's holdings under its incarnation: those not read before in one round trip."""
        with self._lock:
            known = {(version, n.node_id, n.incarnation): self._holdings.get((version, n.node_id, n.incarnation))
                     for n in nodes if n.incarnation}  # fmt: skip
        new = [n for n in nodes if n.incarnation and known[(version, n.node_id, n.incarnation)] is None]
        if new:
            pipe = self._redis.pipeline(transaction=False)
            for n in new:
                pipe.hgetall(self._held_key(version, n))
            for n, fields in zip(new, pipe.execute()):
                if fields:  # empty: expired meanwhile; read again next time
                    known[(version, n.node_id, n.incarnation)] = tuple(_holding(f, v) for f, v in fields.items())
        with self._lock:
            for key, held in known.items():
                if held is not None:
                    self._holdings[key] = held
            live = {(version, n.node_id, n.incarnation) for n in nodes}
            for key in [k for k in self._holdings if k[0] == version and k not in live]:
                del self._holdings[key]
        return {node_id: held for (_, node_id, _), held in known.items() if held is not None}

    def current(self) -> str | None:
        return self._call("current", lambda: self._redis.get(f"{self._ns}:current"))

    def publish(self, version: str, replaces: str | None) -> bool:
        key = f"{self._ns}:current"

        def swap(pipe) -> bool:
            if pipe.get(key) != replaces:  # read under WATCH: EXEC fails (and this runs again) if it changes
                return False
            pipe.multi()
            pipe.set(key, version)
            return True

        return self._call("publish", lambda: self._redis.transaction(swap, key, value_from_callable=True))

    def close(self) -> None:
        self._redis.close()


def without_password(url: str) -> str:
    """`url` as errors and logs may show it: a password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))
