"""Benchmark: the ExpertFlow prefetcher's own host time, replayed off the engine, and a record to check plans by.

`record` runs the live engine once (embedded default model, its shipped predictor, one request at a time) with
the prefetcher behind a recorder that keeps every call's input (requests, routes, speculation, the cache's view)
and output (the plan, and the eviction's next-use table). `replay` feeds those same calls to a fresh prefetcher,
times each one and checks that it returns the same plans and next-use tables as recorded, bit for bit: a change to
the policy's code that is meant to make it faster must replay a record made before it without a difference.

    python -m bench.policy_replay record --out /tmp/calls.pkl [--budget 25%] [--per-domain 1] [--new-tokens 32]
    python -m bench.policy_replay replay /tmp/calls.pkl [--repeats 3]

The replay isolates the prefetcher's calls (predictor and planner) from the machine's other work; the live
`plan_ms_per_step` (bench/live_policies.py) adds the cache's views and the gate speculation around them.

Not for: hit rates or step times (bench/live_policies.py), correctness of the plans themselves (tests).
"""

from __future__ import annotations

import argparse
import pickle
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from bench import emit
from bench.live_policies import prompts_from_trace
from expert_store.plan import CacheView, Plan
from expertflow.default_model import default_model_dir
from expertflow.engine import Engine
from expertflow.loader import LoadOptions, load, policy_inputs
from expertflow.requests import SamplingParams
from orchestrator.expertflow import ExpertFlow, ExpertFlowConfig
from orchestrator.policies import CachePolicy, make_policy
from orchestrator.prefetcher import LayerRoutes, Prefetcher, StepRequest
from predictor.learned import LearnedPredictor
from predictor.online import OnlineConfig

PREDICTOR = Path("expertflow/assets/expertflow-coarse-8x2/expertflow-predictor")
TRACES = Path("traces/data/coarse_test.safetensors")


class _Recorder(Prefetcher):
    """The inner prefetcher, its calls kept: ("begin" | "after" | "finish", arguments, plan, next-use table)."""

    name = "recorder"

    def __init__(self, inner: ExpertFlow) -> None:
        self.inner = inner
        self.wants_speculation = inner.wants_speculation
        self.eviction = inner.eviction
        self.calls: list[tuple] = []

    def _use(self) -> np.ndarray | None:
        use = self.inner.eviction.use
        return None if use is None else use.copy()

    def begin_step(self, requests: Sequence[StepRequest], view: CacheView) -> Plan | None:
        plan = self.inner.begin_step(requests, view)
        self.calls.append(("begin", (list(requests), view), plan, self._use()))
        return plan

    def after_layer(self, routed: LayerRoutes, view: CacheView) -> Plan | None:
        copied = LayerRoutes(
            routed.layer,
            {r: np.array(v) for r, v in routed.routes.items()},
            None if routed.speculation is None else {r: np.array(v) for r, v in routed.speculation.items()},
        )
        plan = self.inner.after_layer(routed, view)
        self.calls.append(("after", (copied, view), plan, self._use()))
        return plan

    def finish(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        self.inner.finish(ids)
        self.calls.append(("finish", (ids,), None, None))


def record(out: Path, budget: str, per_domain: int, new_tokens: int) -> None:
    recorders: list[_Recorder] = []

    def factory(space) -> CachePolicy:
        inputs = policy_inputs(space, learned=LearnedPredictor.load(PREDICTOR, OnlineConfig()).sessions())
        policy = make_policy("expertflow", inputs)
        recorders.append(_Recorder(policy.prefetcher))
        return CachePolicy(policy.name, policy.eviction, recorders[-1])

    loaded = load(default_model_dir(), LoadOptions(device="cpu", expert_budget=budget, policy_factory=factory))
    prompts = prompts_from_trace(TRACES, per_domain, 64)
    engine = Engine(loaded)
    params = SamplingParams(max_new_tokens=new_tokens, stop_on_eos=False)
    tokens = [engine.generate([p], params).outputs[0].token_ids for p in prompts]
    loaded.close()
    with open(out, "wb") as f:
        pickle.dump({"budget": budget, "calls": recorders[-1].calls, "tokens": tokens}, f)
    print(f"{len(recorders[-1].calls)} calls -> {out}")


def _actions(plan: Plan | None) -> tuple:
    if plan is None:
        return ()
    return tuple(t.key for t in plan.fetch), plan.cancel, plan.evict


def replay(path: Path, repeats: int) -> dict:
    with open(path, "rb") as f:
        rec = pickle.load(f)
    calls = rec["calls"]
    runs = []
    for _ in range(repeats):
        policy = ExpertFlow(LearnedPredictor.load(PREDICTOR, OnlineConfig()).sessions(), ExpertFlowConfig())
        differ = acts_differ = 0
        decode_s = other_s = decode_cpu = 0.0
        steps = prompts = 0
        decode = False
        for kind, args, plan, use in calls:
            t0, c0 = time.perf_counter(), time.thread_time()
            if kind == "begin":
                got = policy.begin_step(*args)
            elif kind == "after":
                got = policy.after_layer(*args)
            else:
                policy.finish(*args)
                continue
            dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
            if kind == "begin":
                decode = all(len(r.new_tokens) == 1 for r in args[0])
                steps += decode
                prompts += not decode
            if decode:
                decode_s += dt
                decode_cpu += cpu
            else:
                other_s += dt
            got_use = policy.eviction.use
            same_use = (use is None and got_use is None) or (
                use is not None and got_use is not None and np.array_equal(use, got_use)
            )
            if got != plan or not same_use:
                differ += 1
            if _actions(got) != _actions(plan):
                acts_differ += 1
        runs.append(
            {
                "decode_steps": steps,
                "ms_per_decode_step": 1e3 * decode_s / max(steps, 1),
                "cpu_ms_per_decode_step": 1e3 * decode_cpu / max(steps, 1),  # this thread's CPU time: less noisy
                "ms_per_prompt_step": 1e3 * other_s / max(prompts, 1),
                "calls_differ": differ,
                "actions_differ": acts_differ,
            }
        )
    return {
        "record": str(path),
        "budget": rec["budget"],
        "calls": len(calls),
        "runs": runs,
        "ms_per_decode_step_min": min(r["ms_per_decode_step"] for r in runs),
        "cpu_ms_per_decode_step_min": min(r["cpu_ms_per_decode_step"] for r in runs),
        # bit for bit: every plan (probabilities included) and next-use table as recorded
        "plans_identical": all(r["calls_differ"] == 0 for r in runs),
        # the same keys fetched (in order), cancelled and evicted at every call
        "actions_identical": all(r["actions_differ"] == 0 for r in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--budget", default="25%")
    r.add_argument("--per-domain", type=int, default=1)
    r.add_argument("--new-tokens", type=int, default=32)
    p = sub.add_parser("replay")
    p.add_argument("record", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    # The predictor reads a new window through torch. In the engine torch's threads are busy anyway; idle here, on
    # a small shared machine their wake-up and spinning can cost a read 100 ms instead of 2 (measured on 2 cores).
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.cmd == "record":
        record(args.out, args.budget, args.per_domain, args.new_tokens)
    else:
        torch.set_num_threads(args.torch_threads)
        emit(replay(args.record, args.repeats), args.out)


if __name__ == "__main__":
    main()
