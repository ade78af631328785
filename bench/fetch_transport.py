"""Benchmark: GB/s of one expert fetched from the expert store as S parallel ranged streams of C-byte chunks
(expertflow/services/store_fetch.py), over loopback and across a veth pair, against the same bytes copied from
local shared memory. What store_fetch.py's DEFAULT_FETCH_CHUNK_BYTES and DEFAULT_FETCH_STREAMS were chosen from.

    python -m bench.fetch_transport --out bench/results/fetch_transport_cpu.json   # as root (the namespace)
    python -m bench.fetch_transport --device cuda --out bench/results/fetch_transport_h200.json  # pinned buffers
    python -m bench.fetch_transport --networks loopback --expert-mib 4 --repeats 2  # a smoke test, no root

The store runs as a real subprocess (`expertflow expert-store`) on a checkpoint built here (bench/store_transport.py),
every expert in its shared memory:

    local     the store's segments mapped here, as a worker on the store's host does: a copy into a host buffer
    loopback  the store on 127.0.0.1; the client is told it is on another host, so it fetches
    veth      the store in a network namespace made here (ip netns, a veth pair with private 10.x addresses only on
              that link, MTU 1500) and a mount namespace of its own with a private /dev/shm (unshare -m, tmpfs): a
              different host id, so the client fetches as from another machine. Both go at the end, also on error.
              Without root or `ip netns` (a container), the veth cells are recorded as skipped with the reason.

The destination is a host buffer as big as the expert (pinned with `--device cuda`, as the worker's staging buffers
are; pageable on a CPU machine), one
expert at a time (`readers` 1). Per (chunk, streams): GB/s (median and min of `--repeats` fetches after one warm-up)
and the CPU seconds per GB the client and the store spent, which say where the time goes on a machine this small.
Prints one JSON object (bench.emit); `--out` writes it too.

Not for: correctness (tests/test_store_fetch.py) or the copy to a GPU after the fetch (bench/store_transport.py).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import torch

from bench import emit
from bench.store_transport import build_checkpoint, start_store, stop_store, store_command


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 in 10.0.0.0/8 that no address or route of this host overlaps."""
    used = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True, check=True).stdout
    used += subprocess.run(["ip", "-4", "route"], capture_output=True, text=True, check=True).stdout
    taken = [ipaddress.ip_network(w, strict=False) for w in used.split() if w[:1].isdigit() and "." in w]
    for third in range(os.getpid() % 200, 256):
        net = ipaddress.ip_network(f"10.213.{third}.0/30")
        if not any(net.overlaps(t) for t in taken):
            return net
    raise RuntimeError("no free 10.213.x.0/30 for the veth pair")


@contextmanager
def veth_namespace() -> Iterator[tuple[str, str]]:
    """A network namespace joined to this one by a veth pair: (its name, the address on its side)."""
    tag = str(os.getpid())
    name, here, there = f"efbench{tag}", f"efh{tag}"[:15], f"efs{tag}"[:15]
    net = _free_subnet()
    ours, theirs = (str(a) for a in list(net.hosts())[:2])
    _ip("netns", "add", name)
    try:
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        _ip("link", "set", there, "netns", name)
        _ip("addr", "add", f"{ours}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("netns", "exec", name, "ip", "addr", "add", f"{theirs}/30", "dev", there)
        _ip("netns", "exec", name, "ip", "link", "set", there, "up")
        _ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
        yield name, theirs
    finally:
        subprocess.run(
            ["ip", "netns", "del", name], check=False, capture_output=True
        )  # takes its end of the pair along
        subprocess.run(
            ["ip", "link", "del", here], check=False, capture_output=True
        )  # gone already, unless setup failed early


def in_namespace(namespace: str, command: list[str]) -> list[str]:
    """`command` inside `namespace`, in a mount namespace of its own with a fresh /dev/shm."""
    shell = 'mount -t tmpfs -o mode=1777 tmpfs /dev/shm && exec "$@"'
    return [
        "ip",
        "netns",
        "exec",
        namespace,
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        shell,
        "sh",
    ] + command


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of this process (every thread), or of process `pid`."""
    if pid is None:
        return time.process_time()
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rates(nbytes: int, seconds: list[float]) -> dict:
    gbps = [nbytes / s / 1e9 for s in seconds]
    return {"gb_per_s_median": round(statistics.median(gbps), 3), "gb_per_s_min": round(min(gbps), 3)}


def host_buffer(numel: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """The destination: pinned on a CUDA machine (the worker's staging buffers are), pageable on a CPU one."""
    return torch.empty(numel, dtype=dtype, pin_memory=device == "cuda")


def local_copy(address: str, repeats: int, device: str) -> dict:
    """The same bytes from the store's shared memory mapped here, copied into a host buffer."""
    from expertflow.services.store_client import RemoteExpertStore

    store = RemoteExpertStore(address, device)
    try:
        keys = store.keys()
        views = [store.host_view(k) for k in keys]
        if any(v is None for v in views):
            raise RuntimeError(f"the store's shared memory is not mapped here: {store.host_kind}")
        dst = host_buffer(views[0].numel(), views[0].dtype, device)
        dst.copy_(views[0])
        times = []
        for r in range(repeats):
            t0 = time.perf_counter()
            dst.copy_(views[r % len(views)])
            times.append(time.perf_counter() - t0)
        return {
            **rates(store.layout.slot_nbytes, times),
            "host_kind": store.host_kind,
            "bytes": store.layout.slot_nbytes,
        }
    finally:
        store.close()


def fetch_grid(
    address: str,
    store_pid: int,
    host_id: str | None,
    chunks: list[int],
    streams: list[int],
    repeats: int,
    device: str,
) -> list[dict]:
    """GB/s of whole-expert fetches for every (chunk, streams)."""
    from expertflow.services.store_client import RemoteExpertStore

    rows = []
    for chunk in chunks:
        for n in streams:
            store = RemoteExpertStore(
                address, device, chunk_bytes=chunk, streams=n, readers=1, fetch_timeout_s=600, host_id=host_id
            )
            try:
                if not store.host_kind.startswith("fetch"):
                    raise RuntimeError(f"the client maps the store's memory instead of fetching: {store.host_kind}")
                keys, nbytes = store.keys(), store.layout.slot_nbytes
                dst = host_buffer(store.layout.padded_numel, store.layout.dtype, device)
                store.read_into(keys[0], dst)  # warm-up: connections, allocator, page faults of dst
                times, client0, server0 = [], cpu_seconds(), cpu_seconds(store_pid)
                for r in range(repeats):
                    t0 = time.perf_counter()
                    store.read_into(keys[(r + 1) % len(keys)], dst)
                    times.append(time.perf_counter() - t0)
                gb = nbytes * repeats / 1e9
                rows.append(
                    {
                        "chunk_bytes": chunk,
                        "streams": n,
                        **rates(nbytes, times),
                        "client_cpu_s_per_gb": round((cpu_seconds() - client0) / gb, 3),
                        "store_cpu_s_per_gb": round((cpu_seconds(store_pid) - server0) / gb, 3),
                        "refetches": store.refetches,
                    }
                )
                print(f"{address} {chunk >> 10} KiB x {n}: {rows[-1]['gb_per_s_median']} GB/s", flush=True)
            finally:
                store.close()
    return rows


def veth_cells(model: Path, chunks: list[int], streams: list[int], repeats: int, device: str) -> list[dict] | dict:
    """The grid against a store in a namespace of its own; {"skipped": why} where namespaces cannot be made here
    (no root, no `ip netns`, no unshare: a container), so the loopback and local cells still come back."""
    if os.geteuid() != 0:
        return {"skipped": "not root: ip netns and unshare -m need it"}
    try:
        with veth_namespace() as (namespace, there):
            proc, address = start_store(model, command=in_namespace(namespace, store_command(model, f"{there}:0")))
            try:
                return fetch_grid(address, proc.pid, None, chunks, streams, repeats, device)
            finally:
                stop_store(proc)
    except (OSError, RuntimeError, subprocess.CalledProcessError) as e:
        detail = getattr(e, "stderr", None) or ""
        return {"skipped": f"{type(e).__name__}: {e} {detail}".strip()[:500]}


def machine(device: str) -> dict:
    cpuinfo, meminfo = Path("/proc/cpuinfo").read_text(), Path("/proc/meminfo").read_text()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    mem = next(line.split()[1] for line in meminfo.splitlines() if line.startswith("MemTotal"))
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
    }


def best(rows: list[dict] | dict) -> dict:
    if isinstance(rows, dict):  # skipped
        return rows
    top = max(rows, key=lambda r: r["gb_per_s_median"])
    return {k: top[k] for k in ("chunk_bytes", "streams", "gb_per_s_median")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # 16.5 MiB: one DeepSeek-V2-Lite expert (3 x 2048 x 1408 bf16); 336 MiB: one Mixtral-8x7B expert (3 x 4096 x 14336)
    parser.add_argument("--expert-mib", default="16.5,336", help="expert sizes in MiB, comma-separated")
    parser.add_argument("--experts", type=int, default=2, help="experts in each checkpoint (fetched in turn)")
    parser.add_argument("--chunks-kib", default="256,1024,4096", help="chunk sizes in KiB, comma-separated")
    parser.add_argument("--streams", default="1,2,4", help="parallel streams per expert, comma-separated")
    parser.add_argument("--networks", default="loopback,veth", help="loopback and/or veth (veth needs root)")
    parser.add_argument("--repeats", type=int, default=3, help="timed fetches per (chunk, streams)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: pinned host buffers")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    sizes = [float(x) for x in args.expert_mib.split(",")]
    chunks = [int(x) << 10 for x in args.chunks_kib.split(",")]
    streams = [int(x) for x in args.streams.split(",")]
    networks = [x.strip() for x in args.networks.split(",")]
    if set(networks) - {"loopback", "veth"} or args.experts < 2 or args.repeats < 1:
        parser.error("--networks from loopback,veth; --experts >= 2; --repeats >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    results = []
    about = machine(args.device)
    for mib in sizes:
        with tempfile.TemporaryDirectory(prefix="fetch-transport-") as tmp:
            model = Path(tmp) / "model"
            build_checkpoint(model, mib, args.experts)
            block: dict = {"expert_mib": mib}  # and "expert_bytes", the padded buffer, from the store
            proc, address = start_store(model)
            try:
                block["local_shm"] = local_copy(address, max(3, args.repeats), args.device)
                block["expert_bytes"] = block["local_shm"].pop("bytes")
                if "loopback" in networks:
                    block["loopback"] = fetch_grid(
                        address, proc.pid, "another-host", chunks, streams, args.repeats, args.device
                    )
            finally:
                stop_store(proc)
            if "veth" in networks:
                block["veth"] = veth_cells(model, chunks, streams, args.repeats, args.device)
            block["best"] = {net: best(block[net]) for net in networks}
            results.append(block)
    about["load_average_end"] = os.getloadavg()
    emit({"benchmark": "fetch_transport", "machine": about, "repeats": args.repeats, "results": results}, args.out)


if __name__ == "__main__":
    main()
