"""Benchmark: tokens/s at batch 1, the embedded mode against the same model behind the services.

Three ways, one request at a time, the same prompts, model, expert budget, policy and device:

    embedded   Engine in this process (`expertflow generate`)
    worker     one `expertflow worker` process (its own store and planning) through the gRPC client
    services   `expertflow serve`: expert store, predictor, orchestrator, worker (and the HTTP API) as separate
               processes; the worker maps the store's shared memory and plans through the orchestrator

Greedy decoding with `--new-tokens` per prompt (EOS ignored), after one warm-up request; outputs must match
across the three. `--ways` sets the order, and a way named twice runs twice (the order shows whether the GPU's
own warming up favours a later way). Prints one JSON object (`--out` writes it too):

    python -m bench.services_b1 --device cuda --out bench/results/services_b1_h200.json

Not for: many clients (bench/serving.py) or the store's copy rate alone (bench/store_transport.py).
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench import emit
from bench.live_policies import prompts_from_trace
from bench.serving import _free_port
from expertflow.services.client import InferenceClient
from expertflow.services.common import wait_for_server
from expertflow.services.config import ServicesConfig


def timed(generate: Callable[[list[int]], list[int]], prompts: list[list[int]]) -> dict:
    generate(prompts[0])  # warm-up: kernels, allocator, first plans
    outputs, t0 = [], time.perf_counter()
    for p in prompts:
        outputs.append(generate(p))
    seconds = time.perf_counter() - t0
    tokens = sum(len(o) for o in outputs)
    return {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "outputs": outputs}


def embedded(args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    from expertflow.default_model import default_model_dir, default_predictor
    from expertflow.engine import Engine
    from expertflow.loader import LoadOptions, load, policy_inputs
    from expertflow.requests import SamplingParams
    from predictor.learned import LearnedPredictor
    from predictor.online import OnlineConfig

    directory = args.model or default_model_dir()
    learned = LearnedPredictor.load(default_predictor(args.model), OnlineConfig())
    loaded = load(
        directory,
        LoadOptions(device=args.device, expert_budget=args.expert_budget, policy=args.policy,
                    policy_inputs=lambda space: policy_inputs(space, learned=learned.sessions())),
    )  # fmt: skip
    try:
        engine = Engine(loaded)
        params = SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False)
        return timed(lambda p: list(engine.generate([p], params).outputs[0].token_ids), prompts)
    finally:
        loaded.close()


def behind(command: list[str], address: str, args: argparse.Namespace, prompts: list[list[int]]) -> dict:
    process = subprocess.Popen(command)
    try:
        wait_for_server(address, timeout_s=300)
        with InferenceClient(address, timeout_s=600) as client:
            return timed(
                lambda p: list(client.complete(p, max_new_tokens=args.new_tokens, ignore_eos=True).token_ids),
                prompts,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="default: the embedded model")
    p.add_argument("--traces", type=Path, default=Path("traces/data/coarse_test.safetensors"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--policy", default="expertflow")
    p.add_argument("--expert-budget", default="25%")
    p.add_argument("--per-domain", type=int, default=2, help="prompts per domain of the trace")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--ways", default="embedded,worker,services")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    prompts = prompts_from_trace(args.traces, args.per_domain, 48)

    model = {"device": args.device, "expert_budget": args.expert_budget, "policy": args.policy}
    if args.model:
        model["dir"] = str(args.model)
    names = ("worker", "expert_store", "predictor", "orchestrator", "api")
    config = ServicesConfig.from_dict(
        {
            "model": model,
            "worker": {"listen": f"127.0.0.1:{_free_port()}"},
            **{n: {"listen": f"127.0.0.1:{_free_port()}"} for n in names if n != "worker"},
            "metrics": {n: 0 for n in names},
        }
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expertflow.toml"
        path.write_text(config.to_toml())
        cli = [sys.executable, "-m", "expertflow.cli"]
        for i, way in enumerate(args.ways.split(",")):
            name = way if way not in results else f"{way}_{i}"  # a way named twice: its second run
            if way == "embedded":
                results[name] = embedded(args, prompts)
            elif way == "worker":
                results[name] = behind(cli + ["worker", "--config", str(path)], config.worker.listen, args, prompts)
            elif way == "services":
                results[name] = behind(cli + ["serve", "--config", str(path)], config.worker.listen, args, prompts)
            else:
                raise SystemExit(f"unknown way {way!r}: embedded, worker or services")
    identical = len({str(r.pop("outputs")) for r in results.values()}) == 1
    base = results.get("embedded", next(iter(results.values())))["tokens_per_s"]
    for r in results.values():
        r["vs_embedded"] = r["tokens_per_s"] / base
    import torch

    emit(
        {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "prompts": len(prompts),
            "new_tokens": args.new_tokens,
            "expert_budget": args.expert_budget,
            "policy": args.policy,
            "outputs_identical": identical,
            "ways": results,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
