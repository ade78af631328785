"""Train a small MoE language model on the encoded corpus, evaluate it per domain, save it for serving.

Two presets, both standard Hugging Face architectures trained with their usual
load-balancing loss, saved with `save_pretrained` as bf16 safetensors:

    coarse  Mixtral-style: 8 experts, top-2, 4 MoE layers, hidden 256 (about 21 MB: it ships)
    fine    Qwen3-MoE-style, fine-grained: 64 experts, top-8, 8 MoE layers, hidden 512

    python -m training.train --preset coarse --data ENCDIR --tokenizer TOKDIR --out DIR --seconds 150

Training runs for a wall-clock budget (the learning rate follows a cosine over it), so
one command fits a lease on the lent GPU. Batches mix the domains equally. After
training it reports validation and test loss and perplexity per domain, and checks
that ExpertFlow's logits equal transformers' on the saved checkpoint.

Not for: building the corpus or tokenizer (corpus.py, tokenizer.py), or serving.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(frozen=True)
class Preset:
    architecture: str  # "mixtral" | "qwen3_moe"
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    experts: int
    top_k: int
    expert_ffn: int
    aux_loss_coef: float
    lr: float
    batch: int
    seq_len: int = 256


PRESETS = {
    "coarse": Preset("mixtral", 256, 4, 4, 2, 8, 2, 320, 0.02, 3e-3, 64),
    "fine": Preset("qwen3_moe", 512, 8, 8, 4, 64, 8, 128, 0.01, 2e-3, 64),
}


def hf_config(p: Preset, vocab: int, eos: int, pad: int):
    import transformers as T

    common = dict(
        vocab_size=vocab,
        hidden_size=p.hidden,
        num_hidden_layers=p.layers,
        num_attention_heads=p.heads,
        num_key_value_heads=p.kv_heads,
        num_experts_per_tok=p.top_k,
        max_position_embeddings=1024,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=pad,
        output_router_logits=True,
        router_aux_loss_coef=p.aux_loss_coef,
        tie_word_embeddings=False,
    )
    if p.architecture == "mixtral":
        return T.MixtralConfig(
            **common, num_local_experts=p.experts, intermediate_size=p.expert_ffn, rope_theta=10000.0
        )
    return T.Qwen3MoeConfig(
        **common,
        num_experts=p.experts,
        moe_intermediate_size=p.expert_ffn,
        intermediate_size=4 * p.hidden,
        head_dim=p.hidden // p.heads,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


class Streams:
    """Token streams of one split, one per domain, sampled as random windows."""

    def __init__(self, directory: Path, split: str):
        self.domains = sorted(d.name for d in directory.iterdir() if (d / f"{split}.npy").exists())
        if not self.domains:
            raise FileNotFoundError(f"{directory}: no <domain>/{split}.npy token streams")
        self.streams = [np.load(directory / d / f"{split}.npy", mmap_mode="r") for d in self.domains]

    def batch(self, rng: np.random.Generator, batch: int, seq_len: int) -> torch.Tensor:
        rows = []
        for _ in range(batch):
            s = self.streams[rng.integers(len(self.streams))]
            start = rng.integers(0, len(s) - seq_len - 1)
            rows.append(np.asarray(s[start : start + seq_len + 1], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def windows(self, domain: int, seq_len: int, limit: int) -> torch.Tensor:
        s = self.streams[domain]
        n = min(limit, (len(s) - 1) // seq_len)
        return torch.from_numpy(np.asarray(s[: n * seq_len + 1], dtype=np.int64)).unfold(0, seq_len + 1, seq_len)


@torch.no_grad()
def evaluate(model, streams: Streams, seq_len: int, device: torch.device, windows: int) -> dict[str, dict]:
    model.eval()
    out = {}
    for d, name in enumerate(streams.domains):
        data = streams.windows(d, seq_len, windows)
        total, count = 0.0, 0
        for chunk in data.split(16):
            chunk = chunk.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(chunk[:, :-1], output_router_logits=False).logits
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
            )
            total, count = total + loss.item(), count + chunk[:, 1:].numel()
        out[name] = {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count}
    model.train()
    return out


def train(preset: Preset, data: Path, seconds: float, device: torch.device, seed: int, log_every: int = 50):
    import transformers as T

    meta = json.loads((data / "encoded.json").read_text())
    vocab = int(meta["vocab_size"])
    cfg = hf_config(preset, vocab, eos=0, pad=1)
    model = None
    for implementation in ("grouped_mm", None) if device.type == "cuda" else (None,):
        torch.manual_seed(seed)
        try:
            kwargs = {"experts_implementation": implementation} if implementation else {}
            model = T.AutoModelForCausalLM.from_config(cfg, **kwargs).to(device).train()
            probe = torch.randint(0, vocab, (2, 16), device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                model(probe, output_router_logits=True).logits.float().sum().backward()
            model.zero_grad(set_to_none=True)
            break
        except (ValueError, TypeError, RuntimeError, NotImplementedError) as e:
            print(f"experts implementation {implementation!r} unusable here ({e}); trying the default", flush=True)
    assert model is not None
    opt = torch.optim.AdamW(
        model.parameters(), lr=preset.lr, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda"
    )
    streams = Streams(data, "train")
    rng = np.random.default_rng(seed)
    log, step, tokens, t0 = [], 0, 0, time.perf_counter()
    warmup = 100
    while (elapsed := time.perf_counter() - t0) < seconds:
        frac = elapsed / seconds
        lr = preset.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        batch = streams.batch(rng, preset.batch, preset.seq_len).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch[:, :-1], output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss = lm_loss + preset.aux_loss_coef * out.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens += batch[:, 1:].numel()
        if step % log_every == 0:
            log.append(
                {
                    "step": step,
                    "s": round(elapsed, 1),
                    "lm_loss": lm_loss.item(),
                    "aux_loss": out.aux_loss.item(),
                    "lr": lr,
                }
            )
            print(json.dumps(log[-1]), flush=True)
    return model, cfg, {"steps": step, "tokens": tokens, "seconds": time.perf_counter() - t0, "log": log}


def check_expertflow(directory: Path, streams: Streams) -> dict[str, float]:
    """Max |logit difference| between ExpertFlow and transformers on the saved checkpoint (fp32, CPU)."""
    import transformers as T

    from expertflow.engine import Engine
    from expertflow.loader import LoadOptions, load

    ids = streams.windows(0, 64, 1)[0, :64].tolist()
    ref = T.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = ref(torch.tensor([ids])).logits[0]
    loaded = load(directory, LoadOptions(device="cpu", dtype=torch.float32, expert_budget="25%"))
    ours = Engine(loaded).logits(ids)
    loaded.close()
    return {"max_abs_logit_diff": float((ours - theirs).abs().max()), "logit_scale": float(theirs.abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), required=True)
    parser.add_argument("--data", type=Path, required=True, help="encoded corpus (training.tokenizer encode)")
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=150.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-windows", type=int, default=64, help="per domain and split")
    parser.add_argument("--override", action="append", default=[], help="preset field=value, e.g. batch=8")
    args = parser.parse_args()

    preset = PRESETS[args.preset]
    for item in args.override:
        key, value = item.split("=", 1)
        preset = Preset(**{**asdict(preset), key: type(getattr(preset, key))(value)})
    device = torch.device(args.device)
    model, cfg, run = train(preset, args.data, args.seconds, device, args.seed)
    results = {"preset": args.preset, **asdict(preset), "device": str(device), "run": run}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name()
    results["validation"] = evaluate(model, Streams(args.data, "validation"), preset.seq_len, device, args.eval_windows)
    results["test"] = evaluate(model, Streams(args.data, "test"), preset.seq_len, device, args.eval_windows)
    args.out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16).save_pretrained(str(args.out), max_shard_size="15MB")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (args.tokenizer / name).exists():
            shutil.copy(args.tokenizer / name, args.out / name)
    results["expertflow_check"] = check_expertflow(args.out, Streams(args.data, "validation"))
    (args.out / "training.json").write_text(json.dumps(results, indent=2))
    print(json.dumps({k: results[k] for k in ("validation", "test", "expertflow_check")}, indent=2))


if __name__ == "__main__":
    main()
