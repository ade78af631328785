"""Benchmark: host-to-GPU GB/s of the same expert bytes by each way a worker can get them from the expert store.

    (a) pinned        this process's own page-locked memory (the embedded mode's best case)
    (b) shm_registered the store process's shared memory, mapped here and cudaHostRegister'ed (RemoteExpertStore
                      on a CUDA device: what a worker on the store's host uses)
    (c) shm_pageable  the same mapping, unregistered
    (d) fetch         Fetch over gRPC loopback into a pinned staging buffer, then the copy (what a worker on
                      another host does); also the fetch alone

The store runs as a real subprocess (`expertflow expert-store`) on a checkpoint built here in seconds: a tiny
Mixtral (hidden 64, one MoE layer) whose FFN width makes each expert `--expert-mib` MiB in float32 (default 336,
Mixtral-8x7B's expert size in bf16). Prints one JSON object (bench.emit); `--out` writes it too.

    python -m bench.store_transport --out bench/results/store_transport_h200.json     # on a GPU
    python -m bench.store_transport --device cpu --expert-mib 4 --repeats 2          # a smoke test anywhere

With `--device cpu` the "device" is host memory and (b) is skipped (nothing to register).

Not for: correctness (tests/test_store_service.py) or the engine's end-to-end speed (bench/live_policies.py).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import emit

ROOT = Path(__file__).resolve().parents[1]
_HIDDEN = 64  # the tiny Mixtral's hidden size; the FFN width carries the bytes


def build_checkpoint(directory: Path, expert_mib: float, experts: int) -> int:
    """A one-layer tiny Mixtral whose experts take `expert_mib` MiB each in float32; its FFN width."""
    from expertflow.tiny import build_tiny

    width = int(expert_mib * 2**20) // (3 * _HIDDEN * 4)
    build_tiny("mixtral", directory, num_hidden_layers=1, num_local_experts=experts, intermediate_size=width)
    return width


def _pipe_lines(stream, lines: queue.Queue) -> None:
    for line in stream:  # ends when the store exits and the pipe closes
        lines.put(line)


def store_command(model: Path, listen: str = "127.0.0.1:0") -> list[str]:
    """The `expertflow expert-store` command serving `model` with every expert in shared memory."""
    command = [sys.executable, "-m", "expertflow.cli", "expert-store", "--model", str(model), "--host-budget", "100%"]
    return command + ["--dtype", "float32", "--listen", listen, "--metrics-port", "0"]


def start_store(model: Path, timeout_s: float = 600, command: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    """`command` (default: `store_command(model)`), a store that logs JSON lines; (process, its address)."""
    command = command or store_command(model)
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pipe_lines, args=(proc.stderr, lines), daemon=True).start()
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        seen.append(line)
        if line.startswith("{") and json.loads(line).get("message") == "serving":
            return proc, json.loads(line)["address"]
    stop_store(proc)
    raise RuntimeError("the expert store did not start; it wrote:\n" + "".join(seen))


def stop_store(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # it unlinks its shared memory on the way out
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def timed(move: Callable[[int], None], n_keys: int, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of `repeats` moves, cycling over the experts, after one warm-up move of each."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for i in range(n_keys):
        move(i)
    sync()
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        move(r % n_keys)
        sync()
        times.append(time.perf_counter() - t0)
    return times


def summary(nbytes: int, times: list[float], **extra) -> dict:
    rates = [nbytes / t / 1e9 for t in times]
    return {"gb_per_s_median": round(statistics.median(rates), 3), "gb_per_s_min": round(min(rates), 3), **extra}


def measure(address: str, device: torch.device, repeats: int, chunk_bytes: int) -> tuple[int, dict]:
    """(bytes of one expert buffer, {way: GB/s figures})."""
    from expertflow.services.store_client import RemoteExpertStore

    results: dict[str, dict] = {}
    pin = device.type == "cuda"
    # (b) and (c): the store's mapping, registered by a client for the GPU, unregistered by a host client
    registered = RemoteExpertStore(address, device) if pin else None
    pageable = RemoteExpertStore(address, "cpu")
    fetcher = RemoteExpertStore(address, "cpu", host_id="another-host", chunk_bytes=chunk_bytes, fetch_timeout_s=600)
    try:
        keys = pageable.keys()
        layout = pageable.layout
        nbytes = layout.slot_nbytes
        dst = torch.empty(layout.padded_numel, dtype=layout.dtype, device=device)
        # (a): the same bytes in this process's own (pinned, on CUDA) memory
        own = [torch.empty(layout.padded_numel, dtype=layout.dtype, pin_memory=pin) for _ in keys]
        for key, buffer in zip(keys, own):
            buffer.copy_(pageable.host_view(key))
        results["pinned" if pin else "own_memory"] = summary(
            nbytes, timed(lambda i: dst.copy_(own[i], non_blocking=True), len(keys), repeats, device)
        )
        del own
        if registered is not None:
            views = [registered.host_view(k) for k in keys]
            results["shm_registered"] = summary(
                nbytes,
                timed(lambda i: dst.copy_(views[i], non_blocking=True), len(keys), repeats, device),
                host_kind=registered.host_kind,
            )
            del views
        views = [pageable.host_view(k) for k in keys]
        results["shm_pageable"] = summary(
            nbytes,
            timed(lambda i: dst.copy_(views[i], non_blocking=True), len(keys), repeats, device),
            host_kind=pageable.host_kind,
        )
        del views
        staging = torch.empty(layout.padded_numel, dtype=layout.dtype, pin_memory=pin)
        results["fetch_only"] = summary(
            nbytes, timed(lambda i: fetcher.read_into(keys[i], staging), len(keys), repeats, device)
        )

        def fetch_and_copy(i: int) -> None:
            fetcher.read_into(keys[i], staging)
            dst.copy_(staging, non_blocking=True)

        results["fetch"] = summary(
            nbytes,
            timed(fetch_and_copy, len(keys), repeats, device),
            chunk_bytes=chunk_bytes or "server default",
            refetches=fetcher.refetches,
        )
        assert torch.equal(dst.cpu(), pageable.host_view(keys[(repeats - 1) % len(keys)])), "fetched bytes differ"
    finally:
        for store in (registered, pageable, fetcher):
            if store is not None:
                store.close()
    return nbytes, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--expert-mib", type=float, default=336.0, help="bytes of one expert, in MiB")
    parser.add_argument("--experts", type=int, default=4, help="experts in the checkpoint (cycled through)")
    parser.add_argument("--repeats", type=int, default=12, help="timed moves per way")
    parser.add_argument("--chunk-bytes", type=int, default=0, help="Fetch chunk size (0: the server's default)")
    parser.add_argument("--model", type=Path, help="an existing checkpoint instead of building one")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but no CUDA device is available (use --device cpu for a smoke test)")
    if args.experts < 2 or args.expert_mib <= 0 or args.repeats < 1:
        parser.error("--experts >= 2 (top-2 routing), --expert-mib > 0 and --repeats >= 1")
    with tempfile.TemporaryDirectory(prefix="store-transport-") as tmp:
        model, t0 = args.model or Path(tmp) / "model", time.perf_counter()
        width = None if args.model else build_checkpoint(model, args.expert_mib, args.experts)
        built_s = time.perf_counter() - t0
        proc, address = start_store(model)
        try:
            nbytes, results = measure(address, device, args.repeats, args.chunk_bytes)
        finally:
            stop_store(proc)
    emit(
        {
            "benchmark": "store_transport",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "expert_bytes": nbytes,
            "ffn_width": width,
            "experts": args.experts,
            "repeats": args.repeats,
            "checkpoint_seconds": round(built_s, 1),
            "cpus": os.cpu_count(),
            "results": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
