"""The hot-expert cache on the compute device: fixed slots, a copy engine, a policy.

Slots are one preallocated [n_slots, padded_numel] tensor, reused and never
reallocated. `acquire(layer, experts)` yields each requested expert's weight views:
already-resident experts first, so compute starts while misses are still copying;
misses are loaded into free slots or slots the policy frees, never into a slot whose
expert this layer has yet to use. Evicted experts are read-only copies and are never
written back.

Prefetches wait in a software queue (the policy's, earliest deadline first) and go to the
copy stream at most `max_inflight` at a time, so a demand load is queued behind at most that
many copies, and a queued prefetch the policy stops asking for is cancelled before it starts.
The queue advances whenever the cache is called (each layer and each expert it yields).

Not for: deciding eviction order (policies) or reading checkpoints (store).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import time
from typing import Any

import torch

from expert_store.layout import ExpertKey
from expert_store.policies import CachePolicy
from expert_store.residency import Residency
from expert_store.stats import CacheStats
from expert_store.store import ExpertStore, Tier
from expert_store.transfer import Copier

_STAGING_BUFFERS = 2


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        n_slots: int,
        device: torch.device,
        policy: CachePolicy,
        copier: Copier,
        max_inflight: int = 4,
    ):
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        self.store = store
        self.layout = store.layout
        self.device = device
        self.policy = policy
        self.copier = copier
        self.residency = Residency(n_slots)
        self.slots = torch.empty(n_slots, self.layout.padded_numel, dtype=self.layout.dtype, device=device)
        self._ready: list[Any | None] = [None] * n_slots  # copy into the slot has landed
        self._released: list[Any | None] = [None] * n_slots  # compute is done reading the slot
        self._staging = [
            torch.empty(self.layout.padded_numel, dtype=self.layout.dtype, pin_memory=device.type == "cuda")
            for _ in range(_STAGING_BUFFERS if device.type == "cuda" else 0)
        ]
        self._staging_free: list[Any | None] = [None] * len(self._staging)
        self._next_staging = 0
        self._prefetched_unused: set[ExpertKey] = set()
        self.max_inflight = max_inflight
        self._queue: list[ExpertKey] = []  # prefetches not yet issued, earliest deadline first
        self._inflight: dict[ExpertKey, int] = {}  # issued prefetches that may still be copying -> slot
        self._keep: frozenset[ExpertKey] = frozenset()  # what prefetches may not evict
        self._busy: set[ExpertKey] = set()  # keys the running layer has yet to use
        self.stats = CacheStats()
        policy.attach(n_slots)

    @property
    def n_slots(self) -> int:
        return self.residency.n_slots

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size()

    def take_stats(self) -> CacheStats:
        """The counters since the last call (synchronises to read copy timings)."""
        stall_s, copy_s = self.copier.drain()
        self.stats.stall_s += stall_s
        self.stats.copy_s += copy_s
        stats, self.stats = self.stats, CacheStats()
        return stats

    def before_route(self, layer: int) -> None:
        """`layer` is about to route: let the policy plan (after seeing which copies landed) and queue its plan."""
        self._pump()
        self.prefetch(self.policy.prefetch(layer), self.policy.protected())

    def after_route(self, layer: int, experts: Sequence[int]) -> None:
        """`layer` has routed to `experts`: the policy may replan (e.g. the next layer, now refined) before
        they run; its prefetches never evict them."""
        self._pump()
        keys = self.policy.after_route(layer)
        if keys is not None:
            self.prefetch(keys, self.policy.protected() | {(layer, e) for e in experts})

    def prefetch(self, keys: Sequence[ExpertKey], protected: frozenset[ExpertKey] = frozenset()) -> None:
        """Make `keys` (earliest deadline first) the prefetch queue: queued keys not listed are cancelled,
        the rest issued as copies allow, never evicting anything in `protected` or in `keys`."""
        listed = set(keys)
        self.stats.prefetch_cancelled += sum(1 for k in self._queue if k not in listed)
        self._queue = [k for k in dict.fromkeys(keys) if k not in self.residency]
        self._keep = frozenset(protected) | listed  # resident keys listed stay too
        self._pump()

    def _pump(self) -> None:
        """Issue queued prefetches while fewer than `max_inflight` are copying."""
        for key in [k for k, slot in self._inflight.items() if self.residency.lookup(k) != slot]:
            del self._inflight[key]  # evicted meanwhile
        for key in [k for k, slot in self._inflight.items() if self.copier.landed(self._ready[slot])]:
            del self._inflight[key]
            self.policy.on_landed(key)
        while self._queue and len(self._inflight) < self.max_inflight:
            key = self._queue[0]
            if key in self.residency:
                self._queue.pop(0)
                continue
            slot = self._make_room(self._keep | self._busy)
            if slot is None:
                return
            self._queue.pop(0)
            self._load(key, slot)
            self._inflight[key] = slot
            self._prefetched_unused.add(key)
            self.stats.prefetches += 1

    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (expert, gate_up [2F, D], down [D, F]) for each expert, each once.

        The caller must finish issuing its use of one expert before asking for the next:
        the slot may be refilled right after.
        """
        keys = [(layer, e) for e in experts]
        hits = [k for k in keys if k in self.residency]
        misses = [k for k in keys if k not in self.residency]
        self.stats.hits += len(hits)
        self.stats.misses += len(misses)
        unused = set(keys)
        self._busy = unused
        demanded = set(misses)
        self._queue = [k for k in self._queue if k not in demanded]  # loaded now, at top priority
        queue = list(misses)

        def issue() -> None:
            while queue:
                slot = self._make_room(unused)
                if slot is None:
                    return
                self._load(queue.pop(0), slot)

        issue()
        for key in hits + misses:
            if key not in self.residency:
                issue()
            slot = self.residency.lookup(key)
            if slot is None:
                raise RuntimeError(f"no slot could be freed for expert {key}")
            self.copier.wait(self._ready[slot])
            if key in self._prefetched_unused:
                self._prefetched_unused.discard(key)
                self.stats.prefetch_used += 1
            self.policy.on_use(key)
            gate_up, down = self.layout.views(self.slots[slot])
            yield key[1], gate_up, down
            self._released[slot] = self.copier.compute_done()
            unused.discard(key)
            if not self.policy.keeps_experts:
                self.residency.release(key)
                self.policy.on_evict(key)
            issue()
            self._pump()
        self._busy = set()

    def _make_room(self, protected: set[ExpertKey] | frozenset[ExpertKey]) -> int | None:
        slot = self.residency.free_slot()
        if slot is not None:
            return slot
        candidates = [k for k in self.residency.resident() if k not in protected]
        if not candidates:
            return None
        victim = self.policy.victim(candidates)
        self.policy.on_evict(victim)
        if victim in self._prefetched_unused:
            self._prefetched_unused.discard(victim)
            self.stats.prefetch_wasted += 1
        return self.residency.release(victim)

    def _load(self, key: ExpertKey, slot: int) -> None:
        self.residency.place(key, slot)
        self.policy.on_load(key)
        dst = self.slots[slot]
        src = self.store.host_view(key)
        tier = Tier.HOST
        if src is None:
            # Reading the files blocks the host, so its time is stall on any device.
            t0 = time.perf_counter()
            if self._staging:
                i = self._next_staging
                self._next_staging = (i + 1) % len(self._staging)
                self.copier.host_wait(self._staging_free[i])
                src = self._staging[i]
                tier = self.store.read_into(key, src)
            else:  # CPU device: read the files straight into the slot
                self.copier.host_wait(self._released[slot])
                tier = self.store.read_into(key, dst)
            elapsed = time.perf_counter() - t0
            self.stats.stall_s += elapsed
            if not self._staging:
                self.stats.copy_s += elapsed
                self._ready[slot] = None
                self._count(tier)
                return
            ready = self.copier.copy(dst, src, after=self._released[slot])
            self._staging_free[i] = ready
        else:
            ready = self.copier.copy(dst, src, after=self._released[slot])
        self._ready[slot] = ready
        self._count(tier)

    def _count(self, tier: Tier) -> None:
        if tier is Tier.HOST:
            self.stats.bytes_from_host += self.layout.nbytes
        else:
            self.stats.bytes_from_nvme += self.layout.nbytes
