"""`expertflow` command line: generate text from a local MoE checkpoint with tiered experts.

Not for: library use (import expertflow.loader / expertflow.engine instead).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tomllib
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TextIO

import torch

from expert_store.checkpoint import CheckpointError
from expertflow.families import UnsupportedArchitecture
from orchestrator.policies import LIVE_POLICY_NAMES

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_HELP = "compute dtype (default: the checkpoint's on cuda, float32 on cpu)"
_DEVICES = ["cpu", "cuda"]


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none to show or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        # `is`, not `in (None, False)`: a default of 0 or 0.0 equals False and is worth showing
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    try:
        return metadata.version("expertflow")
    except metadata.PackageNotFoundError:  # run from a checkout that was never pip-installed
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            return tomllib.loads(pyproject.read_text())["project"]["version"]
        except (OSError, tomllib.TOMLDecodeError, KeyError):
            return "unknown"


def _sampling_value(field: str, convert: Callable[[str], int | float]) -> Callable[[str], int | float]:
    """An argparse type that converts text and checks it the way SamplingParams does, before any model loads."""
    from expertflow.requests import RequestError, SamplingParams

    def parse(text: str) -> int | float:
        value = convert(text)  # ValueError: argparse says "invalid float value"
        try:
            SamplingParams(**{field: value})
        except RequestError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    parse.__name__ = convert.__name__
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expertflow", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # the parser class reaches every subcommand, the predictor's and orchestrator's too
    parser_class = functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=parser_class)
    gen = sub.add_parser("generate", help="generate text; prints text, tokens/s, hit rate, bytes moved, memory saved")
    gen.add_argument("--model", type=Path, help="Hugging Face model directory (default: the embedded default model)")
    gen.add_argument(
        "--prompt",
        action="append",
        help="prompt text; repeat for a batch of requests. One prompt's text streams as it is made; "
        "a batch's texts print when all are done",
    )
    gen.add_argument("--prompt-ids", action="append", help="a prompt as comma-separated token ids; repeatable")
    gen.add_argument(
        "--expert-budget", default="25%", help="device bytes for routed experts: 6GiB, 512MB or 25%% of all"
    )
    gen.add_argument("--host-budget", default="100%", help="host RAM for routed experts; the rest is read from NVMe")
    gen.add_argument("--device", default=_DEVICES[torch.cuda.is_available()], choices=_DEVICES, help="compute device")
    gen.add_argument("--dtype", choices=sorted(_DTYPES), help=_DTYPE_HELP)
    gen.add_argument("--policy", default="lru", choices=LIVE_POLICY_NAMES, help="expert cache policy (orchestrator/policies.py)")
    gen.add_argument(
        "--predictor",
        type=Path,
        help="routing-path predictor directory for --policy expertflow (default: the model's, from expertflow prepare)",
    )
    gen.add_argument("--no-online-correction", action="store_true", help="use the predictor's raw forecasts")
    gen.add_argument(
        "--train-traces", nargs="+", type=Path, default=[], help="routing traces of this model (static, activation)"
    )
    gen.add_argument(
        "--planning",
        choices=("inline", "thread"),
        default="inline",
        help="plan prefetches on the engine's thread, or on a worker thread off the critical path",
    )
    gen.add_argument(
        "--max-new-tokens",
        type=_sampling_value("max_new_tokens", int),
        default=32,
        help="tokens to generate per request, at most what the model's context leaves after the prompt",
    )
    gen.add_argument("--temperature", type=_sampling_value("temperature", float), default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=_sampling_value("top_p", float), default=1.0, help="nucleus sampling mass")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    tr = sub.add_parser("trace", help="record routing traces of a checkpoint over text (see traces/format.py)")
    tr.add_argument("--model", type=Path, help="Hugging Face model directory (default: the embedded default model)")
    tr.add_argument("--data", type=Path, action="append", required=True, help=".jsonl, .txt or .npy; repeatable")
    tr.add_argument("--domain", action="append", help="domain name per --data (default: the file's folder name)")
    tr.add_argument("--out", type=Path, required=True, help="trace file to write (.safetensors)")
    tr.add_argument("--max-seq-len", type=int, default=256, help="tokens per traced window")
    tr.add_argument("--max-tokens", type=int, help="per --data file")
    tr.add_argument("--batch", type=int, default=16, help="windows per forward pass")
    tr.add_argument("--device", default=_DEVICES[torch.cuda.is_available()], choices=_DEVICES, help="compute device")
    tr.add_argument("--dtype", choices=sorted(_DTYPES), help=_DTYPE_HELP)
    tr.add_argument("--expert-budget", default="100%", help="device bytes for routed experts")

    from expertflow import prepare
    from expertflow.services import cli as services_cli
    from orchestrator import cli as orchestrator_cli
    from predictor import cli as predictor_cli

    prepare.add_subcommand(sub)
    predictor_cli.add_subcommands(sub)
    orchestrator_cli.add_subcommands(sub)
    services_cli.add_subcommands(sub)
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

        from expertflow.default_model import default_predictor

        predictor_dir = args.predictor if args.predictor is not None else default_predictor(args.model)
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


class _TextStream:
    """Prints one request's text as it is made: the prompt at the first token, then each new piece.

    The whole output is decoded each time and only the new suffix printed, so a character split
    over several tokens prints once it is whole.
    """

    def __init__(self, prompt: str, decode: Callable[[list[int]], str], out: TextIO):
        self._prompt, self._decode, self._out = prompt, decode, out
        self._ids: list[int] = []
        self._shown = ""
        self._started = False

    def __call__(self, sampled: list[tuple[int, int]]) -> None:
        self._ids += [token for _, token in sampled]
        self._show(final=False)

    def _show(self, final: bool) -> None:
        if not self._started:
            self._out.write(self._prompt)
            self._started = True
        text = self._decode(self._ids)
        # an unfinished multi-byte character decodes as U+FFFD until its last byte arrives
        if text.startswith(self._shown) and (final or not text.endswith("\ufffd")):
            if len(text) > len(self._shown):
                self._out.write(text[len(self._shown) :])
            self._shown = text
        elif final:  # a later token changed how earlier ones decode: print the whole text again
            self._out.write(f"\n{self._prompt}{text}")
        self._out.flush()

    def finish(self) -> None:
        """After the last token: the rest of the text and the line's end."""
        self._show(final=True)
        self._out.write("\n")
        self._out.flush()

    def abandon(self) -> None:
        """On an error or Ctrl-C: end a half-printed line so a message starts on its own."""
        if self._started:
            self._out.write("\n")
            self._out.flush()


def _streams(n_requests: int, args: argparse.Namespace) -> bool:
    return n_requests == 1 and not args.json


def _check_utf8(prompts: list[str]) -> None:
    """Text the terminal could not decode reaches argv as lone surrogates, which no tokenizer takes."""
    for text in prompts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            try:
                shown = repr(text.encode("utf-8", "surrogateescape")[:60])  # the bytes as given on the command line
            except UnicodeEncodeError:
                shown = ascii(text[:60])
            raise ValueError(
                f"--prompt {shown} is not UTF-8 text (character {e.start}); "
                "pass UTF-8 text, or token ids with --prompt-ids"
            ) from None


def _generate(args: argparse.Namespace) -> dict:
    from expertflow.default_model import default_model_dir
    from expertflow.engine import Engine
    from expertflow.requests import SamplingParams
    from expertflow.loader import LoadOptions, load
    from expertflow.tokenizer import TextCodec

    _check_utf8(args.prompt or [])
    directory = args.model if args.model is not None else default_model_dir()
    params = SamplingParams(args.max_new_tokens, args.temperature, args.top_p, args.seed)
    options = LoadOptions(
        device=args.device,
        dtype=_DTYPES[args.dtype] if args.dtype else None,
        expert_budget=args.expert_budget,
        host_budget=args.host_budget,
        policy=args.policy,
        policy_inputs=_policy_inputs(args),
        planning=args.planning,
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
        decode = codec.decode if codec is not None else (lambda ids: " " + ",".join(map(str, ids)))
        stream = _TextStream(prompts[0], decode, sys.stdout) if _streams(len(prompt_ids), args) else None
        try:
            result = Engine(loaded).generate(prompt_ids, params, on_tokens=stream)
        except BaseException:
            if stream is not None:
                stream.abandon()
            raise
        if stream is not None:
            stream.finish()
    finally:
        loaded.close()  # on every path, Ctrl-C included: releases the host arena's shared memory
    total = result.stats.total
    return {
        "model": str(directory),
        "family": loaded.spec.family,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
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
        "max_new_tokens": args.max_new_tokens,
        "max_new_tokens_capped_to": result.max_new_tokens_capped_to,  # null unless the context was too short
        "context_tokens": loaded.spec.max_positions,
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "stats": total.to_dict(),
        "per_step": [s.to_dict() for s in result.stats.steps],
        "memory": result.memory.to_dict(),
    }


def _print_text(out: dict, args: argparse.Namespace) -> None:
    if not _streams(len(out["requests"]), args):
        for r in out["requests"]:
            print(f"{r['prompt']}{r['text']}")
    if out["max_new_tokens_capped_to"] is not None:
        print(
            f"expertflow: warning: --max-new-tokens {out['max_new_tokens']} "
            f"capped to {out['max_new_tokens_capped_to']}: "
            f"the longest prompt leaves that much of the model's {out['context_tokens']}-token context",
            file=sys.stderr,
        )
    s, m = out["stats"], out["memory"]
    print(
        f"\n[{out['family']} on {out['device']}, {out['dtype']}, policy {out['policy']}, "
        f"{out['expert_slots']} expert slots] "
        f"{out['new_tokens']} tokens at {out['tokens_per_s']:.1f} tok/s | hit rate {s['hit_rate']:.1%} "
        f"({s['hits']} hits, {s['late']} late, {s['misses']} misses) | moved {s['bytes_from_host'] / 2**20:.1f} MiB from RAM, "
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
        if hasattr(args, "services_command"):
            from expertflow.services import cli as services_cli

            return services_cli.run(args)
        out = _trace(args) if args.command == "trace" else _generate(args)
    except (CheckpointError, UnsupportedArchitecture, FileNotFoundError, ValueError, KeyError) as e:
        print(f"expertflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the commands' finally blocks have released what they held
        print("expertflow: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout's reader left (`| head`) while text streamed
        return _stdout_closed()
    try:
        if args.command == "trace" or args.json:
            print(json.dumps(out))
        else:
            _print_text(out, args)
    except BrokenPipeError:
        return _stdout_closed()
    return 0


def _stdout_closed() -> int:
    # Python flushes stdout again at exit, which would fail the same way and print a traceback
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141  # 128 + SIGPIPE, as a shell reports a process the pipe killed


if __name__ == "__main__":
    sys.exit(main())
