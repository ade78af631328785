"""Benchmark: a worker serving many concurrent clients, the token scheduler against FIFO batching.

For each scheduler it starts a real `expertflow worker` process (same model, expert budget and micro-batch size),
lets `--clients` client threads each send `--requests` prompts from a routing trace's held-out text (greedy,
`--new-tokens` each, one request per client at a time), and reads the worker's Prometheus counters after: expert
lookups (each is one distinct expert of one MoE layer in one step), bytes brought to the device, tokens and
steps. Prints one JSON object (`--out` writes it too):

    distinct experts per layer per step, bytes per token, tokens/s, time to first token, hit rate

    python -m bench.serving --clients 32 --max-batch 8 --expert-budget 25% --device cuda --out FILE

A scheduler may be named twice (`--schedulers fifo,fifo,expertflow`): which requests share a step depends on
when the clients' requests arrive, so two runs of one scheduler show what batch composition alone changes in the
replies (`outputs_vs_first_run`; on a GPU, reduced-precision kernels chosen by batch shape can flip a greedy
token; on the CPU in float32 the replies agree).

Not for: correctness (tests/test_worker_service.py) or the simulator's scheduler study (orchestrator/cli.py
schedule).
"""

from __future__ import annotations

import argparse
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from bench import emit
from bench.live_policies import prompts_from_trace
from expertflow.services.client import InferenceClient
from expertflow.services.common import wait_for_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(port: int) -> dict[str, float]:
    """The worker's counters: name{labels} -> value."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(expertflow_\w+)(\{[^}]*\})? ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def run(args: argparse.Namespace, scheduler: str, prompts: list[list[int]]) -> dict:
    address, metrics_port = f"127.0.0.1:{_free_port()}", _free_port()
    command = [
        sys.executable, "-m", "expertflow.cli", "worker", "--listen", address, "--metrics-port", str(metrics_port),
        "--policy", args.policy, "--expert-budget", args.expert_budget, "--device", args.device,
        "--scheduler", scheduler, "--max-batch", str(args.max_batch), "--rows", str(args.clients),
    ]  # fmt: skip
    if args.model:
        command += ["--model", str(args.model)]
    worker = subprocess.Popen(command)
    try:
        wait_for_server(address, timeout_s=300)
        with InferenceClient(address, timeout_s=600) as warm:
            warm.complete(prompts[0], max_new_tokens=4, ignore_eos=True)
        before = _metrics(metrics_port)
        ttft: list[float] = []
        outputs: dict[int, list[int]] = {}
        lock = threading.Lock()

        def client(c: int) -> None:
            with InferenceClient(address, timeout_s=600) as client:
                for r in range(args.requests):
                    i = (c * args.requests + r) % len(prompts)
                    t0 = time.perf_counter()
                    first = None
                    tokens: list[int] = []
                    for piece in client.stream(prompts[i], max_new_tokens=args.new_tokens, ignore_eos=True):
                        if first is None and piece.token_ids:
                            first = time.perf_counter() - t0
                        tokens += piece.token_ids
                    with lock:
                        ttft.append(first or 0.0)
                        outputs[c * args.requests + r] = tokens

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        after = _metrics(metrics_port)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(120)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    lookups = sum(delta(f'expertflow_expert_lookups_total{{outcome="{o}"}}') for o in ("hit", "late", "miss"))
    steps = delta("expertflow_step_requests_count")
    tokens = delta("expertflow_generated_tokens_total")
    moved = delta('expertflow_expert_bytes_total{tier="host"}') + delta('expertflow_expert_bytes_total{tier="nvme"}')
    return {
        "scheduler": scheduler,
        "seconds": seconds,
        "tokens": tokens,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "requests_per_step": delta("expertflow_step_requests_sum") / max(steps, 1),
        "distinct_experts_per_layer_step": lookups / max(steps, 1) / args.moe_layers,
        "bytes_per_token": moved / max(tokens, 1),
        "hit_rate": delta('expertflow_expert_lookups_total{outcome="hit"}') / max(lookups, 1),
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p99_s": sorted(ttft)[int(0.99 * (len(ttft) - 1))],
        "outputs": outputs,
    }


def differences(a: dict[int, list[int]], b: dict[int, list[int]]) -> dict:
    """How two runs' greedy replies to the same requests differ: how many differ, and where they part."""
    parted = [next((i for i, (x, y) in enumerate(zip(a[k], b[k])) if x != y), min(len(a[k]), len(b[k])))
              for k in a if a[k] != b[k]]  # fmt: skip
    return {
        "requests": len(a),
        "differing": len(parted),
        "first_difference_at_median": statistics.median(parted) if parted else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, help="default: the embedded model")
    p.add_argument("--traces", type=Path, default=Path("traces/data/coarse_test.safetensors"))
    p.add_argument("--moe-layers", type=int, default=4, help="the model's MoE layers (for per-layer figures)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--policy", default="expertflow")
    p.add_argument("--expert-budget", default="25%")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=2, help="per client, one after another")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=8, help="decodes per step: the scheduler's micro-batch")
    p.add_argument("--schedulers", default="fifo,expertflow")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    prompts = prompts_from_trace(args.traces, max(1, args.clients * args.requests // 4), 48)
    runs = [run(args, s, prompts) for s in args.schedulers.split(",")]
    outputs = [r.pop("outputs") for r in runs]
    identical = all(o == outputs[0] for o in outputs)
    import torch

    emit(
        {
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "clients": args.clients,
            "requests_per_client": args.requests,
            "new_tokens": args.new_tokens,
            "max_batch": args.max_batch,
            "expert_budget": args.expert_budget,
            "policy": args.policy,
            "outputs_identical_across_schedulers": identical,
            "outputs_vs_first_run": [differences(outputs[0], o) for o in outputs[1:]],
            "runs": runs,
        },
        args.out,
    )


if __name__ == "__main__":
    main()
