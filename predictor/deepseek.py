"""Import DeepSeek-V2-Lite routing (`routes.npz`, see /work/shared/data/README.md) as ExpertFlow traces.

The npz holds, per token, the 6 routed experts of each of the 26 MoE layers as sorted sets: no gate
weights and no hidden states. So the imported traces carry a uniform score of 1/6 (flagged in
`info.extra["scores"] = "absent"`) and no `spec_experts`: next-layer gate speculation cannot be replayed
on them, and predictors that need scores or hidden states must say so rather than approximate.

Prompts are split train / validation / test (about 80 / 10 / 10) by a stable hash of each prompt's token
ids, so a prompt lands in the same split whatever order or subset of the file is imported.

`python -m predictor.deepseek NPZ OUT_DIR` writes OUT_DIR/deepseek_{train,validation,test}.safetensors.

Not for: recording routing (expertflow/trace.py) or keeping the data in the repository (read it in place).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np

from traces.format import Trace, TraceInfo

FAMILY = "deepseek_v2"
MOE_LAYERS = tuple(range(1, 27))  # layer 0 of DeepSeek-V2-Lite is dense
N_EXPERTS = 64
TOP_K = 6
DOMAIN = "puffin"
SPLITS = ("train", "validation", "test")
# hash bucket (of 10) -> split: 8 train buckets, 1 validation, 1 test
_BUCKET_SPLIT = (0, 0, 0, 0, 0, 0, 0, 0, 1, 2)


def split_of(token_ids: np.ndarray) -> str:
    """The split of one prompt: a stable hash of its token ids (not Python's salted hash())."""
    digest = hashlib.blake2b(np.ascontiguousarray(token_ids, dtype=np.int32).tobytes(), digest_size=8).digest()
    return SPLITS[_BUCKET_SPLIT[int.from_bytes(digest, "little") % 10]]


def _check(token_ids: np.ndarray, offsets: np.ndarray, experts: np.ndarray) -> None:
    if experts.shape != (len(token_ids), len(MOE_LAYERS), TOP_K):
        raise ValueError(f"routes.npz: experts has shape {experts.shape}, expected (N, 26, 6)")
    if offsets[0] != 0 or offsets[-1] != len(token_ids) or np.any(np.diff(offsets) <= 0):
        raise ValueError("routes.npz: seq_offsets must rise strictly from 0 to the number of tokens")
    if experts.size and int(experts.max()) >= N_EXPERTS:
        raise ValueError(f"routes.npz: expert id {int(experts.max())} outside 0..{N_EXPERTS - 1}")


def _vocab_size(npz_path: Path) -> int | None:
    vocab = npz_path.with_name("vocab.json")
    if not vocab.exists():
        return None
    return len(json.loads(vocab.read_text()))


def import_deepseek(npz_path: str | Path, out_dir: str | Path) -> dict:
    """Write deepseek_{train,validation,test}.safetensors under out_dir; returns sequences and tokens per split."""
    npz_path, out_dir = Path(npz_path), Path(out_dir)
    with np.load(npz_path) as data:  # plain arrays only: np.load refuses pickles by default
        token_ids = data["token_ids"].astype(np.int32)
        offsets = data["seq_offsets"].astype(np.int64)
        experts = data["experts"].astype(np.uint8)
    _check(token_ids, offsets, experts)
    n_seq = len(offsets) - 1
    split = np.array([SPLITS.index(split_of(token_ids[offsets[s] : offsets[s + 1]])) for s in range(n_seq)])
    vocab_size = _vocab_size(npz_path)
    full = Trace(
        TraceInfo("", FAMILY, MOE_LAYERS, N_EXPERTS, TOP_K, (DOMAIN,)),
        token_ids,
        offsets,
        np.zeros(n_seq, np.int16),
        experts,
        np.full(experts.shape, 1.0 / TOP_K, np.float16),
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict[str, int]] = {}
    for i, name in enumerate(SPLITS):
        part = full.select(np.flatnonzero(split == i))
        extra = {
            "scores": "absent",  # the npz has expert sets only; 1/top_k is a placeholder, not a router score
            "hidden_states": "absent",
            "split": name,
            "split_rule": "blake2b-64 of the prompt's int32 token ids mod 10: 0-7 train, 8 validation, 9 test",
            "vocab_size": vocab_size,
        }
        part.info = TraceInfo(
            "deepseek-ai/DeepSeek-V2-Lite-Chat",
            FAMILY,
            MOE_LAYERS,
            N_EXPERTS,
            TOP_K,
            (DOMAIN,),
            source=f"predictor.deepseek import of {npz_path}",
            extra=extra,
        )
        part.save(out_dir / f"deepseek_{name}.safetensors")
        counts[name] = {"sequences": part.n_sequences, "tokens": len(part.tokens)}
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="import DeepSeek-V2-Lite routes.npz as routing traces")
    parser.add_argument("npz", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    print(json.dumps(import_deepseek(args.npz, args.out_dir)))


if __name__ == "__main__":
    main()
