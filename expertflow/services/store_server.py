"""The expert-store service: one process holds a model's routed experts (all of them, or its share of a
scaled-out store) and serves them over gRPC (proto/expertflow/v1/expert_store.proto), so that workers on this
host map its host tier and others fetch.

    expertflow expert-store --model DIR [--host-budget B] [--listen HOST:PORT] [--config FILE] [--metrics-port N]
        [--directory redis://HOST:PORT --shard I/N|auto --replicas R --node-id ID --advertise HOST:PORT --ttl S]

The experts live in a `LocalExpertStore` whose host arena is POSIX shared memory (mode 0600: this user only),
never registered with CUDA here: a worker on the same host maps the segments (Attach) and registers the pages
in its own process (store_client.py). Experts outside the host budget stay in the NVMe files and, like every
expert for a worker on another host, travel as a stream of checksummed chunks (Fetch).

With --directory the node holds only its share (placement.py: static I/N, or rendezvous over the live nodes),
registers it in the directory and keeps it there (store_node.py); without, it holds every expert, as one store.
A Fetch for an expert it does not hold is NOT_FOUND, never another expert's bytes.

Every expert's crc32 (its whole buffer, padding included) is computed once when the node loads, both tiers, on
a few threads: List answers from that table at once, and a client checks each fetched buffer against it end to
end, which also catches a checkpoint file rewritten under a running store. The cost is one pass over the host
tier in RAM and one read of the NVMe tier.

Not for: deciding what a worker caches or prefetches, anything on a GPU, or reading the wire (store_client.py).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import threading
import time
import zlib
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from expert_store.budget import parse_budget
from expert_store.checkpoint import CheckpointError, CheckpointFiles
from expert_store.directory import HeldExpert, ServedLayout
from expert_store.keys import ExpertKey, ExpertSpace
from expert_store.layout import ExpertLayout, ExpertTensorNames
from expert_store.store import LocalExpertStore, Tier
from expertflow.services.common import GrpcServer, run_until_stopped, setup_logging, start_metrics
from expertflow.services.config import ServicesConfig, add_server_flags
from expertflow.services.security import Security
from expertflow.services.store_wire import (
    DEFAULT_CHUNK_BYTES,
    chunk_size_error,
    chunks,
    dtype_name,
    dtype_of,
    host_id,
    key_from_proto,
    key_to_proto,
    model_version,
    range_error,
)
from expertflow.v1 import expert_store_pb2 as pb
from expertflow.v1 import expert_store_pb2_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExpertStore"].full_name
log = logging.getLogger("expertflow.expert-store")


def _bytes(buffer: torch.Tensor) -> np.ndarray:
    """A flat expert buffer's bytes, without a copy (numpy has no bfloat16, so as uint8)."""
    return buffer.view(torch.uint8).numpy()


@dataclass(frozen=True)
class ServedModel:
    """What a store serves, read from the checkpoint's config and headers before any expert is loaded, so bad
    input fails in a second rather than after minutes of loading."""

    directory: Path
    files: CheckpointFiles
    space: ExpertSpace
    layout: ExpertLayout
    names: dict[ExpertKey, ExpertTensorNames]
    host_budget: str  # of the experts a node holds: "100%" of its share, or a size
    version: str

    @classmethod
    def open(
        cls, directory: str | Path, host_budget: str, dtype: torch.dtype | None, version_label: str = ""
    ) -> ServedModel:
        """`dtype` None: the checkpoint's own."""
        from expertflow.loader import read_config

        directory = Path(directory)
        family, config = read_config(directory)
        try:
            spec = family.build_spec(config)
            space = spec.experts
        except ValueError as e:
            raise CheckpointError(f"{directory / 'config.json'}: {e}") from None
        ffns = {ls.moe.expert_ffn for ls in spec.layers if ls.moe is not None}
        if len(ffns) != 1:
            raise CheckpointError(f"{directory}: routed experts of sizes {sorted(ffns)}; one size is supported")
        # the layout the loader gives a worker computing in `dtype` (expertflow/loader.py)
        layout = ExpertLayout(spec.hidden, ffns.pop(), dtype or spec.dtype)
        names = {k: family.expert_names(space.model_layer(k.layer), k.expert) for k in space.keys()}
        parse_budget(host_budget, len(names) * layout.slot_nbytes, "--host-budget")  # bad input fails now
        files = CheckpointFiles(directory)
        version = model_version(files, layout.dtype, version_label)
        return cls(directory.resolve(), files, space, layout, names, host_budget, version)

    def served_layout(self) -> ServedLayout:
        layout = self.layout
        layers, experts = self.space.shape
        return ServedLayout(
            layout.hidden, layout.ffn, dtype_name(layout.dtype), layout.slot_nbytes, layers, experts, str(self.directory)
        )

    def load(self, keys: Collection[ExpertKey] | None = None) -> LocalExpertStore:
        """The experts `keys` (default: all) in host RAM (shared memory, not registered with CUDA) up to the host
        budget, a percentage of these experts' bytes; the rest left in the files."""
        names = self.names if keys is None else {k: self.names[k] for k in keys}
        budget = parse_budget(self.host_budget, len(names) * self.layout.slot_nbytes, "--host-budget")
        return LocalExpertStore(self.files, names, self.layout, budget, pin_for_cuda=False, shared_host=True)


def expert_crcs(store: LocalExpertStore, workers: int = 4) -> dict[ExpertKey, int]:
    """crc32 of every expert's buffer, padding included (NVMe experts are read into zeroed buffers, as Fetch
    reads them). zlib releases the GIL, so a few threads go a few times faster."""
    layout = store.layout

    def crc(key: ExpertKey) -> int:
        buffer = store.host_view(key)
        if buffer is None:
            buffer = torch.zeros(layout.padded_numel, dtype=layout.dtype)
            store.read_into(key, buffer)
        return zlib.crc32(_bytes(buffer))

    keys = store.keys()
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="expert-store-crc") as pool:
        return dict(zip(keys, pool.map(crc, keys)))


@dataclass
class _SharedRead:
    """One NVMe expert read once for the streams sending its ranges at the same time."""

    done: threading.Event = field(default_factory=threading.Event)
    buffer: torch.Tensor | None = None
    error: str | None = None
    users: int = 0


@dataclass
class _Share:
    """The experts this node holds now, with their crc32s and tiers; replaced whole when its placement moves."""

    store: LocalExpertStore | None
    crcs: dict[ExpertKey, int] = field(default_factory=dict)
    tiers: dict[ExpertKey, Tier] = field(default_factory=dict)
    active: int = 0  # Fetch calls reading it

    @classmethod
    def of(cls, store: LocalExpertStore | None) -> _Share:
        if store is None:
            return cls(None)
        crcs = expert_crcs(store, workers=min(8, os.cpu_count() or 1))
        return cls(store, crcs, {key: store.tier(key) for key in crcs})


class ExpertStoreServicer(expert_store_pb2_grpc.ExpertStoreServicer):
    """The ExpertStore API over one `LocalExpertStore` at a time. It owns the stores it is given: `replace` swaps
    in another (closing the old one once no Fetch reads it), `close` closes the last. `store` None: nothing held
    yet (a node of a scaled-out store before its first share is loaded)."""

    def __init__(
        self, served: ServedModel, store: LocalExpertStore | None, registry: CollectorRegistry | None = None
    ) -> None:
        self.served = served
        self.layout = served.layout
        self.host_id = host_id()
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._fetches = self._bytes_sent = 0
        self._nvme_reads: dict[ExpertKey, _SharedRead] = {}  # NVMe experts being sent, by key
        registry = registry if registry is not None else CollectorRegistry()
        self._m_fetches = Counter(
            "expertflow_store_fetches", "Fetch calls completed, by the expert's tier", ["tier"], registry=registry
        )
        self._m_bytes = Counter(
            "expertflow_store_sent_bytes", "expert bytes sent by Fetch, by tier", ["tier"], registry=registry
        )
        self._m_experts = Gauge("expertflow_store_experts", "experts held, by tier", ["tier"], registry=registry)
        self._m_host = Gauge("expertflow_store_host_bytes", "bytes of the shared host tier", registry=registry)
        for tier in Tier:
            self._m_fetches.labels(tier.value)
            self._m_bytes.labels(tier.value)
        t0 = time.perf_counter()
        self._share = _Share.of(store)
        self.crc_seconds = time.perf_counter() - t0
        self._count(self._share)

    def _count(self, share: _Share) -> None:
        for tier in Tier:
            self._m_experts.labels(tier.value).set(sum(t is tier for t in share.tiers.values()))
        self._m_host.set(share.store.host_bytes if share.store is not None else 0)

    @property
    def store(self) -> LocalExpertStore | None:
        return self._share.store

    @property
    def crcs(self) -> dict[ExpertKey, int]:
        return self._share.crcs

    @property
    def tiers(self) -> dict[ExpertKey, Tier]:
        return self._share.tiers

    def held(self) -> list[HeldExpert]:
        """The experts held now, as the directory records them."""
        share, nbytes = self._share, self.layout.slot_nbytes
        return [HeldExpert(k, nbytes, share.crcs[k], share.tiers[k]) for k in sorted(share.crcs)]

    def replace(self, store: LocalExpertStore, drain_s: float = 30.0) -> None:
        """Serve `store` from now on; the old one is closed once the Fetch calls reading it have ended (or after
        `drain_s`). Its crc32s are computed before the switch, so List never answers half of either."""
        share = _Share.of(store)
        with self._lock:
            old, self._share = self._share, share
        self._count(share)
        with self._idle:
            if not self._idle.wait_for(lambda: old.active == 0, drain_s):
                log.warning("Fetch calls still reading the old share after %.0f s; releasing it anyway", drain_s)
        if old.store is not None:
            old.store.close()  # unlinks its shared memory; workers that mapped it keep their pages until they unmap

    def close(self) -> None:
        with self._lock:
            share, self._share = self._share, _Share(None)
        if share.store is not None:
            share.store.close()

    # -- the RPCs --------------------------------------------------------------------------------------------
    def GetLayout(self, request: pb.LayoutRequest, context: grpc.ServicerContext) -> pb.Layout:
        layout, space = self.layout, self.served.space
        return pb.Layout(
            hidden=layout.hidden,
            ffn=layout.ffn,
            dtype=dtype_name(layout.dtype),
            padded_numel=layout.padded_numel,
            nbytes=layout.nbytes,
            slot_nbytes=layout.slot_nbytes,
            model=str(self.served.directory),
            model_version=self.served.version,
            moe_layers=space.n_layers,
            experts=space.n_experts,
        )

    def List(self, request: pb.ListRequest, context: grpc.ServicerContext) -> pb.ListResponse:
        share = self._share
        return pb.ListResponse(
            experts=[
                pb.ExpertEntry(key=key_to_proto(k), tier=share.tiers[k].value, nbytes=self.layout.slot_nbytes, crc32=c)
                for k, c in share.crcs.items()
            ]
        )

    def Attach(self, request: pb.AttachRequest, context: grpc.ServicerContext) -> pb.AttachResponse:
        share = self._share
        store = share.store
        placed = {k: p for k in share.crcs if store is not None and (p := store.host_placement(k)) is not None}
        names = sorted({name for name, _ in placed.values()})
        # one arena today; the message allows several (e.g. one per NUMA node)
        segments = [pb.Segment(name=name, nbytes=store.host_bytes) for name in names]
        placements = [
            pb.Placement(key=key_to_proto(k), segment=names.index(name), offset=offset)
            for k, (name, offset) in placed.items()
        ]
        return pb.AttachResponse(segments=segments, placements=placements, host_id=self.host_id)

    def Fetch(self, request: pb.FetchRequest, context: grpc.ServicerContext) -> Iterator[pb.ExpertChunk]:
        key = key_from_proto(request.key)
        with self._lock:
            share = self._share
            share.active += 1
        try:
            if key not in share.tiers:
                context.abort(grpc.StatusCode.NOT_FOUND, self._not_held(key, share))
            problem = chunk_size_error(request.chunk_bytes) or range_error(
                request.offset, request.length, self.layout.slot_nbytes
            )
            if problem is not None:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"expert {tuple(key)}: {problem}")
            stop = request.offset + request.length if request.length else self.layout.slot_nbytes
            chunk_bytes = request.chunk_bytes or DEFAULT_CHUNK_BYTES
            yield from self._send(share, key, chunk_bytes, request.offset, stop, context)
        finally:  # also when the call is cancelled: the generator is closed at the chunk it stopped at
            with self._lock:
                share.active -= 1
                self._idle.notify_all()

    def _not_held(self, key: ExpertKey, share: _Share) -> str:
        layers, experts = self.served.space.shape
        where = f"expert {tuple(key)} (MoE layer, expert) is not in this store"
        if len(share.tiers) == layers * experts or not (0 <= key[0] < layers and 0 <= key[1] < experts):
            return f"{where}: it serves MoE layers 0..{layers - 1} of {experts} experts each of {self.served.directory}"
        return (
            f"{where}: it holds {len(share.tiers)} of the {layers * experts} experts of {self.served.directory}, "
            "its share of a scaled-out store (the directory says which node holds the others)"
        )

    def _send(
        self, share: _Share, key: ExpertKey, chunk_bytes: int, start: int, stop: int, context: grpc.ServicerContext
    ) -> Iterator[pb.ExpertChunk]:
        tier = share.tiers[key].value
        with self._expert_bytes(share, key, context) as data:
            for chunk in chunks(data, chunk_bytes, start, stop):
                yield chunk
                self._m_bytes.labels(tier).inc(len(chunk.data))
                with self._lock:
                    self._bytes_sent += len(chunk.data)
        self._m_fetches.labels(tier).inc()
        with self._lock:
            self._fetches += 1
        log.debug("fetched", extra={"key": list(key), "tier": tier, "range": [start, stop]})

    @contextmanager
    def _expert_bytes(self, share: _Share, key: ExpertKey, context: grpc.ServicerContext) -> Iterator[np.ndarray]:
        """The expert's buffer as bytes: its host-tier view, or (NVMe) one read shared by the streams fetching it at
        the same time (a client fetches one expert as several ranges at once), dropped when the last one ends."""
        buffer = share.store.host_view(key)
        if buffer is not None:
            yield _bytes(buffer)
            return
        with self._lock:
            read = self._nvme_reads.get(key)
            first = read is None
            if first:
                read = self._nvme_reads[key] = _SharedRead()
            read.users += 1
        try:
            if first:  # read it whole through the NVMe tier, zeroed so that the padding matches its crc
                try:
                    read.buffer = torch.zeros(self.layout.padded_numel, dtype=self.layout.dtype)
                    share.store.read_into(key, read.buffer)
                except Exception as e:  # a file gone or unreadable: the client hears why (and may try again)
                    log.exception("NVMe read failed", extra={"key": list(key)})
                    read.error = f"expert {tuple(key)}: reading it from the files failed: {e}"
                finally:
                    read.done.set()
            read.done.wait()
            if read.error is not None:
                context.abort(grpc.StatusCode.INTERNAL, read.error)
            yield _bytes(read.buffer)
        finally:
            with self._lock:
                read.users -= 1
                if read.users == 0:
                    del self._nvme_reads[key]

    def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait for Fetch calls still sending (once the server has stopped, each ends at its next chunk), so that
        the shared memory they read is released only after them; False if some are still running."""
        with self._idle:
            return self._idle.wait_for(lambda: self._share.active == 0, timeout_s)

    def GetStats(self, request: pb.StatsRequest, context: grpc.ServicerContext) -> pb.StoreStats:
        return self.stats()

    def stats(self) -> pb.StoreStats:
        with self._lock:
            fetches, sent, share = self._fetches, self._bytes_sent, self._share
        host = sum(t is Tier.HOST for t in share.tiers.values())
        return pb.StoreStats(
            experts_host=host,
            experts_nvme=len(share.tiers) - host,
            bytes_host=share.store.host_bytes if share.store is not None else 0,
            fetches=fetches,
            bytes_sent=sent,
        )


# -- the command -----------------------------------------------------------------------------------------------
def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "expert-store",
        help="serve a model's routed experts to workers: shared memory on this host, gRPC streams to others",
        description="Hold a model's routed experts (host RAM as POSIX shared memory within the host budget, the rest "
        "read from the safetensors files) and serve them over gRPC until SIGTERM or SIGINT. Flags override the "
        "config file, which overrides the defaults.",
    )
    p.add_argument(
        "--model", type=Path, help="Hugging Face model directory (default: [model] dir, else the embedded model)"
    )
    p.add_argument("--host-budget", help="host RAM for routed experts: 40GiB, 50%% (default: [model] host_budget)")
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        help="the workers' compute dtype (default: [model] dtype, else as the loader picks it: the checkpoint's "
        "where CUDA is present, float32 where not)",
    )
    p.add_argument("--listen", help="host:port (default: [expert_store] listen)")
    add_server_flags(p)
    p.add_argument("--metrics-port", type=int, help="Prometheus port, 0 for none (default: [metrics] expert_store)")
    cluster = p.add_argument_group("scaled out (a node of many; README: Scaled-out expert store)")
    cluster.add_argument("--directory", help="the directory, redis://HOST:PORT: hold a share and register it there")
    cluster.add_argument("--shard", help="I/N: node I of N (static), or auto: rendezvous over the live nodes "
                         "(default: [expert_store] shard)")  # fmt: skip
    cluster.add_argument("--replicas", type=int, help="copies of each expert (default: [expert_store] replicas)")
    cluster.add_argument("--node-id", help="this node's name in the directory (default: hostname:port)")
    cluster.add_argument("--advertise", help="host:port workers dial (default: the listen address; for 0.0.0.0, "
                         "this host's address)")  # fmt: skip
    cluster.add_argument("--ttl", type=float, help="seconds a silent node stays in the directory ([expert_store] ttl_s)")
    p.set_defaults(services_command=run)


def _check_listen(address: str, what: str) -> None:
    """Refuse an address this process cannot listen on before minutes of loading, not after."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{what} {address!r}: give host:port, e.g. 127.0.0.1:50061")
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: a port in TIME_WAIT is free
            s.bind(where)
    except OSError as e:
        raise ValueError(f"{what} {address}: cannot listen there ({e.strerror or e})") from None


def served_dtype(config: ServicesConfig) -> torch.dtype | None:
    """The dtype a worker of this config computes in, as the loader picks it; None: the checkpoint's."""
    if config.model.dtype:
        return dtype_of(config.model.dtype)
    device = config.model.device or ("cuda" if torch.cuda.is_available() else "cpu")  # a device count, no context
    return torch.float32 if device == "cpu" else None


def advertised(given: str, listen: str, port: int) -> str:
    """Where workers dial this node: `given`, else the listen address with the port bound, and for a wildcard
    address the one this host's name resolves to (in a container: its address on the compose network)."""
    if given:
        host, _, p = given.rpartition(":")
        if not host or not p.isdigit():
            raise ValueError(f"--advertise {given!r}: give host:port")
        return given
    host = listen.rpartition(":")[0]
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        host = socket.gethostbyname(socket.gethostname())
    return f"{host}:{port}"


def _configured(args: argparse.Namespace) -> ServicesConfig:
    config = ServicesConfig.from_args(args)
    config = config.override("model", dir=str(args.model) if args.model else None, host_budget=args.host_budget)
    config = config.override("model", dtype=args.dtype).override("metrics", expert_store=args.metrics_port)
    return config.override("expert_store", listen=args.listen, directory=args.directory, shard=args.shard,
                           replicas=args.replicas, node_id=args.node_id, advertise=args.advertise, ttl_s=args.ttl)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Serve until SIGTERM / SIGINT; bad input raises ValueError (or a subclass) before anything is loaded."""
    from expertflow.default_model import default_model_dir

    config = _configured(args)
    directory = Path(config.model.dir) if config.model.dir else default_model_dir()
    served = ServedModel.open(directory, config.model.host_budget, served_dtype(config), config.model.version_label)
    cfg = config.expert_store
    listen = cfg.listen
    _check_listen(listen, "--listen")
    security = Security.load(config.security)
    security.check_listen(listen, "--listen")  # before minutes of loading, as the address itself
    if cfg.directory:
        from expert_store.placement import Shard
        from expertflow.services.redis_directory import RedisDirectory
        from expertflow.services.store_node import NodeOptions

        options = NodeOptions(Shard.parse(cfg.shard), cfg.replicas, cfg.ttl_s)
        directory_client = RedisDirectory.from_url(cfg.directory)
    elif args.shard is not None or args.replicas is not None:
        raise ValueError("--shard and --replicas place experts over the nodes of a directory: give --directory too")
    setup_logging("expert-store")  # JSON lines on stderr, through this module's `log`
    try:
        registry = start_metrics(config.metrics.expert_store, config.metrics.host)
    except OSError as e:
        raise ValueError(f"--metrics-port {config.metrics.expert_store}: cannot serve metrics there ({e})") from None
    t0 = time.perf_counter()
    servicer = ExpertStoreServicer(served, None if cfg.directory else served.load(), registry)
    node = None
    try:
        try:
            add = expert_store_pb2_grpc.add_ExpertStoreServicer_to_server
            server = GrpcServer("expert-store", listen, [(add, servicer)], [SERVICE_NAME], security=security)
        except (OSError, RuntimeError) as e:  # taken since the check
            raise ValueError(f"--listen {listen}: cannot listen there ({e})") from None
        if cfg.directory:
            from expert_store.directory import StoreNode
            from expertflow.services.store_node import ClusterNode

            me = StoreNode(cfg.node_id or f"{socket.gethostname()}:{server.port}",
                           advertised(cfg.advertise, listen, server.port), host_id())  # fmt: skip
            log.info("joining", extra={"directory": cfg.directory, "node_id": me.node_id, "address": me.address,
                                       "shard": cfg.shard, "replicas": cfg.replicas, "model_version": served.version})  # fmt: skip
            node = ClusterNode(directory_client, served, servicer, me, options, log)
            node.start()
        else:
            stats = servicer.stats()
            log.info("loaded", extra={
                "model": str(served.directory), "model_version": served.version,
                "dtype": dtype_name(served.layout.dtype), "experts_host": stats.experts_host,
                "experts_nvme": stats.experts_nvme, "bytes_host": stats.bytes_host,
                "seconds": round(time.perf_counter() - t0, 3), "crc_seconds": round(servicer.crc_seconds, 3)})  # fmt: skip
    except BaseException:
        if node is not None:
            node.stop()
        servicer.close()  # unlinks the shared memory
        raise

    def release() -> None:
        if not servicer.drain():
            log.warning("Fetch calls still running after the stop; releasing the shared memory anyway")
        servicer.close()  # unlinks the shared memory
        if cfg.directory:
            directory_client.close()

    # a node leaves the directory first, so workers stop choosing it while its server still answers
    run_until_stopped(server, log, on_stop=release, drain=node.stop if node else None,
                      on_start=node.announce if node else None)  # fmt: skip
    return 0
