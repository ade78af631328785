"""Score routing predictors on held-out sequences, per MoE layer, per domain and overall.

    recall@k      |top-k predicted & actual| / k, k = the model's top_k: the share of a token's experts
                  that a cache holding exactly the k predicted experts would have had
    recall@2k     the same with the top 2k predicted (prefetching twice as many); precision@2k, the share
                  of those 2k that were used, is recall@2k / 2 since exactly k experts are used
    ece           expected calibration error of every (token, layer, expert) probability, 10 equal-width
                  bins; reported for 0/1 predictors too (it then measures how wrong their certainty is)

Layer means are plain means over layers (every layer sees the same tokens).

Not for: fitting predictors (baselines.py, train.py) or simulating a cache with them (orchestrator/).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from predictor.base import TracePredictor
from traces.format import Trace

N_BINS = 10


@dataclass
class _Counts:
    """Running sums for one group of sequences; L = MoE layers."""

    n_layers: int
    tokens: int = 0
    hits_k: np.ndarray = field(init=False)  # [L]
    hits_2k: np.ndarray = field(init=False)  # [L]
    bin_n: np.ndarray = field(init=False)  # [L, N_BINS] probabilities that fell in each bin
    bin_p: np.ndarray = field(init=False)  # [L, N_BINS] sum of those probabilities
    bin_y: np.ndarray = field(init=False)  # [L, N_BINS] how many of them were picked

    def __post_init__(self) -> None:
        self.hits_k, self.hits_2k = np.zeros(self.n_layers), np.zeros(self.n_layers)
        self.bin_n, self.bin_p, self.bin_y = (np.zeros((self.n_layers, N_BINS)) for _ in range(3))

    def add(self, other: _Counts) -> None:
        self.tokens += other.tokens
        for name in ("hits_k", "hits_2k", "bin_n", "bin_p", "bin_y"):
            getattr(self, name).__iadd__(getattr(other, name))


def top_hits(probs: np.ndarray, actual: np.ndarray, m: int) -> np.ndarray:
    """[L] summed over tokens: how many actual experts are among the m most probable."""
    top = np.argpartition(-probs, m - 1, axis=-1)[..., :m]  # [T, L, m]
    return (actual[..., :, None] == top[..., None, :]).any(-1).sum(-1).sum(0)


def score(probs: np.ndarray, experts: np.ndarray, n_experts: int) -> _Counts:
    """Counts of one sequence: probs [T, L, E] against the actual experts [T, L, K]."""
    t, n_layers, k = experts.shape
    if probs.shape != (t, n_layers, n_experts):
        raise ValueError(f"predictions have shape {probs.shape}, expected {(t, n_layers, n_experts)}")
    actual = experts.astype(np.int64)
    out = _Counts(n_layers, tokens=t)
    out.hits_k = top_hits(probs, actual, k).astype(np.float64)
    out.hits_2k = top_hits(probs, actual, min(2 * k, n_experts)).astype(np.float64)
    y = np.zeros(probs.shape, np.float64)
    np.put_along_axis(y, actual, 1.0, axis=-1)
    p = np.clip(probs.astype(np.float64), 0.0, 1.0)
    cell = np.minimum((p * N_BINS).astype(np.int64), N_BINS - 1) + N_BINS * np.arange(n_layers)[None, :, None]
    size = n_layers * N_BINS
    out.bin_n = np.bincount(cell.ravel(), minlength=size).reshape(n_layers, N_BINS).astype(np.float64)
    out.bin_p = np.bincount(cell.ravel(), p.ravel(), minlength=size).reshape(n_layers, N_BINS)
    out.bin_y = np.bincount(cell.ravel(), y.ravel(), minlength=size).reshape(n_layers, N_BINS)
    return out


def summarize(c: _Counts, k: int, n_experts: int, moe_layers: tuple[int, ...]) -> dict:
    m = min(2 * k, n_experts)
    recall_k = c.hits_k / max(c.tokens * k, 1)
    recall_2k = c.hits_2k / max(c.tokens * k, 1)
    ece = np.abs(c.bin_p - c.bin_y).sum(1) / np.maximum(c.bin_n.sum(1), 1)
    layers = [
        {
            "layer": int(moe_layers[j]),
            "recall@k": float(recall_k[j]),
            "recall@2k": float(recall_2k[j]),
            "precision@2k": float(c.hits_2k[j] / max(c.tokens * m, 1)),
            "ece": float(ece[j]),
        }
        for j in range(len(moe_layers))
    ]
    mean = {key: float(np.mean([row[key] for row in layers])) for key in layers[0] if key != "layer"}
    return {"tokens": c.tokens, "mean": mean, "layers": layers}


def evaluate(
    predictor: TracePredictor,
    trace: Trace,
    label: str | None = None,
    on_sequence: Callable[[], None] | None = None,
) -> dict:
    """recall@k, recall@2k, precision@2k and ECE of `predictor` on every sequence of `trace`; `on_sequence` is
    called after each sequence is scored (a progress bar), never for a predictor that cannot run on the trace."""
    head = {"name": label or predictor.name, "horizon": predictor.horizon, "k": trace.info.top_k}
    reason = predictor.supports(trace)
    if reason is not None:
        return {**head, "supported": False, "reason": reason}
    n_layers = len(trace.info.moe_layers)
    per_domain = [_Counts(n_layers) for _ in trace.info.domains]
    for s in range(trace.n_sequences):
        probs = predictor.predict(trace, s)
        per_domain[int(trace.seq_domain[s])].add(score(probs, trace.experts[trace.sequence(s)], trace.info.n_experts))
        if on_sequence is not None:
            on_sequence()
    overall = _Counts(n_layers)
    for c in per_domain:
        overall.add(c)
    shape = (trace.info.top_k, trace.info.n_experts, trace.info.moe_layers)
    return {
        **head,
        "supported": True,
        **summarize(overall, *shape),
        "by_domain": {d: summarize(c, *shape) for d, c in zip(trace.info.domains, per_domain) if c.tokens},
    }


def format_comparison(
    results: list[dict], title: str = "", per_layer: tuple[str, ...] = ("recall@k", "recall@2k")
) -> str:
    """Several predictors side by side: per-layer blocks of `per_layer` metrics, means, per-domain recall@k."""
    if not results:
        return title
    ok = [r for r in results if r["supported"]]
    k = results[0]["k"]
    width = max(12, *(len(r["name"]) + 1 for r in results))
    head = f"{'layer':>16}" + "".join(f"{r['name']:>{width}}" for r in results)
    lines = [title] if title else []

    def cells(path: tuple) -> str:
        """Each predictor's value at `path` inside its result, or n/a."""
        out = []
        for r in results:
            value = r
            for step in path if r["supported"] else ():
                value = value[step]
            out.append(f"{value:>{width}.3f}" if r["supported"] else f"{'n/a':>{width}}")
        return "".join(out)

    def named(key: str) -> str:
        return key.replace("2k", str(2 * k)).replace("@k", f"@{k}")

    for key in per_layer:
        lines += [f"{named(key)} per layer", head]
        for j, row in enumerate(ok[0]["layers"] if ok else []):
            lines.append(f"{row['layer']:>16}" + cells(("layers", j, key)))
    lines.append("means over layers")
    for key in ("recall@k", "recall@2k", "ece"):
        lines.append(f"{named(key):>16}" + cells(("mean", key)))
    domains = list(ok[0]["by_domain"]) if ok else []
    if len(domains) > 1:
        lines.append(f"recall@{k} per domain (mean over layers)")
        lines += [f"{d:>16}" + cells(("by_domain", d, "mean", "recall@k")) for d in domains]
    lines += [f"{r['name']}: n/a: {r['reason']}" for r in results if not r["supported"]]
    return "\n".join(lines)
