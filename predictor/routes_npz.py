"""Import any model's routing from the routes.npz format (see /work/shared/data/README.md) as ExpertFlow traces.

The format (numpy .npz, plain arrays, no pickle):

    token_ids    integer [N]         token ids of all sequences, concatenated
    seq_offsets  integer [S+1]       sequence s is token_ids[seq_offsets[s]:seq_offsets[s+1]]
    experts      integer [N, L, K]   the K routed experts of each token at each of the L MoE layers

and, optionally (each overridden by its command-line flag):

    moe_layers   integer [L]         the model's layer number of each MoE layer (default 0..L-1)
    n_experts    integer []          routed experts per layer (default: the largest id in `experts` + 1)
    seq_domain   integer [S]         a domain index per sequence, into `domains`
    domains      str [D]             domain names
    model        str []              the model's name
    vocab_size   integer []          the tokenizer's size (default: len(vocab.json) beside the file, if any)
    expert_bytes integer []          bytes of one expert (gate + up + down), read by `simulate`

L, K and the expert count come from the file, so any model's routes import. A file with no optional arrays
whose experts are [N, 26, 6] with ids below 64 is DeepSeek-V2-Lite's published layout (the only such model):
it imports exactly as it always did, with that model's facts (MoE layers 1..26, 64 experts, domain "puffin",
files deepseek_{train,validation,test}.safetensors); flags still override them.

The npz holds expert sets only: no gate weights and no hidden states. So the traces carry a uniform score of
1/K (flagged in `info.extra["scores"] = "absent"`) and no `spec_experts`: gate speculation cannot be replayed
on them, and predictors that need scores or hidden states say so rather than approximate.

Sequences are split by a stable hash of each one's token ids, so a sequence lands in the same split whatever
order or subset of the file is imported: blake2b-64 of its int32 ids, mod 10^d where d is the most decimals
of the shares, into consecutive bucket ranges (the default 0.8,0.1,0.1 is buckets 0-7 / 8 / 9 of 10).
`--split none` writes one trace.

Not for: recording routing (expertflow/trace.py), the trace format (traces/format.py), or keeping such data in
the repository (read it in place).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from expert_store.budget import parse_size
from traces.format import Trace, TraceInfo, expert_dtype

REQUIRED = ("token_ids", "seq_offsets", "experts")
OPTIONAL = ("moe_layers", "n_experts", "seq_domain", "domains", "model", "vocab_size", "expert_bytes")
DEFAULT_SPLIT = (0.8, 0.1, 0.1)
SPLIT_NAMES = {3: ("train", "validation", "test"), 2: ("train", "test")}
DEFAULT_DOMAIN = "all"  # the one domain of a file without labels


@dataclass(frozen=True)
class Preset:
    """What a known model's file does not say about itself."""

    model: str
    family: str
    moe_layers: tuple[int, ...]
    n_experts: int
    domain: str
    prefix: str


DEEPSEEK_V2_LITE = Preset(
    model="deepseek-ai/DeepSeek-V2-Lite-Chat",
    family="deepseek_v2",
    moe_layers=tuple(range(1, 27)),  # layer 0 of DeepSeek-V2-Lite is dense
    n_experts=64,
    domain="puffin",
    prefix="deepseek",
)


@dataclass(frozen=True)
class ImportOptions:
    """Each None: from the file, else the preset the file is recognised as, else the generic default."""

    domain: str | None = None  # one domain name for every sequence
    split: tuple[float, ...] | None = DEFAULT_SPLIT  # shares of (train, validation, test) or (train, test); None: one
    n_experts: int | None = None
    moe_layers: tuple[int, ...] | None = None
    model: str | None = None
    family: str | None = None
    prefix: str | None = None  # output file names: PREFIX_SPLIT.safetensors, or PREFIX.safetensors unsplit
    expert_bytes: int | None = None


def parse_split(text: str) -> tuple[float, ...] | None:
    """`0.8,0.1,0.1` (train, validation, test), `0.9,0.1` (train, test) or `none` (one trace)."""
    if text.strip().lower() == "none":
        return None
    try:
        shares = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--split {text!r}: give 2 or 3 comma-separated shares (e.g. 0.8,0.1,0.1) or none") from None
    if len(shares) not in SPLIT_NAMES:
        raise ValueError(f"--split {text!r}: give 2 shares (train, test) or 3 (train, validation, test), or none")
    if any(not 0 < s < 1 for s in shares) or abs(sum(shares) - 1) > 1e-6:
        raise ValueError(f"--split {text!r}: the shares must each be between 0 and 1 and add up to 1")
    if any(abs(s * 10**4 - round(s * 10**4)) > 1e-6 for s in shares):
        raise ValueError(f"--split {text!r}: shares with at most 4 decimals")
    return shares


def _buckets(shares: tuple[float, ...]) -> tuple[int, list[int]]:
    """(modulus 10^d, first bucket of each split after the first): d = the most decimals of any share."""
    d = next(d for d in range(5) if all(abs(s * 10**d - round(s * 10**d)) < 1e-6 for s in shares))
    modulus = 10**d
    return modulus, [round(sum(shares[: i + 1]) * modulus) for i in range(len(shares) - 1)]


def split_of(token_ids: np.ndarray, shares: tuple[float, ...] = DEFAULT_SPLIT) -> str:
    """The split of one sequence: a stable hash of its token ids (not Python's salted hash())."""
    digest = hashlib.blake2b(np.ascontiguousarray(token_ids, dtype=np.int32).tobytes(), digest_size=8).digest()
    modulus, starts = _buckets(shares)
    bucket = int.from_bytes(digest, "little") % modulus
    return SPLIT_NAMES[len(shares)][sum(bucket >= s for s in starts)]


def split_rule(shares: tuple[float, ...]) -> str:
    modulus, starts = _buckets(shares)
    bounds = [0, *starts, modulus]

    def span(a: int, b: int) -> str:
        return str(a) if b - a == 1 else f"{a}-{b - 1}"

    parts = [f"{span(bounds[i], bounds[i + 1])} {name}" for i, name in enumerate(SPLIT_NAMES[len(shares)])]
    return f"blake2b-64 of the prompt's int32 token ids mod {modulus}: {', '.join(parts)}"


def _read(npz_path: Path) -> dict[str, np.ndarray]:
    if not npz_path.is_file():
        raise FileNotFoundError(f"{npz_path}: no such routes file")
    if not zipfile.is_zipfile(npz_path):  # np.load would try it as a pickle
        raise ValueError(f"{npz_path}: not a numpy .npz file (save it with numpy.savez)")
    try:
        with np.load(npz_path) as data:  # plain arrays only: np.load refuses pickles by default
            missing = [k for k in REQUIRED if k not in data.files]
            if missing:
                raise ValueError(
                    f"{npz_path}: no {', '.join(repr(k) for k in missing)} array; the format needs "
                    f"{', '.join(REQUIRED)} (see predictor/routes_npz.py)"
                )
            return {k: data[k] for k in (*REQUIRED, *OPTIONAL) if k in data.files}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise ValueError(f"{npz_path}: not a numpy .npz file ({e})") from None
    except ValueError as e:
        if "pickle" in str(e):
            raise ValueError(f"{npz_path}: holds object arrays, which are never unpickled; save plain arrays") from None
        raise


def _int_array(arrays: dict[str, np.ndarray], key: str, ndim: int, where: Path) -> np.ndarray:
    a = arrays[key]
    if a.dtype.kind not in "iu":
        raise ValueError(f"{where}: {key} has dtype {a.dtype}, expected integers")
    if a.ndim != ndim:
        raise ValueError(f"{where}: {key} has shape {a.shape}, expected {ndim} dimension{'s' if ndim != 1 else ''}")
    return a


def _scalar(arrays: dict[str, np.ndarray], key: str, kind: str, where: Path):
    a = arrays.get(key)
    if a is None:
        return None
    if a.ndim != 0 or a.dtype.kind not in kind:
        raise ValueError(
            f"{where}: {key} must be a single {'integer' if 'i' in kind else 'string'}, got {a.dtype} {a.shape}"
        )
    return a.item()


def recognise(arrays: dict[str, np.ndarray]) -> Preset | None:
    """DeepSeek-V2-Lite's published layout: exactly the three arrays, experts [N, 26, 6] with ids below 64."""
    e = arrays["experts"]
    plain = not any(k in arrays for k in OPTIONAL)
    if plain and e.ndim == 3 and e.shape[1:] == (26, 6) and (not e.size or int(e.max()) < 64):
        return DEEPSEEK_V2_LITE
    return None


def read_routes(npz_path: str | Path, options: ImportOptions = ImportOptions()) -> tuple[Trace, Preset | None, dict]:
    """The whole file as one trace, the preset it was recognised as, and notes on what was inferred."""
    npz_path = Path(npz_path)
    arrays = _read(npz_path)
    preset = recognise(arrays)
    tokens = _int_array(arrays, "token_ids", 1, npz_path)
    offsets = _int_array(arrays, "seq_offsets", 1, npz_path).astype(np.int64)
    experts = _int_array(arrays, "experts", 3, npz_path)
    n, n_layers, k = len(tokens), experts.shape[1], experts.shape[2]
    if experts.shape[0] != n:
        raise ValueError(f"{npz_path}: experts has {experts.shape[0]} rows for {n} token_ids; expected [N, L, K]")
    if len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) <= 0):
        raise ValueError(f"{npz_path}: seq_offsets must rise strictly from 0 to the number of tokens ({n})")
    if n_layers < 1 or k < 1:
        raise ValueError(f"{npz_path}: experts has shape {experts.shape}: no MoE layer or no expert per token")
    if tokens.size and int(tokens.min()) < 0:
        raise ValueError(f"{npz_path}: negative token id {int(tokens.min())}")
    notes: dict = {}

    n_experts = options.n_experts or _scalar(arrays, "n_experts", "iu", npz_path) or (preset and preset.n_experts)
    if not n_experts:
        n_experts = int(experts.max()) + 1 if experts.size else k
        notes["n_experts"] = f"{n_experts}, from the largest expert id; pass --n-experts if the model has more"
    if experts.size and (int(experts.min()) < 0 or int(experts.max()) >= n_experts):
        bad = int(experts.min()) if int(experts.min()) < 0 else int(experts.max())
        raise ValueError(f"{npz_path}: expert id {bad} outside 0..{n_experts - 1}")
    if k > n_experts:
        raise ValueError(f"{npz_path}: {k} experts per token but only {n_experts} experts")
    if n_experts > np.iinfo(np.int16).max:
        raise ValueError(f"{npz_path}: {n_experts} experts per layer; traces hold at most {np.iinfo(np.int16).max}")

    layers = options.moe_layers
    if layers is None and "moe_layers" in arrays:
        layers = tuple(int(x) for x in _int_array(arrays, "moe_layers", 1, npz_path))
    if layers is None:
        layers = preset.moe_layers if preset else tuple(range(n_layers))
    if len(layers) != n_layers or len(set(layers)) != n_layers or min(layers) < 0:
        raise ValueError(
            f"{npz_path}: {len(layers)} MoE layer numbers {list(layers)[:8]} for {n_layers} layers of experts"
        )

    n_seq = len(offsets) - 1
    if options.domain is not None:
        domains, seq_domain = (options.domain,), np.zeros(n_seq, np.int16)
    elif "seq_domain" in arrays or "domains" in arrays:
        if "seq_domain" not in arrays or "domains" not in arrays:
            raise ValueError(f"{npz_path}: seq_domain and domains go together; the file has only one of them")
        names = arrays["domains"]
        if names.ndim != 1 or names.dtype.kind != "U" or not len(names):
            raise ValueError(
                f"{npz_path}: domains must be a 1-dimensional array of strings, got {names.dtype} {names.shape}"
            )
        seq_domain = _int_array(arrays, "seq_domain", 1, npz_path)
        if len(seq_domain) != n_seq or (n_seq and (seq_domain.min() < 0 or seq_domain.max() >= len(names))):
            raise ValueError(f"{npz_path}: seq_domain needs one index into domains (0..{len(names) - 1}) per sequence")
        domains, seq_domain = tuple(str(x) for x in names), seq_domain.astype(np.int16)
    else:
        domains, seq_domain = (preset.domain if preset else DEFAULT_DOMAIN,), np.zeros(n_seq, np.int16)

    vocab = npz_path.with_name("vocab.json")
    vocab_size = _scalar(arrays, "vocab_size", "iu", npz_path) or (
        len(json.loads(vocab.read_text())) if vocab.exists() else None
    )
    expert_bytes = options.expert_bytes or _scalar(arrays, "expert_bytes", "iu", npz_path)
    model = options.model or _scalar(arrays, "model", "U", npz_path) or (preset.model if preset else str(npz_path))
    extra = {
        "scores": "absent",  # the npz has expert sets only; 1/top_k is a placeholder, not a router score
        "hidden_states": "absent",
        "vocab_size": vocab_size,
        **({"expert_bytes": int(expert_bytes)} if expert_bytes else {}),
    }
    info = TraceInfo(
        model,
        options.family or (preset.family if preset else ""),
        tuple(layers),
        int(n_experts),
        k,
        domains,
        source=f"predictor.deepseek import of {npz_path}" if preset else f"expertflow import-routes {npz_path}",
        extra=extra,
    )
    trace = Trace(
        info,
        tokens.astype(np.int32),
        offsets,
        seq_domain,
        experts.astype(expert_dtype(int(n_experts))),
        np.full(experts.shape, 1.0 / k, np.float16),
    )
    return trace, preset, notes


def import_routes(npz_path: str | Path, out_dir: str | Path, options: ImportOptions = ImportOptions()) -> dict:
    """Write the split traces (or one) under out_dir. Returns {"outputs": {split: {sequences, tokens, out}}, the
    model's shape, domains, and "notes" on anything inferred}."""
    npz_path, out_dir = Path(npz_path), Path(out_dir)
    full, preset, notes = read_routes(npz_path, options)
    prefix = options.prefix or (preset.prefix if preset else npz_path.stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict = {}
    if options.split is None:
        path = out_dir / f"{prefix}.safetensors"
        full.save(path)
        counts["all"] = {"sequences": full.n_sequences, "tokens": len(full.tokens), "out": str(path)}
    else:
        names = SPLIT_NAMES[len(options.split)]
        split = np.array(
            [names.index(split_of(full.tokens[full.sequence(s)], options.split)) for s in range(full.n_sequences)]
        )
        for i, name in enumerate(names):
            part = full.select(np.flatnonzero(split == i))
            extra = {**full.info.extra, "split": name, "split_rule": split_rule(options.split)}
            order = (
                "scores",
                "hidden_states",
                "split",
                "split_rule",
                "vocab_size",
                "expert_bytes",
            )  # as written before
            part.info = replace(full.info, extra={k: extra[k] for k in order if k in extra})
            path = out_dir / f"{prefix}_{name}.safetensors"
            part.save(path)
            counts[name] = {"sequences": part.n_sequences, "tokens": len(part.tokens), "out": str(path)}
    info = full.info
    return {
        "outputs": counts,
        "model": info.model,
        "moe_layers": list(info.moe_layers),
        "n_experts": info.n_experts,
        "top_k": info.top_k,
        "domains": list(info.domains),
        **({"recognised_as": preset.model} if preset else {}),
        **({"notes": notes} if notes else {}),
    }


def parse_layers(text: str) -> tuple[int, ...]:
    """`1-26` or `0,2,4`."""
    try:
        if "-" in text and "," not in text:
            a, b = (int(x) for x in text.split("-"))
            layers = tuple(range(a, b + 1))
        else:
            layers = tuple(int(x) for x in text.split(","))
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        raise ValueError(f"--moe-layers {text!r}: the model's layer numbers as FIRST-LAST (1-26) or a list (0,2,4)")
    return layers


def add_import_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--npz", required=True, type=Path, help="routes file: token_ids, seq_offsets, experts [N, L, K]"
    )
    parser.add_argument("--out", required=True, type=Path, help="directory for the trace files (created if needed)")
    # Flags are parsed in import_from_args, not by argparse types: the errors then read like every other command's.
    parser.add_argument(
        "--split",
        default="0.8,0.1,0.1",
        help="shares of train,validation,test (or train,test) by a stable hash of each sequence, or none for one "
        "trace (default 0.8,0.1,0.1)",
    )
    parser.add_argument("--domain", help="one domain name for every sequence (default: the file's, else 'all')")
    parser.add_argument("--n-experts", type=int, help="routed experts per layer (default: the file's)")
    parser.add_argument(
        "--moe-layers", help="the model's layer numbers, 1-26 or 0,2,4 (default: the file's, or 0..L-1)"
    )
    parser.add_argument("--model-name", help="the model the routes came from, kept in the traces")
    parser.add_argument("--family", help="the model's architecture family (e.g. mixtral), kept in the traces")
    parser.add_argument("--prefix", help="output names PREFIX_SPLIT.safetensors (default: the npz file's stem)")
    parser.add_argument(
        "--expert-bytes", help="bytes of one expert, e.g. 3*2048*1408*2, kept for `simulate` (default: the file's)"
    )


def import_from_args(args: argparse.Namespace) -> dict:
    if args.n_experts is not None and args.n_experts < 1:
        raise ValueError(f"--n-experts {args.n_experts}: at least 1")
    if args.domain is not None and not args.domain.strip():
        raise ValueError("--domain: give a name")
    options = ImportOptions(
        domain=args.domain,
        split=parse_split(args.split),
        n_experts=args.n_experts,
        moe_layers=None if args.moe_layers is None else parse_layers(args.moe_layers),
        model=args.model_name,
        family=args.family,
        prefix=args.prefix,
        expert_bytes=None if args.expert_bytes is None else parse_size(args.expert_bytes, "--expert-bytes"),
    )
    return import_routes(args.npz, args.out, options)
