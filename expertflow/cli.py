"""`expertflow` command line: generate text from a local MoE checkpoint with tiered experts.

Not for: library use (import expertflow.loader / expertflow.engine instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from expert_store.checkpoint import CheckpointError
from expertflow.families import UnsupportedArchitecture
from orchestrator.policies import LIVE_POLICY_NAMES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text; prints text, tokens/s, hit rate, bytes moved, memory saved")
    gen.add_argument("--model", type=Path, help="Hugging Face model directory (default: the embedded default model)")
    gen.add_argument("--prompt", action="append", help="prompt text; repeat for a batch of requests")
    gen.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids; repeatable")
    gen.add_argument(
        "--expert-budget", default="25%", help="device bytes for routed experts: 6GiB, 512MB or 25%% of all"
    )
    gen.add_argument("--host-budget", default="100%", help="host RAM for routed experts; the rest is read from NVMe")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    gen.add_argument("--dtype", choices=sorted(_DTYPES), help="compute dtype (default: the checkpoint's)")
    gen.add_argument("--policy", default="lru", choices=LIVE_POLICY_NAMES, help="cache policy (orchestrator/policies.py)")
    gen.add_argument(
        "--predictor",
        type=Path,
        help="routing-path predictor directory for --policy expertflow (default: the model's, from expertflow prepare)",
    )
    gen.add_argument("--no-online-correction", action="store_true", help="use the predictor's raw forecasts")
    gen.add_argument(
        "--train-traces", nargs="+", type=Path, default=[], help="routing traces of this model (static, activation)"
    )
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    tr = sub.add_parser("trace", help="record routing traces of a checkpoint over text (see traces/format.py)")
    tr.add_argument("--model", type=Path, help="Hugging Face model directory (default: the embedded default model)")
    tr.add_argument("--data", type=Path, action="append", required=True, help=".jsonl, .txt or .npy; repeatable")
    tr.add_argument("--domain", action="append", help="domain name per --data (default: the file's folder name)")
    tr.add_argument("--out", type=Path, required=True, help="trace file to write (.safetensors)")
    tr.add_argument("--max-seq-len", type=int, default=256)
    tr.add_argument("--max-tokens", type=int, help="per --data file")
    tr.add_argument("--batch", type=int, default=16)
    tr.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    tr.add_argument("--dtype", choices=sorted(_DTYPES), help="compute dtype (default: the checkpoint's)")
    tr.add_argument("--expert-budget", default="100%")

    from expertflow import prepare
    from orchestrator import cli as orchestrator_cli
    from predictor import cli as predictor_cli

    prepare.add_subcommand(sub)
    predictor_cli.add_subcommands(sub)
    orchestrator_cli.add_subcommands(sub)
    return parser


def _trace(args: argparse.Namespace) -> dict:
    from expertflow.default_model import default_model_dir
    from expertflow.engine import Engine
    from expertflow.loader import LoadOptions, load
    from expertflow.tokenizer import TextCodec
    from expertflow.trace import read_documents, record, windows

    directory = args.model if args.model is not None else default_model_dir()
    if args.domain and len(args.domain) != len(args.data):
        raise ValueError(f"{len(args.domain)} --domain names for {len(args.data)} --data files")
    if args.max_seq_len < 2:
        raise ValueError("--max-seq-len must be at least 2")
    dtype = _DTYPES[args.dtype] if args.dtype else None
    loaded = load(directory, LoadOptions(device=args.device, dtype=dtype, expert_budget=args.expert_budget))
    try:
        spec = loaded.spec
        eos = spec.eos_token_ids[0] if spec.eos_token_ids else 0
        bos = spec.bos_token_id if spec.bos_token_id is not None else eos
        codec = None if all(p.suffix == ".npy" for p in args.data) else TextCodec(directory)
        sequences: list[list[int]] = []
        domains: list[int] = []
        names: list[str] = []
        for i, path in enumerate(args.data):
            if not path.exists():
                raise FileNotFoundError(f"{path}: no such data file")
            name = args.domain[i] if args.domain else path.parent.name
            if name not in names:
                names.append(name)
            docs = read_documents(path, codec.encode if codec else None, eos)
            seqs = windows(docs, bos, min(args.max_seq_len, spec.max_positions), args.max_tokens)
            sequences += seqs
            domains += [names.index(name)] * len(seqs)
        if not sequences:
            raise ValueError("the data files hold no text to trace")
        source = "expertflow trace " + " ".join(str(p) for p in args.data)
        trace = record(Engine(loaded), sequences, domains, names, source, args.batch)
    finally:
        loaded.close()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    trace.save(args.out)
    return {"out": str(args.out), "sequences": trace.n_sequences, "tokens": len(trace.tokens), "domains": names}


def _policy_inputs(args: argparse.Namespace):
    """What the chosen policy needs, built once the model's expert space is known (checked against it)."""
    from expertflow.loader import policy_inputs

    learned = None
    if args.policy == "expertflow":
        from predictor.learned import LearnedPredictor
        from predictor.online import OnlineConfig

        predictor_dir = args.predictor if args.predictor is not None else _default_predictor(args.model)
        if not (predictor_dir / "config.json").exists():
            raise FileNotFoundError(f"{predictor_dir}: not a predictor directory (no config.json)")
        learned = LearnedPredictor.load(predictor_dir, None if args.no_online_correction else OnlineConfig())
    train = None
    if args.policy in ("static", "activation") and args.train_traces:
        from traces.format import concat, load_trace

        train = concat([load_trace(p) for p in args.train_traces])

    def build(space):
        values = {}
        if learned is not None:
            values["learned"] = learned.sessions()
        if train is not None:
            from predictor.baselines import ActivationMatrixPredictor, layer_frequency

            if (len(train.info.moe_layers), train.info.n_experts) != space.shape:
                raise ValueError(
                    f"--train-traces route {len(train.info.moe_layers)} MoE layers x {train.info.n_experts} experts, "
                    f"the model has {space.n_layers} x {space.n_experts}"
                )
            values["frequency"] = layer_frequency(train)
            values["activation"] = ActivationMatrixPredictor(train).sessions()
        return policy_inputs(space, **values)

    return build


def _default_predictor(model: Path | None) -> Path:
    """The predictor `expertflow prepare` made for the model (predictor/locate.py), or an error naming the
    command that makes one."""
    from expertflow.default_model import default_model_dir
    from predictor.locate import candidate_dirs, find_predictor

    directory = model if model is not None else default_model_dir()
    found = find_predictor(directory)
    if found is None:
        looked = " or ".join(str(d) for d in candidate_dirs(directory))
        flag = f" --model {model}" if model is not None else ""
        raise FileNotFoundError(
            f"no route predictor for {directory} (looked in {looked}); make one with "
            f"`expertflow prepare{flag} --data FILE...`, or pass --predictor DIR"
        )
    return found


def _generate(args: argparse.Namespace) -> dict:
    from expertflow.default_model import default_model_dir
    from expertflow.engine import Engine, SamplingParams
    from expertflow.loader import LoadOptions, load
    from expertflow.tokenizer import TextCodec

    directory = args.model if args.model is not None else default_model_dir()
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    options = LoadOptions(
        device=args.device,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        expert_budget=args.expert_budget,
        host_budget=args.host_budget,
        policy=args.policy,
        policy_inputs=_policy_inputs(args),
        progress=not args.json and sys.stderr.isatty(),
    )
    loaded = load(directory, options)
    try:
        codec = TextCodec(directory) if args.prompt or not args.prompt_ids else None
        prompts: list[str] = []
        prompt_ids: list[list[int]] = []
        if codec is not None:
            prompts = args.prompt or ["The expert said"]
            prompt_ids = [codec.encode(p) for p in prompts]
        for text in args.prompt_ids or []:
            try:
                prompt_ids.append([int(t) for t in text.replace(" ", "").split(",") if t])
            except ValueError:
                raise ValueError(f"--prompt-ids {text!r} is not a comma-separated list of integers") from None
            prompts.append(text)
        result = Engine(loaded).generate(prompt_ids, params)
    finally:
        loaded.close()
    decode = codec.decode if codec is not None else (lambda ids: " " + ",".join(map(str, ids)))
    total = result.stats.total
    return {
        "model": str(directory),
        "family": loaded.spec.family,
        "device": str(loaded.device),
        "policy": args.policy,
        "expert_slots": loaded.cache.n_slots,
        "requests": [
            {
                "prompt": p,
                "token_ids": o.token_ids,
                "text": decode(o.token_ids),
                "finish_reason": o.finish_reason,
            }
            for p, o in zip(prompts, result.outputs)
        ],
        "tokens_per_s": result.tokens_per_s,
        "new_tokens": result.new_tokens,
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "stats": total.to_dict(),
        "per_step": [s.to_dict() for s in result.stats.steps],
        "memory": result.memory.to_dict(),
    }


def _print_text(out: dict) -> None:
    for r in out["requests"]:
        print(f"{r['prompt']}{r['text']}")
    s, m = out["stats"], out["memory"]
    print(
        f"\n[{out['family']} on {out['device']}, policy {out['policy']}, {out['expert_slots']} expert slots] "
        f"{out['new_tokens']} tokens at {out['tokens_per_s']:.1f} tok/s | hit rate {s['hit_rate']:.1%} "
        f"({s['hits']} hits, {s['misses']} misses) | moved {s['bytes_from_host'] / 2**20:.1f} MiB from RAM, "
        f"{s['bytes_from_nvme'] / 2**20:.1f} MiB from NVMe, stall {s['stall_s'] * 1e3:.1f} ms | "
        f"device weights {m['weight_bytes_saved']:.1%} smaller, peak memory {m['peak_saved']:.1%} lower than fully resident",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command in ("train-predictor", "eval-predictor", "import-routes"):
            from predictor import cli as predictor_cli

            predictor_cli.run(args)
            return 0
        if args.command in ("simulate", "schedule"):
            from orchestrator import cli as orchestrator_cli

            return orchestrator_cli.run(args)
        if args.command == "prepare":
            from expertflow import prepare

            return prepare.run(args)
        out = _trace(args) if args.command == "trace" else _generate(args)
    except (CheckpointError, UnsupportedArchitecture, FileNotFoundError, ValueError, KeyError) as e:
        print(f"expertflow: error: {e}", file=sys.stderr)
        return 2
    if args.command == "trace" or args.json:
        print(json.dumps(out))
    else:
        _print_text(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
