"""`RemoteExpertStore`: the `ExpertStore` contract served by an expert-store service (store_server.py), for
`load(directory, options, store=RemoteExpertStore(address, device))`.

    same host      Attach gives the shared-memory segments of the store's host tier; they are mapped here
                   (read-only where possible) and, on a CUDA device, registered with cudaHostRegister, so
                   `host_view` is a zero-copy, page-locked view and the cache copies from it as from its own
    otherwise      (NVMe experts, or every expert when the store's host id is not this one) `stage` fetches
                   the expert on a small pool of reader threads as `streams` concurrent ranged Fetch streams of
                   `chunk_bytes` chunks, straight into the staging buffer (store_fetch.py: each chunk's crc32 and
                   the whole buffer's checked against the listing, a bad range fetched again from where it went
                   wrong); a fetch that still fails is tried again whole, a few times

Segments are opened as files under /dev/shm and mapped with mmap, not attached through
multiprocessing.shared_memory, whose resource tracker (Python 3.11) unlinks at exit segments it did not create.
Every call has a deadline, so a store that dies or hangs is an error naming it, never a hang.

Not for: serving (store_server.py), caching on the device (expert_store/device_cache.py) or choosing what
to fetch (the prefetchers).
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from expert_store.keys import ExpertKey
from expert_store.layout import ExpertLayout
from expert_store.plan import Source
from expert_store.store import ExpertStore, StagedRead, ThreadedRead, Tier
from expertflow.services import store_wire
from expertflow.services.security import Security, open_channel
from expertflow.services.store_fetch import DEFAULT_FETCH_CHUNK_BYTES, DEFAULT_FETCH_STREAMS, fetch_expert
from expertflow.services.store_wire import (
    MAX_MESSAGE_BYTES,
    BadStream,
    chunk_size_error,
    dtype_of,
    key_from_proto,
)
from expertflow.v1 import expert_store_pb2 as pb
from expertflow.v1 import expert_store_pb2_grpc

log = logging.getLogger(__name__)

_SHM = "/dev/shm"
_REGISTER_PORTABLE, _REGISTER_READ_ONLY = 0x01, 0x08  # cudaHostRegister flags
_PERMANENT = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)


def check_host_buffer(out: torch.Tensor, nbytes: int) -> None:
    """A fetch's destination must be one contiguous host buffer of an expert's `nbytes`: a clear error before any
    node is asked (a caller's bad buffer is not a node's failure)."""
    if out.device.type != "cpu" or not out.is_contiguous() or out.numel() * out.element_size() != nbytes:
        raise ValueError(f"fetch into a contiguous host buffer of {nbytes} bytes, not {out.shape} on {out.device}")


class StoreFetchError(IOError):
    """An expert the store did not deliver intact: which, from where, and what went wrong last."""


@dataclass
class _Mapping:
    """One mapped segment; `registered` is the address cudaHostRegister pinned, if it did."""

    memory: mmap.mmap
    bytes: torch.Tensor  # uint8 view of the whole mapping
    registered: int | None = None


def _on_own_thread(call: Callable[[], int]) -> int:
    """Run a CUDA runtime call on a thread of its own. A failed cudaHostRegister also leaves its error as the
    thread's last CUDA error, which torch's next kernel-launch check on that thread would raise as its own; the
    helper thread takes the error with it."""
    with ThreadPoolExecutor(1, thread_name_prefix="expert-store-cuda") as one:
        return int(one.submit(call).result())


class RemoteExpertStore(ExpertStore):
    """The experts of the expert-store service at `address`, for a worker computing on `device`.

    `timeout_s` bounds each control call (and the wait for a store still starting), `fetch_timeout_s` each
    expert's fetch; `retries` more attempts follow a failed fetch; `readers` experts are fetched at once, each
    as `streams` ranges of `chunk_bytes` chunks (0: store_fetch's measured defaults); `read_into` fetches on the
    calling thread, ranges after the first on a pool of `readers * (streams - 1)` (a caller with its own reader
    threads, store_cluster.py, calls it there); `host_id` None is this host's (store_wire.host_id); any other value
    makes this client fetch everything, as a client on another host;
    `security` the TLS and token the store wants (security.py; None: plaintext, no token)."""

    def __init__(
        self,
        address: str,
        device: str | torch.device = "cpu",
        *,
        timeout_s: float = 10.0,
        fetch_timeout_s: float = 60.0,
        retries: int = 2,
        readers: int = 2,
        chunk_bytes: int = 0,
        streams: int = 0,
        host_id: str | None = None,
        security: Security | None = None,
    ) -> None:
        if retries < 0 or readers < 1 or streams < 0 or timeout_s <= 0 or fetch_timeout_s <= 0:
            raise ValueError("retries >= 0, readers >= 1, streams >= 0 and positive timeouts, please")
        problem = chunk_size_error(chunk_bytes)
        if problem is not None:
            raise ValueError(problem)
        self.address = address
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("a RemoteExpertStore for a CUDA device, but no CUDA device is available")
        self._timeout_s, self._fetch_timeout_s = timeout_s, fetch_timeout_s
        self._retries = retries
        self._chunk_bytes = chunk_bytes or DEFAULT_FETCH_CHUNK_BYTES
        self._streams = streams or DEFAULT_FETCH_STREAMS
        self._lock = threading.Lock()
        self._refetches = 0
        self._mappings: list[_Mapping] = []
        self._views: dict[ExpertKey, torch.Tensor] = {}
        self._same_host = False  # the store runs on this host (set once it says which host it is on)
        self._readers: ThreadPoolExecutor | None = None
        self._ranges: ThreadPoolExecutor | None = None  # the ranges of a fetch after its first, for every reader
        self._security = security or Security()
        self._channel = open_channel(
            address,
            self._security,
            options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", 1 << 20)],
        )
        try:
            self._stub = expert_store_pb2_grpc.ExpertStoreStub(self._channel)
            self._describe(self._call("GetLayout", pb.LayoutRequest(), wait_for_ready=True))
            listed = self._call("List", pb.ListRequest()).experts
            self._tiers = {key_from_proto(e.key): Tier(e.tier) for e in listed}
            self._crcs = {key_from_proto(e.key): e.crc32 for e in listed}
            wrong = [e for e in listed if e.nbytes != self.layout.slot_nbytes]
            if wrong:
                raise ValueError(
                    f"the store at {address} lists expert buffers of {wrong[0].nbytes} bytes, "
                    f"not {self.layout.slot_nbytes}"
                )
            attach = self._call("Attach", pb.AttachRequest())
            mine = host_id if host_id is not None else store_wire.host_id()
            self.host_kind = "fetch (the store is on another host)" if attach.host_id != mine else "fetch"
            self._same_host = attach.host_id == mine
            if attach.host_id == mine and attach.segments:
                self._map(attach)
            if len(self._views) < len(self._tiers):
                self._readers = ThreadPoolExecutor(readers, thread_name_prefix="expert-store-fetch")
                if self._streams > 1:
                    self._ranges = ThreadPoolExecutor(
                        readers * (self._streams - 1), thread_name_prefix="expert-store-range"
                    )
        except BaseException:
            self.close()
            raise

    # -- connecting ------------------------------------------------------------------------------------------
    def _call(self, name: str, request, wait_for_ready: bool = False):
        """One control call; `wait_for_ready`: wait (up to the deadline) for a store that is still starting."""
        try:
            return getattr(self._stub, name)(request, timeout=self._timeout_s, wait_for_ready=wait_for_ready)
        except grpc.RpcError as e:
            problem = self._security.explain(e)
            raise ConnectionError(f"expert store at {self.address}: {name} failed: {problem}") from None

    def _describe(self, wire: pb.Layout) -> None:
        self.layout = ExpertLayout(wire.hidden, wire.ffn, dtype_of(wire.dtype))
        ours = (self.layout.padded_numel, self.layout.nbytes, self.layout.slot_nbytes)
        if ours != (wire.padded_numel, wire.nbytes, wire.slot_nbytes):
            raise ValueError(
                f"the store at {self.address} lays experts out as (padded_numel, nbytes, slot_nbytes) = "
                f"{(wire.padded_numel, wire.nbytes, wire.slot_nbytes)}, this client as {ours}: another version?"
            )
        self.model, self.model_version = wire.model, wire.model_version
        self.shape = (wire.moe_layers, wire.experts)

    def _map(self, attach: pb.AttachResponse) -> None:
        """Map every segment and make the host-tier views; on any failure (a segment this host cannot see after
        all) fall back to fetching, saying why."""
        try:
            for segment in attach.segments:
                self._mappings.append(self._map_segment(segment.name, segment.nbytes))
        except (OSError, ValueError) as e:
            log.warning("cannot map the store's shared memory, fetching instead: %s", e)
            self._unmap()
            self.host_kind = f"fetch (shared memory not mapped: {e})"
            return
        slot = self.layout.slot_nbytes
        for p in attach.placements:
            key = key_from_proto(p.key)
            if self._tiers.get(key) is not Tier.HOST or p.segment >= len(self._mappings):
                self._unmap()
                raise ValueError(f"the store places expert {tuple(key)} in shared memory, not as it listed it")
            raw = self._mappings[p.segment].bytes[p.offset : p.offset + slot]
            if raw.numel() != slot:
                self._unmap()
                raise ValueError(f"the store places expert {tuple(key)} past the end of its segment")
            self._views[key] = raw.view(self.layout.dtype)
        probe = key_from_proto(attach.placements[0].key) if attach.placements else None
        if probe is not None and zlib.crc32(self._views[probe].view(torch.uint8).numpy()) != self._crcs[probe]:
            self._unmap()
            raise ValueError(f"the store's shared memory does not hold expert {tuple(probe)} as it listed it")
        registered = all(m.registered is not None for m in self._mappings)
        on_cuda = self.device.type == "cuda"
        self.host_kind = "shm+cudaHostRegister" if on_cuda and registered else "shm (pageable)" if on_cuda else "shm"

    def _map_segment(self, name: str, nbytes: int) -> _Mapping:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"the store names a shared-memory segment {name!r}, which is not a plain name")
        path = os.path.join(_SHM, name)
        mapping = self._mmap(path, nbytes, writable=False)
        if self.device.type != "cuda":
            return mapping
        # Read-only pages pin only with cudaHostRegisterReadOnly, which not every device supports; else the
        # same pages mapped writable (this process never writes them), as the in-process arena registers them.
        flags = _REGISTER_PORTABLE | _REGISTER_READ_ONLY
        if self._register(mapping, flags) != 0:
            writable = self._mmap(path, nbytes, writable=True)
            err = self._register(writable, _REGISTER_PORTABLE)
            if err == 0:
                self._release(mapping)
                return writable
            self._release(writable)
            log.warning("cudaHostRegister of %s failed (CUDA error %d): its experts copy at pageable speed", path, err)
        return mapping

    def _mmap(self, path: str, nbytes: int, writable: bool) -> _Mapping:
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            if size < nbytes:
                raise ValueError(f"{path} holds {size} bytes, the store says {nbytes}")
            prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
            memory = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=prot)
        finally:
            os.close(fd)
        with warnings.catch_warnings():  # torch warns that it cannot make the tensor read-only too
            warnings.simplefilter("ignore", UserWarning)
            return _Mapping(memory, torch.frombuffer(memory, dtype=torch.uint8))

    def _register(self, mapping: _Mapping, flags: int) -> int:
        ptr, nbytes, index = mapping.bytes.data_ptr(), mapping.bytes.numel(), self.device.index

        def register() -> int:
            with torch.cuda.device(index if index is not None else torch.cuda.current_device()):
                return torch.cuda.cudart().cudaHostRegister(ptr, nbytes, flags)

        err = _on_own_thread(register)
        if err == 0:
            mapping.registered = ptr
        return err

    def _release(self, mapping: _Mapping) -> None:
        """Unregister the pages and drop this client's references, which unmaps them. Never mmap.close():
        torch.frombuffer keeps the mmap object alive but holds no buffer export, so closing it would unmap pages
        under a view someone still holds (a crash, not an error); such a view keeps its pages, unpinned."""
        if mapping.registered is not None:
            ptr = mapping.registered
            _on_own_thread(lambda: torch.cuda.cudart().cudaHostUnregister(ptr))
            mapping.registered = None
        mapping.bytes = mapping.memory = None  # type: ignore[assignment]

    def _unmap(self) -> None:
        self._views.clear()
        if self._mappings and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # no copy may still be reading pages about to be unpinned
        for mapping in self._mappings:
            self._release(mapping)
        self._mappings.clear()

    # -- the contract ----------------------------------------------------------------------------------------
    @property
    def refetches(self) -> int:
        """Fetches, and ranges of fetches, repeated after a bad or broken stream, so far."""
        return self._refetches

    def keys(self) -> list[ExpertKey]:
        return sorted(self._tiers)

    def tier(self, key: ExpertKey) -> Tier:
        """The tier the store holds the expert in (a client on another host fetches host-tier experts too)."""
        self._check(key)
        return self._tiers[key]

    def source(self, key: ExpertKey) -> Source:
        """LOCAL: mapped from the store's shared memory; fetched: NVME if the store is on this host and reads it from
        its file, else REMOTE (another host, or this host's store memory that could not be mapped here)."""
        self._check(key)
        if key in self._views:
            return Source.LOCAL
        return Source.NVME if self._same_host and self._tiers[key] is Tier.NVME else Source.REMOTE

    def host_view(self, key: ExpertKey) -> torch.Tensor | None:
        self._check(key)
        return self._views.get(key)

    def read_into(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        view = self.host_view(key)
        if view is not None:
            out.copy_(view)
            return Tier.HOST
        return self._fetch(key, out)

    def stage(self, key: ExpertKey, out: torch.Tensor) -> StagedRead:
        if self.host_view(key) is not None or self._readers is None:
            return super().stage(key, out)
        return ThreadedRead(lambda: self._fetch(key, out), self._readers)

    def _check(self, key: ExpertKey) -> None:
        if key not in self._tiers:
            raise KeyError(f"expert {tuple(key)} is not in the store at {self.address} (MoE layer, expert)")

    # -- fetching ----------------------------------------------------------------------------------------------
    def _fetch(self, key: ExpertKey, out: torch.Tensor) -> Tier:
        check_host_buffer(out, self.layout.slot_nbytes)
        flat = out.view(torch.uint8).numpy()
        last = ""
        for attempt in range(1 + self._retries):
            if attempt:
                with self._lock:
                    self._refetches += 1
                time.sleep(0.05 * attempt)  # a restarting or overloaded store gets a moment
            try:
                self._fetch_once(key, flat)
                return self._tiers[key]
            except BadStream as e:
                last = str(e)
            except grpc.RpcError as e:
                last = f"{e.code().name}: {e.details()}"
                if e.code() in _PERMANENT or self._channel is None:  # no second try can help, or closed
                    raise StoreFetchError(f"expert {tuple(key)} from the store at {self.address}: {last}") from None
            log.warning("fetch of expert %s failed (attempt %d): %s", tuple(key), attempt + 1, last)
        raise StoreFetchError(
            f"expert {tuple(key)} from the store at {self.address}: "
            f"{1 + self._retries} attempts failed; the last: {last}"
        )

    def _fetch_once(self, key: ExpertKey, flat: np.ndarray) -> None:
        if self._channel is None:
            raise StoreFetchError(f"expert {tuple(key)}: the store client is closed")
        deadline = time.monotonic() + self._fetch_timeout_s
        refetched = fetch_expert(
            self._stub,
            key,
            flat,
            self._crcs[key],
            chunk_bytes=self._chunk_bytes,
            streams=self._streams,
            deadline=deadline,
            pool=self._ranges,
        )
        if refetched:
            with self._lock:
                self._refetches += refetched

    def close(self) -> None:
        """Stop the readers (closing the channel ends fetches under way), unregister and unmap the segments."""
        channel, self._channel = getattr(self, "_channel", None), None
        if channel is not None:
            channel.close()
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
            self._readers = None
        if self._ranges is not None:  # after the readers: a fetch still running hands ranges to this pool
            self._ranges.shutdown(wait=True, cancel_futures=True)
            self._ranges = None
        self._unmap()
