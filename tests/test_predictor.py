"""Routing predictors: trace import, the peers' baselines, the learned predictor, online correction, metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from predictor.base import TracePredictor
from predictor.baselines import (
    ranked_hot,
    ActivationMatrixPredictor,
    FrequencyPredictor,
    GateSpeculationPredictor,
    layer_frequency,
    multi_hot,
)
from predictor.evaluate import evaluate, format_comparison
from predictor.learned import LearnedPredictor, LearnedSession, window_start
from predictor.model import RouteModelConfig, RouteTransformer, load_model, save_model
from predictor.online import OnlineConfig, OnlineCorrector
from predictor.train import TrainConfig, model_config_for, train
from traces.format import Trace, TraceInfo, load_trace


pytestmark = pytest.mark.usefixtures("one_thread")


def _trace(tokens, lengths, experts, n_experts=8, spec=None, domains=None, domain_names=("a",)) -> Trace:
    experts = np.asarray(experts, np.uint8)
    _, n_layers, k = experts.shape
    return Trace(
        TraceInfo("hand", "mixtral", tuple(range(n_layers)), n_experts, k, tuple(domain_names)),
        np.asarray(tokens, np.int32),
        np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        np.zeros(len(lengths), np.int16) if domains is None else np.asarray(domains, np.int16),
        experts,
        np.full(experts.shape, 0.5, np.float16),
        None if spec is None else np.asarray(spec, np.uint8),
    )


def _rule_trace(seed: int, n_seq: int, length: int) -> Trace:
    """2 MoE layers, 8 experts, top-2; the experts depend on the token and on the token before it,
    so a per-token table alone cannot get them all (the transformer has to look back)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 16, (n_seq, length))
    prev = np.concatenate([np.zeros((n_seq, 1), np.int64), tokens[:, :-1]], axis=1)
    e1 = tokens % 8
    e2 = (e1 + 1 + prev % 7) % 8
    layers = [np.sort(np.stack([(e1 + j) % 8, (e2 + j) % 8], -1), -1) for j in range(2)]
    experts = np.stack(layers, axis=2).reshape(-1, 2, 2)
    return _trace(tokens.ravel(), [length] * n_seq, experts)


def _mode_trace(seed: int, n_seq: int, length: int) -> Trace:
    """Each sequence routes every token to its own random expert pair, whatever the token: only the routes
    observed so far can tell which (the token ids are noise)."""
    rng = np.random.default_rng(seed)
    modes = np.stack([np.sort(rng.permutation(8)[:2]) for _ in range(n_seq)])  # [S, 2]
    experts = np.repeat(modes, length, axis=0)[:, None, :]
    return _trace(rng.integers(0, 16, n_seq * length), [length] * n_seq, experts)


class _Fixed(TracePredictor):
    name = "fixed"

    def __init__(self, probs: np.ndarray) -> None:
        self.probs = probs

    def predict(self, trace: Trace, s: int) -> np.ndarray:
        return self.probs[trace.sequence(s)]


def test_import_deepseek_npz_layout(tmp_path):
    from predictor.deepseek import import_deepseek, split_of

    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 9, 60)
    n = int(lengths.sum())
    experts = np.sort(np.stack([rng.permutation(64)[:6] for _ in range(n * 26)]).reshape(n, 26, 6), -1)
    token_ids = rng.integers(0, 500, n).astype(np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    np.savez(tmp_path / "routes.npz", token_ids=token_ids, seq_offsets=offsets, experts=experts.astype(np.uint8))
    (tmp_path / "vocab.json").write_text(json.dumps([f"t{i}" for i in range(500)]))
    counts = import_deepseek(tmp_path / "routes.npz", tmp_path / "out")
    many = [split_of(rng.integers(0, 500, 7)) for _ in range(3000)]
    assert abs(many.count("train") / 3000 - 0.8) < 0.03 and abs(many.count("test") / 3000 - 0.1) < 0.02
    assert sum(c["sequences"] for c in counts.values()) == 60 and sum(c["tokens"] for c in counts.values()) == n
    assert counts["train"]["sequences"] > counts["test"]["sequences"]
    prompts = {tuple(token_ids[offsets[s] : offsets[s + 1]]): s for s in range(60)}
    for name in ("train", "validation", "test"):
        t = load_trace(tmp_path / "out" / f"deepseek_{name}.safetensors")
        assert t.info.moe_layers == tuple(range(1, 27)) and (t.info.n_experts, t.info.top_k) == (64, 6)
        assert t.info.extra["scores"] == "absent" and t.info.extra["vocab_size"] == 500 and t.spec_experts is None
        assert np.allclose(t.scores.astype(np.float32), 1 / 6, atol=1e-3)
        for s in range(t.n_sequences):  # every prompt intact, with its own routing, in the split its hash names
            ids = t.tokens[t.sequence(s)]
            src = prompts[tuple(ids)]
            assert split_of(ids) == name
            assert np.array_equal(t.experts[t.sequence(s)], experts[offsets[src] : offsets[src + 1]])


def test_frequency_picks_the_most_frequent_experts():
    experts = [[[3, 5]], [[3, 5]], [[1, 3]], [[5, 7]], [[3, 5]]]  # layer 0: 3 and 5 dominate
    train_trace = _trace([1, 2, 3, 4, 5], [5], experts)
    probs = FrequencyPredictor(train_trace).predict(train_trace, 0)
    assert probs.shape == (5, 1, 8) and np.allclose(probs.sum(-1), 2.0)
    assert set(np.argsort(-probs[0, 0])[:2]) == {3, 5}
    assert probs[0, 0, 3] == pytest.approx(4 / 5)


def test_gate_speculation_replays_spec_experts_and_refuses_without_them():
    rng = np.random.default_rng(1)
    experts = np.sort(np.stack([rng.permutation(8)[:2] for _ in range(12)]).reshape(6, 2, 2), -1)
    spec = np.sort(np.stack([rng.permutation(8)[:2] for _ in range(12)]).reshape(6, 2, 2), -1)
    spec[:, 0] = 255
    with_spec = _trace(np.arange(6), [6], experts, spec=spec)
    gate = GateSpeculationPredictor(with_spec)
    probs = gate.predict(with_spec, 0)
    assert gate.supports(with_spec) is None
    for t in range(6):
        assert set(np.argsort(-probs[t, 1])[:2]) == set(spec[t, 1])
    assert np.allclose(probs[:, 0], layer_frequency(with_spec)[0])
    without = _trace(np.arange(6), [6], experts)
    assert "lacks hidden states" in gate.supports(without)
    result = evaluate(gate, without)
    assert result["supported"] is False and "n/a: trace lacks hidden states" in format_comparison([result])


def test_activation_matrix_matches_the_request_to_similar_sequences():
    a = [[[0, 1], [4, 5]]] * 10  # sequences of kind A use experts 0,1 then 4,5; kind B uses 2,3 then 6,7
    b = [[[2, 3], [6, 7]]] * 10
    train_trace = _trace(np.zeros(40), [10, 10, 10, 10], a + b + a + b)
    test = _trace(np.zeros(12), [12], [[[2, 3], [6, 7]]] * 2 + [[[2, 3], [1, 7]]] * 10)
    probs = ActivationMatrixPredictor(train_trace).predict(test, 0)
    assert set(np.argsort(-probs[1, 0])[:2]) == {2, 3}  # one token seen: the B sequences match
    assert set(np.argsort(-probs[1, 1])[:2]) == {6, 7}
    assert probs[-1, 1, 1] > probs[1, 1, 1]  # the request's own counts pull in expert 1 over time


def test_evaluate_on_a_hand_made_case():
    # one layer, 4 experts, top-1: token 0 routed to 0 (predicted first), token 1 to 1 (predicted second)
    trace = _trace([0, 1], [2], [[[0]], [[1]]], n_experts=4)
    probs = np.array([[[0.9, 0.1, 0.0, 0.0]], [[0.6, 0.4, 0.0, 0.0]]], np.float32)
    r = evaluate(_Fixed(probs), trace)
    layer = r["layers"][0]
    assert layer["recall@k"] == pytest.approx(0.5) and layer["recall@2k"] == pytest.approx(1.0)
    assert layer["precision@2k"] == pytest.approx(0.5)
    # bins: {0,0,0,0}->|0-0|, 0.1->|0.1-0|, 0.4->|0.4-1|, 0.6->|0.6-0|, 0.9->|0.9-1| over 8 probabilities
    assert layer["ece"] == pytest.approx((0.1 + 0.6 + 0.6 + 0.1) / 8)
    assert r["by_domain"]["a"]["mean"]["recall@k"] == pytest.approx(0.5)


@pytest.fixture(scope="module")
def rule_model():
    train_trace = _rule_trace(0, 48, 24)
    cfg = model_config_for(train_trace, d_model=64, n_layers=1, n_heads=2, context=16, dropout=0.0)
    model, summary = train(train_trace, cfg, TrainConfig(seconds=60, max_steps=600, rows=8, lr=3e-3, eval_every=100))
    return model, summary


def test_learned_predictor_learns_a_contextual_rule(rule_model):
    model, summary = rule_model
    test = _rule_trace(1, 8, 40)  # longer than the context: windows are exercised too
    result = evaluate(LearnedPredictor(model), test)
    freq = evaluate(FrequencyPredictor(_rule_trace(0, 48, 24)), test)
    assert result["mean"]["recall@k"] > 0.95, summary["history"]
    assert freq["mean"]["recall@k"] < 0.5


def test_learned_predictor_uses_the_observed_routes():
    cfg = model_config_for(_mode_trace(0, 64, 12), d_model=64, n_layers=1, n_heads=2, context=16, dropout=0.0)
    model, summary = train(
        _mode_trace(0, 64, 12), cfg, TrainConfig(seconds=60, max_steps=300, rows=8, lr=3e-3, eval_every=100)
    )
    test = _mode_trace(1, 8, 12)
    hits = [
        np.isin(
            np.argsort(-LearnedPredictor(model).predict(test, s)[1:, 0], -1)[:, :2],
            test.experts[test.sequence(s)][1:, 0],
        )
        for s in range(8)
    ]
    assert np.mean(hits) > 0.95, summary["history"]  # from the second token on, the pair is known


def test_training_rows_carry_the_previous_route_only_inside_a_sequence():
    from predictor.train import _Batches

    trace = _mode_trace(0, 3, 5)
    cfg = model_config_for(trace, d_model=16, n_heads=2, context=8)
    batch = _Batches(trace, cfg).make([[(0, 5), (6, 3)], [(10, 5)]])  # seq 0 whole, seq 1 from its 2nd token
    prev = batch["prev"].numpy().reshape(2, 8, 1, 8)
    hot = multi_hot(trace.experts, 8)
    assert not prev[0, 0].any() and not prev[1, 0].any()  # sequence starts: nothing before them
    assert np.array_equal(prev[0, 5], hot[5]) and np.array_equal(prev[0, 6], hot[6])  # mid-sequence chunk
    assert np.array_equal(prev[0, 1], hot[0]) and not prev[1, 7].any()  # inside a chunk; padding
    mask = batch["mask"].numpy()[0, 0]
    assert mask[4, 0] and not mask[5, 4] and not mask[0, 1]  # causal, and chunks do not see each other


def test_save_load_round_trip_predicts_identically(rule_model, tmp_path):
    model, _ = rule_model
    save_model(model, tmp_path / "p", {"note": "test"})
    back = load_model(tmp_path / "p")
    assert back.cfg == model.cfg and isinstance(back.cfg, RouteModelConfig)
    test = _rule_trace(2, 3, 30)
    assert np.array_equal(LearnedPredictor(model).predict(test, 1), LearnedPredictor(back).predict(test, 1))


def test_checkpoints_from_before_the_layer_pair_maps_still_load(tmp_path):
    cfg = RouteModelConfig(
        moe_layers=3,
        n_experts=8,
        top_k=2,
        vocab_size=16,
        d_model=16,
        n_heads=2,
        context=8,
        layer_dim=8,
        cross_layers=False,
    )
    save_model(RouteTransformer(cfg), tmp_path / "old")
    fields = json.loads((tmp_path / "old" / "config.json").read_text())
    del fields["cross_layers"]  # as written before the field existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(fields))
    back = load_model(tmp_path / "old")
    assert not back.cfg.cross_layers and back.layer_head.cross is None
    assert "layer_head.cross" in dict(
        RouteTransformer(RouteModelConfig(**{**fields, "layer_dim": 8})).named_parameters()
    )


@pytest.mark.parametrize("online", [None, OnlineConfig()])
def test_session_predicts_what_predict_does(rule_model, online):
    model, _ = rule_model
    test = _rule_trace(3, 1, 37)  # context 16: windows start at 0, 8, 16, 24
    assert [window_start(t, 16) for t in (0, 15, 16, 23, 24, 36)] == [0, 0, 8, 8, 16, 24]
    predictor = LearnedPredictor(model, online)
    replay = predictor.predict(test, 0)
    session = LearnedSession(model, online)
    for t in range(37):
        session.observe_token(int(test.tokens[t]))
        assert np.allclose(session.predict(), replay[t], atol=1e-5), t
        for j in range(2):
            session.observe_route(j, test.experts[t, j].tolist())


def test_online_correction_takes_over_only_when_the_model_is_wrong():
    wrong = np.zeros((1, 8), np.float32)
    wrong[0, [0, 1]] = 0.9  # the model insists on experts 0, 1; the request uses 2, 3
    c = OnlineCorrector(OnlineConfig(), 1, 8, 2)
    first = c.blend(wrong)
    assert set(np.argsort(-first[0])[:2]) == {0, 1}  # nothing observed: the model's word
    for _ in range(12):
        c.blend(wrong)
        c.observe(0, [2, 3])
    assert set(np.argsort(-c.blend(wrong)[0])[:2]) == {2, 3} and c.weights()[0] > 0.8
    right = OnlineCorrector(OnlineConfig(), 1, 8, 2)
    good = np.zeros((1, 8), np.float32)
    good[0, [2, 3]] = 0.9
    for _ in range(12):
        right.blend(good)
        right.observe(0, [2, 3])
    assert right.weights()[0] < 0.5  # both sources right: the model keeps most of the weight


def test_cli_import_train_eval(tmp_path, capsys):
    from predictor.cli import main

    train_trace, test = _rule_trace(0, 12, 20), _rule_trace(1, 4, 20)
    train_trace.save(tmp_path / "train.safetensors")
    test.save(tmp_path / "test.safetensors")
    out = tmp_path / "pred"
    args = ["--traces", str(tmp_path / "train.safetensors"), "--out", str(out), "--max-steps", "3"]
    assert main(["train-predictor", *args, "--d-model", "32", "--layers", "1", "--context", "16", "--quiet"]) == 0
    assert (out / "model.safetensors").exists() and json.loads((out / "train.json").read_text())["steps"] == 3
    capsys.readouterr()
    assert (
        main(["eval-predictor", "--predictor", str(out), "--traces", str(tmp_path / "test.safetensors"), "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    names = [r["name"] for r in result["results"]]
    assert names == ["learned", "learned+online", "learned@layer", "frequency", "gate-speculation", "activation-matrix"]
    assert result["results"][2]["horizon"] == "layer"
    gate = result["results"][4]
    assert gate["supported"] is False and "hidden states" in gate["reason"]
    assert main(["eval-predictor", "--predictor", str(out), "--traces", str(tmp_path / "x.safetensors")]) != 0
    capsys.readouterr()
    for bad in (["--device", "tpu"], ["--holdout", "1.5"]):
        assert main(["train-predictor", *args, *bad]) == 2
        assert "error: --" in capsys.readouterr().err


def test_multi_hot_drops_sentinels():
    hot = multi_hot(np.array([[1, 255], [0, 3]], np.uint8), 4)
    assert hot.tolist() == [[0, 1, 0, 0], [1, 0, 0, 1]]


def _chain_trace(seed: int, n_seq: int, length: int, spec_right: float = 0.0) -> Trace:
    """3 MoE layers, 8 experts, top-2: layer 0 picks a random pair whatever the token; layer j+1 picks layer j's
    pair shifted by 3. Only the token's own earlier layers tell (the layer horizon). Gate speculation, where
    given, is right for a share `spec_right` of tokens and a fixed wrong pair otherwise."""
    rng = np.random.default_rng(seed)
    first = np.stack([np.sort(rng.permutation(8)[:2]) for _ in range(n_seq * length)])
    experts = np.stack([np.sort((first + 3 * j) % 8, -1) for j in range(3)], 1)  # [N, 3, 2]
    spec = np.where(rng.random((len(first), 3, 1)) < spec_right, experts, np.array([6, 7]))
    spec[:, 0] = 255
    return _trace(rng.integers(0, 16, len(first)), [length] * n_seq, experts, spec=spec.astype(np.uint8))


@pytest.fixture(scope="module")
def chain_model():
    trace = _chain_trace(0, 48, 16, spec_right=0.5)
    cfg = model_config_for(trace, d_model=32, n_layers=1, n_heads=2, context=16, dropout=0.0, layer_dim=32)
    return train(trace, cfg, TrainConfig(seconds=60, max_steps=300, rows=8, lr=3e-3, eval_every=100))


def test_layer_head_learns_from_the_tokens_earlier_layers(chain_model):
    model, summary = chain_model
    test = _chain_trace(1, 8, 16)
    token = evaluate(LearnedPredictor(model), test)["layers"]
    layer = evaluate(LearnedPredictor(model, layer_horizon=True), test)["layers"]
    assert token[1]["recall@k"] < 0.6 and token[2]["recall@k"] < 0.6  # the pair is random per token
    assert layer[1]["recall@k"] > 0.95 and layer[2]["recall@k"] > 0.95, summary["history"]


def test_layer_head_never_reads_the_layer_it_predicts_or_later(chain_model):
    model, _ = chain_model
    torch.manual_seed(0)
    state, logits = torch.randn(5, model.cfg.d_model), torch.randn(5, 3, 8)
    routes = (torch.rand(5, 3, 8) < 0.3).float()
    spec = torch.from_numpy(ranked_hot(np.array([[[255, 255], [1, 2], [3, 4]]] * 5, np.uint8), 8))
    with torch.no_grad():
        base = model.refine(state, logits, routes, spec)
        for j in range(3):
            changed = routes.clone()
            changed[:, j:] = 1.0 - changed[:, j:]
            assert torch.equal(model.refine(state, logits, changed, spec)[:, : j + 1], base[:, : j + 1])


def test_session_refine_matches_the_layer_horizon_replay(chain_model):
    model, _ = chain_model
    test = _chain_trace(2, 1, 20, spec_right=0.5)
    replay = LearnedPredictor(model, layer_horizon=True).predict(test, 0)
    session = LearnedSession(model)
    for t in range(20):
        session.observe_token(int(test.tokens[t]))
        session.predict()
        for j in range(3):
            spec = None if j == 0 else test.spec_experts[t, j].tolist()
            assert np.allclose(session.refine(j, spec), replay[t, j], atol=1e-5), (t, j)
            session.observe_route(j, test.experts[t, j].tolist())


def test_speculation_gain_is_calibrated_on_held_out_sequences():
    from predictor.train import calibrate_spec_gain

    trace = _chain_trace(3, 20, 12, spec_right=0.0)  # in training speculation is always wrong ...
    cfg = model_config_for(trace, d_model=16, n_layers=1, n_heads=2, context=16, layer_dim=16)
    model, _ = train(trace, cfg, TrainConfig(seconds=30, max_steps=2, rows=4))
    held_out = _chain_trace(4, 20, 12, spec_right=1.0)  # ... on the held-out sequences always right
    before = evaluate(LearnedPredictor(model, layer_horizon=True), held_out)["mean"]["recall@k"]
    gains = calibrate_spec_gain(model, held_out, np.arange(20))
    assert gains[0] == [0.0, 0.0] and all(max(g) > 0 for g in gains[1:])
    after = evaluate(LearnedPredictor(model, layer_horizon=True), _chain_trace(5, 8, 12, spec_right=1.0))
    assert before < 0.95 and all(row["recall@k"] == 1.0 for row in after["layers"][1:])


def test_training_reads_the_token_table_leave_one_out():
    from predictor.train import _Batches, init_token_table
    from predictor.model import RouteTransformer

    trace = _trace(np.array([5, 5, 5]), [1, 1, 1], np.array([[[0, 1]], [[0, 1]], [[2, 3]]]))
    cfg = model_config_for(trace, d_model=16, n_heads=2, context=4, layer_dim=0)
    model = RouteTransformer(cfg)
    table = init_token_table(model, trace, np.arange(3))
    rows = np.full(3, 5)
    batch = _Batches(trace, cfg, table, rows, np.array([True, True, False])).make([[(0, 1), (2, 1)]])
    got = batch["table"].numpy()[0, :2, 0]  # [position, E]
    # position 0 (fitted): the table without itself = token 5 seen twice, once [0, 1], once [2, 3]
    assert np.allclose(got[0], table.logits(table.counts[5] - multi_hot(np.array([0, 1]), 8), np.float32(2.0)))
    # position 1 holds trace row 2, which was not fitted: the full table
    assert np.allclose(got[1], model.table.weight[5].detach().numpy())


def test_one_token_sequences_are_predicted(chain_model):
    model, _ = chain_model
    trace = _chain_trace(6, 3, 1, spec_right=1.0)  # three sequences of one token each
    for layer_horizon in (False, True):
        probs = LearnedPredictor(model, layer_horizon=layer_horizon).predict(trace, 1)
        assert probs.shape == (1, 3, 8) and np.isfinite(probs).all()


def test_batched_sessions_follow_requests_by_id_from_their_prompts(chain_model):
    """LearnedSessions: a request's first step may bring its whole prompt (its routes arrive per layer after
    it); from then on one token per step predicts what the offline replay does, token and layer horizon."""
    from predictor.replay import ReplaySessions

    model, _ = chain_model
    test = _chain_trace(7, 2, 14, spec_right=0.5)
    token_replay = [LearnedPredictor(model).predict(test, s) for s in range(2)]
    layer_replay = [LearnedPredictor(model, layer_horizon=True).predict(test, s) for s in range(2)]
    live = LearnedPredictor(model).sessions()
    replayed = ReplaySessions(test, LearnedPredictor(model), LearnedPredictor(model, layer_horizon=True))
    prompt = 5
    seqs = [test.sequence(s) for s in range(2)]
    for predictor in (live, replayed):
        ids = {"0": seqs[0], "1": seqs[1]}
        first = predictor.step({rid: test.tokens[sl][:prompt].tolist() for rid, sl in ids.items()})
        assert first == {}  # a prompt's last token cannot be predicted before the prompt's routes are known
        for j in range(3):
            predictor.layer(j, {rid: test.experts[sl][:prompt, j] for rid, sl in ids.items()})
        if predictor is live:  # the prompt's window is read once its routes are complete, not at its next token
            assert all(live._sessions[rid]._kv_window == (0, prompt - 1) for rid in ids)
        for t in range(prompt, 14):
            got = predictor.step({rid: [int(test.tokens[sl][t])] for rid, sl in ids.items()})
            for s, rid in enumerate(ids):
                assert np.allclose(got[rid], np.clip(token_replay[s][t], 0, 1), atol=1e-5), (rid, t)
            for j in range(3):
                spec = {rid: test.spec_experts[sl][t, j + 1] for rid, sl in ids.items()} if j < 2 else None
                refined = predictor.layer(j, {rid: test.experts[sl][t : t + 1, j] for rid, sl in ids.items()}, spec)
                if j < 2:
                    for s, rid in enumerate(ids):
                        assert np.allclose(refined[rid], layer_replay[s][t, j + 1], atol=1e-5), (rid, t, j)
                else:
                    assert refined == {}
        predictor.finish(["0", "1"])
    with pytest.raises(ValueError, match="not the trace's"):
        replayed.step({"0": [int(test.tokens[seqs[0]][0]) + 1]})


def test_activation_sessions_predict_what_the_replay_does():
    rng = np.random.default_rng(3)
    train_trace = _trace(np.zeros(60), [20, 20, 20], rng.integers(0, 8, (60, 2, 2)))
    test = _trace(np.zeros(30), [30], rng.integers(0, 8, (30, 2, 2)))
    matcher = ActivationMatrixPredictor(train_trace)
    replay = matcher.predict(test, 0)
    sessions = matcher.sessions()
    sessions.step({"r": [0] * 3})  # a three-token prompt first
    sessions.layer(0, {"r": test.experts[:3, 0]})
    sessions.layer(1, {"r": test.experts[:3, 1]})
    for t in range(3, 30):
        got = sessions.step({"r": [0]})["r"]
        assert np.allclose(got, replay[t], atol=1e-5), t
        for j in range(2):
            assert sessions.layer(j, {"r": test.experts[t : t + 1, j]}) == {}


def test_corrector_observe_one_layer_is_the_vectorised_update():
    rng = np.random.default_rng(0)
    fast, reference = OnlineCorrector(OnlineConfig(), 4, 8, 2), OnlineCorrector(OnlineConfig(), 4, 8, 2)
    for _ in range(200):
        p = rng.random((4, 8)).astype(np.float32)
        assert np.array_equal(fast.blend(p), reference.blend(p))
        for j in range(4):
            e = rng.choice(8, 2, replace=False)
            fast.observe(j, e)
            reference._update(np.array([j]), e[None])
        for name in ("counts", "mass", "r_model", "r_own"):
            assert np.array_equal(getattr(fast, name), getattr(reference, name)), name
