"""Train the route transformer (model.py) on routing traces: token ids and their experts, nothing else.

Sequences are cut into chunks of at most one context and packed into rows of `context` positions; a
row's chunks cannot attend to each other (block-diagonal causal mask) and each chunk's positions start
at 0, as in inference. A chunk that starts inside a sequence still gets the real routes of the token
before it, as inference windows do. Short prompts (DeepSeek's median is 26 tokens) thus cost no padding.

A small share of the training sequences is held out to pick the best checkpoint by recall@k.

Stopping: training runs `max_steps` steps, or for `seconds`, or whichever comes first when both are given;
neither given means `DEFAULT_SECONDS`. A step count alone is never cut by a time cap nobody asked for. The
learning rate follows a cosine over that budget. The summary says what stopped it (`stopped_by`: "steps" or
"time") and how many of the requested steps ran (`steps_done`, `steps_requested`).

Not for: the network (model.py) or scoring on test traces (evaluate.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from predictor.baselines import multi_hot, ranked_hot
from predictor.evaluate import top_hits
from predictor.learned import sequence_probs
from predictor.model import RouteModelConfig, RouteTransformer
from traces.format import Trace


DEFAULT_SECONDS = 240.0  # the time budget when neither a step count nor a time is given


@dataclass(frozen=True)
class TrainConfig:
    seconds: float | None = None  # time cap; None: none (or DEFAULT_SECONDS when max_steps is None too)
    max_steps: int | None = None  # step count; None: until the time cap
    rows: int = 16  # packed rows of `context` positions per step
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    token_dropout: float = 0.03  # share of input tokens replaced by the unknown row: teaches that row
    holdout: float = 0.05  # share of training sequences kept aside to pick the best checkpoint
    eval_every: int = 40  # steps
    seed: int = 0
    train_table: bool = False  # frozen, the table keeps the smoothed counts; fine-tuning it overfitted sooner
    # Share of positions whose gate speculation is hidden from the layer head in training, so that it also
    # predicts well where the server computes no speculation.
    spec_dropout: float = 0.25

    def __post_init__(self) -> None:
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"--seconds {self.seconds}: a time cap must be more than 0 seconds")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"--max-steps {self.max_steps}: at least 1 step")

    def limits(self) -> tuple[int | None, float | None]:
        """(steps, seconds) that stop training: what was given, or DEFAULT_SECONDS when nothing was."""
        if self.max_steps is None and self.seconds is None:
            return None, DEFAULT_SECONDS
        return self.max_steps, self.seconds


def stop_note(summary: dict) -> str:
    """One line on what stopped training, saying so when a time cap cut the requested steps."""
    done, asked, cap = summary["steps_done"], summary["steps_requested"], summary["seconds_requested"]
    if summary["stopped_by"] == "time" and asked is not None:
        return (
            f"stopped by the time cap (--seconds {cap:g}) after {done} of the {asked} requested steps; "
            "give more --seconds, or drop --seconds to run every step"
        )
    if summary["stopped_by"] == "time":
        return f"stopped by the time cap (--seconds {cap:g}) after {done} steps"
    return f"ran the {done} requested steps in {summary['seconds']:g} s"


# Largest layer-pair map (L x L x E x E weights) a model gets unless asked: 16 M parameters, 64 MB in fp32. Within
# it: Mixtral, OLMoE, Qwen-MoE, DeepSeek-V2-Lite (2.8 M); beyond it Qwen3-30B-A3B (38 M) or DeepSeek-V3 (220 M).
CROSS_LAYERS_MAX = 1 << 24


def model_config_for(trace: Trace, max_vocab: int = 65536, **overrides) -> RouteModelConfig:
    """A model shaped for `trace`'s routing; the token table covers its ids (hashed beyond max_vocab). Without a
    `cross_layers` choice (or with None) the layer-pair maps are on if they fit `CROSS_LAYERS_MAX`."""
    top_id = int(trace.tokens.max()) + 1
    vocab = max(top_id, int(trace.info.extra.get("vocab_size") or 0))
    shape = {"moe_layers": len(trace.info.moe_layers), "n_experts": trace.info.n_experts, "top_k": trace.info.top_k}
    if overrides.get("cross_layers") is None:
        overrides["cross_layers"] = (shape["moe_layers"] * shape["n_experts"]) ** 2 <= CROSS_LAYERS_MAX
    return RouteModelConfig(**shape, vocab_size=min(vocab, max_vocab), hash_tokens=vocab > max_vocab, **overrides)


@dataclass
class TableCounts:
    """The routing counts behind the token table: per table row, how often each (layer, expert) was picked."""

    counts: np.ndarray  # [rows, L*E] float32
    n: np.ndarray  # [rows] float32, occurrences
    glob: np.ndarray  # [L*E] global pick rate
    prior: float
    bce: bool

    def logits(self, counts: np.ndarray, n: np.ndarray) -> np.ndarray:
        """`prior` pseudo-tokens of the global rate, as log-odds (BCE) or log-probabilities (softmax)."""
        p = np.clip((counts + self.prior * self.glob) / (n[..., None] + self.prior), 1e-4, 1 - 1e-4)
        return (np.log(p / (1 - p)) if self.bce else np.log(p)).astype(np.float32)


def init_token_table(model: RouteTransformer, trace: Trace, seqs: np.ndarray, prior: float = 2.0) -> TableCounts:
    """Start the token table at each token's smoothed routing frequency (`prior` pseudo-tokens of the
    global frequency), as logits: log-odds for BCE, log-probabilities for the softmax loss."""
    cfg = model.cfg
    le = cfg.moe_layers * cfg.n_experts
    rows_idx = np.concatenate([np.arange(trace.seq_offsets[s], trace.seq_offsets[s + 1]) for s in seqs])
    with torch.no_grad():
        rows = model.rows(torch.from_numpy(trace.tokens[rows_idx].astype(np.int64))).numpy()
    e = trace.experts[rows_idx].astype(np.int64)  # [N, L, K]
    cell = rows[:, None, None] * le + np.arange(cfg.moe_layers)[None, :, None] * cfg.n_experts + e
    n_rows = cfg.vocab_size + 1
    counts = np.bincount(cell.ravel(), minlength=n_rows * le).reshape(n_rows, le).astype(np.float32)
    n = np.bincount(rows, minlength=n_rows).astype(np.float32)
    table = TableCounts(counts, n, counts.sum(0) / max(float(n.sum()), 1.0), prior, cfg.loss == "bce")
    with torch.no_grad():
        model.table.weight.copy_(torch.from_numpy(table.logits(counts, n)))
        model.head.bias.zero_()
    return table


def _param_groups(model: RouteTransformer, weight_decay: float) -> list[dict]:
    """Decay matrices only: decaying the logit table or biases would pull probabilities towards 1/2."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim == 2 and not name.startswith("table") else keep).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]


def _chunks(trace: Trace, seqs: np.ndarray, ctx: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(first row, length) of chunks covering the sequences; long ones are cut at a random phase each epoch."""
    out = []
    for s in seqs:
        lo, hi = int(trace.seq_offsets[s]), int(trace.seq_offsets[s + 1])
        cut = lo + (int(rng.integers(1, ctx + 1)) if hi - lo > ctx else hi - lo)
        out.append((lo, cut - lo))
        for a in range(cut, hi, ctx):
            out.append((a, min(ctx, hi - a)))
    return out


def _pack(chunks: list[tuple[int, int]], ctx: int) -> list[list[tuple[int, int]]]:
    """First-fit packing, longest first, into rows of ctx positions."""
    rows: list[list[tuple[int, int]]] = []
    free: list[int] = []
    for chunk in sorted(chunks, key=lambda c: -c[1]):
        for i, room in enumerate(free):
            if room >= chunk[1]:
                rows[i].append(chunk)
                free[i] -= chunk[1]
                break
        else:
            rows.append([chunk])
            free.append(ctx - chunk[1])
    return rows


class _Batches:
    """Tensors of packed rows; N = trace rows, LE = L*E.

    With `table` (the counts behind the token table, fitted on `fitted` trace rows), each fitted position
    reads its table row leave-one-out: the counts without its own routing. Read in full, the table knows
    every training token's answer, and the layer head learned to trust it over gate speculation, which
    then beat it on test tokens in deep layers."""

    def __init__(
        self,
        trace: Trace,
        cfg: RouteModelConfig,
        table: TableCounts | None = None,
        table_rows: np.ndarray | None = None,  # [N] table row of each trace token
        fitted: np.ndarray | None = None,  # [N] bool, token counted in `table`
    ) -> None:
        self.trace, self.cfg = trace, cfg
        self.table, self.table_rows, self.fitted = table, table_rows, fitted
        starts = np.zeros(len(trace.tokens), bool)
        starts[trace.seq_offsets[:-1]] = True
        self.starts = starts  # a sequence's first token has no previous route

    def make(self, rows: list[list[tuple[int, int]]]) -> dict[str, torch.Tensor]:
        ctx, n_exp = self.cfg.context, self.cfg.n_experts
        idx = np.full((len(rows), ctx), -1, np.int64)  # trace row of each position, -1 = padding
        pos = np.zeros((len(rows), ctx), np.int64)
        seg = np.full((len(rows), ctx), -1, np.int64)
        for r, row in enumerate(rows):
            at = 0
            for c, (first, length) in enumerate(row):
                idx[r, at : at + length] = np.arange(first, first + length)
                pos[r, at : at + length] = np.arange(length)
                seg[r, at : at + length] = c
                at += length
        valid = idx >= 0
        rows_ = np.where(valid, idx, 0)
        prev_rows = np.where(valid & ~self.starts[rows_], rows_ - 1, -1)
        experts = self.trace.experts[rows_].astype(np.int64)  # [B, T, L, K]
        target = multi_hot(experts, n_exp) * valid[..., None, None]
        prev = multi_hot(self.trace.experts[np.maximum(prev_rows, 0)], n_exp) * (prev_rows >= 0)[..., None, None]
        spec = None
        if self.trace.spec_experts is not None:
            spec = torch.from_numpy(ranked_hot(self.trace.spec_experts[rows_], n_exp) * valid[..., None, None])
        same = seg[:, :, None] == seg[:, None, :]
        causal = np.tril(np.ones((ctx, ctx), bool))
        mask = (same & causal[None]) | np.eye(ctx, dtype=bool)[None]  # padding attends to itself: no NaN rows
        return {
            "tokens": torch.from_numpy(self.trace.tokens[rows_].astype(np.int64)),
            "prev": torch.from_numpy(prev.reshape(len(rows), ctx, -1)),
            "positions": torch.from_numpy(pos),
            "mask": torch.from_numpy(mask[:, None]),
            "target": torch.from_numpy(target),
            "valid": torch.from_numpy(valid),
            "spec": spec,
            "table": None if self.table is None else torch.from_numpy(self._table_logits(rows_, valid, target)),
        }

    def _table_logits(self, rows_: np.ndarray, valid: np.ndarray, target: np.ndarray) -> np.ndarray:
        """[B, T, L, E] table logits, leave-one-out for fitted positions."""
        t = self.table
        r = self.table_rows[rows_]
        own = (self.fitted[rows_] & valid).astype(np.float32)  # [B, T]
        counts = t.counts[r] - own[..., None] * target.reshape(*r.shape, -1)
        logits = t.logits(counts, t.n[r] - own)
        return logits.reshape(target.shape)


def loss_fn(model: RouteTransformer, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean over valid positions and layers. BCE scores every expert independently; "softmax" is the
    cross-entropy against the k-hot target divided by k (a ranking loss: only the order within a layer counts).

    BCE is the default: on the fine traces (60 s runs, same settings) it reached mean recall@8 0.682 against
    0.659 for the softmax loss, and its sigmoids are calibrated probabilities (ECE 0.007 vs 0.011)."""
    if model.cfg.loss == "bce":
        per = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)  # [B, T, L]
    else:
        per = -(target / model.cfg.top_k * torch.log_softmax(logits, -1)).sum(-1)
    return (per.mean(-1) * valid).sum() / valid.sum().clamp(min=1)


def holdout_recall(model: RouteTransformer, trace: Trace, seqs: np.ndarray) -> float:
    """Mean recall@k over layers on held-out training sequences (checkpoint selection only), averaged
    over the token horizon and, with a layer head, the layer horizon."""
    hits = total = 0
    k = model.cfg.top_k
    for s in seqs:
        sl = trace.sequence(int(s))
        experts = trace.experts[sl].astype(np.int64)
        spec = None if trace.spec_experts is None else trace.spec_experts[sl]
        for layer_horizon in (False, True) if model.layer_head is not None else (False,):
            probs = sequence_probs(model, trace.tokens[sl].astype(np.int64), experts, spec, layer_horizon)
            hits += int(top_hits(probs, experts, k).sum())
            total += experts.size
    return hits / max(total, 1)


@torch.no_grad()
def calibrate_spec_gain(model: RouteTransformer, trace: Trace, seqs: np.ndarray) -> list[list[float]]:
    """Set the layer head's per-layer speculation gains (a pair, 0..8 each) from recall@k on `seqs` (held-out
    sequences, never trained on): the largest pair within one standard error of the best. Trained jointly,
    the gains stay where training tokens put them: there the rest of the head is more often right than on
    new text, so speculation ends up under-weighted."""
    head = model.layer_head
    # The search adds gains to logits recovered from probabilities, which only the BCE head inverts exactly
    # (the softmax head's k x softmax is capped at 1); softmax models keep their trained gains.
    if head is None or trace.spec_experts is None or not len(seqs) or model.cfg.loss != "bce":
        return []
    k, n_exp = model.cfg.top_k, model.cfg.n_experts
    head.spec_gain.zero_()
    head.rank_gain.zero_()
    rest, ranked, actual = [], [], []
    for s in seqs:
        sl = trace.sequence(int(s))
        experts, spec = trace.experts[sl], trace.spec_experts[sl]
        probs = sequence_probs(model, trace.tokens[sl].astype(np.int64), experts, spec, layer_horizon=True)
        p = np.clip(probs, 1e-7, 1 - 1e-7)  # back to logits
        rest.append(np.log(p / (1 - p)))
        ranked.append(ranked_hot(spec, n_exp))
        actual.append(experts.astype(np.int64))
    r, h, a = np.concatenate(rest), np.concatenate(ranked), np.concatenate(actual)
    grid = np.linspace(0.0, 8.0, 17)
    gains = [[0.0, 0.0]]  # layer 0 has no speculation
    for j in range(1, model.cfg.moe_layers):
        scores = {}
        for g in grid:
            for q in grid:
                boosted = r[:, j : j + 1] + g * (h[:, j : j + 1] > 0) + q * h[:, j : j + 1]  # [N, 1, E]
                scores[float(g), float(q)] = top_hits(boosted, a[:, j : j + 1], k)[0] / a[:, j].size
        # Within one standard error of the best, lean on speculation (the larger gains): it is the
        # signal that carries over to new text, the rest of the head is fitted on the training tokens.
        best = max(scores.values())
        slack = np.sqrt(best * (1 - best) / a[:, j].size)
        gains.append(list(max((gq for gq, v in scores.items() if v >= best - slack), key=sum)))
    table = torch.tensor(gains)
    head.spec_gain.copy_(table[:, 0])
    head.rank_gain.copy_(table[:, 1])
    return gains


def train(
    trace: Trace,
    model_cfg: RouteModelConfig,
    cfg: TrainConfig = TrainConfig(),
    log: Callable[[str], None] = print,
    device: str | torch.device = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[RouteTransformer, dict]:
    """The trained model (best held-out recall, on the CPU) and a summary of the run. `on_step(step, done)`
    is called after every step with the share of the budget spent (0..1), for a progress bar."""
    device = torch.device(device)
    max_steps, seconds = cfg.limits()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    order = rng.permutation(trace.n_sequences)
    n_hold = round(cfg.holdout * trace.n_sequences) if trace.n_sequences > 1 else 0
    hold, fit = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    model = RouteTransformer(model_cfg)
    seen = np.unique(np.concatenate([trace.tokens[trace.sequence(int(s))] for s in fit]).astype(np.int64))
    with torch.no_grad():  # ids never seen in the fitted sequences read the trained unknown row
        rows = model.rows(torch.from_numpy(seen))
        model.token_map.fill_(model_cfg.vocab_size)
        model.token_map[rows] = rows
    batches = _Batches(trace, model_cfg)
    if model.table is not None:
        table = init_token_table(model, trace, fit)
        model.table.weight.requires_grad_(cfg.train_table)
        if not cfg.train_table:
            with torch.no_grad():
                table_rows = model.rows(torch.from_numpy(trace.tokens.astype(np.int64))).numpy()
            fitted = np.zeros(len(trace.tokens), bool)
            for s in fit:
                fitted[trace.sequence(int(s))] = True
            batches = _Batches(trace, model_cfg, table, table_rows, fitted)
    model.to(device)
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), foreach=True)
    t0, step, epoch, best, best_state, history = time.time(), 0, 0, -1.0, None, []
    queue: list[list[tuple[int, int]]] = []

    def progress() -> float:
        by_steps = step / max_steps if max_steps is not None else 0.0
        by_time = (time.time() - t0) / seconds if seconds is not None else 0.0
        return max(by_steps, by_time)

    while progress() < 1.0:
        if len(queue) < cfg.rows:
            packed = _pack(_chunks(trace, fit, model_cfg.context, rng), model_cfg.context)
            queue += [packed[i] for i in rng.permutation(len(packed))]
            epoch += 1
        batch, queue = batches.make(queue[: cfg.rows]), queue[cfg.rows :]
        batch = {k: None if v is None else v.to(device, non_blocking=True) for k, v in batch.items()}
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(progress(), 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        tokens, table_logits = batch["tokens"], batch["table"]
        if cfg.token_dropout > 0 and not model_cfg.hash_tokens:  # hashed ids have no unknown id to point at
            drop = torch.rand(tokens.shape, device=device) < cfg.token_dropout
            tokens = torch.where(drop, torch.full_like(tokens, model_cfg.vocab_size), tokens)
            if table_logits is not None:
                unknown = model.table.weight[model_cfg.vocab_size].view(model_cfg.moe_layers, model_cfg.n_experts)
                table_logits = torch.where(drop[..., None, None], unknown, table_logits)
        model.train()
        state, logits = model.encode(tokens, batch["prev"], batch["positions"], batch["mask"], table_logits)
        loss = loss_fn(model, logits, batch["target"], batch["valid"])
        if model.layer_head is not None:
            spec = batch["spec"]
            if spec is not None and cfg.spec_dropout > 0:
                spec = spec * (torch.rand(spec.shape[:2], device=device) >= cfg.spec_dropout)[..., None, None]
            refined = model.refine(state, logits, batch["target"], spec)
            loss = loss + loss_fn(model, refined, batch["target"], batch["valid"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if on_step is not None:
            on_step(step, min(progress(), 1.0))
        if step % cfg.eval_every == 0 or progress() >= 1.0:
            model.eval()
            value = loss.item()
            recall = holdout_recall(model, trace, hold) if len(hold) else -value
            history.append({"step": step, "seconds": round(time.time() - t0, 1), "loss": value, "recall": recall})
            log(f"step {step} epoch {epoch} {time.time() - t0:.0f}s loss {value:.4f} holdout recall {recall:.4f}")
            if recall > best:
                best, best_state = recall, {k: v.clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    model.cpu().eval()
    spec_gain = calibrate_spec_gain(model, trace, hold)
    summary = {
        "steps": step,
        "stopped_by": "steps" if max_steps is not None and step >= max_steps else "time",
        "steps_done": step,
        "steps_requested": max_steps,
        "seconds_requested": seconds,
        "epochs": epoch,
        "seconds": round(time.time() - t0, 1),
        "holdout_sequences": len(hold),
        "best_holdout_recall": best,
        "spec_gain": spec_gain,
        "train_tokens": int(sum(trace.seq_offsets[s + 1] - trace.seq_offsets[s] for s in fit)),
        "train_config": asdict(cfg),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "history": history,
    }
    return model.eval(), summary
