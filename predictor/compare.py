"""The learned predictor against its peers on held-out traces: what `eval-predictor` and `prepare` report.

The learned predictor is scored at the token horizon, with online correction, and (where it has a layer
head) at the layer horizon; the peers (frequency, gate speculation, activation-matrix matching) are fitted
on the training traces only. Progress, one step per scored sequence, goes to stderr.

Not for: the metrics themselves (evaluate.py) or printing them (evaluate.format_comparison).
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from predictor.baselines import ActivationMatrixPredictor, FrequencyPredictor, GateSpeculationPredictor
from predictor.evaluate import evaluate
from predictor.learned import LearnedPredictor
from predictor.online import OnlineConfig
from traces.format import Trace

LEARNED = ("learned", "learned+online", "learned@layer")  # labels of the learned predictor's variants


def contenders(learned: LearnedPredictor, train: Trace) -> list[tuple[Any, str | None]]:
    """(predictor, label) pairs: the learned one's variants, then the peers fitted on `train`."""
    return [
        (learned, "learned"),
        (LearnedPredictor(learned.model, OnlineConfig()), "learned+online"),
        *([(LearnedPredictor(learned.model, layer_horizon=True), "learned@layer")] if learned.model.layer_head else []),
        (FrequencyPredictor(train), None),
        (GateSpeculationPredictor(train), None),
        (ActivationMatrixPredictor(train), None),
    ]


def compare_with_peers(
    learned: LearnedPredictor, train: Trace, test: Trace, progress: bool = True, desc: str = "evaluating"
) -> list[dict]:
    """evaluate() of every contender on `test`, in `contenders` order."""
    pairs = contenders(learned, train)
    results = []
    with tqdm(total=len(pairs) * test.n_sequences, desc=desc, unit="seq", file=sys.stderr, disable=not progress) as bar:
        for predictor, label in pairs:
            bar.set_postfix_str(label or predictor.name)
            result = evaluate(predictor, test, label, on_sequence=bar.update)
            if not result["supported"]:  # skipped whole: its sequences are done
                bar.update(test.n_sequences)
            results.append(result)
    return results


def best_peer(results: list[dict]) -> dict | None:
    """The supported peer (not a learned variant) with the highest mean recall@k, or None."""
    peers = [r for r in results if r["supported"] and r["name"] not in LEARNED]
    return max(peers, key=lambda r: r["mean"]["recall@k"], default=None)
