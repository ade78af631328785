"""The directory of a scaled-out expert store: which store nodes are alive, and which experts each holds in which
tier, per model version. The contract (frozen dataclasses and the `Directory` ABC) and its in-process
implementation; the Redis one is expertflow/services/redis_directory.py.

    directory.register(version, node, layout, experts, ttl_s)
                                                       a node's record and holdings (under a new
                                                       `node.incarnation` each time), replacing earlier ones in one
                                                       step; with no experts it is a member of `version`'s
                                                       placement holding nothing yet. Both expire after ttl_s
    directory.heartbeat(version, node, ttl_s)          renews both; False once they expired (or the directory lost
                                                       them): the node registers again
    directory.leave(version, node)                     gone now, not at expiry (a node stopping cleanly)
    directory.snapshot(version) -> DirectorySnapshot   the live nodes of one version and the copies they hold
    directory.current() / publish(version, replaces)   the version workers should serve, switched atomically
                                                       (compare-and-set: False if someone else switched first)

Versions never mix: every record lives under its model version, and a snapshot reads one version only, so a
worker that binds to a version (its own checkpoint's: store_wire.model_version) reads only copies of it.

Not for: placing experts (placement.py), serving or fetching bytes (the services), or a network protocol.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from expert_store.keys import ExpertKey
from expert_store.placement import score
from expert_store.store import Tier


@dataclass(frozen=True)
class StoreNode:
    node_id: str
    address: str  # host:port a worker dials
    host_id: str  # equal to a worker's when the worker can map the node's shared memory (store_wire.host_id)
    incarnation: str = ""  # new at each registration: what a worker knew of an older one is stale ("": none yet)


@dataclass(frozen=True)
class ServedLayout:
    """What every node of one version serves: the expert buffers' layout and the model's expert space."""

    hidden: int
    ffn: int
    dtype: str  # "float32", "bfloat16", "float16"
    slot_nbytes: int
    moe_layers: int
    experts: int
    model: str = ""  # where the first node read it from (for messages)

    def keys(self) -> list[ExpertKey]:
        return [ExpertKey(layer, e) for layer in range(self.moe_layers) for e in range(self.experts)]


@dataclass(frozen=True)
class HeldExpert:
    """One expert as a node registers it."""

    key: ExpertKey
    nbytes: int
    crc32: int  # of its whole buffer, padding included
    tier: Tier


@dataclass(frozen=True)
class ExpertCopy:
    node_id: str
    tier: Tier


@dataclass(frozen=True)
class ExpertEntry:
    key: ExpertKey
    nbytes: int
    crc32: int
    copies: tuple[ExpertCopy, ...]


@dataclass(frozen=True)
class DirectorySnapshot:
    """One version as the directory saw it at one moment: live nodes (those still joining included) and the
    entries of the experts they hold."""

    version: str
    layout: ServedLayout | None  # None: no live node of this version
    nodes: Mapping[str, StoreNode]
    entries: Mapping[ExpertKey, ExpertEntry]
    current: str | None = None  # the published version when this was read

    def replicas(self, key: ExpertKey, host_id: str | None = None) -> list[tuple[StoreNode, Tier]]:
        """The live copies of `key`, best first: on this host (`host_id`, mapped without a copy), then in a node's
        host RAM before its NVMe, then by rendezvous score, which spreads a worker's reads over the replicas."""
        entry = self.entries.get(key)
        if entry is None:
            return []
        copies = [(self.nodes[c.node_id], c.tier) for c in entry.copies if c.node_id in self.nodes]
        return sorted(
            copies, key=lambda nt: (nt[0].host_id != host_id, nt[1] is not Tier.HOST, -score(nt[0].node_id, key))
        )

    def held_by(self, node_id: str) -> set[ExpertKey]:
        return {k for k, e in self.entries.items() if any(c.node_id == node_id for c in e.copies)}

    def copies_elsewhere(self, node_id: str) -> dict[ExpertKey, int]:
        """key -> how many live nodes other than `node_id` hold it."""
        return {k: sum(c.node_id != node_id for c in e.copies) for k, e in self.entries.items()}

    def keeping(self, older: DirectorySnapshot, node_ids: Iterable[str]) -> DirectorySnapshot:
        """This snapshot plus the nodes `node_ids` of `older` that it lacks, with their copies: a reader's view while
        the directory may have lost records that will come back (Redis restarted empty, its nodes not registered
        again yet). Reading from such a node is safe: it serves the same version, and every buffer is checked."""
        kept = {n: older.nodes[n] for n in node_ids if n in older.nodes and n not in self.nodes}
        if not kept:
            return self
        entries = dict(self.entries)
        for key, entry in older.entries.items():
            extra = tuple(c for c in entry.copies if c.node_id in kept)
            if extra:
                mine = entries.get(key)
                copies = (mine.copies if mine is not None else ()) + extra
                entries[key] = ExpertEntry(key, entry.nbytes, entry.crc32, copies)
        layout = self.layout or older.layout
        return DirectorySnapshot(self.version, layout, {**self.nodes, **kept}, dict(sorted(entries.items())), self.current)

    def missing(self) -> list[ExpertKey]:
        """The model's experts no live node holds (all of them when the layout is unknown)."""
        return [] if self.layout is None else [k for k in self.layout.keys() if k not in self.entries]


def assemble(
    version: str,
    records: Iterable[tuple[StoreNode, ServedLayout]],
    holdings: Mapping[str, Sequence[HeldExpert]],
    current: str | None,
) -> DirectorySnapshot:
    """A snapshot from the live node records and the holdings of each (by node id): what both implementations
    read, put together one way. A node's copies count only under its live record."""
    nodes, layout = {}, None
    entries: dict[ExpertKey, tuple[int, int, list[ExpertCopy]]] = {}
    for node, node_layout in sorted(records, key=lambda r: r[0].node_id):
        nodes[node.node_id] = node
        layout = layout or node_layout
        for held in holdings.get(node.node_id, ()):
            nbytes, crc, copies = entries.setdefault(held.key, (held.nbytes, held.crc32, []))
            if (nbytes, crc) != (held.nbytes, held.crc32):
                continue  # cannot happen within one content version; never let a worker see two different buffers
            copies.append(ExpertCopy(node.node_id, held.tier))
    return DirectorySnapshot(
        version,
        layout,
        nodes,
        {k: ExpertEntry(k, n, c, tuple(copies)) for k, (n, c, copies) in sorted(entries.items())},
        current,
    )


class DirectoryUnavailable(ConnectionError):
    """The directory's server cannot be reached (or answered with an error): callers keep what they have and
    try again later."""


class Directory(ABC):
    """Where store nodes announce themselves and their experts, and workers find them (one model version each).
    Thread-safe: a node's heartbeat thread and its placement thread share one. Every method may raise
    `DirectoryUnavailable`."""

    @abstractmethod
    def register(
        self, version: str, node: StoreNode, layout: ServedLayout, experts: Sequence[HeldExpert], ttl_s: float
    ) -> None:
        """Record `node` (a member of `version`) and its holdings `experts` under `node.incarnation`, which must
        be new for each registration that holds experts; everything it registered before is replaced."""

    @abstractmethod
    def heartbeat(self, version: str, node: StoreNode, ttl_s: float) -> bool:
        """Renew the node's record and holdings for another ttl_s; False if they were gone (expired, or lost with
        the directory's server), in which case nothing was renewed."""

    @abstractmethod
    def leave(self, version: str, node: StoreNode) -> None: ...

    @abstractmethod
    def snapshot(self, version: str) -> DirectorySnapshot: ...

    @abstractmethod
    def current(self) -> str | None: ...

    @abstractmethod
    def publish(self, version: str, replaces: str | None) -> bool:
        """Make `version` the current one if the current one is still `replaces`; False if it changed meanwhile."""

    def close(self) -> None:
        """Release connections; the directory's contents stay (they expire)."""


@dataclass
class _Record:
    node: StoreNode
    layout: ServedLayout
    expires: float
    experts: tuple[HeldExpert, ...] = ()


@dataclass
class InProcessDirectory(Directory):
    """The directory in this process (one host, and the tests): the same expiry semantics on `clock`."""

    clock: Callable[[], float] = time.monotonic
    _records: dict[tuple[str, str], _Record] = field(default_factory=dict)
    _current: str | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _live(self, version: str, node_id: str) -> _Record | None:
        record = self._records.get((version, node_id))
        if record is not None and record.expires <= self.clock():
            del self._records[(version, node_id)]
            return None
        return record

    def register(
        self, version: str, node: StoreNode, layout: ServedLayout, experts: Sequence[HeldExpert], ttl_s: float
    ) -> None:
        with self._lock:
            self._records[(version, node.node_id)] = _Record(node, layout, self.clock() + ttl_s, tuple(experts))

    def heartbeat(self, version: str, node: StoreNode, ttl_s: float) -> bool:
        with self._lock:
            record = self._live(version, node.node_id)
            if record is None or record.node.incarnation != node.incarnation:
                return False
            record.expires = self.clock() + ttl_s
            return True

    def leave(self, version: str, node: StoreNode) -> None:
        with self._lock:
            self._records.pop((version, node.node_id), None)

    def snapshot(self, version: str) -> DirectorySnapshot:
        with self._lock:
            live = [r for (v, n) in list(self._records) if v == version and (r := self._live(v, n)) is not None]
            return assemble(
                version, [(r.node, r.layout) for r in live], {r.node.node_id: r.experts for r in live}, self._current
            )

    def current(self) -> str | None:
        with self._lock:
            return self._current

    def publish(self, version: str, replaces: str | None) -> bool:
        with self._lock:
            if self._current != replaces:
                return False
            self._current = version
            return True
