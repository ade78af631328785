"""One config file for every service: where each listens, what the worker serves, how it batches.

    [model]          dir (default: the embedded model), device, dtype, expert_budget, host_budget, policy, predictor,
                     version_label (tells apart weights the content version cannot: store_wire.model_version)
    [worker]         listen, rows, max_len, max_batch, token_budget, scheduler ("expertflow" | "fifo"), max_wait,
                     plan_timeout_ms, max_new_tokens, max_queue, store and orchestrator (addresses; empty: in process;
                     store "redis://HOST:PORT": the expert store scaled out, found through its directory)
    [expert_store]   listen (the host budget is [model] host_budget); scaled out: directory (redis://HOST:PORT),
                     shard ("I/N" or "auto"), replicas, node_id, advertise (host:port workers dial), ttl_s
    [predictor]      listen
    [orchestrator]   listen, predictor (address; empty: in process)
    [api]            listen (the OpenAI-compatible HTTP endpoint), worker (address)
    [metrics]        each service's Prometheus port: worker, expert_store, predictor, orchestrator, api; host (where
                     they bind: loopback by default)
    [security]       token or token_file (a shared secret every call carries), tls_cert / tls_key (a server's own),
                     tls_ca (verifies servers, and clients where require_client_cert), client_cert / client_key (what
                     a client presents), require_client_cert, allow_insecure (see SecurityConfig and security.py)

TOML (tomllib); every key optional. Addresses are host:port, loopback by default. `expertflow serve --config
FILE` starts all services from it; each `expertflow <service>` takes the same file plus flags that override it.

Not for: running anything (launcher.py and the servers), or the embedded mode's options (LoadOptions).
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    dir: str = ""  # empty: the embedded default model
    device: str = ""  # empty: cuda where present, else cpu
    dtype: str = ""  # empty: the checkpoint's on CUDA, float32 on CPU
    expert_budget: str = "25%"
    host_budget: str = "100%"
    policy: str = "expertflow"
    predictor: str = ""  # empty: the model's own (expertflow prepare), else none
    version_label: str = ""  # appended to the content version of the weights (stores and workers must agree)


@dataclass(frozen=True)
class WorkerConfig:
    listen: str = "127.0.0.1:50051"
    rows: int = 64  # requests in the KV cache at once (more wait in a queue)
    max_len: int = 2048  # positions per request, prompt and reply (capped at the model's context)
    max_batch: int = 32  # requests decoding together at most
    token_budget: int = 512  # tokens one step may run (prompts and decodes together)
    scheduler: str = "expertflow"  # "expertflow": group requests with similar predicted routes; "fifo"
    max_wait: int = 4  # steps a running request may be left out at most
    plan_timeout_ms: float = 2.0  # how long one prefetch event waits for the orchestrator's plan; then reactive loading
    max_new_tokens: int = 256  # a request's default and cap
    max_queue: int = 1024  # requests waiting at most; more get RESOURCE_EXHAUSTED
    store: str = ""  # the expert store: "host:port" (one node), "redis://host:port" (scaled out), empty: in process
    orchestrator: str = ""  # the orchestrator's address; empty: the worker plans in process


@dataclass(frozen=True)
class StoreConfig:
    listen: str = "127.0.0.1:50061"
    directory: str = ""  # redis://host:port: a node of a scaled-out store; empty: one store holding every expert
    shard: str = "auto"  # with a directory: "I/N" (static, node I of N) or "auto" (rendezvous over the live nodes)
    replicas: int = 2  # copies of each expert over the nodes (at most one per node)
    node_id: str = ""  # empty: hostname:port
    advertise: str = ""  # the address workers dial; empty: listen's, with this host's address for 0.0.0.0
    ttl_s: float = 10.0  # a node that stops heartbeating leaves the directory after this long


@dataclass(frozen=True)
class PredictorConfig:
    listen: str = "127.0.0.1:50062"


@dataclass(frozen=True)
class OrchestratorConfig:
    listen: str = "127.0.0.1:50063"
    predictor: str = ""  # the predictor service's address; empty: the orchestrator predicts in process


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "127.0.0.1:8000"
    worker: str = "127.0.0.1:50051"  # the worker's inference API


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus ports (0: no endpoint), on `host`."""

    host: str = "127.0.0.1"  # the address every service's /metrics binds (0.0.0.0 in containers, for a scraper)
    worker: int = 9101
    expert_store: int = 9102
    predictor: int = 9103
    orchestrator: int = 9104
    api: int = 9105


@dataclass(frozen=True)
class SecurityConfig:
    """Who may call the services, over what. Nothing set: plaintext and no token, which `security.py` allows only on
    loopback addresses (a service listening on any other refuses to start unless `allow_insecure`).

    The token: `token_file` (its first line; the secret stays out of the config, e.g. a compose secret) or
    `token` (in the file itself), not both; a client's --token-file flag overrides either. TLS is on for servers
    when tls_cert is set, for clients when tls_cert or tls_ca is (tls_ca empty: the system's roots). Every process
    of a deployment reads the same section, so one file makes both ends agree. Paths are read at start."""

    token: str = ""
    token_file: str = ""
    tls_cert: str = ""  # PEM certificate chain this process serves with (it must name every host clients dial)
    tls_key: str = ""  # its PEM private key
    tls_ca: str = ""  # PEM CA bundle: verifies the servers this process calls, and clients' certificates
    client_cert: str = ""  # PEM certificate this process presents when it calls a service (mutual TLS)
    client_key: str = ""
    require_client_cert: bool = False  # servers refuse a TLS handshake without a certificate tls_ca signed
    allow_insecure: bool = False  # listen on a non-loopback address with neither TLS nor token (a private network)


@dataclass(frozen=True)
class ServicesConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    expert_store: StoreConfig = field(default_factory=StoreConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    orchestrator: OrchestratorConfig = field(default_factory=OrchestratorConfig)
    api: ApiConfig = field(default_factory=ApiConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    @classmethod
    def load(cls, path: str | Path | None) -> ServicesConfig:
        """The config in `path` (TOML), or the defaults for None."""
        if path is None:
            return cls()
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a valid TOML config ({e})") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config") -> ServicesConfig:
        sections = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(sections))
        if unknown:
            raise ValueError(f"{where}: unknown section(s) {unknown}; known: {sorted(sections)}")
        values = {}
        for name, section in raw.items():
            kind = type(getattr(cls(), name))
            if not isinstance(section, dict):
                raise ValueError(f"{where}: [{name}] must be a table of keys")
            values[name] = _section(kind, section, f"{where}: [{name}]")
        return cls(**values)

    def to_toml(self) -> str:
        """The config as a TOML file `load` reads back (every key written)."""
        lines = []
        for section in fields(self):
            lines.append(f"[{section.name}]")
            for f in fields(getattr(self, section.name)):
                lines.append(f"{f.name} = {_toml_value(getattr(getattr(self, section.name), f.name))}")
            lines.append("")
        return "\n".join(lines)

    @classmethod
    def from_args(cls, args: Any) -> ServicesConfig:
        """A server command's config: its --config file, with --allow-insecure (add_server_flags) over the file."""
        config = cls.load(args.config)
        return config.override("security", allow_insecure=True) if args.allow_insecure else config

    def override(self, section: str, **values: Any) -> ServicesConfig:
        """A copy with `values` (those not None) set in `section`: command-line flags over the file."""
        given = {k: v for k, v in values.items() if v is not None}
        return replace(self, **{section: replace(getattr(self, section), **given)}) if given else self


def _section(kind: type, raw: dict[str, Any], where: str):
    known = {f.name: f for f in fields(kind)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    default = kind()
    for key, value in raw.items():
        expected = type(getattr(default, key))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
            raw = {**raw, key: value}
        if not isinstance(value, expected) or isinstance(value, bool) != (expected is bool):
            raise ValueError(f"{where}: {key} = {value!r} should be a {expected.__name__}")
    return kind(**raw)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    escaped = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def add_server_flags(parser: Any) -> None:
    """The flags every server command shares: its config file, and the one security choice a container's command
    line must be able to make (listening on 0.0.0.0 behind a port published on loopback or a private network)."""
    parser.add_argument("--config", type=Path, help="the services' TOML config (see expertflow/services/config.py)")
    parser.add_argument(
        "--allow-insecure",
        action="store_true",
        help="listen on a non-loopback address with neither TLS nor a token ([security] allow_insecure)",
    )
