"""The token scheduler: which queued decode requests run together, so a micro-batch needs few experts.

Each round one micro-batch of at most B requests decodes one token each, and every MoE layer needs the
union of its requests' experts. `form_batch` seeds the batch with the request that has waited longest
(or, when needed, the oldest few) and then greedily adds the request that brings the fewest expected new experts: with p_r the request's
[L, E] route probabilities and c the probability that the batch already needs a key, request r adds
sum(p_r * (1 - c)) (exactly the count of new experts when p_r is 0/1). Fairness: no request waits
more than `max_wait` rounds: enough of the oldest are forced in each round that all can still make
their bound, B per round (an earliest-deadline-first test), which holds while the queue has at most
B x (max_wait + 1) requests. `fifo_batch` is the baseline: the B requests that waited longest (round robin).

`replay` turns a trace's sequences into requests (a pool of `concurrency` requests, refilled in trace
order as they finish) and reports distinct experts and bytes per round for both.

Not for: which experts stay cached (policies, planner) or the engine's batching mechanics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from traces.format import Trace


@dataclass(frozen=True)
class Request:
    id: int
    waited: int  # rounds since it last ran (or arrived)
    probs: np.ndarray  # [L, E] P(its next token routes to each expert); 0/1 for a set of expected experts


@dataclass(frozen=True)
class SchedulerConfig:
    batch: int = 8  # B: requests per micro-batch
    max_wait: int = 4  # R: rounds a request may wait before it is forced in


def fifo_batch(queue: Sequence[Request], config: SchedulerConfig) -> list[int]:
    """The ids of the B requests that waited longest (ties: queue order)."""
    order = sorted(range(len(queue)), key=lambda i: -queue[i].waited)
    return [queue[i].id for i in order[: config.batch]]


def form_batch(queue: Sequence[Request], config: SchedulerConfig) -> list[int]:
    """Ids of the micro-batch: aged requests first, then greedily the fewest expected new experts."""
    if not queue:
        return []
    order = sorted(range(len(queue)), key=lambda i: -queue[i].waited)  # oldest first, stable
    chosen = order[: max(1, _forced(queue, order, config))]
    probs = np.stack([np.clip(r.probs, 0.0, 1.0).ravel() for r in queue])  # [N, L*E]
    covered = 1.0 - np.prod(1.0 - probs[chosen], axis=0)  # [L*E] P(the batch needs the key)
    left = [i for i in order if i not in chosen]
    while len(chosen) < config.batch and left:
        cost = probs[left] @ (1.0 - covered)  # expected new experts per candidate
        best = left[int(np.argmin(cost))]  # argmin takes the first: the oldest among equals
        chosen.append(best)
        left.remove(best)
        covered = 1.0 - (1.0 - covered) * (1.0 - probs[best])
    return [queue[i].id for i in chosen]


def _forced(queue: Sequence[Request], order: list[int], config: SchedulerConfig) -> int:
    """How many of the oldest requests must run now so that every request can still run within its wait
    bound, B per round (earliest deadline first): the request i-th by age is due within d_i = max_wait -
    waited more rounds, so at most B * d_i of the i + 1 oldest can wait past this round."""
    need = 0
    for rank, i in enumerate(order):
        need = max(need, rank + 1 - config.batch * max(config.max_wait - queue[i].waited, 0))
    return min(need, config.batch)


@dataclass(frozen=True)
class ScheduleReport:
    scheduler: str
    rounds: int
    tokens: int
    mean_batch: float  # requests per micro-batch
    mean_distinct: float  # distinct (layer, expert) keys per micro-batch, summed over layers
    bytes_per_round: float
    bytes_per_token: float
    max_wait: int  # longest any request waited between two of its tokens


def replay(
    trace: Trace,
    choose: Callable[[Sequence[Request], SchedulerConfig], list[int]],
    config: SchedulerConfig,
    predictions: Callable[[int], np.ndarray] | None = None,
    concurrency: int = 32,
    expert_bytes: int = 1,
    name: str = "",
) -> ScheduleReport:
    """Decode every sequence of `trace` as a request; `predictions(s)` gives [T, L, E] per sequence (None:
    the true routes, an upper bound for any predictor). Each round loads the union of its batch's experts."""
    n_exp = trace.info.n_experts
    if predictions is None:
        predictions = lambda s: _multi_hot(trace.experts[trace.sequence(s)], n_exp)  # noqa: E731
    pending = list(range(trace.n_sequences))[::-1]  # popped from the end: trace order
    pool: dict[int, tuple[int, int, np.ndarray]] = {}  # seq -> (next token, waited, [T, L, E] predictions)
    rounds = tokens = distinct = batch_sum = worst = 0
    while pending or pool:
        while pending and len(pool) < concurrency:
            s = pending.pop()
            pool[s] = (0, 0, predictions(s))
        queue = [Request(s, waited, pred[t]) for s, (t, waited, pred) in pool.items()]
        batch = choose(queue, config)
        union = np.zeros((len(trace.info.moe_layers), n_exp), bool)
        for s in batch:
            t, waited, pred = pool[s]
            worst = max(worst, waited)
            union[np.arange(union.shape[0])[:, None], trace.experts[trace.seq_offsets[s] + t]] = True
            if t + 1 == len(pred):
                del pool[s]
            else:
                pool[s] = (t + 1, -1, pred)  # -1: the increment below makes it 0
        for s, (t, waited, pred) in pool.items():
            pool[s] = (t, waited + 1, pred)
        rounds, tokens, batch_sum = rounds + 1, tokens + len(batch), batch_sum + len(batch)
        distinct += int(union.sum())
    return ScheduleReport(
        scheduler=name or getattr(choose, "__name__", "scheduler"),
        rounds=rounds,
        tokens=tokens,
        mean_batch=batch_sum / max(rounds, 1),
        mean_distinct=distinct / max(rounds, 1),
        bytes_per_round=distinct * expert_bytes / max(rounds, 1),
        bytes_per_token=distinct * expert_bytes / max(tokens, 1),
        max_wait=worst,
    )


def _multi_hot(experts: np.ndarray, n_experts: int) -> np.ndarray:
    """[T, L, K] expert ids -> [T, L, E] 0/1."""
    out = np.zeros(experts.shape[:-1] + (n_experts,), np.float32)
    np.put_along_axis(out, experts.astype(np.int64), 1.0, axis=-1)
    return out


def compare_schedulers(
    trace: Trace,
    config: SchedulerConfig,
    predicted: dict[str, Callable[[int], np.ndarray]],
    concurrency: int = 32,
    expert_bytes: int = 1,
) -> list[ScheduleReport]:
    """FIFO, the scheduler on each named predictor's routes, and on the true routes (the upper bound)."""
    runs = [("fifo", fifo_batch, None)]
    runs += [(f"overlap ({name})", form_batch, fn) for name, fn in predicted.items()]
    runs.append(("overlap (true routes)", form_batch, None))
    return [replay(trace, choose, config, fn, concurrency, expert_bytes, name) for name, choose, fn in runs]
