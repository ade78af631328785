"""Command-line entry points of the predictor package, argparse-style so the main `expertflow` CLI can mount them:

    train-predictor  --traces TRACE... --out DIR [--seconds N] [--d-model N] [--layers N] [--domains D...]
    eval-predictor   --predictor DIR --traces TRACE... [--train-traces TRACE...] [--domains D...]
                     [--train-domains D...] [--json] [--out-json PATH]
    import-routes    --npz PATH --out DIR

`add_subcommands(subparsers)` adds them to an existing parser; `run(args)` executes one and returns its
result as a dict. Standalone: `python -m predictor.cli <subcommand> ...`.

Not for: the work itself (train.py, evaluate.py, deepseek.py hold it); nothing here is needed as a library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from traces.format import Trace, concat, load_trace

COMMANDS = ("train-predictor", "eval-predictor", "import-routes")


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    tr = subparsers.add_parser("train-predictor", help="train the learned routing predictor on routing traces")
    tr.add_argument("--traces", nargs="+", required=True, type=Path, help="training trace files")
    tr.add_argument("--out", required=True, type=Path, help="directory for model.safetensors + config.json")
    tr.add_argument("--domains", nargs="+", help="train on these domains of the traces only")
    tr.add_argument("--seconds", type=float, default=240.0, help="training time budget")
    tr.add_argument("--max-steps", type=int, default=1_000_000)
    tr.add_argument("--d-model", type=int, default=256)
    tr.add_argument("--layers", type=int, default=2)
    tr.add_argument("--heads", type=int, default=4)
    tr.add_argument("--context", type=int, default=256)
    tr.add_argument("--dropout", type=float, default=0.1)
    tr.add_argument("--loss", choices=("bce", "softmax"), default="bce")
    tr.add_argument("--no-token-table", action="store_true", help="no per-token logit table (see model.py)")
    tr.add_argument("--layer-dim", type=int, default=128, help="width of the layer-horizon head (0: none)")
    tr.add_argument(
        "--no-cross-layers", action="store_true", help="no per layer-pair route transitions in the layer head"
    )
    tr.add_argument("--lr", type=float, default=2e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--device", default="cpu", help="train on this torch device (cpu, cuda)")
    tr.add_argument("--rows", type=int, default=16, help="packed rows of one context per step")
    tr.add_argument("--holdout", type=float, default=0.05, help="share of sequences kept for checkpoint choice")
    tr.add_argument("--quiet", action="store_true")

    ev = subparsers.add_parser("eval-predictor", help="recall@k and calibration of the learned predictor vs peers")
    ev.add_argument("--predictor", required=True, type=Path, help="a train-predictor output directory")
    ev.add_argument("--traces", nargs="+", required=True, type=Path, help="held-out trace files")
    ev.add_argument("--train-traces", nargs="+", type=Path, help="fit the peers on these (default: the predictor's)")
    ev.add_argument("--domains", nargs="+", help="evaluate on these domains of --traces only")
    ev.add_argument("--train-domains", nargs="+", help="fit the peers on these domains only (default: the predictor's)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ev.add_argument("--out-json", type=Path, help="also write the JSON result here")
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    im = subparsers.add_parser("import-routes", help="import DeepSeek-V2-Lite routes.npz as train/validation/test")
    im.add_argument("--npz", required=True, type=Path)
    im.add_argument("--out", required=True, type=Path)


def load_traces(paths: list[Path], domains: list[str] | None = None) -> Trace:
    """The traces concatenated, restricted to `domains` if given."""
    trace = concat([load_trace(p) for p in paths])
    return trace.of_domains(domains) if domains else trace


def _train(args: argparse.Namespace) -> dict:
    from predictor.model import save_model
    from predictor.train import TrainConfig, model_config_for, train

    import torch

    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device}: not a torch device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device on this machine (use --device cpu)")
    if not 0.0 <= args.holdout < 1.0:
        raise ValueError(f"--holdout {args.holdout}: a share of the sequences, 0 <= share < 1")
    trace = load_traces(args.traces, args.domains)
    model_cfg = model_config_for(
        trace,
        d_model=args.d_model,
        n_layers=args.layers,
        n_heads=args.heads,
        context=args.context,
        dropout=args.dropout,
        loss=args.loss,
        token_table=not args.no_token_table,
        layer_dim=args.layer_dim,
        cross_layers=False if args.no_cross_layers else None,  # None: on where they fit (train.py)
    )
    train_cfg = TrainConfig(
        seconds=args.seconds, max_steps=args.max_steps, rows=args.rows, lr=args.lr, seed=args.seed, holdout=args.holdout
    )
    model, summary = train(
        trace, model_cfg, train_cfg, log=(lambda _: None) if args.quiet else print, device=args.device
    )
    meta = {
        **summary,
        "traces": [str(p) for p in args.traces],
        "domains": args.domains or list(trace.info.domains),
        "train_sequences": trace.n_sequences,
    }
    save_model(model, args.out, meta)
    result = {"out": str(args.out), **{k: v for k, v in meta.items() if k != "history"}}
    print(json.dumps(result))
    return result


def _evaluate(args: argparse.Namespace) -> dict:
    from predictor.baselines import ActivationMatrixPredictor, FrequencyPredictor, GateSpeculationPredictor
    from predictor.evaluate import evaluate, format_comparison
    from predictor.learned import LearnedPredictor
    from predictor.online import OnlineConfig

    meta_path = args.predictor / "train.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    train_paths = args.train_traces or [Path(p) for p in meta.get("traces", [])]
    if not train_paths:
        raise ValueError("--train-traces needed: the predictor directory does not say what it was trained on")
    train_domains = args.train_domains or (meta.get("domains") if not args.train_traces else None)
    train = load_traces(train_paths, train_domains)
    test = load_traces(args.traces, args.domains)
    learned = LearnedPredictor.load(args.predictor)
    predictors = [
        (learned, "learned"),
        (LearnedPredictor(learned.model, OnlineConfig()), "learned+online"),
        *([(LearnedPredictor(learned.model, layer_horizon=True), "learned@layer")] if learned.model.layer_head else []),
        (FrequencyPredictor(train), None),
        (GateSpeculationPredictor(train), None),
        (ActivationMatrixPredictor(train), None),
    ]
    results = [evaluate(p, test, label) for p, label in predictors]
    out = {
        "predictor": str(args.predictor),
        "traces": [str(p) for p in args.traces],
        "domains": list(test.info.domains) if not args.domains else args.domains,
        "train_traces": [str(p) for p in train_paths],
        "train_domains": train_domains or list(train.info.domains),
        "test_tokens": len(test.tokens),
        "results": results,
    }
    if args.out_json is not None:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(out, indent=1) + "\n")
    if args.json:
        print(json.dumps(out))
    else:
        title = f"{', '.join(map(str, args.traces))} ({out['test_tokens']} tokens, domains {', '.join(out['domains'])})"
        print(format_comparison(results, title))
    return out


def run(args: argparse.Namespace) -> dict | None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)  # an entry-point choice, never made at import
    if args.command == "train-predictor":
        return _train(args)
    if args.command == "eval-predictor":
        return _evaluate(args)
    if args.command == "import-routes":
        from predictor.deepseek import import_deepseek

        counts = import_deepseek(args.npz, args.out)
        print(json.dumps(counts))
        return counts
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m predictor.cli", description="routing predictor commands")
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
