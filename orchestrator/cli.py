"""`simulate` and `schedule`: replay routing traces through cache policies, or as batched decode requests.

`python -m orchestrator.cli simulate ...` / `schedule ...` run standalone.

`add_subcommands(subparsers)` and `run(args)` let another command line (expertflow) host it. Peers'
predictors are fitted on `--train-traces` only; the learned one is loaded from `--predictor DIR`. A policy
whose predictor is missing (no traces, no checkpoint) is reported as n/a instead of failing.

Budgets use the one syntax of every command (expert_store/budget.py): `25%`, a size such as `6GiB`, or here
also a bare share 0..1. The size of one expert comes from each trace (`info.extra["expert_bytes"]`, written
when `expertflow trace` or `expertflow prepare` records it) or from `--expert-bytes`, which a trace without it
needs. Progress goes to stderr, one step per (budget, policy) run, so `--json` output on stdout stays clean.

Not for: the simulation itself (simulator.py) or its output formats (report.py).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from expert_store.budget import parse_share, parse_size
from orchestrator.policies import POLICY_NAMES, PolicyInputs
from orchestrator.report import format_table, plot
from orchestrator.simulator import SimConfig, TierLink, compare, trace_inputs
from predictor.baselines import ActivationMatrixPredictor, FrequencyPredictor, TrueRoutes, layer_frequency
from predictor.learned import LearnedPredictor
from predictor.online import OnlineConfig
from traces.format import Trace, concat, load_trace

# What expertflow may plan with; "true-routes" is the bound with a perfect token-horizon prediction.
_STAND_INS = ("learned", "activation", "frequency", "true-routes")


def parse_bytes(text: str, what: str = "size") -> int:
    """`55GB/s`, `336MiB`, `3*256*320*2` or a plain count (expert_store/budget.py `parse_size`)."""
    return parse_size(text, what)


def parse_budgets(text: str) -> list[str]:
    """The comma-separated `--budget` values, each checked now (before any trace is read); they become shares
    per trace (`budget_share`), since a size is a share of that trace's model."""
    parts = [b.strip() for b in text.split(",") if b.strip()]
    if not parts:
        raise ValueError(f"--budget {text!r} names no budget; e.g. 10%,25%,50%")
    for part in parts:
        parse_share(part, 1 << 62, "--budget")
    return parts


def parse_tiers(args: argparse.Namespace) -> list[dict]:
    """SimConfig's tier fields for each `--remote-share` (and, with `--placement-blind`, each tiered one again
    planning with one link time), checked now, before any trace is read."""
    try:
        remote_shares = [float(x) for x in args.remote_share.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--remote-share {args.remote_share!r}: comma-separated shares 0..1, e.g. 0,0.5") from None
    if not remote_shares:
        raise ValueError("--remote-share names no share; e.g. 0 or 0,0.5")
    links = {
        "remote": TierLink(float(parse_bytes(args.remote_bandwidth, "--remote-bandwidth")), args.remote_latency_ms),
        "nvme": TierLink(float(parse_bytes(args.nvme_bandwidth, "--nvme-bandwidth")), args.nvme_latency_ms),
    }
    if min(args.remote_latency_ms, args.nvme_latency_ms) < 0 or min(t.bandwidth for t in links.values()) <= 0:
        raise ValueError("tier bandwidths must be positive and latencies >= 0")
    out = []
    for share in remote_shares:
        tiers = {"remote_share": share, "nvme_share": args.nvme_share, "placement_seed": args.placement_seed, **links}
        SimConfig(**tiers)  # the shares' checks, now
        out.append(tiers)
        if args.placement_blind and (share or args.nvme_share):
            out.append({**tiers, "placement_aware": False})
    return out


def budget_share(text: str, trace: Trace, expert_bytes: int) -> float:
    """One `--budget` value as the share of `trace`'s routed experts; at least one expert, as in generate."""
    n_keys = len(trace.info.moe_layers) * trace.info.n_experts
    share = parse_share(text, n_keys * expert_bytes, "--budget")
    if share * n_keys < 1 - 1e-9:  # the loader's words for the same mistake in generate
        raise ValueError(
            f"--budget {text} ({int(share * n_keys * expert_bytes)} bytes) is smaller than one expert "
            f"({expert_bytes} bytes); give at least {expert_bytes} bytes or {100 / n_keys:.2f}%"
        )
    return share


def trace_expert_bytes(args: argparse.Namespace, trace: Trace, path: Path) -> int:
    """--expert-bytes if given, else what the trace records of its model; a trace without it needs the flag."""
    if args.expert_bytes is not None:
        return parse_bytes(args.expert_bytes, "--expert-bytes")
    recorded = trace.info.extra.get("expert_bytes")
    if not recorded:
        raise ValueError(
            f"{path}: the trace does not record the size of one expert of {trace.info.model or 'its model'}; "
            "pass --expert-bytes (gate + up + down bytes, e.g. 3*256*320*2 for hidden 256, ffn 320 in bf16)"
        )
    return int(recorded)


def add_subcommands(subparsers) -> None:
    p = subparsers.add_parser("simulate", help="replay routing traces through cache policies on a modelled clock")
    p.add_argument("--traces", nargs="+", type=Path, required=True, help="traces to replay, each on its own")
    p.add_argument("--policy", default="all", help=f"comma-separated, or all: {','.join(POLICY_NAMES)}")
    p.add_argument(
        "--budget",
        default="10%,25%,50%",
        help="comma-separated cache sizes: 25%% of all routed experts, a size such as 6GiB, or a share 0..1",
    )
    p.add_argument("--bandwidth", default="55GB/s", help="host-to-device bytes per second")
    p.add_argument("--layer-ms", type=float, default=0.05, help="compute time of one MoE layer's block")
    p.add_argument(
        "--expert-bytes",
        help="bytes of one expert, e.g. 3*512*128*2 (default: what the trace records; needed where it records none)",
    )
    p.add_argument("--predictor", type=Path, help="learned predictor checkpoint directory (for expertflow)")
    p.add_argument(
        "--train-traces", nargs="+", type=Path, default=[], help="fit the peers' predictors on these (any models)"
    )
    p.add_argument(
        "--expertflow-predictor",
        choices=_STAND_INS,
        default="learned",
        help="what expertflow plans with (activation/frequency: a peer's predictor; true-routes: the bound)",
    )
    p.add_argument("--domains", nargs="+", help="replay only these domains of each trace")
    p.add_argument(
        "--online-correction", action="store_true", help="blend the learned predictor with each request's own routes"
    )
    p.add_argument("--max-sequences", type=int, help="replay only the first N sequences of each trace")
    p.add_argument("--empty-per-sequence", action="store_true", help="empty the cache when a sequence starts")
    p.add_argument(
        "--remote-share",
        default="0",
        help="comma-separated shares 0..1 of the experts on another store node, each a run (e.g. 0,0.5)",
    )
    p.add_argument("--nvme-share", type=float, default=0.0, help="share 0..1 of the experts read from NVMe")
    p.add_argument("--remote-bandwidth", default="3GB/s", help="another node to host memory, bytes per second")
    p.add_argument("--remote-latency-ms", type=float, default=0.1, help="per remote expert: a request's round trip")
    p.add_argument("--nvme-bandwidth", default="6GB/s", help="NVMe to host memory, bytes per second")
    p.add_argument("--nvme-latency-ms", type=float, default=0.1, help="per NVMe expert: a read's setup")
    p.add_argument("--placement-seed", type=int, default=0, help="which experts the shares draw")
    p.add_argument(
        "--placement-blind",
        action="store_true",
        help="also run each tiered config planning with one link time for every key (what per-key times buy)",
    )
    p.add_argument("--plot", type=Path, help="write bytes and stall per token across budgets as a PNG")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of the table")
    p.set_defaults(orchestrator_command=_simulate)

    q = subparsers.add_parser("schedule", help="replay traces as decode requests: overlap micro-batches vs FIFO")
    q.add_argument("--traces", nargs="+", type=Path, required=True)
    q.add_argument("--train-traces", nargs="+", type=Path, default=[], help="fit the activation-matrix predictor")
    q.add_argument("--predictor", type=Path, help="learned predictor checkpoint directory")
    q.add_argument("--batch", type=int, default=8, help="requests per micro-batch")
    q.add_argument("--max-wait", type=int, default=4, help="rounds a request may wait")
    q.add_argument("--concurrency", type=int, default=32, help="requests queued at once")
    q.add_argument(
        "--expert-bytes",
        help="bytes of one expert, e.g. 3*512*128*2 (default: what the trace records; needed where it records none)",
    )
    q.add_argument("--max-sequences", type=int)
    q.add_argument("--json", action="store_true")
    q.set_defaults(orchestrator_command=_schedule)


def _inputs(args: argparse.Namespace, train: Trace | None, trace: Trace) -> PolicyInputs:
    """What the policies may use on `trace`: peers fitted on `train` (same model), the learned predictor."""
    values: dict = {}
    missing: list[tuple[str, str]] = []
    if train is None:
        missing += [(name, "needs --train-traces of this model") for name in ("frequency", "activation")]
    else:
        values["frequency"] = layer_frequency(train)
        values["activation"] = ActivationMatrixPredictor(train)
    if args.expertflow_predictor == "learned":
        token, why = _learned(args.predictor, args.online_correction)
        if isinstance(token, LearnedPredictor) and token.model.layer_head is not None:
            values["learned_layer"] = LearnedPredictor(token.model, layer_horizon=True)
    elif args.expertflow_predictor == "activation":
        token, why = values.get("activation"), "needs --train-traces of this model"
    elif args.expertflow_predictor == "true-routes":
        token, why = TrueRoutes(), None
    else:
        token = FrequencyPredictor(train) if train is not None else None
        why = "needs --train-traces of this model"
    if token is None:
        missing.append(("learned", why or "unavailable"))
    values["learned"] = token
    return trace_inputs(trace, **values, unavailable=missing)


def _learned(directory: Path | None, online: bool = False):
    if directory is None:
        return None, "no learned predictor given (--predictor DIR)"
    try:
        return LearnedPredictor.load(directory, OnlineConfig() if online else None), None
    except Exception as e:  # a bad checkpoint must not stop the baselines from running
        return None, f"learned predictor could not be loaded from {directory}: {e}"


def run(args: argparse.Namespace) -> int:
    """Run the subcommand `add_subcommands` parsed (simulate or schedule); the exit code."""
    return args.orchestrator_command(args)


def _simulate(args: argparse.Namespace) -> int:
    policies = POLICY_NAMES if args.policy == "all" else tuple(p.strip() for p in args.policy.split(","))
    unknown = [p for p in policies if p not in POLICY_NAMES]
    if unknown:
        print(f"unknown policies {unknown}; choose from {', '.join(POLICY_NAMES)}", file=sys.stderr)
        return 2
    budgets = parse_budgets(args.budget)
    bandwidth = float(parse_bytes(args.bandwidth, "--bandwidth"))
    tier_configs = parse_tiers(args)
    train = _train_by_shape(args.train_traces)
    results = []
    for path in args.traces:
        trace = load_trace(path)
        if args.domains:
            trace = trace.of_domains(args.domains)
        if args.max_sequences:
            trace = trace.select(list(range(min(args.max_sequences, trace.n_sequences))))
        expert_bytes = trace_expert_bytes(args, trace, path)
        shares = [budget_share(b, trace, expert_bytes) for b in budgets]
        inputs = _inputs(args, train.get(_shape(trace)), trace)
        # One bar step per (budget, policy) run: each replays the whole trace, the unit a user waits for.
        configs = [
            SimConfig(
                budget=share,
                bandwidth=bandwidth,
                expert_bytes=expert_bytes,
                layer_ms=args.layer_ms,
                empty_per_sequence=args.empty_per_sequence,
                **tiers,
            )
            for share in shares
            for tiers in tier_configs
        ]
        with tqdm(total=len(configs) * len(policies), desc=path.stem, unit="run", file=sys.stderr) as bar:
            for config in configs:
                for policy in policies:
                    bar.set_postfix_str(f"budget {config.budget:.3g}, remote {config.remote_share:g}, {policy}")
                    results += compare(trace, [policy], config, inputs, label=path.stem)
                    bar.update()
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=1))
    else:
        print(format_table(results))
    if args.plot:
        plot(results, args.plot)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    from orchestrator.scheduler import SchedulerConfig, compare_schedulers

    config = SchedulerConfig(batch=args.batch, max_wait=args.max_wait)
    train = _train_by_shape(args.train_traces)
    rows = []
    for path in args.traces:
        trace = load_trace(path)
        if args.max_sequences:
            trace = trace.select(list(range(min(args.max_sequences, trace.n_sequences))))
        predicted = {}
        for predictor in (_learned(args.predictor)[0], _activation(train.get(_shape(trace)))):
            if predictor is not None and predictor.supports(trace) is None:
                predicted[predictor.name] = lambda s, p=predictor, t=trace: p.predict(t, s)
        expert_bytes = trace_expert_bytes(args, trace, path)
        for r in compare_schedulers(trace, config, predicted, args.concurrency, expert_bytes):
            rows.append(dict(trace=path.stem, batch=args.batch, max_wait_bound=args.max_wait, **asdict(r)))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    print(
        f"{'trace':<14} {'scheduler':<32} {'rounds':>7} {'batch':>6} {'distinct/round':>14} {'MB/token':>9} {'max wait':>8}"
    )
    for r in rows:
        print(
            f"{r['trace']:<14} {r['scheduler']:<32} {r['rounds']:>7} {r['mean_batch']:>6.2f} "
            f"{r['mean_distinct']:>14.2f} {r['bytes_per_token'] / 1e6:>9.3f} {r['max_wait']:>8}"
        )
    return 0


def _shape(trace: Trace) -> tuple[int, int, int]:
    return len(trace.info.moe_layers), trace.info.n_experts, trace.info.top_k


def _train_by_shape(paths: list[Path]) -> dict[tuple[int, int, int], Trace]:
    """Training traces of each model shape, concatenated: one command may replay traces of several models."""
    groups: dict[tuple[int, int, int], list[Trace]] = {}
    for p in paths:
        t = load_trace(p)
        groups.setdefault(_shape(t), []).append(t)
    return {shape: concat(ts) for shape, ts in groups.items()}


def _activation(train: Trace | None) -> ActivationMatrixPredictor | None:
    return ActivationMatrixPredictor(train) if train is not None else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.cli", description=__doc__.splitlines()[0])
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
