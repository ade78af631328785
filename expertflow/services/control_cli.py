"""`expertflow predictor` and `expertflow orchestrator`: the control-plane services from the command line.

    expertflow predictor [--model DIR] [--predictor DIR] [--listen HOST:PORT] [--config FILE] [--metrics-port N]
    expertflow orchestrator [--predictor-address HOST:PORT] [--policy NAME] [--listen HOST:PORT] [--config FILE]
                            [--metrics-port N] [--plans-port N]

Defaults come from the services config (services/config.py: --config FILE, else its defaults); flags override
the file. Each serves until SIGTERM or SIGINT, with JSON logs on stderr and Prometheus metrics on the port.
The servers are imported only when a command runs, so that building the CLI's parser stays cheap.

Not for: the services themselves (predictor_server.py, orchestrator_server.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from expertflow.services.config import add_server_flags


def add_subcommands(sub) -> None:
    from orchestrator.policies import LIVE_POLICY_NAMES

    pr = sub.add_parser("predictor", help="serve a model's route predictor (the Predictor gRPC API) until stopped")
    pr.add_argument(
        "--model", type=Path, help="model whose predictor to serve (default: [model] dir, else the embedded model)"
    )
    pr.add_argument(
        "--predictor", type=Path, help="predictor directory (default: [model] predictor, else the model's own)"
    )
    _common(pr, "predictor", "127.0.0.1:50062", 9103)
    pr.set_defaults(services_command=run)

    orc = sub.add_parser("orchestrator", help="serve prefetch plans and token scheduling for gpu workers until stopped")
    orc.add_argument("--predictor-address", help="the predictor service, host:port (default: [predictor] listen)")
    orc.add_argument("--policy", choices=LIVE_POLICY_NAMES, help="default cache policy (default: [model] policy)")
    orc.add_argument(
        "--plans-port", type=int, default=0, help="ZMQ port for the per-layer plans (0: any free one; workers ask)"
    )
    orc.add_argument(
        "--predictor-timeout-ms", type=float, default=100.0, help="deadline of each predictor call; then no prediction"
    )
    _common(orc, "orchestrator", "127.0.0.1:50063", 9104)
    orc.set_defaults(services_command=run)


def _common(parser: argparse.ArgumentParser, section: str, listen: str, metrics: int) -> None:
    parser.add_argument("--listen", help=f"gRPC address, host:port (default: [{section}] listen, {listen})")
    add_server_flags(parser)
    parser.add_argument(
        "--metrics-port", type=int, help=f"Prometheus port, 0 for none (default: [metrics] {section}, {metrics})"
    )
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"), help="log level")


def run(args: argparse.Namespace) -> int:
    """Serve the command's service until stopped."""
    from expertflow.services.config import ServicesConfig

    config = ServicesConfig.from_args(args)
    try:
        if args.command == "predictor":
            _predictor(args, config)
        else:
            _orchestrator(args, config)
    except OSError as e:  # an address in use: said plainly, as the CLI says its other errors
        if isinstance(e, FileNotFoundError):
            raise
        print(f"expertflow: error: {e}", file=sys.stderr)
        return 2
    return 0


def _predictor(args: argparse.Namespace, config) -> None:
    from expertflow.default_model import default_model_dir, default_predictor
    from expertflow.services.common import setup_logging, start_metrics
    from expertflow.services.predictor_server import PredictorServicer, learned_factory, serve
    from expertflow.services.security import Security

    config = config.override("predictor", listen=args.listen).override("metrics", predictor=args.metrics_port)
    security = Security.load(config.security)
    security.check_listen(config.predictor.listen, "--listen")
    model = args.model or (Path(config.model.dir) if config.model.dir else None)
    predictor_dir = args.predictor or (Path(config.model.predictor) if config.model.predictor else None)
    if predictor_dir is None:
        predictor_dir = default_predictor(model)
    # What can be refused is refused before the process's logging becomes the service's (setup_logging hands its
    # handler to the same logger the servicer was given).
    log = logging.getLogger("expertflow.predictor")
    servicer = PredictorServicer(learned_factory(predictor_dir), start_metrics(config.metrics.predictor, config.metrics.host), log)
    setup_logging("predictor", args.log_level)
    log.info("loaded", extra={"model": str(model or default_model_dir()), "predictor": str(predictor_dir)})
    serve(servicer, config.predictor.listen, log, security)


def _orchestrator(args: argparse.Namespace, config) -> None:
    from expertflow.services.common import setup_logging, start_metrics
    from expertflow.services.orchestrator_server import OrchestratorOptions, OrchestratorServicer, PlansEndpoint, serve
    from expertflow.services.security import Security

    config = config.override("orchestrator", listen=args.listen).override("metrics", orchestrator=args.metrics_port)
    security = Security.load(config.security)
    security.check_listen(config.orchestrator.listen, "--listen")
    options = OrchestratorOptions(
        policy=args.policy or config.model.policy,
        predictor_address=args.predictor_address or config.predictor.listen,
        predictor_timeout_ms=args.predictor_timeout_ms,
        security=security,
    )
    log = logging.getLogger("expertflow.orchestrator")
    servicer = OrchestratorServicer(options, start_metrics(config.metrics.orchestrator, config.metrics.host), log)
    host = config.orchestrator.listen.rsplit(":", 1)[0]
    endpoint = PlansEndpoint(servicer, host, args.plans_port, curve=security.serves_tls)
    setup_logging("orchestrator", args.log_level)
    log.info("planning", extra={"policy": options.policy, "predictor": options.predictor_address})
    serve(servicer, endpoint, config.orchestrator.listen, log, security)
