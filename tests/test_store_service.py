"""The expert-store service and its client: real gRPC on loopback, a real subprocess where the process boundary
is the point, the embedded mode as the oracle."""

from __future__ import annotations

import functools
import json
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from conftest import prompt_ids
from expert_store.checkpoint import CheckpointFiles
from expert_store.keys import ExpertKey
from expert_store.store import Tier
from expertflow.cli import main
from expertflow.engine import Engine, SamplingParams
from expertflow.loader import LoadOptions, load
from expertflow.services.common import GrpcServer, wait_for_server
from expertflow.services.store_client import RemoteExpertStore, StoreFetchError
from expertflow.services.store_server import SERVICE_NAME, ExpertStoreServicer, ServedModel
from expertflow.v1 import expert_store_pb2 as pb
from expertflow.v1 import expert_store_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@contextmanager
def serving(directory: Path, host_budget: str = "100%", servicer=ExpertStoreServicer, registry=None) -> Iterator:
    """An expert store for `directory` on a loopback port in this process: (address, servicer, server)."""
    served = ServedModel.open(directory, host_budget, torch.float32)
    store = served.load()
    server = None
    try:
        svc = servicer(served, store, registry)
        add = expert_store_pb2_grpc.add_ExpertStoreServicer_to_server
        server = GrpcServer("expert-store", "127.0.0.1:0", [(add, svc)], [SERVICE_NAME]).start()
        yield server.address, svc, server
    finally:
        if server is not None:
            server.stop(0)
        store.close()


def assert_serves_the_checkpoint(store: RemoteExpertStore, directory: Path) -> None:
    """Every expert, through stage(), equals its three tensors in the checkpoint's files."""
    served = ServedModel.open(directory, "0", torch.float32)
    f = served.layout.ffn
    for key in store.keys():
        out = torch.full((store.layout.padded_numel,), float("nan"))
        assert store.stage(key, out).wait() is store.tier(key)
        gate_up, down = store.layout.views(out)
        names = served.names[key]
        assert torch.equal(gate_up[:f], served.files.get(names.gate)), key
        assert torch.equal(gate_up[f:], served.files.get(names.up)), key
        assert torch.equal(down, served.files.get(names.down)), key


def generate(directory: Path, store: RemoteExpertStore | None = None, device: str = "cpu"):
    """Greedy ids and the prompt's logits, through `store` (None: embedded), at a 25% expert budget."""
    loaded = load(directory, LoadOptions(device=device, expert_budget="25%"), store=store)
    try:
        engine = Engine(loaded)
        ids = prompt_ids(2, 10)
        logits = engine.logits(ids).cpu()
        result = engine.generate([ids], SamplingParams(max_new_tokens=12, stop_on_eos=False))
    finally:
        loaded.close()
    return result.outputs[0].token_ids, logits, result.stats.total


@pytest.fixture(scope="module")
def embedded(tiny_models) -> dict[str, tuple]:
    """The oracle: each family's greedy ids and logits in the embedded mode."""
    return {family: generate(tiny_models[family][0])[:2] for family in ("mixtral", "deepseek_v2")}


# -- the process ---------------------------------------------------------------------------------------------
def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:  # ends when the process exits and the pipe closes
        lines.put(line)


def _wait_for_log(proc: subprocess.Popen, lines: queue.Queue, message: str, timeout_s: float) -> dict:
    deadline, seen = time.monotonic() + timeout_s, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.2)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        seen.append(line)
        if line.startswith("{") and json.loads(line)["message"] == message:
            return json.loads(line)
    raise AssertionError(f"no {message!r} log line from the store; it wrote:\n{''.join(seen)}")


def test_the_command_serves_shared_memory_and_sigterm_releases_it(mixtral_dir, tmp_path):
    config = tmp_path / "services.toml"
    config.write_text('[model]\nhost_budget = "100%"\n[expert_store]\nlisten = "127.0.0.1:1"\n')
    config.write_text(config.read_text() + "[metrics]\nexpert_store = 0\n")
    command = ["expert-store", "--model", str(mixtral_dir), "--config", str(config), "--listen", "127.0.0.1:0"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "expertflow.cli", *command],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    try:
        loaded = _wait_for_log(proc, lines, "loaded", 60)
        address = _wait_for_log(proc, lines, "serving", 10)["address"]  # flag over the file's port 1
        assert loaded["experts_host"] == 24 and loaded["experts_nvme"] == 0 and loaded["service"] == "expert-store"
        wait_for_server(address, timeout_s=10, service=SERVICE_NAME)
        store = RemoteExpertStore(address)
        try:
            assert store.host_kind == "shm" and all(store.host_view(k) is not None for k in store.keys())
            assert store.model_version == loaded["model_version"]
            assert_serves_the_checkpoint(store, mixtral_dir)
            with grpc.insecure_channel(address) as channel:
                attach = expert_store_pb2_grpc.ExpertStoreStub(channel).Attach(pb.AttachRequest(), timeout=5)
            segments = [Path("/dev/shm") / s.name for s in attach.segments]
            assert len(segments) == 1 and stat.S_IMODE(segments[0].stat().st_mode) == 0o600
        finally:
            store.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        assert not segments[0].exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_command_refuses_bad_input(mixtral_dir, tmp_path, capsys):
    def refused(*args: str) -> str:
        assert main(["expert-store", "--metrics-port", "0", *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("expertflow: error: ") and "Traceback" not in err
        return err

    assert "model directory does not exist" in refused("--model", str(tmp_path / "missing"))
    assert "--host-budget 'lots' is not a size" in refused("--model", str(mixtral_dir), "--host-budget", "lots")
    assert "give host:port" in refused("--model", str(mixtral_dir), "--listen", "nowhere")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        err = refused("--model", str(mixtral_dir), "--listen", f"127.0.0.1:{port}")
        assert f"--listen 127.0.0.1:{port}: cannot listen there (Address already in use)" in err
    with serving(mixtral_dir) as (address, _, _):  # a port another store serves on
        err = refused("--model", str(mixtral_dir), "--listen", address)
        assert "cannot listen there (Address already in use)" in err
        with pytest.raises(RuntimeError, match="Failed to bind"):  # gRPC's SO_REUSEPORT would let it share the port
            GrpcServer("expert-store", address, [], [])


# -- fetching --------------------------------------------------------------------------------------------------
def test_nvme_experts_come_through_fetch_and_unknown_keys_are_not_found(mixtral_dir):
    registry = CollectorRegistry()
    with serving(mixtral_dir, host_budget="0", registry=registry) as (address, svc, _):
        store = RemoteExpertStore(address, chunk_bytes=16 << 10, streams=2)
        try:
            assert store.host_kind == "fetch" and {store.tier(k) for k in store.keys()} == {Tier.NVME}
            assert_serves_the_checkpoint(store, mixtral_dir)
            with pytest.raises(KeyError, match=r"expert \(3, 0\) is not in the store"):
                store.host_view(ExpertKey(3, 0))
        finally:
            store.close()
        stats = svc.stats()
        assert (stats.experts_nvme, stats.experts_host, stats.fetches) == (24, 0, 48)  # each expert as 2 ranges
        assert stats.bytes_sent == 24 * svc.layout.slot_nbytes
        assert registry.get_sample_value("expertflow_store_sent_bytes_total", {"tier": "nvme"}) == stats.bytes_sent
        assert registry.get_sample_value("expertflow_store_experts", {"tier": "nvme"}) == 24
        with grpc.insecure_channel(address) as channel:
            stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
            with pytest.raises(grpc.RpcError) as missing:
                list(stub.Fetch(pb.FetchRequest(key={"layer": 3, "expert": 0}), timeout=5))
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
            message = "expert (3, 0) (MoE layer, expert) is not in this store: it serves MoE layers 0..2"
            assert message in missing.value.details()
            with pytest.raises(grpc.RpcError) as bad:
                list(stub.Fetch(pb.FetchRequest(key={"layer": 0, "expert": 0}, chunk_bytes=3), timeout=5))
            assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "chunk_bytes 3" in bad.value.details()


class _Spoils(ExpertStoreServicer):
    """A store whose first `spoil` fetches go wrong: a flipped byte in the second chunk (its crc32 as before), or
    (`short`) the last chunk never sent."""

    def __init__(self, *args, spoil: int = 1, short: bool = False) -> None:
        super().__init__(*args)
        self.spoil, self.short = spoil, short

    def Fetch(self, request, context):
        sent = list(super().Fetch(request, context))
        with self._lock:
            self.spoil, spoiled = self.spoil - 1, self.spoil > 0
        if spoiled and self.short:
            sent = sent[:-1]
        elif spoiled:
            c = sent[1]
            data = bytes([c.data[0] ^ 0xFF]) + c.data[1:]
            sent[1] = pb.ExpertChunk(offset=c.offset, data=data, crc32=c.crc32, total=c.total)
        yield from sent


@pytest.mark.parametrize("short", [False, True], ids=["corrupt-chunk", "short-stream"])
def test_a_bad_stream_is_fetched_again(mixtral_dir, short):
    with serving(mixtral_dir, "0", functools.partial(_Spoils, short=short)) as (address, _, _):
        store = RemoteExpertStore(address, chunk_bytes=4 << 10, streams=1)
        try:
            out = torch.empty(store.layout.padded_numel)
            store.read_into(ExpertKey(1, 2), out)
            good = torch.empty_like(out)
            store.read_into(ExpertKey(1, 2), good)
            assert torch.equal(out, good) and store.refetches == 1
        finally:
            store.close()
    # each of the 3 whole attempts fetches the one range 3 times (store_fetch.RANGE_ATTEMPTS)
    with serving(mixtral_dir, "0", functools.partial(_Spoils, spoil=9)) as (address, _, _):
        store = RemoteExpertStore(address, chunk_bytes=4 << 10, streams=1, retries=2)
        try:
            failed = r"expert \(1, 2\) .* 3 attempts failed; the last: bytes \[0, \d+\): 3 attempts failed; the last: the chunk at"
            with pytest.raises(StoreFetchError, match=failed):
                store.read_into(ExpertKey(1, 2), torch.empty(store.layout.padded_numel))
        finally:
            store.close()


class _Misstates(ExpertStoreServicer):
    """A store that lists a wrong crc32 for expert (1, 2), as if its file had changed since it started."""

    def List(self, request, context):
        listing = super().List(request, context)
        for entry in listing.experts:
            if (entry.key.layer, entry.key.expert) == (1, 2):
                entry.crc32 ^= 1
        return listing


def test_a_buffer_unlike_the_listing_is_refused(mixtral_dir):
    with serving(mixtral_dir, "0", _Misstates) as (address, _, _):
        store = RemoteExpertStore(address, retries=1)
        try:
            store.read_into(ExpertKey(1, 1), torch.empty(store.layout.padded_numel))
            with pytest.raises(StoreFetchError, match=r"the buffer's crc32 is 0x[0-9a-f]{8}, the store listed"):
                store.read_into(ExpertKey(1, 2), torch.empty(store.layout.padded_numel))
        finally:
            store.close()


def test_the_model_version_follows_the_content_the_dtype_and_the_label(mixtral_dir, tmp_path):
    first = ServedModel.open(mixtral_dir, "0", torch.float32).version
    assert ServedModel.open(mixtral_dir, "0", torch.bfloat16).version != first
    assert ServedModel.open(mixtral_dir, "0", torch.float32, version_label="tuned").version != first
    copy = tmp_path / "copy"  # the same checkpoint on another host: other paths, other modification times
    shutil.copytree(mixtral_dir, copy)
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(1, 1))
    assert ServedModel.open(copy, "0", torch.float32).version == first
    files = CheckpointFiles(copy)  # a fine-tune: same names, shapes and offsets, other weights
    info = files.info(sorted(files.tensors)[0])
    with open(weights, "r+b") as f:
        f.seek(info.start)
        byte = f.read(1)
        f.seek(info.start)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert ServedModel.open(copy, "0", torch.float32).version != first


class _Hangs(ExpertStoreServicer):
    """A store that sends one chunk and then nothing, until its caller gives up or the server stops."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.hanging = threading.Event()

    def Fetch(self, request, context):
        yield next(iter(super().Fetch(request, context)))
        self.hanging.set()
        while context.is_active():
            time.sleep(0.02)


def test_a_store_that_stops_mid_stream_is_a_clear_error_in_time(mixtral_dir):
    key, t0 = ExpertKey(0, 1), time.monotonic()
    with serving(mixtral_dir, "0", _Hangs) as (address, svc, server):
        store = RemoteExpertStore(address, chunk_bytes=4 << 10, fetch_timeout_s=0.5, retries=1)
        try:
            hung = r"expert \(0, 1\) .* 2 attempts failed; the last: DEADLINE_EXCEEDED"
            with pytest.raises(StoreFetchError, match=hung):
                store.read_into(key, torch.empty(store.layout.padded_numel))
            assert time.monotonic() - t0 < 5
            # the stop ends the stream at once; should the transport miss it, the fetch's deadline (store_fetch's
            # backstop included) still ends it within the bound asserted below
            patient = RemoteExpertStore(address, chunk_bytes=4 << 10, fetch_timeout_s=4, retries=1)
            read = patient.stage(key, torch.empty(store.layout.padded_numel))
            assert svc.hanging.wait(5)
            t1 = time.monotonic()
            server.stop(0)  # the store goes away mid-stream
            with pytest.raises(StoreFetchError, match=r"expert \(0, 1\) from the store at 127.0.0.1:\d+: 2 attempts"):
                read.wait()
            assert time.monotonic() - t1 < 6
            assert svc.drain(timeout_s=5)  # its handler has ended: the shared memory may go
            patient.close()
        finally:
            store.close()


# -- the oracle -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("host_budget", ["100%", "0"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v2"])
def test_generation_through_the_store_equals_embedded(tiny_models, embedded, family, host_budget):
    directory = tiny_models[family][0]
    with serving(directory, host_budget) as (address, _, _):
        store = RemoteExpertStore(address)
        try:
            ids, logits, stats = generate(directory, store)
            assert store.host_kind == ("shm" if host_budget == "100%" else "fetch")
        finally:
            store.close()
    assert ids == embedded[family][0] and torch.equal(logits, embedded[family][1])
    if host_budget == "0":
        assert stats.bytes_from_nvme > 0 and stats.bytes_from_host == 0
    else:
        assert stats.bytes_from_host > 0 and stats.bytes_from_nvme == 0


def test_a_client_on_another_host_fetches_everything(mixtral_dir, embedded):
    with serving(mixtral_dir, "100%") as (address, svc, _):
        store = RemoteExpertStore(address, host_id="another-host")
        try:
            assert store.host_kind.startswith("fetch") and all(store.host_view(k) is None for k in store.keys())
            assert {store.tier(k) for k in store.keys()} == {Tier.HOST}  # where the store holds them
            ids, logits, stats = generate(mixtral_dir, store)
        finally:
            store.close()
        assert svc.stats().fetches > 0
    assert ids == embedded["mixtral"][0] and torch.equal(logits, embedded["mixtral"][1])
    assert stats.bytes_from_nvme > 0  # the cache staged them, as from any tier below host RAM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_on_cuda_the_mapping_is_registered_and_generation_equals_embedded(mixtral_dir):
    with serving(mixtral_dir, "50%") as (address, _, _):
        store = RemoteExpertStore(address, "cuda")
        try:
            assert store.host_kind == "shm+cudaHostRegister", store.host_kind
            host = [k for k in store.keys() if store.tier(k) is Tier.HOST]
            assert host and all(store.host_view(k).is_pinned() for k in host)
            ids, logits, _ = generate(mixtral_dir, store, device="cuda")
        finally:
            store.close()
    expected, expected_logits, _ = generate(mixtral_dir, device="cuda")
    assert ids == expected and torch.equal(logits, expected_logits)
