"""pofa.metrics on hand-made cases whose answers are worked out in the comments."""

import math

import numpy as np
import pytest

from pofa.metrics import (
    accuracy,
    aggregate_seeds,
    binary_f1,
    classification_metrics,
    normalize_answer,
    squad_exact_match,
    squad_f1,
    squad_metrics,
)


def test_accuracy_counts_matches():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert accuracy(np.array([2, 2]), np.array([2, 2])) == 1.0


@pytest.mark.parametrize(
    ("preds", "labels", "message"),
    [([1, 0], [1], "differ in length"), ([], [], "empty"), ([[0.1, 0.9]], [1], "argmax")],
)
def test_accuracy_rejects_bad_shapes(preds, labels, message):
    with pytest.raises(ValueError, match=message):
        accuracy(preds, labels)


def test_binary_f1_qqp_hand_case():
    preds = [1, 1, 0, 0, 1]
    labels = [1, 0, 1, 0, 1]
    # positive=1: TP at 0 and 4, FP at 1, FN at 2 -> P = R = 2/3 -> F1 = 2/3.
    assert binary_f1(preds, labels) == pytest.approx(2 / 3)
    # positive=0: TP at 3, FP at 2, FN at 1 -> P = R = 1/2 -> F1 = 1/2.
    assert binary_f1(preds, labels, positive=0) == pytest.approx(0.5)


def test_binary_f1_zero_division_is_zero_like_sklearn():
    assert binary_f1([0, 0, 0], [0, 0, 0]) == 0.0  # no positive anywhere: 0/0 -> 0.0
    assert binary_f1([1, 1], [0, 0]) == 0.0  # only false positives


def test_classification_metrics_uses_task_metric_names():
    result = classification_metrics([1, 1, 0, 0, 1], [1, 0, 1, 0, 1], names=("accuracy", "f1"))
    assert result == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})
    with pytest.raises(ValueError, match="'exact_match'"):
        classification_metrics([1], [1], names=("exact_match",))


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("The Cat", "cat"),
        ("  An  apple, a day!  ", "apple day"),
        ("theater", "theater"),  # articles only as whole words
        # Punctuation goes before articles (official order): "The.Cat" -> "thecat", not "cat".
        ("The.Cat", "thecat"),
        ("A\tb\nc", "b c"),
    ],
)
def test_normalize_answer_matches_official_script(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_squad_exact_match_normalizes_and_takes_max():
    assert squad_exact_match("The Cat", ["cat"]) == 1.0
    assert squad_exact_match("the cat.", ["a dog", "Cat"]) == 1.0
    assert squad_exact_match("black cat", ["cat"]) == 0.0


def test_squad_f1_partial_overlap_by_hand():
    # pred tokens [big, black, cat], truth [black, cat, sat]: 2 shared -> P = R = 2/3 -> F1 = 2/3.
    assert squad_f1("the big black cat", ["black cat sat"]) == pytest.approx(2 / 3)
    # Repeated tokens count once per match: [cat, cat] vs [cat] -> P = 1/2, R = 1 -> F1 = 2/3.
    assert squad_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)
    # Max over ground truths.
    assert squad_f1("cat", ["dog", "the cat"]) == 1.0
    assert squad_f1("", ["cat"]) == 0.0


def test_squad_rejects_bare_string_and_empty_truths():
    with pytest.raises(TypeError, match="list of answer strings"):
        squad_f1("cat", "cat")
    with pytest.raises(ValueError, match="at least one reference"):
        squad_exact_match("cat", [])


def test_squad_metrics_percentages_and_missing_ids():
    predictions = {"a": "The Cat", "b": "big black cat"}
    references = {"a": ["cat"], "b": ["black cat sat"], "c": ["x"]}  # "c" unanswered -> scores 0 (official)
    result = squad_metrics(predictions, references)
    assert result["exact_match"] == pytest.approx(100 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)


def test_squad_metrics_rejects_stray_prediction_ids():
    with pytest.raises(ValueError, match="'zzz'"):
        squad_metrics({"zzz": "cat"}, {"a": ["cat"]})


def test_aggregate_seeds_mean_and_sample_std():
    seeds = [{"accuracy": 0.8, "f1": 0.5}, {"accuracy": 0.9, "f1": 0.5}, {"accuracy": 1.0, "f1": 0.5}]
    summary = aggregate_seeds(seeds)
    assert summary["accuracy"]["mean"] == pytest.approx(0.9)
    assert summary["accuracy"]["std"] == pytest.approx(0.1)  # sample std (ddof=1) of 0.8, 0.9, 1.0
    assert summary["accuracy"]["n"] == 3
    assert (summary["accuracy"]["min"], summary["accuracy"]["max"]) == (0.8, 1.0)
    assert summary["f1"]["std"] == 0.0
    assert aggregate_seeds([{"accuracy": 0.7}])["accuracy"]["std"] == 0.0


def test_aggregate_seeds_names_missing_metric_and_seed():
    with pytest.raises(ValueError, match=r"seed result 1 .*missing \['f1'\]"):
        aggregate_seeds([{"accuracy": 0.8, "f1": 0.5}, {"accuracy": 0.9}])
    with pytest.raises(ValueError, match="non-finite"):
        aggregate_seeds([{"accuracy": math.nan}])
