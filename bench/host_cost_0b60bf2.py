"""The "before" of issue 10: the live ExpertFlow policy of 0b60bf2 (before the orchestration refactor), its host
time per decode step, on the same prompts as bench/live_policies.py.

It runs the OLD code: `git worktree add /tmp/old 0b60bf2`, then, from this checkout,

    python -m bench.host_cost_0b60bf2 --old-tree /tmp/old --device cuda

(its model, predictor and traces default to this checkout's). The old code has no timing of its own, so for the
length of the run this wraps, in this process only, the methods through which the old engine and cache called
into the old policy stack: policy.begin_step / end_step, the route collector's on_route and on_attention_out
(gate speculation), the cache's before_route / after_route (the policy's plans and their queueing); the copies
issued inside them are timed apart and left out (the cache's data movement, as the new code's `plan_s` leaves
them out). The wrappers are removed when the run ends. Prints JSON.

Not for: the current code (bench/live_policies.py reports its `plan_ms_per_step`) or anything the engine imports.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = ("expertflow", "expert_store", "orchestrator", "predictor", "traces", "bench")


class _HostTimer:
    """Time spent inside wrapped calls (outermost only), and inside copies made within them."""

    def __init__(self) -> None:
        self.spent = self.copying = 0.0
        self._depth = 0

    def reset(self) -> None:
        self.spent = self.copying = 0.0

    def call(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1
                if self._depth == 0:
                    self.spent += time.perf_counter() - t0

        return wrapper

    def copy(self, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                if self._depth > 0:
                    self.copying += time.perf_counter() - t0

        return wrapper


@contextlib.contextmanager
def _old_code(tree: Path):
    """Import the old tree's packages in place of this checkout's, for the length of the block."""
    saved_path, saved = list(sys.path), {m: sys.modules.pop(m) for m in list(sys.modules) if m.split(".")[0] in _PACKAGES}
    sys.path[:] = [str(tree)] + [p for p in sys.path if Path(p or ".").resolve() != _ROOT]
    try:
        yield
    finally:
        for m in [m for m in sys.modules if m.split(".")[0] in _PACKAGES]:
            del sys.modules[m]
        sys.modules.update(saved)
        sys.path[:] = saved_path


@contextlib.contextmanager
def _timed(timer: _HostTimer):
    """Wrap the old stack's policy entry points and copies with `timer`; unwrapped afterwards."""
    transfer = importlib.import_module("expert_store.transfer")
    device_cache = importlib.import_module("expert_store.device_cache")
    live_policy = importlib.import_module("orchestrator.live_policy")
    targets = [(cls, "copy", timer.copy) for cls in (transfer.CpuCopier, transfer.CudaCopier)]
    targets += [(live_policy.ExpertFlowPolicy, n, timer.call) for n in ("begin_step", "end_step")]
    targets += [(live_policy._RouteCollector, n, timer.call) for n in ("on_route", "on_attention_out")]
    targets += [(device_cache.ExpertCache, n, timer.call) for n in ("before_route", "after_route")]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in targets]
    for cls, name, wrap in targets:
        setattr(cls, name, wrap(cls.__dict__[name]))
    try:
        yield
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-tree", type=Path, required=True, help="a checkout of 0b60bf2")
    p.add_argument("--model", type=Path, default=_ROOT / "expertflow/assets/expertflow-coarse-8x2")
    p.add_argument("--predictor", type=Path, default=_ROOT / "expertflow/assets/expertflow-coarse-8x2/expertflow-predictor")
    p.add_argument("--traces", type=Path, default=_ROOT / "traces/data/coarse_test.safetensors")
    p.add_argument("--device", default="cuda")
    p.add_argument("--budgets", default="25%,50%")
    p.add_argument("--per-domain", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=48)
    args = p.parse_args()
    timer = _HostTimer()
    with _old_code(args.old_tree), _timed(timer):
        import torch
        from bench.live_policies import prompts_from_trace
        from expertflow.engine import Engine, SamplingParams
        from expertflow.loader import LoadOptions, load
        from orchestrator.live_policy import ExpertFlowPolicy
        from predictor.learned import LearnedPredictor
        from predictor.online import OnlineConfig

        prompts = prompts_from_trace(args.traces, args.per_domain, 64)
        predictor = LearnedPredictor.load(args.predictor, OnlineConfig())
        runs = []
        for budget in args.budgets.split(","):
            for policy in ("lru", "expertflow"):
                factory = (lambda spec: ExpertFlowPolicy(predictor, spec.moe_layers)) if policy == "expertflow" else None
                options = LoadOptions(device=args.device, expert_budget=budget, policy="lru", policy_factory=factory)
                loaded = load(args.model, options)
                engine = Engine(loaded)
                engine.generate(prompts[:1], SamplingParams(max_new_tokens=2, stop_on_eos=False))  # warm-up
                timer.reset()
                steps, step_s, hits, accesses = 0, 0.0, 0, 0
                for prompt in prompts:
                    r = engine.generate([prompt], SamplingParams(max_new_tokens=args.new_tokens, stop_on_eos=False))
                    steps += len(r.step_s) - 1
                    step_s += sum(r.step_s[1:])
                    hits += r.stats.total.hits
                    accesses += r.stats.total.accesses
                loaded.close()
                runs.append(
                    dict(
                        budget=budget,
                        policy=policy,
                        decode_steps=steps,
                        policy_host_ms_per_step=1e3 * (timer.spent - timer.copying) / steps,
                        with_copies_ms_per_step=1e3 * timer.spent / steps,
                        step_ms_mean=1e3 * step_s / steps,
                        hit_rate_as_counted_then=hits / accesses,
                    )
                )
        device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(json.dumps({"code": "0b60bf2", "device": device, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
