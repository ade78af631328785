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
        raise ValueError(f"expert size {expert_bytes} bytes: below the model's own expert size")
    return target


def _shards(model: Path) -> list[Path]:
    """The checkpoint's weight files: those its index lists, else the lone model.safetensors."""
    index = model / "model.safetensors.index.json"
    if index.exists():
        return [model / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (model / "model.safetensors").exists():
        return [model / "model.safetensors"]
    raise FileNotFoundError(f"{model}: neither model.safetensors.index.json nor model.safetensors")


def _source_id(model: Path, shards: list[Path]) -> dict:
    """What the padded copy was made from: the source's path and its files' sizes and change times."""
    files = [model / "config.json"] + shards
    return {"source": str(model.resolve()), "files": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}}


def pad_checkpoint(model: Path, out: Path, expert_bytes: int) -> Path:
    """Write the padded copy to `out` (skipped if already there for this source and size) and return it."""
    config = json.loads((model / "config.json").read_text())
    if config.get("model_type") != "mixtral":
        raise ValueError(f"{model}: model_type {config.get('model_type')!r}; padding handles Mixtral checkpoints")
    if "quantization_config" in config:
        raise ValueError(f"{model}: quantized weights (their scales would need padding too)")
    if out.resolve() == model.resolve():
        raise ValueError(f"{out}: the padded copy must go to another directory than its source")
    marker = out / "padded.json"
    files = _shards(model)
    wanted = {**_source_id(model, files), "expert_bytes": expert_bytes}
    if marker.exists() and {k: v for k, v in json.loads(marker.read_text()).items() if k != "width"} == wanted:
        return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)  # written last: a copy cut short is never taken for a finished one
    for stale in out.glob("*.safetensors"):  # an earlier copy of another size
        stale.unlink()
    hidden, width = config["hidden_size"], config["intermediate_size"]
    new_width, shards, current, size, seen = None, [], {}, 0, set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                if name in seen:
                    raise ValueError(f"{model}: tensor {name} appears in more than one file")
                seen.add(name)
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
    weights = {f.name for f in files} | {"model.safetensors.index.json", "config.json", "padded.json"}
    for extra in model.iterdir():  # tokenizer, generation config, chat template, ...
        if extra.is_file() and extra.name not in weights and extra.suffix not in (".safetensors", ".bin", ".pt"):
            shutil.copy(extra, out / extra.name)
    marker.write_text(json.dumps({**wanted, "width": new_width}))
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
