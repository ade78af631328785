"""The services' command lines, mounted by `expertflow`:

    expertflow serve  [--config FILE] [model flags]      every service as its own process (launcher.py)
    expertflow expert-store [--config FILE] [--model] [--host-budget] [--listen]   (store_server.py)
    expertflow predictor | orchestrator [--config FILE] ...                          (control_cli.py)
    expertflow worker [--config FILE] [model flags] [--listen] [--store] [--orchestrator] ...
    expertflow api    [--config FILE] [--listen] [--worker]  the OpenAI-compatible HTTP endpoint
    expertflow ask PROMPT [--address] [--config FILE] [--token-file F] [--tls-ca F] [sampling flags]
                                                          stream a completion from a worker

Every service reads the same config file (config.py); flags override it. Each runs until SIGTERM / SIGINT
and then stops gracefully.

Not for: the services' work (worker.py, launcher.py, ...) or the embedded commands (expertflow/cli.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from expertflow.services.config import ServicesConfig, add_server_flags

# what `serve` starts, in order
SERVE = ("expert-store", "predictor", "orchestrator", "worker", "api")


def _model_flags(p: argparse.ArgumentParser) -> None:
    add_server_flags(p)
    p.add_argument("--model", help="Hugging Face model directory (default: the embedded model)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="compute device (default: cuda where present)")
    p.add_argument("--policy", help="expert cache policy (orchestrator/policies.py)")
    p.add_argument("--expert-budget", help="device bytes for routed experts: 6GiB, 512MB or 25%% of all")
    p.add_argument("--host-budget", help="host RAM for routed experts (the expert store's, in process or not)")
    p.add_argument("--predictor", help="route predictor directory for --policy expertflow")


def add_subcommands(sub) -> None:
    from expertflow.services import control_cli, store_server

    store_server.add_subcommand(sub)
    control_cli.add_subcommands(sub)
    serve = sub.add_parser("serve", help="start every service as its own process and stop them together")
    _model_flags(serve)
    serve.set_defaults(services_command=_serve)

    worker = sub.add_parser("worker", help="the gpu worker: the model, its expert cache, the inference API")
    _model_flags(worker)
    worker.add_argument("--listen", help="host:port of the inference API")
    worker.add_argument("--store", help="the expert store: host:port (one node), redis://HOST:PORT (scaled out: "
                        "its directory); default: in process")  # fmt: skip
    worker.add_argument("--orchestrator", help="the orchestrator's address (default: plan in process)")
    worker.add_argument("--scheduler", choices=("expertflow", "fifo"), help="how decodes are batched")
    worker.add_argument("--max-batch", type=int, help="decodes per step at most")
    worker.add_argument("--rows", type=int, help="requests in the KV cache at once")
    worker.add_argument("--metrics-port", type=int, help="Prometheus port (0: none)")
    worker.set_defaults(services_command=_worker)

    api = sub.add_parser("api", help="the OpenAI-compatible HTTP endpoint in front of a worker")
    add_server_flags(api)
    api.add_argument("--listen", help="host:port of the HTTP endpoint")
    api.add_argument("--worker", help="the worker's inference API (host:port)")
    api.add_argument("--model", help="the model directory, for its chat template (default: the embedded model)")
    api.add_argument("--metrics-port", type=int, help="Prometheus port (0: none)")
    api.set_defaults(services_command=_api)

    ask = sub.add_parser("ask", help="stream a completion from a running worker")
    ask.add_argument("prompt", help="the prompt text")
    ask.add_argument("--address", help="the worker's inference API (default: [worker] listen of --config, else "
                     f"{ServicesConfig().worker.listen})")
    ask.add_argument("--config", type=Path, help="the services' config: the worker's address and [security]")
    ask.add_argument("--token-file", help="a file whose first line is the services' token (over the config's; "
                     "no --token flag: a command line is visible to every user of the machine)")
    ask.add_argument("--tls-ca", help="the CA that signed the worker's certificate: dial with TLS")
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ask.add_argument("--top-p", type=float, default=1.0)
    ask.add_argument("--seed", type=int, default=0)
    ask.add_argument("--stop", action="append", default=[], help="a string that ends the reply; repeatable")
    ask.add_argument("--timeout", type=float, default=600.0, help="seconds before giving up")
    ask.set_defaults(services_command=_ask)


def run(args: argparse.Namespace) -> int:
    return args.services_command(args)


def config_from(args: argparse.Namespace) -> ServicesConfig:
    """The config file (or the defaults) with the command line's model flags over it."""
    config = ServicesConfig.from_args(args)
    return config.override(
        "model",
        dir=args.model,
        device=args.device,
        policy=args.policy,
        expert_budget=args.expert_budget,
        host_budget=args.host_budget,
        predictor=args.predictor,
    )


def _serve(args: argparse.Namespace) -> int:
    from expertflow.services.common import setup_logging
    from expertflow.services.launcher import Launcher, wire

    log = setup_logging("serve")
    launcher = Launcher(wire(config_from(args), SERVE), SERVE, log)
    launcher.start()
    print(f"expertflow: serving; the inference API at {launcher.config.worker.listen}", file=sys.stderr)
    return launcher.wait()


def _worker(args: argparse.Namespace) -> int:
    from expertflow.services.common import GrpcServer, run_until_stopped, setup_logging, start_metrics
    from expertflow.services.security import Security
    from expertflow.services.worker import Worker, load_model
    from expertflow.v1 import inference_pb2_grpc

    config = config_from(args).override(
        "worker",
        listen=args.listen,
        store=args.store,
        orchestrator=args.orchestrator,
        scheduler=args.scheduler,
        max_batch=args.max_batch,
        rows=args.rows,
    )
    if args.metrics_port is not None:
        config = config.override("metrics", worker=args.metrics_port)
    security = Security.load(config.security)
    security.check_listen(config.worker.listen, "--listen")  # before the model loads
    log = setup_logging("worker")
    loaded = load_model(config, security)
    try:
        registry = start_metrics(config.metrics.worker, config.metrics.host)
        worker = Worker(loaded, config.worker, registry, log).start()
        server = GrpcServer(
            "worker",
            config.worker.listen,
            [(inference_pb2_grpc.add_InferenceServicer_to_server, worker)],
            ["expertflow.v1.Inference"],
            max_workers=config.worker.max_queue + 8,
            security=security,
        )
        run_until_stopped(server, log, drain=worker.stop)
    finally:
        loaded.close()
    return 0


def _api(args: argparse.Namespace) -> int:
    from expertflow.default_model import default_model_dir
    from expertflow.services.common import setup_logging, start_metrics, wait_for_signal
    from expertflow.services.http_api import ApiServer
    from expertflow.services.security import Security

    config = ServicesConfig.from_args(args).override("api", listen=args.listen, worker=args.worker)
    config = config.override("model", dir=args.model)
    if args.metrics_port is not None:
        config = config.override("metrics", api=args.metrics_port)
    security = Security.load(config.security)
    log = setup_logging("api")
    model_dir = Path(config.model.dir) if config.model.dir else default_model_dir()
    registry = start_metrics(config.metrics.api, config.metrics.host)
    server = ApiServer(
        config.api.listen, config.api.worker, model_dir, registry, log, config.worker.max_new_tokens, security
    )
    server.start()
    log.info("serving", extra={"address": f"{server.scheme}://{server.address}", "worker": config.api.worker})
    try:
        wait_for_signal(log)
    finally:
        server.stop()
        log.info("stopped")
    return 0


def _ask(args: argparse.Namespace) -> int:
    from expertflow.services.client import InferenceClient, InferenceError
    from expertflow.services.security import Security

    config = ServicesConfig.load(args.config)
    if args.token_file:  # the flag's token replaces the config's, whichever key held it
        config = config.override("security", token_file=args.token_file, token="")
    config = config.override("security", tls_ca=args.tls_ca)
    security = Security.load(config.security)
    address = args.address or config.worker.listen
    with InferenceClient(address, timeout_s=args.timeout, security=security) as client:
        try:
            reason = ""
            for piece in client.stream(
                args.prompt,
                max_new_tokens=args.max_new_tokens,
                temperature=args.temperature,
                top_p=args.top_p,
                seed=args.seed,
                stop=args.stop,
            ):
                sys.stdout.write(piece.text)
                sys.stdout.flush()
                reason = piece.finish_reason or reason
        except InferenceError as e:
            print(f"\nexpertflow: error: {e.message} ({e.code.name.lower()} from {address})", file=sys.stderr)
            return 2
    print()
    print(f"[{reason}]", file=sys.stderr)
    return 0
