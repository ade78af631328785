"""The expert store, residency bookkeeping, eviction policies and the device cache executing plans, on CPU."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from expert_store.checkpoint import CheckpointFiles
from expert_store.device_cache import ExpertCache
from expert_store.eviction import Lru, NextUse, OnDemand, Pinned
from expert_store.keys import ExpertKey
from expert_store.layout import ExpertLayout
from expert_store.plan import Plan, Transfer
from expert_store.residency import Residency
from expert_store.store import LocalExpertStore, Tier
from expert_store.transfer import CpuCopier
from expertflow.families import family_for
from orchestrator.policies import make_policy, PolicyInputs


def fetch(*keys) -> Plan:
    """A plan fetching `keys` in this order, all due now."""
    return Plan(fetch=tuple(Transfer(ExpertKey(*k), 0.0, 0.0, 1.0) for k in keys))


def test_layout_pack_and_views_round_trip():
    layout = ExpertLayout(hidden=4, ffn=3, dtype=torch.float32)
    gate, up, down = torch.randn(3, 4), torch.randn(3, 4), torch.randn(4, 3)
    flat = torch.full((layout.padded_numel,), float("nan"))
    layout.pack(gate, up, down, flat)
    gate_up, down_view = layout.views(flat)
    assert torch.equal(gate_up, torch.cat([gate, up])) and torch.equal(down_view, down)
    assert layout.padded_numel % 128 == 0 and layout.nbytes == 36 * 4
    with pytest.raises(ValueError, match="gate projection has shape"):
        layout.pack(torch.randn(4, 3), up, down, flat)


def test_residency_bookkeeping():
    r = Residency(2)
    r.place((0, 1), r.free_slot())
    r.place((0, 2), r.free_slot())
    assert r.free_slot() is None and len(r) == 2
    with pytest.raises(RuntimeError):
        r.place((0, 3), 0)
    assert r.release((0, 1)) == 0
    assert r.free_slot() == 0 and (0, 1) not in r
    with pytest.raises(ValueError):
        Residency(0)


def test_lru_evicts_least_recently_used():
    lru = Lru()
    for key in [(0, 0), (0, 1), (0, 2)]:
        lru.on_use(key)
    lru.on_use((0, 0))
    assert lru.victim([(0, 0), (0, 1), (0, 2)]) == (0, 1)
    assert lru.victim([(0, 0), (0, 2)]) == (0, 2)
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        make_policy("mru", PolicyInputs(1, 8, 2))


def test_pinned_and_next_use_eviction():
    pinned = Pinned(keep={(0, 1)})
    for key in [(0, 1), (0, 2), (0, 3)]:
        pinned.on_load(key)
    assert pinned.victim({(0, 1), (0, 2), (0, 3)}) == (0, 2) and pinned.victim({(0, 1)}) is None
    nxt = NextUse()
    for key in [(0, 0), (0, 1), (1, 0)]:
        nxt.on_load(key)
    assert nxt.victim({(0, 1), (1, 0)}) == (0, 1)  # no prediction yet: LRU
    nxt.use = np.array([[5.0, 1.0], [9.0, 9.0]])
    assert nxt.victim({(0, 0), (0, 1), (1, 0)}) == (1, 0)  # furthest predicted use
    nxt.use = np.array([[5.0, 5.0], [1.0, 1.0]])
    assert nxt.victim({(0, 1), (0, 0)}) == (0, 0)  # equal: the least recently touched


def _store(directory, host_budget):
    files = CheckpointFiles(directory)
    family = family_for(["MixtralForCausalLM"], None)
    names = {(layer, e): family.expert_names(layer, e) for layer in range(3) for e in range(8)}
    layout = ExpertLayout(64, 96, torch.float32)
    return files, LocalExpertStore(files, names, layout, host_budget, pin_for_cuda=False), family


def test_store_places_experts_by_host_budget(mixtral_dir):
    files, store, family = _store(mixtral_dir, host_budget=5 * ExpertLayout(64, 96, torch.float32).slot_nbytes)
    keys = store.keys()
    assert [store.tier(k) for k in keys[:5]] == [Tier.HOST] * 5
    assert all(store.tier(k) is Tier.NVME for k in keys[5:])
    names = family.expert_names(2, 7)
    out = torch.empty(store.layout.padded_numel)
    assert store.read_into((2, 7), out) is Tier.NVME
    gate_up, down = store.layout.views(out)
    assert torch.equal(gate_up[:96], files.get(names.gate)) and torch.equal(down, files.get(names.down))
    with pytest.raises(KeyError, match="not in this store"):
        store.tier((9, 0))
    store.close()


def test_cache_with_one_slot_serves_every_expert_in_turn(mixtral_dir):
    files, store, _ = _store(mixtral_dir, host_budget=0)
    cache = ExpertCache(store, 1, torch.device("cpu"), Lru(), CpuCopier())
    base = cache.slots.data_ptr()
    seen = []
    for expert, gate_up, down in cache.acquire(1, [3, 5, 0]):
        reference = torch.empty(store.layout.padded_numel)
        store.read_into((1, expert), reference)
        assert torch.equal(gate_up, store.layout.views(reference)[0])
        seen.append(expert)
    assert seen == [3, 5, 0] and cache.slots.data_ptr() == base
    assert cache.residency.resident() == [(1, 0)]
    stats = cache.take_stats()
    assert (stats.hits, stats.misses, stats.bytes_from_nvme) == (0, 3, 3 * store.layout.nbytes)
    assert [e for e, *_ in cache.acquire(1, [5, 0])] == [0, 5]  # the resident one first
    assert (cache.stats.hits, cache.stats.misses) == (1, 1)
    store.close()


def test_prefetch_loads_without_evicting_the_running_layers_experts(mixtral_dir):
    files, store, _ = _store(mixtral_dir, host_budget=10**9)
    cache = ExpertCache(store, 2, torch.device("cpu"), Lru(), CpuCopier())
    cache.demand(0, [1])  # layer 0 routed to expert 1: pinned until it has run
    cache.execute(fetch((0, 2), (0, 3)))
    assert set(cache.residency.resident()) == {(0, 1), (0, 2)}
    assert cache.stats.prefetches == 1
    list(cache.acquire(0, [1]))
    list(cache.acquire(0, [2]))
    assert cache.stats.hits == 1 and cache.stats.prefetch_used == 1
    store.close()


def test_ondemand_keeps_nothing(mixtral_dir):
    files, store, _ = _store(mixtral_dir, host_budget=10**9)
    cache = ExpertCache(store, 4, torch.device("cpu"), OnDemand(), CpuCopier())
    list(cache.acquire(0, [1, 2]))
    list(cache.acquire(0, [1, 2]))
    assert len(cache.residency) == 0 and cache.stats.hits == 0 and cache.stats.misses == 4
    store.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_host_arena_is_registered_shared_memory_on_cuda(mixtral_dir):
    from expertflow.loader import LoadOptions, load

    loaded = load(mixtral_dir, LoadOptions(device="cuda", expert_budget="25%"))
    assert loaded.store.host_kind in ("shm+cudaHostRegister", "pinned")
    view = loaded.store.host_view((0, 0))
    assert view.is_pinned()
    loaded.close()


class _SlowCopier(CpuCopier):
    """Copies on the host, but reports them landed only when the test says so (a busy copy stream)."""

    def __init__(self) -> None:
        super().__init__()
        self.done = False

    def copy(self, dst, src, after):
        super().copy(dst, src, after)
        return object()

    def landed(self, ready) -> bool:
        return ready is None or self.done


def test_plan_queue_issues_a_few_at_a_time_cancels_and_yields_to_demand(mixtral_dir):
    files, store, _ = _store(mixtral_dir, host_budget=10**9)
    copier = _SlowCopier()
    cache = ExpertCache(store, 8, torch.device("cpu"), Lru(), copier, max_inflight=2)
    cache.execute(fetch((0, 1), (0, 2), (1, 3), (1, 4), (2, 5)))
    assert [cache.state(k) for k in [(0, 1), (0, 2), (1, 3), (2, 5)]] == ["copying", "copying", "queued", "queued"]
    assert len(cache.residency) == 5 and cache.stats.prefetches == 2  # slots taken when planned
    view = cache.view()
    assert [(f.key, f.started) for f in view.in_flight] == [
        ((0, 1), True), ((0, 2), True), ((1, 3), False), ((1, 4), False), ((2, 5), False)
    ]
    assert all(a.eta_ms < b.eta_ms for a, b in zip(view.in_flight, view.in_flight[1:]))  # one copy after another
    cache.execute(Plan(cancel=((1, 3), (1, 4))))  # no longer wanted: dropped before they start
    assert cache.stats.prefetch_cancelled == 2 and cache.state((1, 3)) == "absent" and cache.state((2, 5)) == "queued"
    assert [e for e, *_ in cache.acquire(1, [4])] == [4]  # a demand load does not wait for the queue
    assert cache.stats.misses == 1 and cache.state((2, 5)) == "queued"
    copier.done = True  # the copies landed: the queue moves on at the next call
    assert [e for e, *_ in cache.acquire(0, [1])] == [1]
    assert cache.state((2, 5)) == "landed" and cache.stats.prefetches == 3 and cache.stats.prefetch_used == 1
    assert cache.stats.hits == 1
    copier.done = False
    cache.execute(fetch((2, 6), (2, 7), (0, 5)))
    assert cache.state((2, 7)) == "copying" and cache.state((0, 5)) == "queued"
    moved = cache.stats.bytes_moved
    assert [e for e, *_ in cache.acquire(0, [5])] == [5]  # queued, then demanded: loaded now, not twice
    assert cache.stats.late == 1 and cache.stats.misses == 1 and cache.stats.bytes_moved == moved + store.layout.nbytes
    # A cancel never drops a copy already under way, nor the running layer's.
    cache.execute(Plan(cancel=((2, 6),)))
    assert cache.state((2, 6)) == "copying"
    cache.demand(1, [6])
    cache.execute(fetch((1, 7)))
    cache.execute(Plan(cancel=((1, 7),)))
    assert cache.state((1, 7)) == "absent" and cache.view().pinned == {(1, 6)}
    store.close()


def test_plan_never_evicts_a_fetched_resident_key(mixtral_dir):
    files, store, _ = _store(mixtral_dir, host_budget=10**9)
    cache = ExpertCache(store, 2, torch.device("cpu"), Lru(), CpuCopier())
    cache.execute(fetch((0, 0), (0, 1)))
    cache.execute(fetch((0, 0), (1, 5)))  # (0, 0) is wanted first: (0, 1) must make room, not (0, 0)
    assert sorted(cache.residency.resident()) == [(0, 0), (1, 5)]
    cache.execute(Plan(evict=((1, 5),)))  # an explicit eviction frees the slot
    assert sorted(cache.residency.resident()) == [(0, 0)]
    store.close()


def test_store_stages_nvme_experts_asynchronously(mixtral_dir):
    files, store, _ = _store(mixtral_dir, host_budget=0)
    out = torch.empty(store.layout.padded_numel)
    staged = store.stage(ExpertKey(2, 7), out)
    assert staged.wait() is Tier.NVME and staged.done()
    reference = torch.empty(store.layout.padded_numel)
    store.read_into(ExpertKey(2, 7), reference)
    assert torch.equal(out, reference)
    # Through the cache: the read starts when the copy is queued, the layer waits only at its use.
    cache = ExpertCache(store, 4, torch.device("cpu"), Lru(), CpuCopier())
    cache.execute(fetch((1, 2), (1, 3)))
    got = {e: gate_up.clone() for e, gate_up, _ in cache.acquire(1, [3, 2])}
    for e in (2, 3):
        store.read_into(ExpertKey(1, e), reference)
        assert torch.equal(got[e], store.layout.views(reference)[0])
    assert cache.stats.bytes_from_nvme == 2 * store.layout.nbytes and cache.stats.late + cache.stats.hits == 2
    store.close()


class _FailingStore(LocalExpertStore):
    """NVMe reads of the listed experts fail (a bad disk sector, a remote store gone)."""

    def __init__(self, *args, failing=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.failing = set(failing)

    def read_into(self, key, out):
        if key in self.failing:
            raise OSError(f"I/O error reading {tuple(key)}")
        return super().read_into(key, out)


def test_a_failed_read_frees_its_slot_drops_a_prefetch_and_names_a_demanded_expert(mixtral_dir):
    from expert_store.device_cache import ExpertReadError

    files = CheckpointFiles(mixtral_dir)
    family = family_for(["MixtralForCausalLM"], None)
    names = {(layer, e): family.expert_names(layer, e) for layer in range(3) for e in range(8)}
    layout = ExpertLayout(64, 96, torch.float32)
    store = _FailingStore(files, names, layout, 0, pin_for_cuda=False, failing={(0, 1)})
    cache = ExpertCache(store, 4, torch.device("cpu"), Lru(), CpuCopier())
    cache.execute(fetch((0, 1), (0, 2)))  # the prefetch of (0, 1) fails: dropped, its slot free again
    for _ in range(1000):  # the read runs on the store's reader thread: wait for it (10 s at most)
        cache.view()
        if cache.stats.failed_reads:
            break
        threading.Event().wait(0.01)
    assert cache.stats.failed_reads == 1 and cache.state((0, 1)) == "absent"
    assert [e for e, *_ in cache.acquire(0, [2, 3])] == [2, 3]  # the cache goes on serving
    with pytest.raises(ExpertReadError, match=r"expert \(0, 1\) could not be read.*I/O error"):
        list(cache.acquire(0, [1]))
    assert cache.state((0, 1)) == "absent" and len(cache.residency) == 2
    assert [e for e, *_ in cache.acquire(1, [4])] == [4]
    store.close()


def test_a_store_for_another_model_is_refused(mixtral_dir, tmp_path):
    from expertflow.loader import LoadOptions, load

    files = CheckpointFiles(mixtral_dir)
    family = family_for(["MixtralForCausalLM"], None)
    layout = ExpertLayout(64, 96, torch.float32)
    fewer = {(layer, e): family.expert_names(layer, e) for layer in range(2) for e in range(8)}
    store = LocalExpertStore(files, fewer, layout, 0, pin_for_cuda=False)
    with pytest.raises(ValueError, match="lacks 8 of the model's experts"):
        load(mixtral_dir, LoadOptions(), store=store)
    store.close()
    more = {(layer, e): family.expert_names(layer % 3, e) for layer in range(4) for e in range(8)}
    store = LocalExpertStore(files, more, layout, 0, pin_for_cuda=False)
    with pytest.raises(ValueError, match="holds 8 experts this model does not have"):
        load(mixtral_dir, LoadOptions(), store=store)
    store.close()
    exact = {(layer, e): family.expert_names(layer, e) for layer in range(3) for e in range(8)}
    store = LocalExpertStore(files, exact, layout, 0, pin_for_cuda=False)
    loaded = load(mixtral_dir, LoadOptions(expert_budget="25%"), store=store)
    assert loaded.store is store and loaded.cache.shape == (3, 8)
    loaded.close()  # the caller's store stays open
    assert store.host_view((0, 0)) is None and store.tier((0, 0)) is Tier.NVME
    store.close()
