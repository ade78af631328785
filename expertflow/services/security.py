"""Who may talk to a service, and over what: the [security] section (config.py) turned into gRPC credentials, a
token check and TLS contexts, for every server and client of expertflow/services.

    security = Security.load(config.security)       # the files read once: a bad path or token fails at start
    channel = open_channel("host:port", security)   # TLS when configured; `authorization: Bearer` on every call
    GrpcServer(..., security=security)              # TLS credentials and the token check (common.py)
    security.check_listen("0.0.0.0:50051", "[worker] listen")   # no exposed service without TLS or a token
    security.http_context()                         # the HTTP API's HTTPS, same certificate
    security.bearer_problem(header)                 # the HTTP API's token check: None, or why not

What each server does with a call:
    token set       every call must carry `authorization: Bearer <token>`; otherwise UNAUTHENTICATED, saying
                    whether the token was missing or wrong (compared in constant time). The gRPC health service
                    (grpc.health.v1) is exempt: orchestrators' probes (Docker's, Kubernetes' grpc probe) cannot
                    send metadata, and it tells nothing but SERVING or not. Reflection is not exempt: it lists the
                    API. Our own health checks send the token anyway.
    tls_cert set    the server speaks only TLS; a plaintext client's connection is closed in the handshake.
    require_client_cert   ... and only to clients presenting a certificate tls_ca signed (mutual TLS).
    nothing set     plaintext, no token: allowed on loopback only, unless allow_insecure (check_listen says why).

The orchestrator's ZMQ plans port is guarded in its own modules with what this one provides (a ticket from the
token-checked gRPC handshake; CURVE encryption where TLS is on): orchestrator_server.py says how.

Not for: what a service does once a call is let in, or the Prometheus endpoints (read-only, loopback by default).
"""

from __future__ import annotations

import collections
import hmac
import ipaddress
import logging
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from expertflow.services.config import SecurityConfig

AUTHORIZATION = "authorization"  # gRPC metadata keys are lower case; HTTP's header is case-insensitive
_EXEMPT_PREFIX = "/grpc.health.v1.Health/"
_MIN_TOKEN = 16
log = logging.getLogger("expertflow.security")


class SecurityError(ValueError):
    """A [security] section that cannot work (a missing file, a half-given pair, a weak token), or a listen
    address it would leave exposed."""


def _read(path: str, key: str) -> bytes:
    if not path:
        return b""
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityError(f"[security] {key} = {path!r}: cannot read it ({e.strerror or e})") from None


def _check_pem(config: SecurityConfig) -> None:
    """Each file parsed as what its key says, so that a wrong one fails at start with its key named, not in
    gRPC's first handshake as "Socket closed"."""
    for cert, key in (("tls_cert", "tls_key"), ("client_cert", "client_key")):
        if getattr(config, cert):
            for name in (cert, key):
                _read(getattr(config, name), name)  # unreadable: says so
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(getattr(config, cert), getattr(config, key))
            except ssl.SSLError as e:
                raise SecurityError(
                    f"[security] {cert} = {getattr(config, cert)!r}, {key} = {getattr(config, key)!r}: not a PEM "
                    f"certificate and its private key ({e.reason or e})"
                ) from None
    if config.tls_ca:
        _read(config.tls_ca, "tls_ca")
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=config.tls_ca)
        except ssl.SSLError as e:
            why = e.reason or e
            raise SecurityError(f"[security] tls_ca = {config.tls_ca!r}: not PEM certificates ({why})") from None


@dataclass(frozen=True)
class Security:
    """The [security] section with its files read. `Security()` is the default: plaintext, no token."""

    token: str = ""
    cert_chain: bytes = b""  # the server's own
    private_key: bytes = b""
    ca: bytes = b""
    client_cert_chain: bytes = b""
    client_key: bytes = b""
    require_client_cert: bool = False
    allow_insecure: bool = False
    paths: SecurityConfig = field(default_factory=SecurityConfig)  # the ssl module reads files, not bytes

    @classmethod
    def load(cls, config: SecurityConfig) -> Security:
        """Read and check the section: pairs given whole, files readable, the token one line of 16+ printable
        characters. SecurityError says which key is wrong."""
        if config.token and config.token_file:
            raise SecurityError("[security] token and token_file are both set: keep one (token_file keeps the secret "
                                "out of the config)")  # fmt: skip
        token = config.token
        if config.token_file:
            lines = _read(config.token_file, "token_file").decode(errors="replace").splitlines()
            token = lines[0].strip() if lines else ""
            if not token:
                raise SecurityError(f"[security] token_file = {config.token_file!r} is empty")
        # gRPC metadata and HTTP headers carry printable ASCII only; short secrets are guessable
        if token and (len(token) < _MIN_TOKEN or not all("!" <= c <= "~" for c in token)):
            raise SecurityError(
                f"[security] token: give at least {_MIN_TOKEN} printable ASCII characters without spaces "
                "(e.g. `openssl rand -hex 32`)"
            )
        for a, b in (("tls_cert", "tls_key"), ("client_cert", "client_key")):
            if bool(getattr(config, a)) != bool(getattr(config, b)):
                raise SecurityError(f"[security] {a} and {b} go together: give both or neither")
        if config.require_client_cert and not (config.tls_cert and config.tls_ca):
            raise SecurityError("[security] require_client_cert needs tls_cert and tls_key (the server's TLS) and "
                                "tls_ca (which signs the clients' certificates)")  # fmt: skip
        _check_pem(config)
        return cls(
            token=token,
            cert_chain=_read(config.tls_cert, "tls_cert"),
            private_key=_read(config.tls_key, "tls_key"),
            ca=_read(config.tls_ca, "tls_ca"),
            client_cert_chain=_read(config.client_cert, "client_cert"),
            client_key=_read(config.client_key, "client_key"),
            require_client_cert=config.require_client_cert,
            allow_insecure=config.allow_insecure,
            paths=config,
        )

    @property
    def serves_tls(self) -> bool:
        """A server of this process speaks TLS only."""
        return bool(self.cert_chain)

    @property
    def tls(self) -> bool:
        """A client of this process dials with TLS (verifying with tls_ca, else the system's roots)."""
        return bool(self.cert_chain or self.ca)

    # -- servers ---------------------------------------------------------------------------------------------
    def check_listen(self, address: str, what: str) -> None:
        """Refuse to expose a service with neither TLS nor a token, as Redis's protected mode does: a worker, a
        store of model weights and a planner on every address, open to whoever can reach them, is a mistake far
        more often than a choice; `allow_insecure` is the choice, for a private network (compose's). A token
        without TLS is allowed, with a warning: it travels in the clear."""
        host = address.rpartition(":")[0]
        if _loopback(host):
            return
        if not (self.serves_tls or self.token or self.allow_insecure):
            raise SecurityError(
                f"{what} {address}: not a loopback address, and [security] sets neither TLS nor a token, so anyone "
                "who reaches it could call it. Set [security] token_file (and tls_cert, tls_key across hosts), or "
                "allow_insecure = true on a private network you trust"
            )
        if self.token and not self.serves_tls and not self.allow_insecure:
            log.warning("listening beyond loopback without TLS: the token travels in the clear",
                        extra={"address": address})  # fmt: skip

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.serves_tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.ca if self.require_client_cert else None,
            require_client_auth=self.require_client_cert,
        )

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenCheck(self)] if self.token else []

    def bearer_problem(self, header: str | None) -> str | None:
        """None when an `authorization` value carries this token (or none is required), else why not."""
        if not self.token:
            return None
        scheme, _, given = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return "this service requires a token: send `authorization: Bearer <token>` (the [security] token)"
        if not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            return "the token does not match this service's"
        return None

    def http_context(self) -> ssl.SSLContext | None:
        """The HTTP API's TLS, the same certificate and client-certificate rule as the gRPC servers'."""
        if not self.serves_tls:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.paths.tls_cert, self.paths.tls_key)
        if self.require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=self.paths.tls_ca)
        return context

    # -- clients ---------------------------------------------------------------------------------------------
    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca or None,
            private_key=self.client_key or None,
            certificate_chain=self.client_cert_chain or None,
        )

    def client_context(self) -> ssl.SSLContext:
        """An HTTPS client's context: tls_ca's servers, this process's client certificate if it has one."""
        context = ssl.create_default_context(cafile=self.paths.tls_ca or None)
        if self.paths.client_cert:
            context.load_cert_chain(self.paths.client_cert, self.paths.client_key)
        return context

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()

    def explain(self, error: grpc.RpcError) -> str:
        """The error's code and details, with a hint where gRPC alone says little (`hint`)."""
        return f"{error.code().name}: {error.details()}{self.hint(error)}"

    def hint(self, error: grpc.RpcError) -> str:
        """What to check, for an error where gRPC says only "Socket closed": a TLS server closes a plaintext
        connection that way, and a mutual-TLS server one without a client certificate. Else ""."""
        if error.code() != grpc.StatusCode.UNAVAILABLE or "Socket closed" not in (error.details() or ""):
            return ""
        if not self.tls:
            return " (if the server uses TLS, give its CA: [security] tls_ca, or --tls-ca)"
        if not self.client_cert_chain:
            return " (if the server requires client certificates, set [security] client_cert and client_key)"
        return ""


def _loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name (or empty: every address): loopback only if every address it names is
        pass
    if not host:
        return False
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


# -- gRPC plumbing ---------------------------------------------------------------------------------------------
class TokenCheck(grpc.ServerInterceptor):
    """Lets a call through when it carries the token (or is a health check), else answers UNAUTHENTICATED."""

    def __init__(self, security: Security) -> None:
        self.security = security

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT_PREFIX):
            return handler
        given = [v for k, v in handler_call_details.invocation_metadata or () if k == AUTHORIZATION]
        problem = self.security.bearer_problem(given[0] if given else None)
        if problem is None:
            return handler

        def refuse(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)

        # a handler of the method's own kind, so the server reads the call as it would (no deserializer: the
        # request is never looked at)
        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return kind(refuse)


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),  # fmt: skip
    grpc.ClientCallDetails,
):
    pass


class _Bearer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call's metadata. An interceptor rather than call credentials: gRPC sends call
    credentials over TLS only, and a token alone (a private network, loopback) must work too."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, d: grpc.ClientCallDetails) -> _CallDetails:
        metadata = tuple(d.metadata or ()) + self._metadata
        return _CallDetails(d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._details(details), requests)


def open_channel(
    address: str, security: Security | None = None, options: Sequence[tuple[str, object]] = ()
) -> grpc.Channel:
    """A channel to `address` as `security` says (None: plaintext, no token): TLS with this process's CA and
    client certificate when configured, the token on every call when set."""
    security = security or Security()
    credentials = security.channel_credentials()
    if credentials is None:
        channel = grpc.insecure_channel(address, options=list(options))
    else:
        channel = grpc.secure_channel(address, credentials, options=list(options))
    metadata = security.metadata()
    return grpc.intercept_channel(channel, _Bearer(metadata)) if metadata else channel
