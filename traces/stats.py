"""Routing statistics of a trace, per MoE layer: how a cache and a predictor would see the routing.

    load balance       coefficient of variation and max/mean of each expert's share of picks
    load entropy       entropy of the experts' shares over log2(E): 1 = perfectly balanced
    top-1 score        mean router score of each token's first pick (routing confidence)
    consecutive overlap  |experts(t) & experts(t-1)| / K within a sequence
    LRU hit rate       per-layer LRU cache of E/4 and E/2 experts, replayed token by token,
                       emptied at each sequence start (a request's own reuse only)
    domain dependence  mutual information between domain and picked expert over H(domain),
                       and the mean Jensen-Shannon divergence of each domain's load from the mix
    speculation recall  |spec(t) & experts(t)| / K, next-layer gate speculation (when traced)

`python -m traces.stats TRACE...` prints them as a table; `--json` as one JSON object.

Not for: predicting anything (the predictor work builds on these numbers, not here).
"""

from __future__ import annotations

import argparse
import json
from collections import OrderedDict

import numpy as np

from traces.format import Trace, concat, load_trace


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    p = np.where(p > 0, p, 1.0)
    return -(np.where(p < 1.0, p * np.log2(p), 0.0)).sum(axis)


def lru_hit_rate(trace: Trace, layer: int, capacity: int) -> float:
    hits = total = 0
    for s in range(trace.n_sequences):
        cache: OrderedDict[int, None] = OrderedDict()
        for row in trace.experts[trace.sequence(s), layer].tolist():
            for e in row:
                if e in cache:
                    hits += 1
            for e in row:  # the token's experts are all needed before any is evicted for it
                cache[e] = None
                cache.move_to_end(e)
            while len(cache) > capacity:
                cache.popitem(last=False)
            total += len(row)
    return hits / total if total else 0.0


def consecutive_overlap(trace: Trace, layer: int) -> float:
    e = trace.experts[:, layer].astype(np.int64)
    starts = np.zeros(len(e), bool)
    starts[trace.seq_offsets[:-1]] = True
    prev, cur = e[:-1][~starts[1:]], e[1:][~starts[1:]]
    if len(cur) == 0:
        return 0.0
    shared = (cur[:, :, None] == prev[:, None, :]).any(-1).sum(-1)
    return float(shared.mean() / e.shape[1])


def layer_stats(trace: Trace, j: int) -> dict[str, float]:
    n_exp, k = trace.info.n_experts, trace.info.top_k
    e = trace.experts[:, j].astype(np.int64)
    counts = np.bincount(e.ravel(), minlength=n_exp).astype(np.float64)
    share = counts / counts.sum()
    out = {
        "layer": int(trace.info.moe_layers[j]),
        "load_cv": float(share.std() / share.mean()),
        "load_max_over_mean": float(share.max() / share.mean()),
        "load_entropy": float(_entropy(share) / np.log2(n_exp)),
        "top1_score": float(trace.scores[:, j].astype(np.float32).max(-1).mean()),
        "consecutive_overlap": consecutive_overlap(trace, j),
        "lru_hit_quarter": lru_hit_rate(trace, j, max(1, n_exp // 4)),
        "lru_hit_half": lru_hit_rate(trace, j, max(1, n_exp // 2)),
    }
    token_domain = np.repeat(trace.seq_domain.astype(np.int64), np.diff(trace.seq_offsets))
    n_dom = len(trace.info.domains)
    if n_dom > 1:
        joint = np.zeros((n_dom, n_exp))
        np.add.at(joint, (np.repeat(token_domain, k), e.ravel()), 1.0)
        joint /= joint.sum()
        p_dom, p_exp = joint.sum(1), joint.sum(0)
        mi = _entropy(p_dom) + _entropy(p_exp) - _entropy(joint.ravel())
        out["domain_mutual_info"] = float(mi / _entropy(p_dom)) if _entropy(p_dom) > 0 else 0.0
        per_dom = joint / np.maximum(p_dom[:, None], 1e-12)
        mix = per_dom.mean(0)
        js = [_entropy((d + mix) / 2) - (_entropy(d) + _entropy(mix)) / 2 for d in per_dom if d.sum() > 0]
        out["domain_js_divergence"] = float(np.mean(js))
    if trace.spec_experts is not None and (trace.spec_experts[:, j] != trace.sentinel).all():
        spec = trace.spec_experts[:, j].astype(np.int64)
        out["spec_recall"] = float((spec[:, :, None] == e[:, None, :]).any(-1).sum(-1).mean() / k)
    return out


def routing_stats(trace: Trace) -> dict:
    layers = [layer_stats(trace, j) for j in range(len(trace.info.moe_layers))]
    keys = [k for k in layers[-1] if k != "layer"]
    mean = {k: float(np.mean([row[k] for row in layers if k in row])) for k in keys}
    return {
        "model": trace.info.model,
        "n_experts": trace.info.n_experts,
        "top_k": trace.info.top_k,
        "tokens": int(len(trace.tokens)),
        "sequences": trace.n_sequences,
        "domains": list(trace.info.domains),
        "layers": layers,
        "mean": mean,
    }


def format_table(stats: dict) -> str:
    layers = stats["layers"]
    keys = [k for k in layers[-1] if k != "layer"]
    lines = [f"{stats['model']}: {stats['tokens']} tokens, {stats['n_experts']} experts, top-{stats['top_k']}"]
    lines.append("layer " + " ".join(f"{k:>20}" for k in keys))
    for row in layers + [{"layer": "mean", **stats["mean"]}]:
        cells = " ".join(f"{row[k]:>20.3f}" if k in row else f"{'-':>20}" for k in keys)
        lines.append(f"{row['layer']!s:>5} {cells}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="routing statistics of traces")
    parser.add_argument("traces", nargs="+")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--by-domain", action="store_true", help="also one block per domain")
    args = parser.parse_args(argv)
    trace = concat([load_trace(p) for p in args.traces])
    stats = routing_stats(trace)
    if args.by_domain:
        stats["by_domain"] = {
            name: routing_stats(trace.select(np.flatnonzero(trace.seq_domain == d)))
            for d, name in enumerate(trace.info.domains)
        }
    if args.json:
        print(json.dumps(stats))
    else:
        print(format_table(stats))


if __name__ == "__main__":
    main()
