"""GPU benchmark: a Mixtral-shaped checkpoint (full-size layers) served at several expert budgets.

Builds a checkpoint with the real Mixtral-8x7B layer shapes (hidden 4096, ffn 14336,
8 experts, top-2, bf16; `--layers` of them) in the Hugging Face on-disk format, then,
in one run: measures the raw host-to-GPU copy limit (pinned, and registered shared
memory), and runs the engine at each budget/policy on the same prompts. Prints one
JSON object; `--out` also writes it to a file.

    python -m bench.mixtral_offload --workdir /tmp/mixtral4 --out results.json

Not for: CPU runs (it needs CUDA) or correctness (the tests are the oracle).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from multiprocessing import shared_memory
from pathlib import Path

import torch

from bench import emit


def build_checkpoint(directory: Path, layers: int, vocab: int = 32000) -> None:
    import transformers as T
    from safetensors.torch import save_file

    if (directory / "config.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    cfg = T.MixtralConfig(
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_local_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=4096,
        dtype="bfloat16",
        eos_token_id=2,
        bos_token_id=1,
    )
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape, std=0.02):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * std).to(torch.bfloat16).cpu()

    weight_map = {}
    shards = []
    dense = {
        "model.embed_tokens.weight": rand(vocab, 4096),
        "lm_head.weight": rand(vocab, 4096),
        "model.norm.weight": torch.ones(4096, dtype=torch.bfloat16),
    }
    shards.append(("model-dense.safetensors", dense))
    for i in range(layers):
        p = f"model.layers.{i}"
        t = {
            f"{p}.input_layernorm.weight": torch.ones(4096, dtype=torch.bfloat16),
            f"{p}.post_attention_layernorm.weight": torch.ones(4096, dtype=torch.bfloat16),
            f"{p}.self_attn.q_proj.weight": rand(4096, 4096),
            f"{p}.self_attn.k_proj.weight": rand(1024, 4096),
            f"{p}.self_attn.v_proj.weight": rand(1024, 4096),
            f"{p}.self_attn.o_proj.weight": rand(4096, 4096),
            f"{p}.block_sparse_moe.gate.weight": rand(8, 4096, std=0.5),
        }
        for e in range(8):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"] = rand(14336, 4096)
            t[f"{q}.w3.weight"] = rand(14336, 4096)
            t[f"{q}.w2.weight"] = rand(4096, 14336)
        shards.append((f"model-layer{i:02d}.safetensors", t))
    for name, tensors in shards:
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
    index = {
        "metadata": {"total_size": sum(v.numel() * 2 for _, s in shards for v in s.values())},
        "weight_map": weight_map,
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg.save_pretrained(str(directory))


def copy_limit(nbytes: int, repeats: int = 20) -> dict[str, float]:
    """Median host-to-GPU GB/s of one expert-sized copy from each kind of host memory."""
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = {}
    shm = shared_memory.SharedMemory(create=True, size=nbytes)
    try:
        registered = torch.frombuffer(shm.buf, dtype=torch.uint8, count=nbytes)
        registered.fill_(1)
        assert int(torch.cuda.cudart().cudaHostRegister(registered.data_ptr(), nbytes, 0)) == 0
        sources = {
            "pinned": torch.ones(nbytes, dtype=torch.uint8, pin_memory=True),
            "shm_registered": registered,
            "pageable": torch.ones(nbytes, dtype=torch.uint8),
        }
        for name, src in sources.items():
            for _ in range(3):  # warm-up: first copies from a buffer pay for driver bookkeeping
                dst.copy_(src, non_blocking=True)
            torch.cuda.synchronize()
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                dst.copy_(src, non_blocking=True)
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            out[name] = nbytes / statistics.median(times) / 1e9
        torch.cuda.cudart().cudaHostUnregister(registered.data_ptr())
        del registered, sources
    finally:
        shm.close()
        shm.unlink()
    return out


def run_engine(directory: Path, budget: str, policy: str, host: str, prompts: list[list[int]], new_tokens: int) -> dict:
    from expertflow.engine import Engine
    from expertflow.requests import SamplingParams
    from expertflow.loader import LoadOptions, load

    t0 = time.perf_counter()
    loaded = load(directory, LoadOptions(device="cuda", expert_budget=budget, host_budget=host, policy=policy))
    load_s = time.perf_counter() - t0
    engine = Engine(loaded)
    params = SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False)
    engine.generate(prompts, SamplingParams(max_new_tokens=2, stop_on_eos=False))  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    result = engine.generate(prompts, params)
    s = result.stats.total
    step_stall_ms = [round(x.stall_s * 1e3, 2) for x in result.stats.steps]
    decode_steps = result.stats.steps[1:]
    decode_bytes = sum(x.bytes_moved for x in decode_steps)
    out = {
        "budget": budget,
        "policy": policy,
        "host_budget": host,
        "expert_slots": loaded.cache.n_slots,
        "host_tier": loaded.store.host_kind,
        "load_s": load_s,
        "tokens_per_s": result.tokens_per_s,
        "decode_tokens_per_s": (result.new_tokens - len(prompts)) / result.decode_s if result.decode_s else 0.0,
        "prefill_s": result.prefill_s,
        "decode_s": result.decode_s,
        "hit_rate": s.hit_rate,
        "hits": s.hits,
        "misses": s.misses,
        "bytes_moved": s.bytes_moved,
        "decode_bytes_per_token": decode_bytes / max(1, result.new_tokens - len(prompts)),
        "stall_s": s.stall_s,
        "copy_s": s.copy_s,
        "load_gbps": s.load_gbps,
        "memory": result.memory.to_dict(),
        "step_stall_ms": step_stall_ms,
        "step_ms": [round(t * 1e3, 2) for t in result.step_s],
        "first_tokens": [o.token_ids[:8] for o in result.outputs],
    }
    loaded.close()
    del engine, loaded
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/expertflow-mixtral-bench"))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", default="25%:ondemand,25%:lru,100%:lru,25%:lru,25%:ondemand,25%:lru:0")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    t0 = time.perf_counter()
    build_checkpoint(args.workdir, args.layers)
    build_s = time.perf_counter() - t0
    expert_bytes = 3 * 4096 * 14336 * 2
    limits = copy_limit(expert_bytes)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 32000, (args.prompt_len,), generator=g).tolist() for _ in range(args.batch)]
    runs = []
    # The first engine run in a process pays for GPU clocks and caches warming up; measure none of it.
    first_budget, first_policy, *_ = args.runs.split(",")[0].split(":")
    run_engine(args.workdir, first_budget, first_policy, "100%", prompts, 4)
    for spec in args.runs.split(","):
        budget, policy, *host = spec.split(":")
        runs.append(run_engine(args.workdir, budget, policy, host[0] if host else "100%", prompts, args.new_tokens))
        keys = ("budget", "policy", "host_budget", "tokens_per_s", "hit_rate", "load_gbps", "stall_s", "decode_s")
        print(json.dumps({k: runs[-1][k] for k in keys}), flush=True)
    same_output = len({json.dumps(r["first_tokens"]) for r in runs}) == 1
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "model": f"Mixtral-8x7B-shaped, {args.layers} layers, bf16, random weights",
        "expert_bytes": expert_bytes,
        "checkpoint_build_s": build_s,
        "copy_limit_gbps": limits,
        "runs": runs,
        "outputs_identical_across_runs": same_output,
        "engine_load_vs_copy_limit": [
            r["load_gbps"] / max(limits["pinned"], limits["shm_registered"])
            for r in runs
            if r["host_budget"] == "100%" and r["load_gbps"]
        ],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
