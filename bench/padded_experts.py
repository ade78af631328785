"""A copy of a Mixtral-format checkpoint whose experts are zero-padded to a wider FFN: same outputs, bigger experts.

An expert computes w2 @ (silu(w1 @ x) * (w3 @ x)). Extra FFN units with zero rows in w1 and w3 and zero
columns in w2 add silu(0) * 0 = 0 to every output, so the padded model produces exactly the tokens (and
routing) of the original while each expert occupies as many bytes as a real large model's. That lets the
live benchmark replay a trained model's learned routing in the regime where copies dominate (e.g.
Mixtral-8x7B's 336 MiB experts), which the small model's own 0.5 MiB experts never reach.

    python -m bench.padded_experts --model DIR --out DIR --expert-bytes 352321536

Not for: making a model better or different (the padding is exactly zero), other families' layouts.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

_EXPERT = re.compile(r"\.block_sparse_moe\.experts\.\d+\.(w1|w2|w3)\.weight$")
_SHARD_BYTES = 2 << 30


def padded_width(hidden: int, width: int, expert_bytes: int, element_bytes: int) -> int:
    """FFN width whose three matrices take `expert_bytes` (rounded down), never below `width`."""
    target = expert_bytes // (3 * hidden * element_bytes)
    if target < width:
        raise ValueError(f"--expert-bytes {expert_bytes}: below the model's own expert size")
    return target


def pad_checkpoint(model: Path, out: Path, expert_bytes: int) -> Path:
    """Write the padded copy to `out` (skipped if already there for this size) and return it."""
    config = json.loads((model / "config.json").read_text())
    if config.get("model_type") != "mixtral":
        raise ValueError(f"{model}: model_type {config.get('model_type')!r}; padding handles Mixtral checkpoints")
    marker = out / "padded.json"
    if marker.exists() and json.loads(marker.read_text()).get("expert_bytes") == expert_bytes:
        return out
    files = sorted(model.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model}: no safetensors files")
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.safetensors"):  # an earlier copy of another size
        stale.unlink()
    hidden, width = config["hidden_size"], config["intermediate_size"]
    new_width, shards, current, size = None, [], {}, 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if _EXPERT.search(name):
                    if new_width is None:
                        new_width = padded_width(hidden, width, expert_bytes, t.element_size())
                    grown = torch.zeros(
                        (new_width, hidden) if not name.endswith("w2.weight") else (hidden, new_width), dtype=t.dtype
                    )
                    grown[: t.shape[0], : t.shape[1]] = t
                    t = grown
                current[name] = t.contiguous()
                size += t.numel() * t.element_size()
                if size >= _SHARD_BYTES:
                    shards.append(current)
                    current, size = {}, 0
    if new_width is None:
        raise ValueError(f"{model}: no Mixtral expert weights found")
    if current:
        shards.append(current)
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += sum(v.numel() * v.element_size() for v in tensors.values())
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config["intermediate_size"] = new_width
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json"):
        if (model / extra).exists():
            shutil.copy(model / extra, out / extra)
    marker.write_text(json.dumps({"source": str(model), "expert_bytes": expert_bytes, "width": new_width}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--expert-bytes", type=int, required=True)
    args = parser.parse_args()
    print(pad_checkpoint(args.model, args.out, args.expert_bytes))


if __name__ == "__main__":
    main()
