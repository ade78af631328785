"""Record routing traces: run any supported checkpoint over text and keep every routing decision.

For each token and MoE layer it keeps the top-k experts and their router scores, and
(for next-layer gate speculation) the experts the next MoE layer's router would pick
from this layer's post-attention hidden state. Sequences run as one prefill pass each:
routing in a prefill equals routing in token-by-token decoding, since it is the same
causal computation.

Input files: `.jsonl` (one {"text": ...} document per line, the corpus format), `.txt`
(documents separated by blank lines) or `.npy` (a token stream, documents separated by
the EOS id). Documents are prefixed with the BOS/EOS id and cut into windows.

The trace's `info.extra` records the size of one routed expert in the checkpoint's dtype (`expert_bytes`,
`expert_dtype`: what a GPU run moves per expert), so `simulate` and `schedule` need no `--expert-bytes` for it.

Not for: the trace format itself (traces/format.py) or statistics (traces/stats.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from expert_store.layout import ExpertLayout
from expertflow.engine import Engine
from expertflow.model import MoETransformer
from traces.format import Trace, TraceInfo, expert_dtype


class TraceRecorder:
    """Collects one batch's routing (a ForwardHooks); `take()` returns it as numpy arrays."""

    def __init__(self, model: MoETransformer):
        self.model = model
        self.n_layers = len(model.spec.moe_layers)
        self._ids: dict[int, torch.Tensor] = {}  # MoE layer index -> [N, K]
        self._scores: dict[int, torch.Tensor] = {}
        self._spec: dict[int, torch.Tensor] = {}

    def on_attention_out(self, layer: int, h: torch.Tensor) -> None:
        speculated = self.model.speculate(layer, h)
        if speculated is not None:
            self._spec[speculated[0]] = speculated[1]

    def on_route(self, moe_layer: int, ids: torch.Tensor, scores: torch.Tensor) -> None:
        self._ids[moe_layer], self._scores[moe_layer] = ids, scores

    def take(self, sentinel: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(experts, scores, spec_experts), each [N, L, K]."""
        ids = torch.stack([self._ids[j] for j in range(self.n_layers)], 1).cpu().numpy()
        scores = torch.stack([self._scores[j] for j in range(self.n_layers)], 1).cpu().numpy()
        spec = np.full_like(ids, sentinel)
        for j, speculated in self._spec.items():
            spec[:, j] = speculated.cpu().numpy()
        self._ids.clear()
        self._scores.clear()
        self._spec.clear()
        return ids.astype(dtype), scores.astype(np.float16), spec.astype(dtype)


def read_documents(path: Path, encode, eos_id: int) -> list[list[int]]:
    """Token ids of each document in a .jsonl, .txt or .npy file."""
    if path.suffix == ".npy":
        stream = np.load(path, allow_pickle=False)
        cuts = np.flatnonzero(stream == eos_id)
        docs = np.split(stream, cuts + 1)
        return [d[d != eos_id].astype(np.int64).tolist() for d in docs if (d != eos_id).any()]
    if path.suffix == ".jsonl":
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]
    elif path.suffix == ".txt":
        texts = [t for t in path.read_text().split("\n\n") if t.strip()]
    else:
        raise ValueError(f"{path}: unsupported data file type {path.suffix!r}; use .jsonl, .txt or .npy")
    return [encode(t) for t in texts]


def windows(docs: list[list[int]], bos_id: int, max_len: int, max_tokens: int | None) -> list[list[int]]:
    """Cut BOS-prefixed documents into windows of at most max_len tokens (at least 2)."""
    out, total = [], 0
    for doc in docs:
        ids = [bos_id] + doc
        for start in range(0, len(ids), max_len):
            w = ids[start : start + max_len]
            if len(w) < 2:
                continue
            if max_tokens is not None and total + len(w) > max_tokens:
                return out
            out.append(w)
            total += len(w)
    return out


def record(
    engine: Engine,
    sequences: list[list[int]],
    domains: list[int],
    domain_names: list[str],
    source: str,
    batch_size: int = 16,
    on_batch: Callable[[int], None] | None = None,
) -> Trace:
    """The routing of `sequences` (token ids) as a trace; `on_batch(n)` is called as each batch of n is done."""
    model = engine.model
    spec = model.spec
    moe0 = spec.layers[spec.moe_layers[0]].moe
    dtype = expert_dtype(moe0.router.n_experts)
    sentinel = 255 if dtype == np.uint8 else -1
    recorder = TraceRecorder(model)
    # Sorting by length keeps padding (wasted compute) low; the trace keeps the input order.
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    per_seq: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        engine.prefill([sequences[i] for i in batch], recorder)
        e, s, p = recorder.take(sentinel, dtype)
        offset = 0
        for i in batch:  # compute rows come out batch-major, each sequence's tokens in order
            n = len(sequences[i])
            per_seq[i] = (e[offset : offset + n], s[offset : offset + n], p[offset : offset + n])
            offset += n
        if on_batch is not None:
            on_batch(len(batch))
    experts, scores, spec_experts = (list(column) for column in zip(*(per_seq[i] for i in range(len(sequences)))))
    info = TraceInfo(
        model=str(engine.loaded.directory),
        family=spec.family,
        moe_layers=tuple(spec.moe_layers),
        n_experts=moe0.router.n_experts,
        top_k=moe0.router.top_k,
        domains=tuple(domain_names),
        source=source,
        extra={
            "expert_bytes": ExpertLayout(spec.hidden, moe0.expert_ffn, spec.dtype).nbytes,
            "expert_dtype": str(spec.dtype).removeprefix("torch."),
        },
    )
    lengths = [len(s) for s in sequences]
    return Trace(
        info,
        np.concatenate([np.asarray(s, np.int32) for s in sequences]),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.asarray(domains, np.int16),
        np.concatenate(experts),
        np.concatenate(scores),
        np.concatenate(spec_experts),
    )
