"""Which store nodes hold which experts when the expert store is scaled out: pure functions, no I/O.

    Shard.parse("1/3") / Shard.parse("auto")     the `--shard` flag
    static_placement(keys, nodes=3, replicas=2)  expert number k (keys sorted) -> nodes k mod N, k+1 mod N, ...:
                                                 R consecutive nodes, so every node holds R/N of the experts and
                                                 no two replicas of one expert share a node (R <= N)
    rendezvous(keys, node_ids, replicas=2)       highest-random-weight hashing: each expert goes to the R live
                                                 nodes that score highest for it. Placement follows membership
                                                 with the least movement: a node that joins takes over only the
                                                 experts it now outranks; one that leaves hands its experts to
                                                 the next-ranked node each; nothing else moves
    score(node_id, key)                          the stable 64-bit weight both use to rank nodes for a key (a
                                                 worker also ranks replicas with it, which spreads its reads)
    handoff(share, held, covered, replicas)      what a node keeps while placement moves: its new share, plus the
                                                 experts it held that fewer than R other nodes have registered
                                                 yet, so an expert never has fewer copies during a move than
                                                 after it

Nodes are named by their ids; the ids, not their order, decide a rendezvous placement, so every node computes the
same placement from the same membership without talking to the others.

Not for: where a node keeps its share (host RAM, then NVMe: the node's LocalExpertStore) or reading the directory.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass

from expert_store.keys import ExpertKey


@dataclass(frozen=True)
class Shard:
    """`--shard`: this node's index of a fixed number of nodes, or `auto` (index and count None)."""

    index: int | None = None
    count: int | None = None

    @property
    def auto(self) -> bool:
        return self.count is None

    @classmethod
    def parse(cls, text: str) -> Shard:
        text = text.strip()
        if text == "auto":
            return cls()
        index, slash, count = text.partition("/")
        if slash and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count):
            return cls(int(index), int(count))
        raise ValueError(f"--shard {text!r}: give I/N with 0 <= I < N (e.g. 0/3), or auto")

    def __str__(self) -> str:
        return "auto" if self.auto else f"{self.index}/{self.count}"


def _check_replicas(replicas: int) -> None:
    if replicas < 1:
        raise ValueError(f"--replicas {replicas}: at least 1")


def static_placement(keys: Iterable[ExpertKey], nodes: int, replicas: int) -> dict[ExpertKey, tuple[int, ...]]:
    """Expert number k of the sorted keys -> the node indices (k + j) mod N for j < min(R, N), first the primary."""
    _check_replicas(replicas)
    if nodes < 1:
        raise ValueError(f"{nodes} nodes: at least 1")
    copies = min(replicas, nodes)
    return {key: tuple((k + j) % nodes for j in range(copies)) for k, key in enumerate(sorted(keys))}


def score(node_id: str, key: ExpertKey) -> int:
    """A stable pseudo-random weight of (node, expert): equal in every process and Python version."""
    digest = hashlib.blake2b(f"{node_id}\0{key[0]}\0{key[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(node_ids: Iterable[str], key: ExpertKey) -> list[str]:
    """`node_ids` best first for `key` (highest score; ties, which need a hash collision, by id)."""
    return sorted(node_ids, key=lambda n: (-score(n, key), n))


def rendezvous(keys: Iterable[ExpertKey], node_ids: Collection[str], replicas: int) -> dict[ExpertKey, tuple[str, ...]]:
    """Each expert -> the min(R, N) live nodes ranked highest for it, first the primary."""
    _check_replicas(replicas)
    if not node_ids:
        raise ValueError("no live store node to place experts on")
    return {key: tuple(ranked(node_ids, key)[:replicas]) for key in keys}


def share_of(placement: Mapping[ExpertKey, Sequence], node) -> set[ExpertKey]:
    """The experts `placement` gives `node` (an index for a static placement, an id for rendezvous)."""
    return {key for key, nodes in placement.items() if node in nodes}


def handoff(
    share: set[ExpertKey], held: set[ExpertKey], covered: Mapping[ExpertKey, int], replicas: int
) -> set[ExpertKey]:
    """What a node should hold: its `share`, plus each expert it `held` that fewer than `replicas` other nodes
    have registered (`covered`: key -> copies on other live nodes) and that it would otherwise drop."""
    return share | {key for key in held - share if covered.get(key, 0) < replicas}
