"""Ranged, parallel, checksummed fetches of one expert (expertflow/services/store_fetch.py) against a real store
server on loopback: the bytes, a corrupt or cut range fetched again from where it went wrong, bad ranges refused."""

from __future__ import annotations

import random
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import torch
from test_store_service import serving

from expert_store.keys import ExpertKey
from expertflow.services.store_client import RemoteExpertStore, StoreFetchError
from expertflow.services.store_fetch import RANGE_ATTEMPTS, crc32_combine, fetch_expert, split
from expertflow.services.store_server import ExpertStoreServicer
from expertflow.services.store_wire import BadStream
from expertflow.v1 import expert_store_pb2 as pb
from expertflow.v1 import expert_store_pb2_grpc

pytestmark = pytest.mark.usefixtures("one_thread")
KEY = ExpertKey(1, 2)


def test_crc32_combine_is_zlibs():
    rng = random.Random(0)
    data = rng.randbytes(3000)
    for _ in range(50):
        a, b = sorted(rng.sample(range(len(data) + 1), 2))
        left, right = data[:a], data[a:b]
        assert crc32_combine(zlib.crc32(left), zlib.crc32(right), len(right)) == zlib.crc32(data[:b])
    assert crc32_combine(0, zlib.crc32(data), len(data)) == zlib.crc32(data)  # from the empty buffer on


def test_split_gives_ranges_of_whole_chunks_covering_the_buffer():
    assert split(10, 4, 2) == [(0, 8), (8, 2)]  # 3 chunks over 2 streams: 2 and 1
    assert split(10, 4, 8) == [(0, 4), (4, 4), (8, 2)]  # never more ranges than chunks
    assert split(16, 4, 1) == [(0, 16)]
    assert split(5, 16, 4) == [(0, 5)]
    with pytest.raises(ValueError, match="must be >= 1"):
        split(0, 4, 2)


def _expected(directory, key: ExpertKey) -> np.ndarray:
    """The expert's buffer bytes as the embedded store holds them."""
    with serving(directory, "100%") as (_, svc, _):
        return svc.store.host_view(key).view(torch.uint8).numpy().copy()


class _Recording(ExpertStoreServicer):
    """A store that keeps every Fetch request's range, and (test hooks on the real server) spoils the chunk at byte
    `at` the first `times` times it sends it: a flipped byte under the original crc32, or (`cut`) the stream ends
    just before it."""

    def __init__(self, *args, at: int = -1, times: int = 0, cut: bool = False) -> None:
        super().__init__(*args)
        self.at, self.times, self.cut = at, times, cut
        self.requests: list[tuple[int, int]] = []

    def Fetch(self, request, context):
        with self._lock:
            self.requests.append((request.offset, request.length))
        for chunk in super().Fetch(request, context):
            if chunk.offset == self.at:
                with self._lock:
                    spoil, self.times = self.times > 0, self.times - 1
                if spoil and self.cut:
                    return
                if spoil:
                    data = bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:]
                    chunk = pb.ExpertChunk(offset=chunk.offset, data=data, crc32=chunk.crc32, total=chunk.total)
            yield chunk


@pytest.mark.parametrize("host_budget", ["100%", "0"], ids=["host-tier", "nvme-tier"])
def test_a_ranged_parallel_fetch_equals_the_expert(mixtral_dir, host_budget):
    expected = _expected(mixtral_dir, KEY)
    total = len(expected)
    with serving(mixtral_dir, host_budget, _Recording) as (address, svc, _):
        with grpc.insecure_channel(address) as channel:
            stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
            crc = zlib.crc32(expected)
            for chunk_bytes, streams in ((4 << 10, 1), (4 << 10, 3), (16 << 10, 8)):
                out = np.full(total, 0xAB, np.uint8)
                svc.requests.clear()
                deadline = time.monotonic() + 10
                assert (
                    fetch_expert(stub, KEY, out, crc, chunk_bytes=chunk_bytes, streams=streams, deadline=deadline) == 0
                )
                assert np.array_equal(out, expected), (chunk_bytes, streams)
                assert sorted(svc.requests) == split(total, chunk_bytes, streams)  # one stream per range, each once
            # a range on its own: exactly its bytes, in chunks cut from its start, offsets in the buffer
            start, length = 5000, 9000
            request = pb.FetchRequest(key={"layer": 1, "expert": 2}, chunk_bytes=4 << 10, offset=start, length=length)
            got = list(stub.Fetch(request, timeout=5))
            assert [c.offset for c in got] == [5000, 5000 + 4096, 5000 + 8192]
            assert b"".join(c.data for c in got) == expected[start : start + length].tobytes()
            assert all(c.total == total and c.crc32 == zlib.crc32(c.data) for c in got)
            to_end = list(stub.Fetch(pb.FetchRequest(key={"layer": 1, "expert": 2}, offset=total - 3), timeout=5))
            assert b"".join(c.data for c in to_end) == expected[-3:].tobytes()


@pytest.mark.parametrize("cut", [False, True], ids=["corrupt-chunk", "cut-stream"])
def test_a_corrupt_or_cut_range_is_refetched_from_where_it_went_wrong(mixtral_dir, cut):
    expected = _expected(mixtral_dir, KEY)
    total, chunk = len(expected), 4 << 10
    ranges = split(total, chunk, 2)
    bad = ranges[1][0] + chunk  # the second range's second chunk
    spoiling = lambda *args: _Recording(*args, at=bad, times=1, cut=cut)
    with serving(mixtral_dir, "100%", spoiling) as (address, svc, _):
        store = RemoteExpertStore(address, chunk_bytes=chunk, streams=2, host_id="another-host")
        try:
            out = torch.empty(store.layout.padded_numel)
            store.read_into(KEY, out)
            assert np.array_equal(out.view(torch.uint8).numpy(), expected) and store.refetches == 1
            # the two ranges, then the second one again from the chunk that went wrong: the bytes before it stay
            assert sorted(svc.requests) == sorted(ranges + [(bad, ranges[1][0] + ranges[1][1] - bad)])
        finally:
            store.close()


def test_a_range_that_stays_corrupt_is_an_error_naming_it(mixtral_dir):
    expected = _expected(mixtral_dir, KEY)
    spoiling = lambda *args: _Recording(*args, at=8192, times=100)
    with serving(mixtral_dir, "100%", spoiling) as (address, svc, _):
        with grpc.insecure_channel(address) as channel:
            stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
            out = np.zeros(len(expected), np.uint8)
            with pytest.raises(
                BadStream,
                match=rf"bytes \[0, \d+\): {RANGE_ATTEMPTS} attempts failed; the last: the chunk at byte 8192 fails its crc32",
            ):
                fetch_expert(
                    stub, KEY, out, zlib.crc32(expected), chunk_bytes=4 << 10, streams=2, deadline=time.monotonic() + 10
                )
            first = split(len(expected), 4 << 10, 2)[0]
            assert svc.requests.count((8192, first[1] - 8192)) == RANGE_ATTEMPTS - 1
        store = RemoteExpertStore(address, chunk_bytes=4 << 10, streams=2, retries=1, host_id="another-host")
        try:
            with pytest.raises(
                StoreFetchError, match=r"expert \(1, 2\) from the store at .*: 2 attempts failed; the last: bytes \[0"
            ):
                store.read_into(KEY, torch.empty(store.layout.padded_numel))
        finally:
            store.close()


def test_bad_ranges_are_invalid_argument_and_unknown_experts_not_found(mixtral_dir):
    with serving(mixtral_dir, "0") as (address, svc, _):
        total = svc.layout.slot_nbytes
        with grpc.insecure_channel(address) as channel:
            stub = expert_store_pb2_grpc.ExpertStoreStub(channel)

            def refused(**fields) -> grpc.RpcError:
                with pytest.raises(grpc.RpcError) as e:
                    list(stub.Fetch(pb.FetchRequest(**fields), timeout=5))
                return e.value

            key = {"layer": 0, "expert": 1}
            past = refused(key=key, offset=total)
            assert past.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert (
                f"expert (0, 1): byte range at offset {total}: the expert buffer holds {total} bytes" in past.details()
            )
            over = refused(key=key, offset=8, length=total)
            assert over.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"byte range [8, {total + 8}) runs past the expert buffer's {total} bytes" in over.details()
            assert refused(key={"layer": 3, "expert": 0}, offset=total).code() is grpc.StatusCode.NOT_FOUND
            # through fetch_expert: the node's status, not the echo of the streams it cancelled
            out = np.zeros(total, np.uint8)
            with pytest.raises(grpc.RpcError) as missing:
                fetch_expert(
                    stub, ExpertKey(3, 0), out, 0, chunk_bytes=4 << 10, streams=4, deadline=time.monotonic() + 5
                )
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(ValueError, match="chunk_bytes 3"):
            RemoteExpertStore(address, chunk_bytes=3)


class _Stalls(ExpertStoreServicer):
    """A store whose streams of the second range send nothing until the caller gives up."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.stalled = threading.Event()

    def Fetch(self, request, context):
        if request.offset > 0:
            self.stalled.set()
            while context.is_active():
                time.sleep(0.02)
            return
        yield from super().Fetch(request, context)


def test_a_stalled_range_fails_the_fetch_by_its_deadline(mixtral_dir):
    with serving(mixtral_dir, "100%", _Stalls) as (address, svc, _), grpc.insecure_channel(address) as channel:
        stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
        out = np.zeros(svc.layout.slot_nbytes, np.uint8)
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as late:
            fetch_expert(stub, KEY, out, 0, chunk_bytes=4 << 10, streams=2, deadline=t0 + 0.5)
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED and svc.stalled.is_set()
        assert time.monotonic() - t0 < 5
