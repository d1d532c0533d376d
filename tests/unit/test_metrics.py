"""pofa.metrics on hand-made cases whose answers are worked out in the comments."""

import math

import numpy as np
import pytest

from pofa.metrics import (
    accuracy,
    aggregate_seeds,
    average_ranks,
    binary_f1,
    classification_metrics,
    entities,
    macro_f1,
    matthews_correlation,
    normalize_answer,
    pearson,
    regression_metrics,
    spearman,
    squad_exact_match,
    squad_f1,
    squad_metrics,
    squad_v2_metrics,
    token_classification_metrics,
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


# --- GLUE's other metrics -------------------------------------------------------------------------------------


def test_matthews_correlation_binary_hand_case():
    # TP at 0 and 3, TN at 1, FP at 2, FN none: (2*1 - 1*0) / sqrt((2+1)(2+0)(1+1)(1+0)) = 2 / sqrt(12).
    assert matthews_correlation([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx(2 / math.sqrt(12))
    assert matthews_correlation([0, 1], [0, 1]) == pytest.approx(1.0)
    assert matthews_correlation([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert matthews_correlation([1, 1, 1], [0, 1, 0]) == 0.0  # one predicted class: undefined -> 0, as sklearn


def test_macro_f1_hand_case():
    # class 0: F1 1; class 1: TP 1, FN 1 -> 2/3; class 2: TP 1, FP 1 -> 2/3. Mean 7/9.
    assert macro_f1([0, 1, 2, 2], [0, 1, 1, 2]) == pytest.approx(7 / 9)


def test_classification_metrics_against_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels, preds = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
        assert matthews_correlation(preds, labels) == pytest.approx(sklearn_metrics.matthews_corrcoef(labels, preds))
        assert macro_f1(preds, labels) == pytest.approx(sklearn_metrics.f1_score(labels, preds, average="macro"))


def test_pearson_and_spearman_hand_cases():
    # Deviations [-1, 0, 1] and [-7/3, -1/3, 8/3]: dot 5, squared norms 2 and 114/9.
    assert pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert spearman([1, 2, 3], [2, 4, 7]) == pytest.approx(1.0)
    # Tied predictions share rank 2.5: ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5).
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert pearson([[0.5], [0.7], [0.2]], [1, 2, 0]) == pytest.approx(pearson([0.5, 0.7, 0.2], [1, 2, 0]))
    assert pearson([3, 3, 3], [1, 2, 3]) == 0.0  # constant predictions: no association shown
    assert regression_metrics([1, 2, 3], [2, 4, 7], ("spearman",)) == {"spearman": pytest.approx(1.0)}
    with pytest.raises(ValueError, match="at least 2"):
        pearson([1.0], [1.0])


def test_correlations_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for _ in range(20):
        labels = rng.integers(0, 6, 40).astype(float)  # ties, as STS-B's 0-5 scores have
        preds = labels + rng.normal(0, 2, 40).round(1)
        assert pearson(preds, labels) == pytest.approx(stats.pearsonr(preds, labels)[0])
        assert spearman(preds, labels) == pytest.approx(stats.spearmanr(preds, labels)[0])
        assert average_ranks(preds).tolist() == pytest.approx(stats.rankdata(preds).tolist())


# --- token classification: seqeval's numbers -------------------------------------------------------------------


def test_entities_read_tags_as_seqeval():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
    # IOB1: an I- after O starts an entity; a change of type ends one.
    assert entities(["I-PER", "I-LOC", "B-LOC", "O"]) == [("PER", 0, 0), ("LOC", 1, 1), ("LOC", 2, 2)]
    assert entities(["S-PER", "B-ORG", "E-ORG"]) == [("PER", 0, 0), ("ORG", 1, 2)]


def test_token_classification_metrics_hand_case():
    # seqeval's own example: the MISC entity starts one word too early (wrong span), PER is right: 1 of 2 found,
    # 1 of 2 predicted right. Tags differ at words 2 and 3 of 10.
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    predicted = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    result = token_classification_metrics(predicted, gold)
    assert result == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "accuracy": 0.8})
    # An entity may not run across sentences: "I-PER" opening sentence 2 is a new entity, not PER's continuation.
    assert token_classification_metrics([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])["f1"] == 1.0
    assert token_classification_metrics([["O"]], [["O"]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0,
                                                              "accuracy": 1.0}
    with pytest.raises(ValueError, match="sentence 0: 1 predicted tags for 2"):
        token_classification_metrics([["O"]], [["O", "B-PER"]])


def test_token_classification_metrics_equal_seqeval_on_random_tags():
    seqeval = pytest.importorskip("seqeval.metrics")
    rng = np.random.default_rng(2)
    tags = ["O", "O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "E-LOC", "S-ORG", "I-ORG"]
    for _ in range(30):
        lengths = rng.integers(1, 12, 8)
        gold = [[tags[i] for i in rng.integers(0, len(tags), n)] for n in lengths]
        predicted = [[tags[i] for i in rng.integers(0, len(tags), n)] for n in lengths]
        ours = token_classification_metrics(predicted, gold)
        assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, predicted, zero_division=0))
        assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, predicted, zero_division=0))
        assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, predicted, zero_division=0))
        assert ours["accuracy"] == pytest.approx(seqeval.accuracy_score(gold, predicted))


# --- SQuAD v2.0 ------------------------------------------------------------------------------------------------


def test_squad_v2_metrics_hand_case():
    references = {"a": ["the cat"], "b": [], "c": []}  # b and c have no answer
    predictions = {"a": "cat", "b": "", "c": "dog"}
    na_probs = {"a": 0.1, "b": 0.9, "c": 0.5}
    result = squad_v2_metrics(predictions, references, na_probs)
    # a right, b right (no answer predicted), c wrong (an answer to an unanswerable question).
    assert result["exact_match"] == pytest.approx(200 / 3) and result["f1"] == pytest.approx(200 / 3)
    assert (result["has_answer_exact_match"], result["no_answer_exact_match"]) == (100.0, 50.0)
    # Best threshold: start from "no answer everywhere" (b, c right: 2); by rising na_prob, a's answer adds 1
    # (3, threshold 0.1), c's "dog" takes 1 away, b changes nothing: 3 of 3 at threshold 0.1.
    assert (result["best_exact_match"], result["best_exact_match_thresh"]) == (100.0, 0.1)
    assert (result["best_f1"], result["best_f1_thresh"]) == (100.0, 0.1)
    # With the threshold at 0.4, c (0.5) counts as "no answer": everything is right.
    assert squad_v2_metrics(predictions, references, na_probs, na_prob_thresh=0.4)["exact_match"] == 100.0


def test_squad_v2_f1_of_no_answer_and_article_only_answers():
    # An answer that normalises to nothing ("The") is no answer, as in the official script: "" is then right.
    assert squad_v2_metrics({"q": ""}, {"q": ["The"]})["exact_match"] == 100.0
    # "" against a real answer: F1 0 (not 1): only both empty agree.
    result = squad_v2_metrics({"q": "", "r": "big cat"}, {"q": ["cat"], "r": ["black cat"]})
    assert result["f1"] == pytest.approx(100 * (0 + 0.5) / 2)
    assert "no_answer_f1" not in result  # no unanswerable question among the references
    with pytest.raises(ValueError, match="without a prediction"):
        squad_v2_metrics({"q": ""}, {"q": [], "r": []})
