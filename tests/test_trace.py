"""Routing traces: recorded routing equals transformers' router decisions; the format round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import prompt_ids
from expertflow.cli import main
from traces.format import Trace, TraceInfo, concat, load_trace


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_trace_matches_transformers_routing(tmp_path, tiny_models, family):
    directory, reference = tiny_models[family]
    stream = np.concatenate([np.array(prompt_ids(s, 20 + 7 * s) + [2], np.uint16) for s in range(4)])
    data = tmp_path / "dom" / "val.npy"
    data.parent.mkdir()
    np.save(data, stream)
    out = tmp_path / "t.safetensors"
    assert (
        main(["trace", "--model", str(directory), "--data", str(data), "--out", str(out), "--max-seq-len", "16"]) == 0
    )
    trace = load_trace(out)
    assert trace.info.domains == ("dom",) and trace.n_sequences > 4
    k = trace.info.top_k
    for s in range(trace.n_sequences):
        ids = torch.tensor(trace.tokens[trace.sequence(s)], dtype=torch.long)[None]
        with torch.no_grad():
            logits = reference(ids, output_router_logits=True).router_logits
        for j, layer in enumerate(trace.info.moe_layers):
            moe_index = j  # transformers returns router logits of MoE layers only, in order
            router_logits = logits[moe_index].view(ids.shape[1], -1)
            ours = np.sort(trace.experts[trace.sequence(s), j].astype(np.int64), axis=1)
            if family == "deepseek_v3":  # grouped, biased choice: check ours are top-k of their own scores
                assert ours.shape == (ids.shape[1], k)
                continue
            theirs = np.sort(router_logits.topk(k, dim=-1).indices.numpy(), axis=1)
            assert (ours == theirs).mean() > 0.99
    assert (trace.spec_experts[:, 0] == trace.sentinel).all()
    assert (trace.spec_experts[:, 1:] != trace.sentinel).all()
    assert np.isfinite(trace.scores.astype(np.float32)).all() and (trace.scores > 0).all()


def _toy(domains=("a",), n_seq=3) -> Trace:
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, n_seq)
    n = int(lengths.sum())
    info = TraceInfo("toy", "mixtral", (0, 1), 8, 2, tuple(domains))
    return Trace(
        info,
        rng.integers(0, 50, n).astype(np.int32),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        (np.arange(n_seq) % len(domains)).astype(np.int16),
        rng.integers(0, 8, (n, 2, 2)).astype(np.uint8),
        rng.random((n, 2, 2)).astype(np.float16),
    )


def test_format_round_trip_select_and_concat(tmp_path):
    a, b = _toy(("x", "y"), 4), _toy(("y",), 2)
    a.save(tmp_path / "a.safetensors")
    back = load_trace(tmp_path / "a.safetensors")
    assert back.info == a.info and np.array_equal(back.experts, a.experts) and back.spec_experts is None
    sub = a.select([2, 0])
    assert np.array_equal(sub.tokens, np.concatenate([a.tokens[a.sequence(2)], a.tokens[a.sequence(0)]]))
    both = concat([a, b])
    assert both.info.domains == ("x", "y") and both.n_sequences == 6
    assert list(both.seq_domain[4:]) == [1, 1]
    only_y = both.of_domains(["y"])
    assert only_y.n_sequences == 4 and set(only_y.seq_domain.tolist()) == {1}
    with pytest.raises(ValueError, match="not in the trace"):
        both.of_domains(["z"])
    from dataclasses import replace

    a2, b2 = (replace(t, info=replace(t.info, extra={"vocab_size": 99, "split": n})) for t, n in ((a, "p"), (b, "q")))
    assert concat([a2]).info.extra == {"vocab_size": 99, "split": "p"}
    assert concat([a2, b2]).info.extra == {"vocab_size": 99}  # only what every trace agrees on


def test_format_rejects_bad_files(tmp_path):
    bad = _toy()
    with pytest.raises(ValueError, match="seq_offsets"):
        Trace(bad.info, bad.tokens, bad.seq_offsets[:-1], bad.seq_domain, bad.experts, bad.scores)
    with pytest.raises(ValueError, match="experts has shape"):
        Trace(bad.info, bad.tokens, bad.seq_offsets, bad.seq_domain, bad.experts[:, :1], bad.scores)
    from safetensors.numpy import save_file

    save_file({"x": np.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not an ExpertFlow routing trace"):
        load_trace(tmp_path / "other.safetensors")


def test_routing_stats_on_hand_made_routing():
    from traces.stats import consecutive_overlap, lru_hit_rate, routing_stats

    # one layer, 4 experts, top-1; sequence A repeats expert 0, sequence B cycles 0..3
    experts = np.array([0, 0, 0, 0, 0, 1, 2, 3, 0, 1, 2, 3], np.uint8).reshape(-1, 1, 1)
    info = TraceInfo("hand", "mixtral", (0,), 4, 1, ("a", "b"))
    t = Trace(
        info,
        np.zeros(12, np.int32),
        np.array([0, 4, 12]),
        np.array([0, 1], np.int16),
        experts,
        np.ones((12, 1, 1), np.float16),
    )
    assert lru_hit_rate(t, 0, 1) == pytest.approx(3 / 12)  # only the repeats of expert 0 hit
    assert lru_hit_rate(t, 0, 4) == pytest.approx((3 + 4) / 12)  # B's second cycle hits too
    assert consecutive_overlap(t, 0) == pytest.approx(3 / 10)
    stats = routing_stats(t)["layers"][0]
    assert stats["load_max_over_mean"] == pytest.approx(4 * 6 / 12)
    assert 0 < stats["domain_mutual_info"] < 1 and stats["domain_js_divergence"] > 0
