"""Benchmark: the cache policies side by side in the live engine, on the same prompts, in one process.

Prompts are the first tokens of held-out sequences of a routing trace (the model's own
test text); every policy serves the same batch at each budget. Prints one JSON object
(`--out` also writes it): tokens/s, hit rate, prefetch accuracy, stall, bytes moved,
and whether every policy produced the same tokens.

    python -m bench.live_policies --predictor DIR --traces traces/data/coarse_test.safetensors --device cuda

`--pad-expert-bytes N` serves a copy of the model whose experts are zero-padded to N bytes each
(bench/padded_experts.py: same tokens and routing, copies as costly as a large model's), e.g. 352321536 for
Mixtral-8x7B's 336 MiB experts.

Policies: any name of the registry (orchestrator/policies.py: ondemand, lru, static, speculate, activation,
expertflow; static and activation fit on --train-traces), plus expertflow-nospec (the layer head without the
model's gate speculation), expertflow-raw (no online correction) and expertflow-thread (planning on a worker
thread, orchestrator/planning_thread.py). Each run reports the policy's host time
per decode step (`plan_ms_per_step`: cache views, prefetcher calls and plan execution on the critical path).

Not for: correctness (tests) or trace replay (orchestrator's simulator).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from bench import emit
from bench.padded_experts import pad_checkpoint
from expertflow.default_model import default_model_dir
from expertflow.engine import Engine
from expertflow.requests import SamplingParams
from expertflow.loader import LoadOptions, load
from expert_store.stats import CacheStats
from expertflow.loader import policy_inputs
from orchestrator.expertflow import ExpertFlowConfig
from predictor.baselines import ActivationMatrixPredictor, layer_frequency
from predictor.learned import LearnedPredictor
from predictor.online import OnlineConfig
from traces.format import Trace, concat, load_trace


def prompts_from_trace(path: Path, per_domain: int, length: int) -> list[list[int]]:
    trace = load_trace(path)
    out = []
    for d in range(len(trace.info.domains)):
        seqs = [s for s in np.flatnonzero(trace.seq_domain == d) if len(trace.tokens[trace.sequence(s)]) >= length]
        out += [trace.tokens[trace.sequence(s)][:length].tolist() for s in seqs[:per_domain]]
    return out


def run(
    model: Path,
    device: str,
    budget: str,
    policy: str,
    predictor_dir: Path | None,
    prompts,
    new_tokens: int,
    batch: int = 0,
    train: Trace | None = None,
) -> dict:
    """One policy at one budget over all prompts, `batch` requests at a time (0: all at once)."""

    def inputs(space):
        values = {}
        if policy.startswith("expertflow"):
            online = None if policy == "expertflow-raw" else OnlineConfig()
            values["learned"] = LearnedPredictor.load(predictor_dir, online).sessions()
            values["expertflow"] = ExpertFlowConfig(speculation=policy != "expertflow-nospec")
        if train is not None:
            values["frequency"] = layer_frequency(train)
            values["activation"] = ActivationMatrixPredictor(train).sessions()
        return policy_inputs(space, **values)

    name = "expertflow" if policy.startswith("expertflow") else policy
    planning = "thread" if policy.endswith("-thread") else "inline"
    options = LoadOptions(device=device, expert_budget=budget, policy=name, policy_inputs=inputs, planning=planning)
    loaded = load(model, options)
    engine = Engine(loaded)
    params = SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False)
    engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, stop_on_eos=False))  # warm-up
    size = batch or len(prompts)
    results = [engine.generate(prompts[i : i + size], params) for i in range(0, len(prompts), size)]
    s = CacheStats()
    for r in results:
        s.add(r.stats.total)
    decode_s = sum(r.decode_s for r in results)
    decode_steps = [st for r in results for st in r.stats.steps[1:]]  # the first step of each call is its prompts
    step_ms = [x * 1e3 for r in results for x in r.step_s[1:]]
    out = {
        "budget": budget,
        "policy": policy,
        "batch": size,
        "slots": loaded.cache.n_slots,
        "expert_bytes": loaded.cache.layout.nbytes,
        "tokens_per_s": sum(r.tokens_per_s * r.decode_s for r in results) / decode_s if decode_s else 0.0,
        "decode_s": decode_s,
        "hit_rate": s.hit_rate,
        "late": s.late,
        "misses": s.misses,
        "prefetches": s.prefetches,
        "prefetch_accuracy": s.prefetch_accuracy,
        "prefetch_cancelled": s.prefetch_cancelled,
        "bytes_moved": s.bytes_moved,
        "stall_s": s.stall_s,
        "step_ms_median": float(np.median(step_ms)) if step_ms else 0.0,
        "plan_ms_per_step": 1e3 * sum(st.plan_s for st in decode_steps) / max(len(decode_steps), 1),
        "plan_share_of_step": sum(st.plan_s for st in decode_steps) / max(sum(step_ms) / 1e3, 1e-12),
        "tokens": [o.token_ids for r in results for o in r.outputs],
    }
    loaded.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--predictor", type=Path, help="learned predictor (expertflow policies)")
    parser.add_argument("--train-traces", type=Path, nargs="+", default=[], help="fit static/activation on these")
    parser.add_argument("--traces", type=Path, required=True)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budgets", default="25%,50%")
    parser.add_argument("--policies", default="lru,ondemand,expertflow,expertflow-raw")
    parser.add_argument("--per-domain", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=0, help="requests per generate call (0: all at once)")
    parser.add_argument("--pad-expert-bytes", type=int, default=0, help="serve a zero-padded copy (see above)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/expertflow-padded"), help="for the padded copy")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = args.model or default_model_dir()
    if args.pad_expert_bytes:
        model = pad_checkpoint(model, args.workdir / f"{model.name}-{args.pad_expert_bytes}", args.pad_expert_bytes)
    prompts = prompts_from_trace(args.traces, args.per_domain, args.prompt_len)
    train = concat([load_trace(p) for p in args.train_traces]) if args.train_traces else None
    # The first run in a process pays for warming up (allocator, kernels, clocks): discard one.
    run(model, args.device, args.budgets.split(",")[0], "lru", args.predictor, prompts, 4)
    runs = [
        run(model, args.device, b, p, args.predictor, prompts, args.new_tokens, args.batch, train)
        for b in args.budgets.split(",")
        for p in args.policies.split(",")
    ]
    identical = len({json.dumps(r["tokens"]) for r in runs}) == 1
    for r in runs:
        del r["tokens"]
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "model": str(model.name),
        "requests": len(prompts),
        "new_tokens": args.new_tokens,
        "outputs_identical_across_policies": identical,
        "runs": runs,
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
