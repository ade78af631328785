"""The hot-expert cache on the compute device: fixed slots, a copy engine, an eviction policy, plans.

Slots are one preallocated [n_slots, padded_numel] tensor, reused and never reallocated. A key is in
one of three states once it has a slot: queued (a planned prefetch not yet issued; cancellable),
copying (issued to the copy stream, or its bytes still being staged from a slower tier), landed.
Evicted experts are read-only copies and are never written back.

Per MoE layer, in this order:

    demand(layer, experts)   count hits (landed), late (queued or copying) and misses; misses get a slot
                             (the eviction policy frees one if needed) and go to the copy stream at once,
                             queued prefetches of this layer's keys too; the layer's keys are pinned
    acquire(layer, experts)  yield each expert's weight views, landed ones first, so compute starts
                             while misses are still copying; the layer's uses reach the eviction policy
                             once all are issued, and the layer is unpinned
    execute(plan)            a prefetcher's plan (the engine plans once the layer's work is issued):
                             cancel queued copies, evict landed keys, queue fetches by the time they
                             must start (deadline less the key's transfer time from its source: a remote
                             key goes before a local one due at the same time), each with its slot
                             reserved now

Queued prefetches go to the copy stream at most `max_inflight` at a time, so a demand load waits
behind at most that many; the queue moves on at each plan and after each expert `acquire` yields.
`view()` is the read-only snapshot prefetchers plan with (expert_store/plan.py), with the injected
clock and times, each key's source (the store's `source()`, fixed at start) and each source's time;
reads are timed per source for `MeasuredTiming`. A read from a slower tier that fails frees its slot:
a prefetch is dropped (loaded on demand if used), a demand load raises `ExpertReadError`.

Shape legend: L = MoE layers, E = experts per layer, D = hidden, F = expert FFN size.

Not for: choosing victims (eviction.py), deciding what to prefetch (orchestrator/), reading
checkpoints (store.py).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from expert_store.eviction import EvictionPolicy
from expert_store.keys import ExpertKey
from expert_store.plan import SOURCES, CacheView, InFlight, Plan, key_ms, source_codes
from expert_store.residency import Residency
from expert_store.stats import CacheStats
from expert_store.store import ExpertStore, StagedRead
from expert_store.timing import Clock, MeasuredTiming, StepTiming, wall_clock_ms
from expert_store.transfer import Copier


class ExpertReadError(RuntimeError):
    """An expert a layer needs could not be read from its tier (a file or a remote store failed)."""


@dataclass
class _Copy:
    """A key whose slot is being filled."""

    slot: int
    issued_ms: float
    demand: bool
    ready: Any | None = None  # the copier's marker once the device copy is issued
    read: StagedRead | None = None  # bytes still coming from a slower tier into `staging`
    staging: int | None = None  # index of the host staging buffer it goes through


class ExpertCache:
    def __init__(
        self,
        store: ExpertStore,
        n_slots: int,
        device: torch.device,
        eviction: EvictionPolicy,
        copier: Copier,
        max_inflight: int = 4,
        timing: StepTiming | None = None,
        clock: Clock = wall_clock_ms,
        shape: tuple[int, int] | None = None,
    ):
        """`shape` (L, E): the model's expert space (default: the store's keys' extent)."""
        if max_inflight < 1:
            raise ValueError("max_inflight must be at least 1")
        keys = store.keys()
        self.shape = shape or (max(k[0] for k in keys) + 1, max(k[1] for k in keys) + 1)
        self.store = store
        self.layout = store.layout
        self.device = device
        self.eviction = eviction
        self.copier = copier
        self.max_inflight = max_inflight
        self.timing = timing if timing is not None else MeasuredTiming(self.shape[0])
        self.clock = clock
        self.residency = Residency(n_slots)
        self.slots = torch.empty(n_slots, self.layout.padded_numel, dtype=self.layout.dtype, device=device)
        self._released: list[Any | None] = [None] * n_slots  # compute is done reading the slot
        # Bytes from a tier outside host RAM pass through pinned staging buffers on CUDA (one per copy
        # that may be in flight); on the CPU they are read straight into the slot.
        n_staging = max_inflight + 2 if device.type == "cuda" else 0
        self._staging = [
            torch.empty(self.layout.padded_numel, dtype=self.layout.dtype, pin_memory=True) for _ in range(n_staging)
        ]
        self._staging_free: list[Any | None] = [None] * n_staging  # marker: its last copy has left it
        self._staging_taken: set[int] = set()
        self._landed = np.zeros(self.shape, bool)  # [L, E]
        # planned prefetches, (latest start = deadline - transfer from its source, deadline, seq, key)
        self._queue: list[tuple[float, float, int, ExpertKey]] = []
        self._queued: set[ExpertKey] = set()
        self._seq = 0
        self._copying: dict[ExpertKey, _Copy] = {}  # in issue order
        self._pinned: frozenset[ExpertKey] = frozenset()  # the running layer's keys not used yet
        self._waiting: list[ExpertKey] = []  # its misses that found no slot yet
        self._last_layer: frozenset[ExpertKey] = frozenset()  # the keys of the layer acquired last
        self._prefetched_unused: set[ExpertKey] = set()
        self._own = frozenset(keys)
        self._read_sources()
        self._reads = [[0.0, 0] for _ in SOURCES]  # per source: seconds of reads finished this step, count
        self.stats = CacheStats()

    @property
    def n_slots(self) -> int:
        return self.residency.n_slots

    @property
    def nbytes(self) -> int:
        return self.slots.numel() * self.slots.element_size()

    def _read_sources(self) -> None:
        """Every key's source from the store, again whenever its sources_epoch moves (a node failed over): a new
        array, never written after, so the views handed out keep the sources they were planned with."""
        own, store = self._own, self.store
        self._sources_epoch = store.sources_epoch
        self._sources = source_codes(
            self.shape, lambda layer, e: store.source(ExpertKey(layer, e)) if (layer, e) in own else None
        )
        self._one_source = not self._sources.any()  # every key local: the view needs no sources (one link time)

    # -- what a prefetcher sees -----------------------------------------------------------------
    def view(self) -> CacheView:
        self._poll()
        if self.store.sources_epoch != self._sources_epoch:
            self._read_sources()
        now = self.clock()
        transfer, source_ms = self.timing.transfer_ms, () if self._one_source else self.timing.source_ms
        per_key = key_ms(self._sources, source_ms)
        in_flight, eta = [], -np.inf
        for key, c in self._copying.items():  # issue order: the copy stream serves them in turn
            eta = max(eta, c.issued_ms) + (transfer if per_key is None else per_key[key])
            in_flight.append(InFlight(key, max(eta, now), started=True))  # overdue: landing any moment
        clock = max(eta, now)
        for *_, key in self._queue:
            clock += transfer if per_key is None else per_key[key]
            in_flight.append(InFlight(key, clock, started=False))
        # The running layer's keys; once its work is issued (a prefetcher plans then), those of its demand
        # copies still under way: the layer cannot finish before they land (CacheView.ready_ms).
        pinned = self._pinned or frozenset(k for k, c in self._copying.items() if c.demand and k in self._last_layer)
        return CacheView(
            now_ms=now,
            n_slots=self.n_slots,
            resident=self._landed.copy(),
            in_flight=tuple(in_flight),
            pinned=pinned,
            layer_ms=self.timing.layer_ms,
            transfer_ms=transfer,
            link_busy=self.timing.link_busy,
            sources=self._sources if source_ms else None,  # never written after __init__
            source_ms=source_ms,
        )

    def _key_ms(self, key: ExpertKey) -> float:
        """The expected time of `key` from its source into a slot."""
        source_ms = self.timing.source_ms
        return source_ms[self._sources[key]] if source_ms else self.timing.transfer_ms

    def state(self, key: ExpertKey) -> str:
        """"landed", "copying", "queued" or "absent" (for tests and reports)."""
        self._poll()
        if key in self._queued:
            return "queued"
        if key in self._copying:
            return "copying"
        return "landed" if key in self.residency else "absent"

    # -- per step -------------------------------------------------------------------------------
    def take_stats(self) -> CacheStats:
        """The counters since the last call (synchronises to read copy timings)."""
        stall_s, copy_s = self.copier.drain()
        self.stats.stall_s += stall_s
        self.stats.copy_s += copy_s
        stats, self.stats = self.stats, CacheStats()
        return stats

    def end_step(self, seconds: float | None) -> CacheStats:
        """A forward pass over every layer ended: its counters. Its wall time `seconds` (None: not
        representative, e.g. a prompt's) also updates the times prefetchers plan with."""
        stats = self.take_stats()
        reads = {source: (s, n) for source, (s, n) in zip(SOURCES, self._reads) if n}
        self._reads = [[0.0, 0] for _ in SOURCES]
        if seconds is not None:
            self.timing.record_step(seconds, stats.copy_s, stats.misses + stats.prefetches, reads)
        return stats

    # -- per layer ------------------------------------------------------------------------------
    def demand(self, layer: int, experts: Sequence[int]) -> None:
        """`layer` routed to `experts`: count them, load what is missing at top priority, pin them. Misses that
        find no slot (a layer needing more experts than the cache holds) load during `acquire`, in the
        slots of this layer's experts already used."""
        keys = [ExpertKey(layer, e) for e in experts]
        self._pinned = self._last_layer = frozenset(keys)
        self._waiting = []
        self._poll()
        for key in keys:
            if self._landed[key]:
                self.stats.hits += 1
            elif key in self._copying:
                self.stats.late += 1
            elif key in self._queued:  # a planned prefetch not yet issued: it goes now, with the misses
                self.stats.late += 1
                self._unqueue(key)
                self._issue(key, self.residency.lookup(key), demand=True, prefetch=True)
            else:
                self.stats.misses += 1
                slot = self._make_room(self._pinned, wait=True)
                if slot is None:
                    self._waiting.append(key)
                    continue
                self._place(key, slot)
                self._issue(key, slot, demand=True, prefetch=False)

    def execute(self, plan: Plan | None) -> None:
        """Carry out a prefetcher's plan: cancel, evict, then queue the fetches earliest deadline first.
        Parts the cache has overtaken since the plan's view (a cancelled key already copying, an evicted
        key now pinned or not landed, a fetched key already here) are skipped."""
        if not plan:
            return
        self._poll()
        for key in plan.cancel:
            if key in self._queued and key not in self._pinned:
                self._unqueue(key)
                self._release(key)
                self.stats.prefetch_cancelled += 1
        for key in plan.evict:
            if self._landed[key] and key not in self._pinned:
                self._evict(key)
        keep = self._pinned | {t.key for t in plan.fetch}
        for t in plan.fetch:
            if t.key in self.residency:
                continue
            slot = self._make_room(keep, wait=False)
            if slot is None:
                break
            self._place(t.key, slot)
            bisect.insort(self._queue, (t.deadline_ms - self._key_ms(t.key), t.deadline_ms, self._seq, t.key))
            self._seq += 1
            self._queued.add(t.key)
        self._pump()

    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield (expert, gate_up [2F, D], down [D, F]) for each expert, each once, landed ones first.

        Calls `demand` first unless it was just called for these experts. The caller must finish
        issuing its use of one expert before asking for the next: the slot may be refilled right after.
        """
        keys = [ExpertKey(layer, e) for e in experts]
        if self._pinned != frozenset(keys):
            self.demand(layer, experts)
        self._poll()
        waiting = set(self._waiting)
        order = sorted(keys, key=lambda k: (k in waiting, not self._landed[k]))  # stable: landed first
        for key in order:
            if key in waiting:  # this layer's experts used so far may make room now
                slot = self._make_room(self._pinned, wait=True)
                if slot is None:
                    raise RuntimeError("no slot can be freed: every slot holds an expert the running layer needs")
                self._place(key, slot)
                self._issue(key, slot, demand=True, prefetch=False)
            slot = self._wait_landed(key)
            if key in self._prefetched_unused:
                self._prefetched_unused.discard(key)
                self.stats.prefetch_used += 1
            gate_up, down = self.layout.views(self.slots[slot])
            yield key.expert, gate_up, down
            self._released[slot] = self.copier.compute_done()
            self._pinned = self._pinned - {key}  # used: its slot may serve the layer's next expert
            self._pump()
        # The policy hears of the layer's uses once it has run, in expert order, whatever order the copies
        # landed in: the simulator does the same, so both make the same choices.
        for key in sorted(keys):
            if key in self.residency:
                self.eviction.on_use(key)
        if not self.eviction.keeps_experts:
            for key in sorted(keys):
                if key in self.residency:
                    self._evict(key)
        self._pinned = frozenset()
        self._waiting = []

    # -- bookkeeping ----------------------------------------------------------------------------
    def _place(self, key: ExpertKey, slot: int) -> None:
        self.residency.place(key, slot)
        self.eviction.on_load(key)

    def _release(self, key: ExpertKey) -> int:
        """Free `key`'s slot, whatever state it was in."""
        self._landed[key] = False
        self._prefetched_unused.discard(key)
        self.eviction.on_evict(key)
        return self.residency.release(key)

    def _evict(self, key: ExpertKey) -> None:
        if key in self._prefetched_unused:
            self.stats.prefetch_wasted += 1
        self._release(key)

    def _unqueue(self, key: ExpertKey) -> None:
        self._queued.discard(key)
        self._queue = [q for q in self._queue if q[-1] != key]

    def _make_room(self, protected: frozenset[ExpertKey], wait: bool) -> int | None:
        """A free slot: a free one, else one the eviction policy frees among landed keys outside `protected`;
        for a demand load (`wait`) then the last queued prefetch's, else the slot of the next copy to land;
        None if there is none."""
        while (slot := self.residency.free_slot()) is None:
            candidates = {k for k in self.residency.resident() if self._landed[k] and k not in protected}
            victim = self.eviction.victim(candidates) if candidates else None
            if victim is not None:
                self._evict(victim)
                continue
            if not wait:
                return None
            queued = [q for q in self._queue if q[-1] not in protected]
            if queued:
                key = queued[-1][-1]
                self._unqueue(key)
                self._release(key)
                self.stats.prefetch_cancelled += 1
                continue
            copying = [k for k in self._copying if k not in protected]
            if not copying:
                return None  # every slot holds a key the running layer has yet to use
            # Give up the oldest copy under way. Its slot's next copy queues behind it on the copy stream, so
            # nothing waits on the device; only a read from a slower tier still filling a buffer must finish.
            # (The simulator waits for that copy to land instead: on its one modelled link it is the same time.)
            key = copying[0]
            copy = self._copying.pop(key)
            if copy.read is not None:
                if not self._end_read(key, copy, block=True, queued=False):
                    continue  # the read failed: its slot is free already
                if copy.staging is not None:
                    self._staging_taken.discard(copy.staging)  # filled, never copied on: free again
            self._evict(key)
        return slot

    def _issue(self, key: ExpertKey, slot: int, demand: bool, prefetch: bool) -> None:
        """Send `key` towards its slot: a device copy from host RAM, or a staged read from a slower tier.
        `demand`: a layer waits for it (not counted against `max_inflight`); `prefetch`: it was planned."""
        copy = _Copy(slot, self.clock(), demand)
        self._copying[key] = copy
        if prefetch:
            self._prefetched_unused.add(key)
            self.stats.prefetches += 1
        src = self.store.host_view(key)
        if src is not None:
            self.stats.bytes_from_host += self.layout.nbytes
            copy.ready = self.copier.copy(self.slots[slot], src, after=self._released[slot])
        else:
            self.stats.bytes_from_nvme += self.layout.nbytes
            if self._staging:
                copy.staging = self._take_staging()
                copy.read = self.store.stage(key, self._staging[copy.staging])
            else:  # CPU: straight into the slot, which compute has finished with (it is synchronous)
                copy.read = self.store.stage(key, self.slots[slot])
        self._advance(key, copy)

    def _advance(self, key: ExpertKey, copy: _Copy, block: bool = False) -> None:
        """Move a copy on if it can (`block`: wait for its read): a finished staged read goes to the device, a
        landed copy is landed. A read that failed frees the key's slot; see `_end_read`."""
        if copy.read is not None:
            if not block and not copy.read.done():
                return
            if not self._end_read(key, copy, block, queued=True):
                return
            if copy.staging is not None:
                copy.ready = self.copier.copy(
                    self.slots[copy.slot], self._staging[copy.staging], after=self._released[copy.slot]
                )
                self._staging_free[copy.staging] = copy.ready
                self._staging_taken.discard(copy.staging)
        if self.copier.landed(copy.ready):
            del self._copying[key]
            self._landed[key] = True

    def _end_read(self, key: ExpertKey, copy: _Copy, block: bool, queued: bool) -> bool:
        """Collect a staged read's outcome (waiting for it if `block`; the wait is stall). On failure the key
        gives up its slot (`queued`: it is still among the copies): a prefetch is dropped, to be loaded on demand
        if used; a demand load raises, naming the expert and its tier. True if the bytes are there."""
        t0 = time.perf_counter()
        try:
            copy.read.wait()
        except Exception as e:
            if queued:
                del self._copying[key]
            if copy.staging is not None:
                self._staging_taken.discard(copy.staging)
            self._release(key)
            self.stats.failed_reads += 1
            if copy.demand:
                raise ExpertReadError(f"expert {tuple(key)} could not be read from its tier: {e}") from e
            return False
        finally:
            if block:
                self.stats.stall_s += time.perf_counter() - t0
        self.stats.read_s += copy.read.seconds
        reads = self._reads[self._sources[key]]
        reads[0] += copy.read.seconds
        reads[1] += 1
        copy.read = None
        return True

    def _take_staging(self) -> int:
        """A staging buffer no read is filling and no device copy is still reading."""
        for i in range(len(self._staging)):
            if i not in self._staging_taken and self.copier.landed(self._staging_free[i]):
                self._staging_taken.add(i)
                return i
        free = [i for i in range(len(self._staging)) if i not in self._staging_taken]
        if not free:  # every buffer is being filled: finish the oldest read
            oldest = next(k for k, c in self._copying.items() if c.staging is not None and c.read is not None)
            self._advance(oldest, self._copying[oldest], block=True)
            free = [i for i in range(len(self._staging)) if i not in self._staging_taken]
        self.copier.host_wait(self._staging_free[free[0]])
        self._staging_taken.add(free[0])
        return free[0]

    def _load_again(self, key: ExpertKey) -> int:
        """A key the running layer needs whose prefetch failed (dropped, its slot freed): load it on demand and
        wait for it; a demand read that fails too raises ExpertReadError."""
        slot = self._make_room(self._pinned, wait=True)
        if slot is None:
            raise RuntimeError("no slot can be freed: every slot holds an expert the running layer needs")
        self._place(key, slot)
        self._issue(key, slot, demand=True, prefetch=False)
        return self._wait_landed(key)

    def _poll(self) -> None:
        for key, copy in list(self._copying.items()):
            self._advance(key, copy)

    def _pump(self) -> None:
        """Observe landings, then issue queued prefetches while fewer than `max_inflight` are copying."""
        self._poll()
        while self._queue and sum(not c.demand for c in self._copying.values()) < self.max_inflight:
            key = self._queue.pop(0)[-1]
            self._queued.discard(key)
            self._issue(key, self.residency.lookup(key), demand=False, prefetch=True)

    def _wait_landed(self, key: ExpertKey) -> int:
        """Block compute (not the host, on a GPU) until `key` has landed; its slot."""
        slot = self.residency.lookup(key)
        if slot is None:  # its prefetch's read failed since demand() and gave up the slot
            return self._load_again(key)
        if key in self._queued:  # demand() issues its layer's queued keys; a caller may skip demand()
            self._unqueue(key)
            self._issue(key, slot, demand=True, prefetch=True)
        copy = self._copying.get(key)
        if copy is not None:
            if copy.read is not None:  # reading a slower tier blocks the host: stall on any device
                self._advance(key, copy, block=True)
                if key not in self.residency:  # a prefetch whose read failed just now
                    return self._load_again(key)
            if key in self._copying:
                self.copier.wait(copy.ready)
                del self._copying[key]
                self._landed[key] = True
        return slot
