"""The "before" of issue 10: the live ExpertFlow policy of 0b60bf2 (before the orchestration refactor), its
host time per decode step, on the same prompts as bench/live_policies.py.

Runs the OLD code: `git worktree add /tmp/old 0b60bf2`, then, from this checkout,
    python -m bench.host_cost_0b60bf2 --old-tree /tmp/old --device cuda
(its model, predictor and traces default to this checkout's). Times, on the engine's thread, every call the
engine and the cache made into the old policy stack: policy.begin_step / end_step, the route collector's
on_route and on_attention_out (speculation), and the cache's before_route / after_route (the policy's plans
and queueing them), less the copies issued inside them (the cache's data movement, not the policy's
decisions). Prints JSON.

Not for: the current code (bench/live_policies.py reports its `plan_ms_per_step`).
"""
import argparse
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_pre = argparse.ArgumentParser(add_help=False)
_pre.add_argument("--old-tree", type=Path, required=True)
_old_tree = _pre.parse_known_args()[0].old_tree
sys.path = [str(_old_tree)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
for _name in [m for m in sys.modules if m.split(".")[0] in ("expertflow", "expert_store", "orchestrator", "predictor", "traces", "bench")]:
    del sys.modules[_name]

import torch  # noqa: E402
from expertflow.engine import Engine, SamplingParams
from expertflow.loader import LoadOptions, load
from expert_store.device_cache import ExpertCache
from orchestrator import live_policy
from orchestrator.live_policy import ExpertFlowPolicy
from predictor.learned import LearnedPredictor
from predictor.online import OnlineConfig
from bench.live_policies import prompts_from_trace

spent = [0.0]
copying = [0.0]  # copies issued inside those calls: the cache's data movement, not the policy's decisions
depth = [0]

def timed(fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        depth[0] += 1
        try:
            return fn(*a, **k)
        finally:
            depth[0] -= 1
            if depth[0] == 0:
                spent[0] += time.perf_counter() - t0
    return wrapper

def copy_timed(fn):
    def wrapper(*a, **k):
        t0 = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            if depth[0] > 0:
                copying[0] += time.perf_counter() - t0
    return wrapper

from expert_store import transfer
for cls in (transfer.CpuCopier, transfer.CudaCopier):
    cls.copy = copy_timed(cls.copy)
for cls, names in ((ExpertFlowPolicy, ("begin_step", "end_step")), (live_policy._RouteCollector, ("on_route", "on_attention_out")),
                   (ExpertCache, ("before_route", "after_route"))):
    for n in names:
        setattr(cls, n, timed(getattr(cls, n)))

p = argparse.ArgumentParser()
p.add_argument("--old-tree", type=Path, required=True, help="a checkout of 0b60bf2")
p.add_argument("--model", type=Path, default=_ROOT / "expertflow/assets/expertflow-coarse-8x2")
p.add_argument("--predictor", type=Path, default=_ROOT / "expertflow/assets/expertflow-coarse-8x2/expertflow-predictor")
p.add_argument("--traces", type=Path, default=_ROOT / "traces/data/coarse_test.safetensors")
p.add_argument("--device", default="cuda")
p.add_argument("--budgets", default="25%,50%")
p.add_argument("--per-domain", type=int, default=2)
p.add_argument("--new-tokens", type=int, default=48)
args = p.parse_args()
prompts = prompts_from_trace(args.traces, args.per_domain, 64)
predictor = LearnedPredictor.load(args.predictor, OnlineConfig())
runs = []
for budget in args.budgets.split(","):
    for policy in ("lru", "expertflow"):
        factory = (lambda spec: ExpertFlowPolicy(predictor, spec.moe_layers)) if policy == "expertflow" else None
        loaded = load(args.model, LoadOptions(device=args.device, expert_budget=budget, policy="lru", policy_factory=factory))
        engine = Engine(loaded)
        engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, stop_on_eos=False))
        spent[0] = copying[0] = 0.0
        steps, step_s, hits, acc = 0, 0.0, 0, 0
        for prompt in prompts:
            r = engine.generate([prompt], SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False))
            steps += len(r.step_s) - 1
            step_s += sum(r.step_s[1:])
            hits += r.stats.total.hits
            acc += r.stats.total.accesses
        loaded.close()
        runs.append(dict(budget=budget, policy=policy, decode_steps=steps, policy_host_ms_per_step=1e3 * (spent[0] - copying[0]) / steps,
                         with_copies_ms_per_step=1e3 * spent[0] / steps,
                         step_ms_mean=1e3 * step_s / steps, hit_rate_as_counted_then=hits / acc))
print(json.dumps({"code": "0b60bf2", "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "runs": runs}, indent=1))
