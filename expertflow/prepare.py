"""`expertflow prepare`: a model's route predictor in one command, from the user's own text.

    expertflow prepare --model DIR --data FILE... [--max-steps N | --seconds S]

Stages, each with a progress bar on stderr:

    trace-train, trace-heldout  record the model's routing over the --data documents (.txt, .jsonl or .npy
                                token ids, as `expertflow trace` reads them), split by document: a stable hash
                                of each document's token ids holds out --eval-share of them for evaluation
    train                       train the route predictor on the train trace (on the GPU when there is one)
    evaluate                    score it on the held-out trace against the peers (frequency, gate speculation,
                                activation-matrix matching), recall per layer

The predictor goes where `generate --policy expertflow` looks for it (predictor/locate.py: `<model
dir>/expertflow-predictor/`, or the user's cache for a read-only model directory), with its traces under
`prepare/` and a summary in `prepare.json`: stage timings, what stopped training, recall per layer.

Resuming: every output is written to a temporary name and renamed into place, and `prepare.json` records, per
stage, a key of its inputs (data file hashes and sizes, the model's id, the options that change the result;
for later stages the hashes of the earlier outputs) and the hashes of its outputs. A stage whose key matches
and whose outputs are intact is skipped ("skipped (done)"), so a re-run after an interruption or with only
evaluation options changed resumes where it stopped. `--force` redoes every stage.

Not for: the pieces themselves (expertflow/trace.py records, predictor/train.py trains, predictor/compare.py
scores); use those for anything other than this one workflow.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from predictor.locate import default_predictor_dir, model_id, record_path, resolve_recorded

SUMMARY = "prepare.json"
WORK = "prepare"  # the predictor directory's folder for traces and evaluation
STAGES = ("trace-train", "trace-heldout", "train", "evaluate")
_BAR = "{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]"  # budget in thousandths: % and ETA


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="trace a model over your text, train its route predictor, evaluate it, and put it where "
        "generate --policy expertflow finds it",
        description="Record the model's routing over your documents, train its route predictor on most of them, "
        "score it on the held-out rest against the peers, and write it where generate --policy expertflow finds "
        "it. Progress per stage goes to stderr; running the same command again resumes after the last finished "
        "stage.",
    )
    p.add_argument("--model", type=Path, help="Hugging Face model directory (default: the embedded default model)")
    p.add_argument(
        "--data",
        type=Path,
        nargs="+",
        action="extend",
        required=True,
        help='documents: .txt (separated by blank lines), .jsonl ({"text": ...} per line) or .npy token ids '
        "(separated by the EOS id); one or more files",
    )
    p.add_argument("--domain", nargs="+", action="extend", help="a domain name per --data file (default: file names)")
    p.add_argument("--out", type=Path, help="predictor directory (default: where generate looks for it)")
    p.add_argument(
        "--eval-share", type=float, default=0.1, help="share of the documents held out to evaluate on (default 0.1)"
    )
    p.add_argument("--max-seq-len", type=int, default=256, help="longest traced window of a document, in tokens")
    p.add_argument("--max-tokens", type=int, help="use at most this many tokens of each --data file")
    p.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="record and train on it (cpu, cuda)"
    )
    p.add_argument("--batch", type=int, default=16, help="sequences per recording batch")
    p.add_argument(
        "--expert-budget",
        default="25%",
        help="device memory for experts while recording, as in generate (routing is the same at any budget; "
        "more is faster where it fits)",
    )
    p.add_argument("--max-steps", type=int, help="training steps (default: until the time cap)")
    p.add_argument(
        "--seconds", type=float, help="training time cap (default: none with --max-steps, else 240); the first stops"
    )
    p.add_argument("--d-model", type=int, default=256, help="width of the route transformer")
    p.add_argument("--layers", type=int, default=2, help="transformer blocks of the route transformer")
    p.add_argument("--heads", type=int, default=4, help="attention heads (d-model must be a multiple)")
    p.add_argument("--context", type=int, default=256, help="longest window the predictor reads")
    p.add_argument("--layer-dim", type=int, default=128, help="width of the layer-horizon head (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of training")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--force", action="store_true", help="redo every stage instead of resuming")
    p.add_argument("--json", action="store_true", help="print prepare.json instead of the summary")


@dataclass
class Stage:
    """One stage's record in prepare.json."""

    key: str
    outputs: dict[str, str]  # path relative to prepare.json -> blake2b of its bytes
    seconds: float
    info: dict = field(default_factory=dict)


def file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _key(**parts) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16).hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` then rename over `path`: a reader (or a resumed run) sees the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _readable_like_folder(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _readable_like_folder(path: Path) -> None:
    """Give `path` its folder's read and write bits: temporary files (and safetensors' own writes) are private
    (0600), while a predictor in a model directory is read by whoever serves that model."""
    os.chmod(path, path.parent.stat().st_mode & 0o666)


def _write_json(path: Path, data: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1) + "\n"))


class Workflow:
    """The stages over one predictor directory; `state` mirrors prepare.json and is saved after every stage."""

    def __init__(self, args: argparse.Namespace, model_dir: Path, out: Path) -> None:
        self.args, self.model_dir, self.out = args, model_dir, out
        self.summary_path = out / SUMMARY
        self.state: dict = {}
        if self.summary_path.exists() and not args.force:
            try:
                self.state = json.loads(self.summary_path.read_text())
            except json.JSONDecodeError:  # a summary from a crashed writer is never renamed in; be safe anyway
                self.state = {}
        self.state.setdefault("stages", {})
        self.ran: set[str] = set()  # stages this run did (the others were skipped as done)
        self._loaded = None  # the model, loaded once for both trace stages
        self._documents: tuple[list[list[list[int]]], list[str]] | None = None

    # -- bookkeeping ---------------------------------------------------------------------------------------

    def path(self, name: str) -> Path:
        return self.out / name

    def done(self, stage: str, key: str) -> bool:
        rec = self.state["stages"].get(stage)
        if not rec or rec.get("key") != key:
            return False
        for rel, digest in rec["outputs"].items():
            path = resolve_recorded(rel, self.summary_path)
            if not path.exists() or file_hash(path) != digest:
                return False
        return True

    def record(self, stage: str, key: str, outputs: list[Path], seconds: float, info: dict | None = None) -> None:
        hashes = {record_path(p, self.summary_path): file_hash(p) for p in outputs}
        self.state["stages"][stage] = asdict(Stage(key, hashes, round(seconds, 2), info or {}))
        _write_json(self.summary_path, self.state)

    def run_stage(self, stage: str, key: str, work: Callable[[], tuple[list[Path], dict]]) -> dict:
        if self.done(stage, key):
            print(f"{stage}: skipped (done)", file=sys.stderr)
            return self.state["stages"][stage]["info"]
        t0 = time.time()
        outputs, info = work()
        self.record(stage, key, outputs, time.time() - t0, info)
        self.ran.add(stage)
        return info

    # -- stages --------------------------------------------------------------------------------------------

    def loaded(self):
        if self._loaded is None:
            from expertflow.loader import LoadOptions, load

            options = LoadOptions(device=self.args.device, expert_budget=self.args.expert_budget)
            self._loaded = load(self.model_dir, options)
        return self._loaded

    def close(self) -> None:
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None

    def documents(self, data: list[dict]) -> tuple[list[list[list[int]]], list[str]]:
        """Per --data file, its documents' token ids (capped at --max-tokens); and the domain names."""
        if self._documents is not None:
            return self._documents
        from expertflow.tokenizer import TextCodec
        from expertflow.trace import read_documents

        spec = self.loaded().spec
        eos = spec.eos_token_ids[0] if spec.eos_token_ids else 0
        codec = None if all(d["path"].endswith(".npy") for d in data) else TextCodec(self.model_dir)
        per_file = []
        for d in data:
            path = Path(d["path"])
            try:
                docs = read_documents(path, codec.encode if codec else None, eos)
            except (KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
                what = "a line without a 'text' field" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{path}: cannot read its documents ({what})") from None
            bad = [t for doc in docs for t in doc if not 0 <= t < spec.vocab_size]
            if bad:
                raise ValueError(f"{path}: token id {bad[0]} outside the model's vocabulary of {spec.vocab_size}")
            per_file.append(_cap(docs, self.args.max_tokens))
        names = list(dict.fromkeys(d["domain"] for d in data))
        self._documents = per_file, names
        return self._documents

    def trace(self, part: str, data: list[dict]) -> tuple[list[Path], dict]:
        """Record the routing of the `part` ("train" or "heldout") documents to prepare/{part}.safetensors."""
        from expertflow.engine import Engine
        from expertflow.trace import record, windows

        per_file, names = self.documents(data)
        all_docs = [doc for docs in per_file for doc in docs]
        held = heldout_documents(all_docs, self.args.eval_share)
        spec = self.loaded().spec
        eos = spec.eos_token_ids[0] if spec.eos_token_ids else 0
        bos = spec.bos_token_id if spec.bos_token_id is not None else eos
        max_len = min(self.args.max_seq_len, spec.max_positions)
        sequences: list[list[int]] = []
        domains: list[int] = []
        at = 0
        for d, docs in zip(data, per_file):
            mine = [doc for i, doc in enumerate(docs, at) if (i in held) == (part == "heldout")]
            at += len(docs)
            seqs = windows(mine, bos, max_len, None)
            sequences += seqs
            domains += [names.index(d["domain"])] * len(seqs)
        if not sequences:
            raise ValueError(f"the {part} documents hold no window of 2 tokens or more to trace")
        source = f"expertflow prepare ({part} documents of " + " ".join(d["path"] for d in data) + ")"
        with tqdm(total=len(sequences), desc=f"trace-{part}", unit="seq", file=sys.stderr) as bar:
            trace = record(Engine(self.loaded()), sequences, domains, names, source, self.args.batch, bar.update)
        path = self.path(f"{WORK}/{part}.safetensors")
        _write_atomic(path, lambda tmp: trace.save(tmp))
        return [path], {
            "sequences": trace.n_sequences,
            "tokens": len(trace.tokens),
            "documents": _count(part, all_docs, held),
        }

    def train(self) -> tuple[list[Path], dict]:
        from predictor.model import save_model
        from predictor.train import TrainConfig, model_config_for, stop_note, train
        from traces.format import load_trace

        args = self.args
        trace_path = self.path(f"{WORK}/train.safetensors")
        trace = load_trace(trace_path)
        model_cfg = model_config_for(
            trace, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads, context=args.context,
            layer_dim=args.layer_dim,
        )  # fmt: skip
        train_cfg = TrainConfig(seconds=args.seconds, max_steps=args.max_steps, seed=args.seed)
        # smoothing 0: the ETA from the average pace (steps are even; the periodic holdout checks are not)
        with tqdm(total=1000, desc="train", file=sys.stderr, bar_format=_BAR, smoothing=0) as bar:

            def on_step(step: int, done: float) -> None:
                bar.set_description_str(f"train (step {step})", refresh=False)
                bar.update(max(0, round(done * 1000) - bar.n))

            model, summary = train(
                trace, model_cfg, train_cfg, log=lambda _: None, device=train_device(args.device), on_step=on_step
            )
        note = stop_note(summary)
        meta_file = self.path("train.json")
        meta = {
            **summary,
            "paths": "relative to this file",
            "traces": [record_path(trace_path, meta_file)],
            "domains": list(trace.info.domains),
            "train_sequences": trace.n_sequences,
            "model_id": model_id(self.model_dir),
            "note": note,
        }
        with tempfile.TemporaryDirectory(dir=self.out, prefix=".predictor.") as tmp:
            save_model(model, tmp, meta)
            outputs = []
            for name in ("config.json", "model.safetensors", "train.json"):
                _readable_like_folder(Path(tmp) / name)
                os.replace(Path(tmp) / name, self.path(name))
                outputs.append(self.path(name))
        keep = ("stopped_by", "steps_done", "steps_requested", "seconds_requested", "seconds", "device")
        return outputs, {**{k: summary[k] for k in keep}, "best_holdout_recall": summary["best_holdout_recall"],
                         "note": note}  # fmt: skip

    def evaluate(self) -> tuple[list[Path], dict]:
        from predictor.compare import compare_with_peers
        from predictor.learned import LearnedPredictor
        from traces.format import load_trace

        train_trace = load_trace(self.path(f"{WORK}/train.safetensors"))
        test = load_trace(self.path(f"{WORK}/heldout.safetensors"))
        results = compare_with_peers(LearnedPredictor.load(self.out), train_trace, test, desc="evaluate")
        path = self.path(f"{WORK}/eval.json")
        out = {"test_sequences": test.n_sequences, "test_tokens": len(test.tokens), "results": results}
        _write_json(path, out)
        return [path], recall_table(results, test.n_sequences, len(test.tokens))


def data_inputs(args: argparse.Namespace) -> list[dict]:
    """Each --data file's path, size, hash and domain name (the trace stages' inputs), checked before any work."""
    if args.domain and len(args.domain) != len(args.data):
        raise ValueError(f"{len(args.domain)} --domain names for {len(args.data)} --data files")
    out = []
    for i, path in enumerate(args.data):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such data file")
        if path.suffix not in (".txt", ".jsonl", ".npy"):
            raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .txt, .jsonl or .npy")
        name = args.domain[i] if args.domain else path.stem
        out.append({"path": str(path), "bytes": path.stat().st_size, "blake2b": file_hash(path), "domain": name})
    return out


def _cap(docs: list[list[int]], max_tokens: int | None) -> list[list[int]]:
    """The first documents up to `max_tokens` tokens in all (the last one cut)."""
    if max_tokens is None:
        return docs
    out, left = [], max_tokens
    for doc in docs:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(out[-1])
    return out


def heldout_documents(docs: list[list[int]], share: float) -> set[int]:
    """Indices of the held-out documents: those whose stable hash (blake2b of the int32 ids) falls below `share`
    of its range, so a document stays on its side whatever else is added. With 2 or more documents, at least one
    is held out and at least one is kept for training."""
    if len(docs) < 2:
        raise ValueError(
            f"{len(docs)} document in the data: holding documents out for evaluation needs at least 2 "
            "(documents are separated by blank lines in .txt, one per line in .jsonl, by the EOS id in .npy)"
        )

    def point(doc: list[int]) -> float:
        digest = hashlib.blake2b(bytes(memoryview(_int32(doc))), digest_size=8).digest()
        return int.from_bytes(digest, "little") / 2**64

    points = [point(d) for d in docs]
    held = {i for i, p in enumerate(points) if p < share}
    if not held:
        held = {min(range(len(docs)), key=points.__getitem__)}
    if len(held) == len(docs):
        held.discard(max(range(len(docs)), key=points.__getitem__))
    return held


def _int32(doc: list[int]):
    import numpy as np

    return np.asarray(doc, np.int32)


def _count(part: str, docs: list, held: set[int]) -> int:
    return len(held) if part == "heldout" else len(docs) - len(held)


def train_device(device: str) -> str:
    try:
        d = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a torch device (cpu, cuda, cuda:N)") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device on this machine (use --device cpu)")
    return device


def recall_table(results: list[dict], sequences: int, tokens: int) -> dict:
    """recall@k per layer of the learned predictor's variants and the best peer, from compare_with_peers."""
    from predictor.compare import LEARNED, best_peer

    ok = [r for r in results if r["supported"]]
    peer = best_peer(results)
    shown = [r for r in ok if r["name"] in LEARNED] + ([peer] if peer else [])
    k = results[0]["k"]
    layers = [
        {"layer": row["layer"], **{r["name"]: r["layers"][j]["recall@k"] for r in shown}}
        for j, row in enumerate(shown[0]["layers"])
    ]
    return {
        "k": k,
        "test_sequences": sequences,
        "test_tokens": tokens,
        "best_peer": peer["name"] if peer else None,
        "mean": {r["name"]: r["mean"]["recall@k"] for r in shown},
        "layers": layers,
    }


def _duration(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


def format_summary(state: dict, out: Path, model_arg: Path | None, default_out: bool, ran: set[str]) -> str:
    stages = state["stages"]
    times = ", ".join(
        f"{name} {_duration(stages[name]['seconds'])}{'' if name in ran else ' (earlier run)'}" for name in STAGES
    )
    total = sum(stages[name]["seconds"] for name in STAGES)
    t, r = stages["train"]["info"], stages["evaluate"]["info"]
    lines = [
        f"prepared the route predictor in {_duration(total)} ({times})",
        f"  written to {out}" + (" (generate --policy expertflow finds it there)" if default_out else ""),
        f"  training on {t['device']}: {t['note']}",
        f"  recall@{r['k']} per MoE layer on {r['test_sequences']} held-out sequences ({r['test_tokens']} tokens)"
        + (f"; best peer: {r['best_peer']}" if r["best_peer"] else ""),
    ]
    names = list(r["mean"])
    width = max(10, *(len(n) + 2 for n in names))
    lines.append(f"  {'layer':>6}" + "".join(f"{n:>{width}}" for n in names))
    for row in r["layers"]:
        lines.append(f"  {row['layer']:>6}" + "".join(f"{row[n]:>{width}.3f}" for n in names))
    lines.append(f"  {'mean':>6}" + "".join(f"{r['mean'][n]:>{width}.3f}" for n in names))
    model = f" --model {model_arg}" if model_arg is not None else ""
    predictor = "" if default_out else f" --predictor {out}"
    lines.append(f'next: expertflow generate{model} --policy expertflow{predictor} --prompt "..."')
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) every stage; prints the summary (or prepare.json with --json). The exit code."""
    from expertflow.default_model import default_model_dir

    if not 0 < args.eval_share < 1:
        raise ValueError(f"--eval-share {args.eval_share}: a share of the documents, between 0 and 1")
    if args.max_seq_len < 2:
        raise ValueError("--max-seq-len must be at least 2")
    if args.batch < 1:
        raise ValueError(f"--batch {args.batch}: at least 1 sequence")
    if args.max_tokens is not None and args.max_tokens < 2:
        raise ValueError("--max-tokens must be at least 2")
    from predictor.train import TrainConfig

    TrainConfig(seconds=args.seconds, max_steps=args.max_steps)  # checks the stopping rule before any work
    train_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # an entry-point choice, never made at import
    model_dir = args.model if args.model is not None else default_model_dir()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: not a model directory (no config.json)")
    data = data_inputs(args)
    out = args.out if args.out is not None else default_predictor_dir(model_dir)
    default_out = args.out is None or out.resolve() == default_predictor_dir(model_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    flow = Workflow(args, model_dir, out)
    started = time.time()
    try:
        mid = model_id(model_dir)
        trace_opts = {
            "model": mid, "data": [(d["blake2b"], d["bytes"], d["domain"]) for d in data],
            "eval_share": args.eval_share, "max_seq_len": args.max_seq_len, "max_tokens": args.max_tokens,
            "device": torch.device(args.device).type,  # CPU and GPU compute dtypes can route a few ties apart
        }  # fmt: skip
        for part in ("train", "heldout"):
            stage = f"trace-{part}"
            flow.run_stage(stage, _key(stage=stage, **trace_opts), lambda p=part: flow.trace(p, data))
        flow.close()  # the model's memory is the predictor's from here on
        train_trace = flow.path(f"{WORK}/train.safetensors")
        train_opts = {
            "trace": file_hash(train_trace), "d_model": args.d_model, "layers": args.layers, "heads": args.heads,
            "context": args.context, "layer_dim": args.layer_dim, "max_steps": args.max_steps,
            "seconds": args.seconds, "seed": args.seed,
        }  # fmt: skip
        flow.run_stage("train", _key(stage="train", **train_opts), flow.train)
        eval_opts = {
            "model": file_hash(flow.path("model.safetensors")),
            "train": file_hash(train_trace),
            "heldout": file_hash(flow.path(f"{WORK}/heldout.safetensors")),
        }
        flow.run_stage("evaluate", _key(stage="evaluate", **eval_opts), flow.evaluate)
    except KeyboardInterrupt:
        print("\nprepare: interrupted; run the same command again to resume after the last finished stage",
              file=sys.stderr)  # fmt: skip
        return 130
    finally:
        flow.close()
    flow.state.update(
        model=record_path(model_dir, flow.summary_path),
        model_id=model_id(model_dir),
        data=[{**d, "path": record_path(d["path"], flow.summary_path)} for d in data],
        seconds_this_run=round(time.time() - started, 2),
    )
    _write_json(flow.summary_path, flow.state)
    if args.json:
        print(json.dumps(flow.state))
    else:
        print(format_summary(flow.state, out, args.model, default_out, flow.ran))
    return 0
