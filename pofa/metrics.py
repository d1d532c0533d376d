"""Downstream-task metrics, pure and offline.

Classification: `accuracy`, `binary_f1` (QQP and MRPC report F1 on class 1), `macro_f1`, `matthews_correlation`
(CoLA). Regression: `pearson` and `spearman` (STS-B). Token classification: entity-level precision / recall / F1
and token accuracy exactly as `seqeval` computes them in its default mode (`entities`, `token_classification_metrics`;
the tests check them against seqeval itself). Extractive QA: the SQuAD v1.1 official evaluation
(`normalize_answer`, `squad_exact_match`, `squad_f1`, `squad_metrics`), re-implemented line for line from the official
`evaluate-v1.1.py`, and SQuAD v2.0's (`squad_v2_metrics`: unanswerable questions, the no-answer threshold and the
best thresholds) from `evaluate-v2.0.py`, so that scores are comparable with published numbers without the
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

CLASSIFICATION_METRICS = ("accuracy", "f1", "macro_f1", "matthews_correlation")
"""Metric names that `classification_metrics` knows; "f1" is binary F1 on class 1, "macro_f1" the unweighted mean
of every class's F1."""

REGRESSION_METRICS = ("pearson", "spearman")
"""Metric names that `regression_metrics` knows (correlations, -1 to 1)."""

TOKEN_CLASSIFICATION_METRICS = ("precision", "recall", "f1", "accuracy")
"""Metric names that `token_classification_metrics` returns: entity-level micro precision / recall / F1 and token
accuracy, each 0-1 (seqeval's overall_precision, overall_recall, overall_f1, overall_accuracy)."""

QA_METRICS = ("exact_match", "f1")
"""Metric names that `squad_metrics` returns (both on a 0-100 scale, as the official script)."""

QA_V2_METRICS = ("exact_match", "f1", "best_exact_match", "best_exact_match_thresh", "best_f1", "best_f1_thresh")
"""Metric names that `squad_v2_metrics` always returns (the official v2 script's exact, f1, best_exact,
best_exact_thresh, best_f1, best_f1_thresh); it adds has_answer_* / no_answer_* when the references hold both kinds."""


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


def _confusion(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Confusion counts [true class, predicted class] over the classes that occur in either."""
    classes, codes = np.unique(np.concatenate([y, p]), return_inverse=True)
    n = len(y)
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(matrix, (codes[:n], codes[n:]), 1)
    return matrix


def macro_f1(preds: ArrayLike, labels: ArrayLike) -> float:
    """Unweighted mean over the classes present in preds or labels of each class's F1 (0-1), as
    `sklearn.metrics.f1_score(labels, preds, average="macro")` (a class with 0/0 counts 0)."""
    p, y = _as_label_vectors(preds, labels)
    matrix = _confusion(p, y)
    tp = np.diag(matrix).astype(np.float64)
    denominator = matrix.sum(axis=0) + matrix.sum(axis=1)  # 2TP + FP + FN, per class
    per_class = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(per_class.mean())


def matthews_correlation(preds: ArrayLike, labels: ArrayLike) -> float:
    """Matthews correlation coefficient (-1 to 1), multi-class, as `sklearn.metrics.matthews_corrcoef` (GLUE's
    CoLA metric). When it is undefined (all predictions or all labels one class) it is 0.0, as sklearn returns."""
    p, y = _as_label_vectors(preds, labels)
    matrix = _confusion(p, y).astype(np.float64)
    true_per_class, pred_per_class = matrix.sum(axis=1), matrix.sum(axis=0)
    correct, total = np.trace(matrix), matrix.sum()
    covariance = correct * total - pred_per_class @ true_per_class
    variance = (total**2 - pred_per_class @ pred_per_class) * (total**2 - true_per_class @ true_per_class)
    return 0.0 if variance == 0 else float(covariance / np.sqrt(variance))


def classification_metrics(
    preds: ArrayLike, labels: ArrayLike, names: Sequence[str] = ("accuracy",)
) -> dict[str, float]:
    """The named metrics (see `CLASSIFICATION_METRICS`) on one evaluation split, keyed by name."""
    unknown = [n for n in names if n not in CLASSIFICATION_METRICS]
    if unknown:
        raise ValueError(f"unknown classification metric(s) {unknown}; known: {list(CLASSIFICATION_METRICS)}")
    functions = {"accuracy": accuracy, "f1": binary_f1, "macro_f1": macro_f1,
                 "matthews_correlation": matthews_correlation}
    return {name: functions[name](preds, labels) for name in names}


# --- regression (STS-B) -----------------------------------------------------------------------------------------


def _as_score_vectors(preds: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as 1-D float64 arrays of the same length >= 2; raises ValueError otherwise."""
    p = np.asarray(preds, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if p.ndim == 2 and p.shape[1] == 1:  # a regression head's [N, 1] output
        p = p[:, 0]
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"preds and labels must be 1-D scores, got shapes {p.shape} and {y.shape}")
    if p.shape[0] != y.shape[0]:
        raise ValueError(f"preds and labels differ in length: {p.shape[0]} preds, {y.shape[0]} labels")
    if p.shape[0] < 2:
        raise ValueError(f"a correlation needs at least 2 examples, got {p.shape[0]}")
    if not (np.all(np.isfinite(p)) and np.all(np.isfinite(y))):
        raise ValueError("preds and labels must be finite numbers")
    return p, y


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denominator = np.sqrt((a @ a) * (b @ b))
    # A constant vector has no linear association to show: 0.0 (scipy says nan, which no average survives).
    return 0.0 if denominator == 0 else float(np.clip((a @ b) / denominator, -1.0, 1.0))


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given the mean of the ranks they span (`scipy.stats.rankdata(method="average")`)."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    # Each run of equal values [start, end) gets the mean of the ranks start+1 .. end.
    boundaries = np.flatnonzero(np.diff(sorted_values) != 0) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(values)]])
    for start, end in zip(starts.tolist(), ends.tolist()):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks


def pearson(preds: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Pearson correlation (-1 to 1) of predictions and gold scores, as `scipy.stats.pearsonr`; 0.0 if either is
    constant."""
    p, y = _as_score_vectors(preds, labels)
    return _correlation(p, y)


def spearman(preds: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (-1 to 1): Pearson's of the average ranks, as `scipy.stats.spearmanr`; 0.0 if
    either is constant."""
    p, y = _as_score_vectors(preds, labels)
    return _correlation(average_ranks(p), average_ranks(y))


def regression_metrics(
    preds: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray,
    names: Sequence[str] = REGRESSION_METRICS,
) -> dict[str, float]:
    """The named metrics (see `REGRESSION_METRICS`) on one evaluation split, keyed by name."""
    unknown = [n for n in names if n not in REGRESSION_METRICS]
    if unknown:
        raise ValueError(f"unknown regression metric(s) {unknown}; known: {list(REGRESSION_METRICS)}")
    functions = {"pearson": pearson, "spearman": spearman}
    return {name: functions[name](preds, labels) for name in names}


# --- token classification, as seqeval's default (conlleval) mode ---------------------------------------------


def _tag_parts(tag: str) -> tuple[str, str]:
    """(prefix, type) of a tag: "B-PER" -> ("B", "PER"), "O" -> ("O", "_"), "B" -> ("B", "_") (seqeval's reading)."""
    return tag[0], tag[1:].split("-", maxsplit=1)[-1] or "_"


def _chunk_ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag not in ("O", ".") and prev_type != type_


def _chunk_starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag not in ("O", ".") and prev_type != type_


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """(type, first, last) of every entity in one tag sequence, as `seqeval.metrics.sequence_labeling.get_entities`.

    IOB1, IOB2, IOE and IOBES tags are read leniently, as conlleval does: an I- after O or after another type starts
    an entity, a change of type ends one. Tags without a prefix letter and dash count as the type "_".
    """
    found = []
    prev_tag, prev_type, begin = "O", "", 0
    for i, tag in enumerate([*tags, "O"]):
        if not tag:
            raise ValueError(f"empty tag at position {i}")
        prefix, type_ = _tag_parts(tag)
        if _chunk_ends(prev_tag, prefix, prev_type, type_):
            found.append((prev_type, begin, i - 1))
        if _chunk_starts(prev_tag, prefix, prev_type, type_):
            begin = i
        prev_tag, prev_type = prefix, type_
    return found


def token_classification_metrics(
    predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]]
) -> dict[str, float]:
    """Entity-level micro precision, recall and F1 and token accuracy (each 0-1) over sentences of tags.

    The same numbers as seqeval's `precision_score`, `recall_score`, `f1_score` and `accuracy_score` in their
    default mode (HF `evaluate`'s "seqeval" overall_* values): sentences are joined with an "O" between them, an
    entity counts as found when type, start and end all match, and 0/0 is 0.0. Each prediction must be as long as
    its reference (ValueError naming the sentence otherwise).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predicted sentences but {len(references)} reference sentences")
    if not references:
        raise ValueError("references is empty: no sentence to score")
    for index, (predicted, gold) in enumerate(zip(predictions, references, strict=True)):
        if isinstance(predicted, str) or isinstance(gold, str):
            raise TypeError(f"sentence {index}: give a list of tags per sentence, not the string {predicted!r}")
        if len(predicted) != len(gold):
            raise ValueError(f"sentence {index}: {len(predicted)} predicted tags for {len(gold)} reference tags")

    def joined(sentences: Sequence[Sequence[str]]) -> list[str]:
        return [tag for sentence in sentences for tag in [*sentence, "O"]]

    flat_predicted, flat_gold = joined(predictions), joined(references)
    found = set(entities(flat_predicted))
    true = set(entities(flat_gold))
    correct = len(found & true)
    precision = correct / len(found) if found else 0.0
    recall = correct / len(true) if true else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    tokens = sum(len(sentence) for sentence in references)
    matching = sum(p == g for sp, sg in zip(predictions, references) for p, g in zip(sp, sg))
    return {"precision": precision, "recall": recall, "f1": f1,
            "accuracy": matching / tokens if tokens else 0.0}


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


def _token_f1(prediction_tokens: list[str], gold_tokens: list[str]) -> float:
    """F1 of the tokens two answers share (a bag of tokens), as both official SQuAD scripts compute it."""
    num_same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        # Also covers an empty prediction or an answer made only of articles/punctuation, as the official script.
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _f1_one(prediction: str, ground_truth: str) -> float:
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


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


# --- SQuAD v2.0, following the official evaluate-v2.0.py --------------------------------------------------------


def _v2_tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def _v2_exact(gold: str, prediction: str) -> float:
    return float(normalize_answer(gold) == normalize_answer(prediction))


def _v2_f1(gold: str, prediction: str) -> float:
    gold_tokens, prediction_tokens = _v2_tokens(gold), _v2_tokens(prediction)
    if not gold_tokens or not prediction_tokens:
        # v2: when either is "no answer", F1 is 1 if both are, else 0 (v1.1 would say 0 for both).
        return float(gold_tokens == prediction_tokens)
    return _token_f1(prediction_tokens, gold_tokens)


def _best_threshold(
    predictions: Mapping[str, str], scores: Mapping[str, float], na_probs: Mapping[str, float],
    has_answer: Mapping[str, bool],
) -> tuple[float, float]:
    """(best score 0-100, its threshold): the official `find_best_thresh`. Start from "every question unanswered"
    (all unanswerable ones right) and, in order of rising no-answer probability, let each question keep its
    predicted answer; the best running total wins, ties keep the lower threshold."""
    current = best = float(sum(1 for qid in has_answer if not has_answer[qid]))
    threshold = 0.0
    for qid in sorted(na_probs, key=lambda k: na_probs[k]):
        if qid not in scores:
            continue
        if has_answer[qid]:
            current += scores[qid]
        elif predictions[qid]:
            current -= 1
        if current > best:
            best, threshold = current, na_probs[qid]
    return 100.0 * best / len(scores), threshold


def squad_v2_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    na_probs: Mapping[str, float] | None = None,
    na_prob_thresh: float = 1.0,
) -> dict[str, float]:
    """Official SQuAD v2.0 scores: exact_match and f1 (0-100), their has_answer_* / no_answer_* parts, and
    best_exact_match / best_f1 with the no-answer thresholds that reach them (`*_thresh`).

    `references[qid]` lists the answer texts, empty for an unanswerable question (whose only right answer is "");
    `predictions[qid]` is the answer text, "" for "no answer". `na_probs[qid]` is the model's no-answer score (any
    scale, e.g. pofa's null-score difference); a question whose score exceeds `na_prob_thresh` counts as answered
    "no answer" in exact_match / f1. Without `na_probs` every score is 0.0, as the official script without
    --na-prob-file (best_* then equal the plain scores when the predictions beat "no answer everywhere").
    Every reference needs a prediction and every prediction a reference (ValueError naming the ids otherwise): the
    official script fails on a missing one too, when it splits the scores into has-answer and no-answer parts.
    """
    if len(references) == 0:
        raise ValueError("references is empty: no question to score")
    stray = [qid for qid in predictions if qid not in references]
    unanswered = [qid for qid in references if qid not in predictions]
    if stray or unanswered:
        raise ValueError(
            f"{len(stray)} prediction id(s) not in references (e.g. {stray[:3]}) and {len(unanswered)} reference "
            f"id(s) without a prediction (e.g. {unanswered[:3]}); pair predictions with the references of the same "
            "examples"
        )
    for qid, answers in references.items():
        if isinstance(answers, str):
            raise TypeError(f"references[{qid!r}] must be a list of answer strings, got the string {answers!r}")
    probs = dict(na_probs) if na_probs is not None else {qid: 0.0 for qid in predictions}
    missing = [qid for qid in predictions if qid not in probs]
    if missing:
        raise ValueError(f"na_probs lacks {len(missing)} predicted id(s), e.g. {missing[:3]}")
    has_answer = {qid: bool(answers) for qid, answers in references.items()}
    exact_raw, f1_raw = {}, {}
    for qid, answers in references.items():
        # Answers that normalise to nothing ("the", ".") do not count as answers, as in the official script.
        golds = [a for a in answers if normalize_answer(a)] or [""]
        exact_raw[qid] = max(_v2_exact(gold, predictions[qid]) for gold in golds)
        f1_raw[qid] = max(_v2_f1(gold, predictions[qid]) for gold in golds)

    def thresholded(raw: Mapping[str, float]) -> dict[str, float]:
        return {qid: float(not has_answer[qid]) if probs[qid] > na_prob_thresh else score for qid, score in raw.items()}

    exact, f1 = thresholded(exact_raw), thresholded(f1_raw)
    total = len(references)
    result = {"exact_match": 100.0 * sum(exact.values()) / total, "f1": 100.0 * sum(f1.values()) / total}
    for prefix, wanted in (("has_answer", True), ("no_answer", False)):
        ids = [qid for qid in references if has_answer[qid] == wanted]
        if ids:
            result[f"{prefix}_exact_match"] = 100.0 * sum(exact[qid] for qid in ids) / len(ids)
            result[f"{prefix}_f1"] = 100.0 * sum(f1[qid] for qid in ids) / len(ids)
    result["best_exact_match"], result["best_exact_match_thresh"] = _best_threshold(predictions, exact_raw, probs,
                                                                                    has_answer)
    result["best_f1"], result["best_f1_thresh"] = _best_threshold(predictions, f1_raw, probs, has_answer)
    return result


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
    "QA_V2_METRICS",
    "REGRESSION_METRICS",
    "TOKEN_CLASSIFICATION_METRICS",
    "accuracy",
    "aggregate_seeds",
    "average_ranks",
    "binary_f1",
    "classification_metrics",
    "entities",
    "macro_f1",
    "matthews_correlation",
    "normalize_answer",
    "pearson",
    "regression_metrics",
    "spearman",
    "squad_exact_match",
    "squad_f1",
    "squad_metrics",
    "squad_v2_metrics",
    "token_classification_metrics",
]
