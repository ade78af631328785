"""Is a service up? For container healthchecks (compose.yaml) and scripts:

    python -m expertflow.services.healthcheck HOST:PORT            gRPC health (grpc.health.v1): exit 0 when SERVING
    python -m expertflow.services.healthcheck HOST:PORT --http     GET http://HOST:PORT/health: exit 0 on 200
    ... --config FILE                                              as the services' [security] says: TLS (https),
                                                                   the CA, a client certificate, the token

Any other answer, or none within --timeout seconds, exits 1 with the reason on stderr. One check, no retries:
the caller (Docker's healthcheck, a script's loop) decides how often to ask.

Not for: waiting until a server comes up (common.wait_for_server does, in process).
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from expertflow.services.security import Security


def check_grpc(address: str, timeout_s: float, service: str = "", security: Security | None = None) -> str | None:
    """None when the server at `address` reports SERVING for `service` ("" = the whole server), else why not."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from expertflow.services.security import Security, open_channel

    security = security or Security()
    with open_channel(address, security) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as e:
            return security.explain(e)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None


def check_http(address: str, timeout_s: float, security: Security | None = None) -> str | None:
    """None when GET http(s)://address/health answers 200, else why not."""
    https = security is not None and security.tls
    request = urllib.request.Request(f"{'https' if https else 'http'}://{address}/health")
    for key, value in security.metadata() if security is not None else ():
        request.add_header(key.title(), value)
    try:
        context = security.client_context() if https else None
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return str(getattr(e, "reason", e))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m expertflow.services.healthcheck", description=__doc__.split("\n\n")[0])
    p.add_argument("address", help="HOST:PORT of the service")
    p.add_argument("--http", action="store_true", help="an HTTP service: GET /health must answer 200")
    p.add_argument("--service", default="", help="the gRPC service name to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    p.add_argument("--config", type=Path, help="the services' config: its [security] section says how to connect")
    args = p.parse_args(argv)
    if ":" not in args.address:
        p.error(f"address {args.address!r} is not HOST:PORT")
    security = None
    if args.config is not None:
        from expertflow.services.config import ServicesConfig
        from expertflow.services.security import Security

        try:
            security = Security.load(ServicesConfig.load(args.config).security)
        except (OSError, ValueError) as e:
            print(f"unhealthy: {args.address}: {e}", file=sys.stderr)
            return 1
    if args.http:
        problem = check_http(args.address, args.timeout, security)
    else:
        problem = check_grpc(args.address, args.timeout, args.service, security)
    if problem is not None:
        print(f"unhealthy: {args.address}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
