"""The routing-trace format (version 1): which experts every token picked, in every MoE layer.

One safetensors file (never pickle), readable without torch through `safetensors.numpy`:

    tokens        int32   [N]        token ids of all sequences, concatenated
    seq_offsets   int64   [S+1]      sequence s is tokens[seq_offsets[s]:seq_offsets[s+1]]
    seq_domain    int16   [S]        index into info.domains
    experts       uint8 or int16 [N, L, K]  top-k expert ids per token and MoE layer (L = MoE layers)
    scores        float16 [N, L, K]  router probability of each picked expert (softmax or sigmoid
                                     score, before renormalisation and scaling)
    spec_experts  like experts, optional: layer j's router applied to the hidden state of the
                                     MoE layer before it (next-layer gate speculation); row j = 0
                                     holds the sentinel (255 or -1) since no earlier layer exists

Metadata: {"format": "expertflow-trace", "version": "1", "info": TraceInfo as JSON}.
Expert ids are uint8 when the layer has at most 255 experts (255 is then the sentinel).

Not for: computing statistics (stats.py) or recording (expertflow/trace.py).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file

FORMAT = "expertflow-trace"
VERSION = "1"


@dataclass(frozen=True)
class TraceInfo:
    model: str  # where the routing came from (a path or a name)
    family: str
    moe_layers: tuple[int, ...]  # model layer index of each traced MoE layer
    n_experts: int
    top_k: int
    domains: tuple[str, ...]
    source: str = ""  # how the trace was made (command, dataset)
    extra: dict = field(default_factory=dict)


@dataclass
class Trace:
    info: TraceInfo
    tokens: np.ndarray
    seq_offsets: np.ndarray
    seq_domain: np.ndarray
    experts: np.ndarray
    scores: np.ndarray
    spec_experts: np.ndarray | None = None

    def __post_init__(self) -> None:
        n, s = len(self.tokens), len(self.seq_domain)
        layers, k = len(self.info.moe_layers), self.info.top_k
        if self.seq_offsets.shape != (s + 1,) or self.seq_offsets[0] != 0 or self.seq_offsets[-1] != n:
            raise ValueError(
                "trace: seq_offsets must run from 0 to the number of tokens, one more entry than sequences"
            )
        if np.any(np.diff(self.seq_offsets) <= 0):
            raise ValueError("trace: every sequence needs at least one token")
        for name in ("experts", "scores") + (("spec_experts",) if self.spec_experts is not None else ()):
            if getattr(self, name).shape != (n, layers, k):
                raise ValueError(f"trace: {name} has shape {getattr(self, name).shape}, expected {(n, layers, k)}")
        if s and (self.seq_domain.min() < 0 or self.seq_domain.max() >= len(self.info.domains)):
            raise ValueError("trace: seq_domain indexes outside info.domains")

    @property
    def sentinel(self) -> int:
        return 255 if self.experts.dtype == np.uint8 else -1

    @property
    def n_sequences(self) -> int:
        return len(self.seq_domain)

    def sequence(self, s: int) -> slice:
        return slice(int(self.seq_offsets[s]), int(self.seq_offsets[s + 1]))

    def of_domains(self, domains: list[str] | tuple[str, ...]) -> Trace:
        """Only the sequences of these domains (in trace order); unknown domain names are an error."""
        unknown = sorted(set(domains) - set(self.info.domains))
        if unknown:
            raise ValueError(f"domains {unknown} not in the trace (it holds {list(self.info.domains)})")
        wanted = [self.info.domains.index(d) for d in domains]
        return self.select(np.flatnonzero(np.isin(self.seq_domain, wanted)))

    def select(self, seqs: np.ndarray | list[int]) -> Trace:
        """A trace of only the given sequences, in that order."""
        seqs = np.asarray(seqs, dtype=np.int64)
        rows = (
            np.concatenate([np.arange(self.seq_offsets[s], self.seq_offsets[s + 1]) for s in seqs])
            if len(seqs)
            else np.zeros(0, np.int64)
        )
        lengths = np.diff(self.seq_offsets)[seqs]
        return Trace(
            self.info,
            self.tokens[rows],
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.seq_domain[seqs],
            self.experts[rows],
            self.scores[rows],
            None if self.spec_experts is None else self.spec_experts[rows],
        )

    def save(self, path: str | Path) -> None:
        tensors = {
            "tokens": self.tokens.astype(np.int32),
            "seq_offsets": self.seq_offsets.astype(np.int64),
            "seq_domain": self.seq_domain.astype(np.int16),
            "experts": self.experts,
            "scores": self.scores.astype(np.float16),
        }
        if self.spec_experts is not None:
            tensors["spec_experts"] = self.spec_experts.astype(self.experts.dtype)
        info = asdict(self.info)
        save_file(tensors, str(path), metadata={"format": FORMAT, "version": VERSION, "info": json.dumps(info)})


def expert_dtype(n_experts: int) -> np.dtype:
    return np.dtype(np.uint8) if n_experts <= 255 else np.dtype(np.int16)


def load_trace(path: str | Path) -> Trace:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an ExpertFlow routing trace (format {meta.get('format')!r})")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: trace version {meta.get('version')!r}, this reader knows {VERSION!r}")
    raw = json.loads(meta["info"])
    info = TraceInfo(**{**raw, "moe_layers": tuple(raw["moe_layers"]), "domains": tuple(raw["domains"])})
    t = load_file(str(path))
    return Trace(info, t["tokens"], t["seq_offsets"], t["seq_domain"], t["experts"], t["scores"], t.get("spec_experts"))


def concat(traces: list[Trace]) -> Trace:
    """One trace of several from the same model; domains are merged by name, and `info.extra` keeps the
    entries every trace agrees on."""
    if not traces:
        raise ValueError("nothing to concatenate")
    first = traces[0].info
    domains: list[str] = []
    for t in traces:
        if (t.info.moe_layers, t.info.n_experts, t.info.top_k) != (first.moe_layers, first.n_experts, first.top_k):
            raise ValueError("cannot concatenate traces of differently shaped models")
        domains += [d for d in t.info.domains if d not in domains]
    offsets, total = [np.zeros(1, np.int64)], 0
    for t in traces:
        offsets.append(t.seq_offsets[1:] + total)
        total += len(t.tokens)
    remap = [np.array([domains.index(d) for d in t.info.domains], np.int16) for t in traces]
    has_spec = all(t.spec_experts is not None for t in traces)
    extra = {k: v for k, v in first.extra.items() if all(t.info.extra.get(k) == v for t in traces)}
    return Trace(
        TraceInfo(
            first.model,
            first.family,
            first.moe_layers,
            first.n_experts,
            first.top_k,
            tuple(domains),
            first.source,
            extra,
        ),
        np.concatenate([t.tokens for t in traces]),
        np.concatenate(offsets),
        np.concatenate([r[t.seq_domain] for r, t in zip(remap, traces)]),
        np.concatenate([t.experts for t in traces]),
        np.concatenate([t.scores for t in traces]),
        np.concatenate([t.spec_experts for t in traces]) if has_spec else None,
    )
