"""What [security] costs an expert store on loopback: a unary call's latency and Fetch's throughput, plaintext vs
the token vs TLS + token vs mutual TLS + token, against the same store serving the embedded default model.

    python -m bench.security_cost [--calls 500] [--rounds 3] [--out FILE]

Certificates come from `make_pki` (openssl, EC P-256, in a temp dir), which tests/test_security.py uses too.
The store runs in this process (one gRPC server; the client's and server's threads share the machine's cores),
so the figures compare the modes with each other, not with a store on its own host.

Not for: correctness (tests/test_security.py) or the cross-host transport (bench/store_transport.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from bench import emit
from expertflow.default_model import default_model_dir
from expertflow.services.common import GrpcServer
from expertflow.services.config import SecurityConfig
from expertflow.services.security import Security, open_channel
from expertflow.services.store_server import SERVICE_NAME, ExpertStoreServicer, ServedModel
from expertflow.v1 import expert_store_pb2 as pb
from expertflow.v1 import expert_store_pb2_grpc

TOKEN = "0123456789abcdef0123456789abcdef"


def _openssl(directory: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _key_and(directory: Path, name: str, *args: str) -> None:
    _openssl(directory, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-subj", f"/CN={name}", "-keyout", f"{name}.key", *args)  # fmt: skip


def _ca(directory: Path, name: str) -> None:
    _key_and(directory, name, "-x509", "-days", "2", "-out", f"{name}.pem", "-addext",
             "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip


def _leaf(directory: Path, name: str, ca: str, extensions: str) -> None:
    (directory / f"{name}.ext").write_text(
        f"{extensions}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid,issuer\n"
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
    )
    _key_and(directory, name, "-out", f"{name}.csr")
    _openssl(directory, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext")  # fmt: skip


def make_pki(directory: Path, token: str = TOKEN) -> Path:
    """In `directory`: ca.pem signs server.pem (SAN 127.0.0.1, localhost) and client.pem; other-ca.pem signs
    other-client.pem (a stranger's); `token` holds `token`. Each .pem has its .key."""
    _ca(directory, "ca")
    _ca(directory, "other-ca")
    _leaf(directory, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    _leaf(directory, "client", "ca", "extendedKeyUsage=clientAuth")
    _leaf(directory, "other-client", "other-ca", "extendedKeyUsage=clientAuth")
    (directory / "token").write_text(token + "\n")
    return directory


def _modes(pki: Path) -> dict[str, tuple[SecurityConfig, SecurityConfig]]:
    """mode -> (the server's [security], the client's)."""
    p = {name: str(pki / name) for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")}
    tls = dict(tls_cert=p["server.pem"], tls_key=p["server.key"], tls_ca=p["ca.pem"], token=TOKEN)
    client = dict(tls_ca=p["ca.pem"], token=TOKEN)
    mutual = dict(client, client_cert=p["client.pem"], client_key=p["client.key"])
    return {
        "plaintext": (SecurityConfig(), SecurityConfig()),
        "token": (SecurityConfig(token=TOKEN), SecurityConfig(token=TOKEN)),
        "tls+token": (SecurityConfig(**tls), SecurityConfig(**client)),
        "mtls+token": (SecurityConfig(**tls, require_client_cert=True), SecurityConfig(**mutual)),
    }


def measure(served: ServedModel, store, server_config: SecurityConfig, client_config: SecurityConfig,
            calls: int, rounds: int) -> dict:  # fmt: skip
    servicer = ExpertStoreServicer(served, store, CollectorRegistry())
    add = expert_store_pb2_grpc.add_ExpertStoreServicer_to_server
    server = GrpcServer("expert-store", "127.0.0.1:0", [(add, servicer)], [SERVICE_NAME],
                        security=Security.load(server_config)).start()  # fmt: skip
    options = [("grpc.max_receive_message_length", 64 << 20)]
    try:
        with open_channel(server.address, Security.load(client_config), options) as channel:
            stub = expert_store_pb2_grpc.ExpertStoreStub(channel)
            stub.GetStats(pb.StatsRequest(), timeout=10)  # connected (and handshaken)
            latencies = []
            for _ in range(calls):
                t0 = time.perf_counter()
                stub.GetStats(pb.StatsRequest(), timeout=10)
                latencies.append(time.perf_counter() - t0)
            keys = list(servicer.crcs)
            seconds, nbytes = [], 0
            for _ in range(rounds):
                t0, nbytes = time.perf_counter(), 0
                for key in keys:
                    request = pb.FetchRequest(key={"layer": key.layer, "expert": key.expert})
                    nbytes += sum(len(c.data) for c in stub.Fetch(request, timeout=60))
                seconds.append(time.perf_counter() - t0)
    finally:
        server.stop(0)
    return {
        "unary_p50_us": round(statistics.median(latencies) * 1e6, 1),
        "unary_p99_us": round(sorted(latencies)[int(0.99 * (len(latencies) - 1))] * 1e6, 1),
        "fetch_gb_s": round(nbytes / min(seconds) / 1e9, 3),
        "fetched_bytes": nbytes,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=500, help="unary GetStats calls per mode")
    p.add_argument("--rounds", type=int, default=3, help="fetches of every expert per mode (the best one counts)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    served = ServedModel.open(default_model_dir(), "100%", torch.float32)
    store = served.load()
    try:
        with tempfile.TemporaryDirectory() as d:
            pki = make_pki(Path(d))
            modes = {name: measure(served, store, *configs, args.calls, args.rounds)
                     for name, configs in _modes(pki).items()}  # fmt: skip
    finally:
        store.close()
    emit({"host": platform.node(), "cpus": os.cpu_count(), "calls": args.calls, "modes": modes}, args.out)


if __name__ == "__main__":
    main()
