"""Downstream-task metrics, pure and offline.

Classification: `accuracy` and `binary_f1` (QQP reports F1 on the "duplicate" class). Extractive QA: the SQuAD v1.1
official evaluation (`normalize_answer`, `squad_exact_match`, `squad_f1`, `squad_metrics`), re-implemented line for
line from the official `evaluate-v1.1.py` so that scores are comparable with published numbers without the
`evaluate` library or a download. `aggregate_seeds` summarises several fine-tuning seeds.

    >>> accuracy([1, 0, 1], [1, 1, 1])
    0.6666666666666666
    >>> squad_metrics({"q1": "the Cat"}, {"q1": ["cat", "a dog"]})
    {'exact_match': 100.0, 'f1': 100.0}
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

ArrayLike = Sequence[int] | np.ndarray

CLASSIFICATION_METRICS = ("accuracy", "f1")
"""Metric names that `classification_metrics` knows; "f1" is binary F1 on class 1."""

QA_METRICS = ("exact_match", "f1")
"""Metric names that `squad_metrics` returns (both on a 0-100 scale, as the official script)."""


def _as_label_vectors(preds: ArrayLike, labels: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D integer arrays of the same, non-zero length; raises ValueError otherwise."""
    p = np.asarray(preds)
    y = np.asarray(labels)
    if p.ndim != 1:
        # A common slip is to pass logits; say so rather than compare a 2-D array element-wise.
        raise ValueError(f"preds must be 1-D class ids, got shape {p.shape} (take argmax over the last axis of logits)")
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D class ids, got shape {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"preds and labels differ in length: {p.shape[0]} preds, {y.shape[0]} labels")
    if p.shape[0] == 0:
        raise ValueError("preds and labels are empty: a metric over zero examples is undefined")
    return p, y


def accuracy(preds: ArrayLike, labels: ArrayLike) -> float:
    """Fraction (0-1) of positions where `preds[i] == labels[i]`."""
    p, y = _as_label_vectors(preds, labels)
    return float(np.mean(p == y))


def binary_f1(preds: ArrayLike, labels: ArrayLike, positive: int = 1) -> float:
    """F1 (0-1) of the `positive` class, as `sklearn.metrics.f1_score(labels, preds, pos_label=positive)`.

    Defined as 2*TP / (2*TP + FP + FN); when there is no positive in either preds or labels the ratio is 0/0 and,
    like sklearn's `zero_division` default, the result is 0.0.
    """
    p, y = _as_label_vectors(preds, labels)
    pred_pos = p == positive
    true_pos = y == positive
    tp = int(np.sum(pred_pos & true_pos))
    fp = int(np.sum(pred_pos & ~true_pos))
    fn = int(np.sum(~pred_pos & true_pos))
    denominator = 2 * tp + fp + fn
    return 0.0 if denominator == 0 else 2.0 * tp / denominator


def classification_metrics(
    preds: ArrayLike, labels: ArrayLike, names: Sequence[str] = ("accuracy",)
) -> dict[str, float]:
    """The named metrics (see `CLASSIFICATION_METRICS`) on one evaluation split, keyed by name, each 0-1."""
    unknown = [n for n in names if n not in CLASSIFICATION_METRICS]
    if unknown:
        raise ValueError(f"unknown classification metric(s) {unknown}; known: {list(CLASSIFICATION_METRICS)}")
    functions = {"accuracy": accuracy, "f1": binary_f1}
    return {name: functions[name](preds, labels) for name in names}


# --- SQuAD v1.1, following the official evaluate-v1.1.py -------------------------------------------------------


def normalize_answer(s: str) -> str:
    """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace (official v1.1 order)."""
    text = s.lower()
    exclude = set(string.punctuation)
    text = "".join(ch for ch in text if ch not in exclude)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _exact_match_one(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def _f1_one(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    ground_truth_tokens = normalize_answer(ground_truth).split()
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        # Also covers an empty prediction or an answer made only of articles/punctuation, as the official script.
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _ground_truth_list(ground_truths: Sequence[str] | str) -> Sequence[str]:
    if isinstance(ground_truths, str):
        # A bare string would otherwise be iterated character by character.
        raise TypeError(f"ground_truths must be a list of answer strings, got the string {ground_truths!r}")
    if len(ground_truths) == 0:
        raise ValueError("ground_truths is empty: SQuAD v1.1 scores need at least one reference answer")
    return ground_truths


def squad_exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised ground truth, else 0.0."""
    return float(max(_exact_match_one(prediction, gt) for gt in _ground_truth_list(ground_truths)))


def squad_f1(prediction: str, ground_truths: Sequence[str]) -> float:
    """Token-level F1 (0-1) of the normalised prediction, the maximum over the ground truths."""
    return max(_f1_one(prediction, gt) for gt in _ground_truth_list(ground_truths))


def squad_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Official SQuAD v1.1 scores over `references`: {"exact_match": 0-100, "f1": 0-100}.

    As the official script, a reference id with no prediction scores 0 on both. Unlike it, a prediction whose id
    is not among the references raises ValueError: inside pofa both come from the same examples, so a stray id
    means the wrong evaluation set was paired.
    """
    if len(references) == 0:
        raise ValueError("references is empty: no question to score")
    stray = [qid for qid in predictions if qid not in references]
    if stray:
        raise ValueError(
            f"{len(stray)} prediction id(s) not in references, e.g. {stray[:3]}; "
            "pair predictions with the references of the same examples"
        )
    exact_match = 0.0
    f1 = 0.0
    for qid, ground_truths in references.items():
        if qid not in predictions:
            continue
        exact_match += squad_exact_match(predictions[qid], ground_truths)
        f1 += squad_f1(predictions[qid], ground_truths)
    total = len(references)
    return {"exact_match": 100.0 * exact_match / total, "f1": 100.0 * f1 / total}


# --- several seeds ---------------------------------------------------------------------------------------------


def aggregate_seeds(results: Sequence[Mapping[str, float]]) -> dict[str, dict[str, float | int]]:
    """Per metric over seeds: {"mean", "std", "min", "max", "n"}.

    `std` is the sample standard deviation (ddof=1), the usual "mean +- std over n seeds" of papers; with one
    seed it is 0.0. Every result must carry the same metric names (a missing one raises, naming it and the seed
    index), since averaging over a different subset per metric would be silently misleading.
    """
    if len(results) == 0:
        raise ValueError("results is empty: nothing to aggregate")
    names = list(results[0].keys())
    for index, result in enumerate(results):
        missing = [n for n in names if n not in result]
        extra = [n for n in result if n not in names]
        if missing or extra:
            raise ValueError(
                f"seed result {index} has different metrics than result 0: missing {missing}, extra {extra}"
            )
    summary: dict[str, dict[str, float | int]] = {}
    for name in names:
        values = np.asarray([float(r[name]) for r in results], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"metric {name!r} has a non-finite value over seeds: {values.tolist()}")
        std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
        summary[name] = {
            "mean": float(np.mean(values)),
            "std": std,
            "min": float(np.min(values)),
            "max": float(np.max(values)),
            "n": int(values.size),
        }
    return summary


__all__ = [
    "CLASSIFICATION_METRICS",
    "QA_METRICS",
    "accuracy",
    "aggregate_seeds",
    "binary_f1",
    "classification_metrics",
    "normalize_answer",
    "squad_exact_match",
    "squad_f1",
    "squad_metrics",
]
