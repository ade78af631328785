"""Fetching one expert from one store node: S concurrent ranged Fetch streams of checksummed chunks, written
straight into the caller's buffer (a view of a pinned staging buffer: no whole-expert copy in between).

    fetch_expert(stub, key, out, crc32, chunk_bytes=C, streams=S, deadline=t, pool=p) -> ranges fetched again
    split(total, chunk_bytes, streams) -> [(offset, length)]    S ranges of whole chunks
    crc32_combine(crc_a, crc_b, len_b) -> crc32 of a + b         as zlib's, which Python does not expose

Each chunk is checked before it is written (crc32, its offset in the range, the buffer's total, no excess); a
range that arrives wrong (a corrupt chunk, a cut stream) is fetched again from the first byte not yet written, up
to `attempts` times; the whole buffer's crc32, combined from the chunks' without another pass over the bytes, must
equal the one the store listed. Any stream failing stops the others (their calls are cancelled) and the first
failure is raised: `BadStream` (the bytes were wrong, `attempts` times for one range, or the whole buffer does not
match the listing) or the `grpc.RpcError` (the node's status: NOT_FOUND, UNAVAILABLE, DEADLINE_EXCEEDED, ...), for
the caller to try again or to fail over to another node.

The defaults come from bench/fetch_transport.py (bench/results/fetch_transport_{cpu,h200}.json), by the cores the
machine has: see DEFAULT_FETCH_CHUNK_BYTES and DEFAULT_FETCH_STREAMS.

Not for: choosing the node or retrying whole fetches (store_client.py), serving (store_server.py), or the chunk
format both ends share (store_wire.py).
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

import grpc
import numpy as np

from expert_store.keys import ExpertKey
from expertflow.services.store_wire import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, BadStream, key_to_proto
from expertflow.v1 import expert_store_pb2 as pb

log = logging.getLogger(__name__)

# Measured on loopback and across a veth pair, against the same bytes over shared memory (bench/fetch_transport.py;
# tables in bench/results/README.md). The fetch is CPU-bound in gRPC's Python layer (client + store spend 3-4 CPU
# seconds per GB), so the best cell depends on the cores the worker and the store have:
#   16 cores (H200 host, fetch_transport_h200.json): 1 MiB x 2 streams is best or within 10 % of it for both
#     sizes and networks (16.5 MiB: 1.02 GB/s loopback, 0.85 veth; 336 MiB: 1.17 and 1.12); 1 stream reaches
#     0.55-0.75, 4 streams no more than 2, 4 MiB chunks 0.3-0.44.
#   2 cores (fetch_transport_cpu.json): 256 KiB x 1 is best for the 16.5 MiB expert (0.53 loopback, 0.37 veth) and
#     within 15 % for the 336 MiB one; a second stream only adds contention for the two cores.
_MANY_CORES = (os.cpu_count() or 1) >= 8
DEFAULT_FETCH_CHUNK_BYTES = (1 << 20) if _MANY_CORES else (256 << 10)
DEFAULT_FETCH_STREAMS = 2 if _MANY_CORES else 1
DEADLINE_GRACE_S = 1.0  # how long past its deadline a fetch may run before its calls are cancelled here
RANGE_ATTEMPTS = 3  # per range: a corrupt or cut range is fetched again from where it went wrong

_POLY = 0xEDB88320  # crc32's polynomial, bit-reflected


def _multmodp(a: int, b: int) -> int:
    """a x b modulo the crc32 polynomial (bit-reflected, as zlib's multmodp)."""
    m, p = 1 << 31, 0
    while True:
        if a & m:
            p ^= b
            if not a & (m - 1):
                return p
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> tuple[int, ...]:
    """x^(2^k) modulo the polynomial, k = 0..31."""
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return tuple(table)


_X2N = _x2n_table()


@functools.lru_cache(maxsize=64)
def _shift(nbytes: int) -> int:
    """x^(8 nbytes) modulo the polynomial: what appending `nbytes` bytes does to a crc (one per chunk size)."""
    p, n, k = 1 << 31, nbytes, 3
    while n:
        if n & 1:
            p = _multmodp(_X2N[k & 31], p)
        n >>= 1
        k += 1
    return p


def crc32_combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """crc32 of a + b from crc32(a), crc32(b) and len(b) (zlib's crc32_combine)."""
    return _multmodp(_shift(len_b), crc_a) ^ crc_b


def split(total: int, chunk_bytes: int, streams: int) -> list[tuple[int, int]]:
    """`total` bytes as at most `streams` ranges (offset, length) of whole chunks, as even as chunks allow."""
    if total < 1 or chunk_bytes < 1 or streams < 1:
        raise ValueError(f"split {total} bytes in chunks of {chunk_bytes} over {streams} streams: all must be >= 1")
    n_chunks = -(-total // chunk_bytes)
    per = -(-n_chunks // streams) * chunk_bytes
    return [(offset, min(per, total - offset)) for offset in range(0, total, per)]


class _Stop(Exception):
    """Another range failed: this one stops quietly."""


class _Ranges:
    """The streams of one fetch: their calls (to cancel them all when one fails) and the first failure."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: list = []
        self.failed = threading.Event()
        self.error: BaseException | None = None

    def open(self, call) -> None:
        with self._lock:
            self._calls.append(call)
            stopped = self.failed.is_set()
        if stopped:
            call.cancel()
            raise _Stop

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = error
            self.failed.set()
            calls = list(self._calls)
        for call in calls:
            call.cancel()


def _fetch_range(
    stub,
    request: pb.FetchRequest,
    out: np.ndarray,
    start: int,
    length: int,
    deadline: float,
    attempts: int,
    ranges: _Ranges,
) -> tuple[list[tuple[int, int]], int]:
    """Bytes [start, start + length) of the expert into `out`: [(crc32, length)] of its chunks in order, and how many
    times it was fetched again."""
    total, done, pieces, last = len(out), 0, [], ""
    for attempt in range(attempts):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        pb_request = pb.FetchRequest()
        pb_request.CopyFrom(request)
        pb_request.offset, pb_request.length = start + done, length - done
        call = stub.Fetch(pb_request, timeout=remaining)
        ranges.open(call)
        try:
            for chunk in call:
                data = chunk.data  # upb makes a new bytes object at every access of a bytes field: once only
                n, at = len(data), start + done
                if chunk.total != total or chunk.offset != at or n == 0 or done + n > length:
                    where = f"a chunk of {n} bytes at byte {chunk.offset} of {chunk.total}"
                    raise BadStream(f"{where}, where byte {at} of {total} was due")
                crc = zlib.crc32(data)
                if crc != chunk.crc32:
                    raise BadStream(f"the chunk at byte {at} fails its crc32")
                out[at : at + n] = np.frombuffer(data, np.uint8)
                pieces.append((crc, n))
                done += n
                if ranges.failed.is_set():
                    raise _Stop
            if done != length:
                raise BadStream(f"the stream of bytes [{start}, {start + length}) ended at byte {start + done}")
            return pieces, attempt
        except BadStream as e:
            last = str(e)
            key = (request.key.layer, request.key.expert)
            log.warning("fetch of expert %s from byte %d: %s (attempt %d)", key, start + done, last, attempt + 1)
        finally:
            call.cancel()  # a stream left early stops at the server too; after its end, a no-op
    if not last:  # out of time before an attempt could start: the caller hears it as the deadline it is
        raise BadStream(f"bytes [{start}, {start + length}): the deadline passed before they could be fetched")
    raise BadStream(f"bytes [{start}, {start + length}): {attempts} attempts failed; the last: {last}")


def fetch_expert(
    stub,
    key: ExpertKey,
    out: np.ndarray,
    crc32: int,
    *,
    chunk_bytes: int = DEFAULT_FETCH_CHUNK_BYTES,
    streams: int = DEFAULT_FETCH_STREAMS,
    deadline: float,
    pool: ThreadPoolExecutor | None = None,
    attempts: int = RANGE_ATTEMPTS,
) -> int:
    """Fetch expert `key` whole into `out` (uint8, the buffer's size) as `streams` ranges of `chunk_bytes` chunks
    at once, by `deadline` (time.monotonic()); check it against `crc32`; how many ranges were fetched again.

    `stub` is the node's ExpertStoreStub; ranges other than the first run on `pool` (None: threads of this call's
    own), the first on the calling thread. Raises BadStream or grpc.RpcError (see the module's docstring)."""
    if out.dtype != np.uint8 or out.ndim != 1 or not out.flags.c_contiguous:
        raise ValueError(f"fetch into a contiguous flat uint8 buffer, not {out.dtype} of shape {out.shape}")
    if not MIN_CHUNK_BYTES <= chunk_bytes <= MAX_CHUNK_BYTES or streams < 1 or attempts < 1:
        raise ValueError(
            f"chunk_bytes {chunk_bytes} (in {MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}), streams {streams} and attempts "
            f"{attempts} (>= 1)"
        )
    request = pb.FetchRequest(key=key_to_proto(key), chunk_bytes=chunk_bytes)
    ranges = _Ranges()
    # gRPC enforces each call's deadline; this timer is the backstop for a call whose deadline never fires (seen
    # once in a full test run: a stream cut by its in-process server's stop waited on past its deadline), so that
    # no fetch outlives its deadline by more than DEADLINE_GRACE_S whatever the transport does
    late = BadStream(f"expert {tuple(key)}: not fetched by its deadline (the transport did not end the call)")
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()) + DEADLINE_GRACE_S, ranges.fail, (late,))
    watchdog.daemon = True
    watchdog.start()

    def run(start: int, length: int) -> tuple[list[tuple[int, int]], int]:
        try:
            return _fetch_range(stub, request, out, start, length, deadline, attempts, ranges)
        except _Stop:
            return [], 0
        except grpc.RpcError as e:
            if not ranges.failed.is_set() or e.code() is not grpc.StatusCode.CANCELLED:
                ranges.fail(e)  # a CANCELLED after another range failed is only that failure's echo
            return [], 0
        except Exception as e:  # noqa: BLE001 - BadStream, or a bug: raised on the calling thread, not lost in a pool
            ranges.fail(e)
            return [], 0

    parts = split(len(out), chunk_bytes, streams)
    own: ThreadPoolExecutor | None = None
    if len(parts) > 1 and pool is None:
        own = pool = ThreadPoolExecutor(len(parts) - 1, thread_name_prefix="expert-store-range")
    try:
        others: list[Future] = [pool.submit(run, *part) for part in parts[1:]] if pool is not None else []
        results = [run(*parts[0])] + [f.result() for f in others]
    finally:
        watchdog.cancel()
        if own is not None:
            own.shutdown(wait=True)
    if ranges.error is not None:
        raise ranges.error
    whole = 0
    for pieces, _ in results:
        for crc, n in pieces:
            whole = crc32_combine(whole, crc, n)
    if whole != crc32:
        raise BadStream(f"the buffer's crc32 is {whole:#010x}, the store listed {crc32:#010x} (its files changed?)")
    return sum(refetched for _, refetched in results)
