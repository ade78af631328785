"""Command-line entry points of the predictor package, argparse-style so the main `expertflow` CLI can mount them:

    train-predictor  --traces TRACE... --out DIR [--max-steps N] [--seconds N] [--d-model N] [--layers N]
                     [--domains D...]
    eval-predictor   --predictor DIR --traces TRACE... [--train-traces TRACE...] [--domains D...]
                     [--train-domains D...] [--json] [--out-json PATH]
    import-routes    --npz PATH --out DIR [--domain NAME] [--split 0.8,0.1,0.1 | none] [--n-experts N] ...

Stopping: `--max-steps` alone runs every step, `--seconds` alone runs that long, both stop at whichever
comes first, neither means 240 s (train.py); the summary says what stopped training.
train.json records the training traces relative to itself (predictor/locate.py), so `eval-predictor` finds
them from any directory. Progress and training logs go to stderr; stdout carries the result only.

`add_subcommands(subparsers)` adds them to an existing parser; `run(args)` executes one and returns its
result as a dict. Standalone: `python -m predictor.cli <subcommand> ...`.

Not for: the work itself (train.py, evaluate.py, compare.py, routes_npz.py hold it); nothing here is a library.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


from tqdm import tqdm

from predictor.locate import record_path, resolve_recorded
from traces.format import Trace, concat, load_trace

COMMANDS = ("train-predictor", "eval-predictor", "import-routes")


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    tr = subparsers.add_parser("train-predictor", help="train the learned routing predictor on routing traces")
    tr.add_argument("--traces", nargs="+", required=True, type=Path, help="training trace files")
    tr.add_argument("--out", required=True, type=Path, help="directory for model.safetensors + config.json")
    tr.add_argument("--domains", nargs="+", help="train on these domains of the traces only")
    tr.add_argument(
        "--seconds", type=float, help="time cap (default: none with --max-steps, else 240); the first limit stops"
    )
    tr.add_argument("--max-steps", type=int, help="steps to train (default: until the time cap)")
    tr.add_argument("--d-model", type=int, default=256, help="width of the route transformer")
    tr.add_argument("--layers", type=int, default=2, help="transformer blocks")
    tr.add_argument("--heads", type=int, default=4, help="attention heads (d-model must be a multiple)")
    tr.add_argument("--context", type=int, default=256, help="longest window of tokens it reads")
    tr.add_argument("--dropout", type=float, default=0.1, help="dropout while training")
    tr.add_argument("--loss", choices=("bce", "softmax"), default="bce", help="per-expert BCE or per-layer softmax")
    tr.add_argument("--no-token-table", action="store_true", help="no per-token logit table (see model.py)")
    tr.add_argument("--layer-dim", type=int, default=128, help="width of the layer-horizon head (0: none)")
    tr.add_argument(
        "--no-cross-layers", action="store_true", help="no per layer-pair route transitions in the layer head"
    )
    tr.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine over the budget)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the holdout split, batches and initial weights")
    tr.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    tr.add_argument("--device", default="cpu", help="train on this torch device (cpu, cuda)")
    tr.add_argument("--rows", type=int, default=16, help="packed rows of one context per step")
    tr.add_argument("--holdout", type=float, default=0.05, help="share of sequences kept for checkpoint choice")
    tr.add_argument("--quiet", action="store_true", help="no progress bar or training log on stderr")

    ev = subparsers.add_parser("eval-predictor", help="recall@k and calibration of the learned predictor vs peers")
    ev.add_argument("--predictor", required=True, type=Path, help="a train-predictor output directory")
    ev.add_argument("--traces", nargs="+", required=True, type=Path, help="held-out trace files")
    ev.add_argument("--train-traces", nargs="+", type=Path, help="fit the peers on these (default: the predictor's)")
    ev.add_argument("--domains", nargs="+", help="evaluate on these domains of --traces only")
    ev.add_argument("--train-domains", nargs="+", help="fit the peers on these domains only (default: the predictor's)")
    ev.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    ev.add_argument("--out-json", type=Path, help="also write the JSON result here")
    ev.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")

    from predictor.routes_npz import add_import_arguments

    im = subparsers.add_parser(
        "import-routes", help="import any model's routes.npz (the documented npz format) as routing traces"
    )
    add_import_arguments(im)


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
    # smoothing 0: the ETA from the average pace (steps are even; the periodic holdout checks are not)
    bar = tqdm(total=1000, desc="training", file=sys.stderr, disable=args.quiet, bar_format=_STEP_BAR, smoothing=0)
    with bar:

        def on_step(step: int, done: float) -> None:
            bar.set_description_str(f"training (step {step})", refresh=False)
            bar.update(max(0, round(done * 1000) - bar.n))

        def log(line: str) -> None:
            if not args.quiet:
                bar.write(line, file=sys.stderr)

        model, summary = train(trace, model_cfg, train_cfg, log=log, device=args.device, on_step=on_step)
    meta_file = args.out / "train.json"
    meta = {
        **summary,
        "paths": "relative to this file",  # marks the paths below; older files hold them as typed
        "traces": [record_path(p, meta_file) for p in args.traces],
        "domains": args.domains or list(trace.info.domains),
        "train_sequences": trace.n_sequences,
    }
    save_model(model, args.out, meta)
    from predictor.train import stop_note

    note = stop_note(summary)
    print(f"train-predictor: {note}", file=sys.stderr)
    result = {"out": str(args.out), **{k: v for k, v in meta.items() if k != "history"}, "note": note}
    print(json.dumps(result))
    return result


# A bar over the budget (steps or seconds, whichever stops training) in thousandths, hence percent and ETA only.
_STEP_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"


def recorded_train_traces(meta_file: Path) -> list[Path]:
    """The training traces a predictor's train.json records, as paths to open from here. A path that does not
    exist is an error naming it, where it came from, and the flag that overrides it."""
    meta = json.loads(meta_file.read_text())
    relative = meta.get("paths") == "relative to this file"
    paths = [resolve_recorded(p, meta_file) if relative else Path(p) for p in meta.get("traces", [])]
    for path in paths:
        if not path.exists():
            how = "relative to that file" if relative else "as typed when it was trained, relative to that directory"
            raise FileNotFoundError(
                f"{path}: training trace recorded in {meta_file} ({how}) does not exist; "
                "pass --train-traces TRACE... to fit the peers on traces of the same model"
            )
    return paths


def _evaluate(args: argparse.Namespace) -> dict:
    from predictor.compare import compare_with_peers
    from predictor.evaluate import format_comparison
    from predictor.learned import LearnedPredictor

    meta_path = args.predictor / "train.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    train_paths = args.train_traces or (recorded_train_traces(meta_path) if meta_path.exists() else [])
    if not train_paths:
        raise ValueError("--train-traces needed: the predictor directory does not say what it was trained on")
    train_domains = args.train_domains or (meta.get("domains") if not args.train_traces else None)
    train = load_traces(train_paths, train_domains)
    test = load_traces(args.traces, args.domains)
    learned = LearnedPredictor.load(args.predictor)
    results = compare_with_peers(learned, train, test)
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
        from predictor.routes_npz import import_from_args

        counts = import_from_args(args)
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
