"""Publish a sparse model: validate its folder, write its model card, push it to the Hugging Face Hub.

A pofa model folder, as the other stages leave it::

    config.json, model.safetensors, tokenizer files   the model, loadable with plain `AutoModelFor...`
    masks.safetensors                                 the sparsity masks (bit-packed), 1 = weight kept
    recipe.yaml                                       the resolved recipe that made the model
    sparsity.json                                     per-parameter and total sparsity report
    eval_results.json                                 optional: {"task", "dataset", "metrics": {...}}
    compact.safetensors, model.int8.onnx              optional: compact sparse format, int8 ONNX export

Three steps, each usable on its own::

    card = build_model_card(folder, base_model="bert-base-uncased", datasets=["wikimedia/wikipedia"])
    folder = prepare_publication(folder, base_model=..., datasets=[...])   # validates, writes README.md
    url = push_to_hub(folder, "me/bert-base-90-sparse", base_model=..., datasets=[...])

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
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id

__all__ = [
    "HubUnreachableError",
    "PublicationError",
    "build_model_card",
    "prepare_publication",
    "publication_files",
    "push_to_hub",
]

MASKS_FILE = "masks.safetensors"
RECIPE_FILE = "recipe.yaml"
SPARSITY_FILE = "sparsity.json"
EVAL_FILE = "eval_results.json"
COMPACT_FILE = "compact.safetensors"
ONNX_INT8_FILE = "model.int8.onnx"
CARD_FILE = "README.md"

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
    "trainer_state.json",
    "*.lock",
    "*.tmp",
)

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "sentencepiece.bpe.model", "spm.model")

# Head class suffix -> (transformers Auto class, Hub pipeline tag). Longest suffixes first: "Model" matches last.
_HEADS = (
    ("ForSequenceClassification", "AutoModelForSequenceClassification", "text-classification"),
    ("ForTokenClassification", "AutoModelForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "AutoModelForQuestionAnswering", "question-answering"),
    ("ForMultipleChoice", "AutoModelForMultipleChoice", None),
    ("ForMaskedLM", "AutoModelForMaskedLM", "fill-mask"),
    ("ForPreTraining", "AutoModelForPreTraining", "fill-mask"),
    ("Model", "AutoModel", "feature-extraction"),
)

# Downstream task name (as pofa's evaluation writes it) -> Hub task type, for `model-index`.
_TASK_TYPES = {
    **{t: "text-classification" for t in ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")},
    "snli": "text-classification",
    "sentiment": "text-classification",
    "squad": "question-answering",
    "squad_v2": "question-answering",
    "mlm": "fill-mask",
}
_GLUE_TASKS = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli")

# Recipe keys worth a row in "How it was made", matched on the last component of the dotted key so that any
# stage's recipe (pre-training, fine-tuning, QAT) shows its own.
_MAIN_HYPERPARAMETERS = frozenset({
    "name_or_path", "teacher", "task", "seed", "max_steps", "num_epochs", "per_device_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_schedule", "warmup_steps", "warmup_ratio", "weight_decay",
    "max_seq_length", "mlm_probability", "mixed_precision", "enabled", "target_sparsity", "initial_sparsity",
    "start_step", "end_step", "frequency", "scope", "hard_weight", "soft_weight", "temperature", "positions",
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


def _read_recipe(path: Path) -> list[Any]:
    """The YAML documents of `path` (one per stage when the recipe is a multi-document stream)."""
    try:
        return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise PublicationError(f"{path}: not readable as YAML ({exc})") from None


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


def _has_int8(folder: Path) -> bool:
    """True when the folder holds an int8 artifact: an int8 ONNX export or a compact file with int8 tensors."""
    if (folder / ONNX_INT8_FILE).is_file():
        return True
    compact = folder / COMPACT_FILE
    if not compact.is_file():
        return False
    header = _safetensors_header(compact)
    metadata = header.get("__metadata__") or {}
    return any(isinstance(v, dict) and v.get("dtype") == "I8" for v in header.values()) or any(
        "int8" in str(v).lower() for v in metadata.values()
    )


def _weight_files(folder: Path) -> list[Path]:
    """The files holding the model's weights, or [] when there are none (sharded checkpoints: every shard)."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise PublicationError(f"{index}: has no 'weight_map' mapping")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise PublicationError(f"{folder}: weight shards listed in {index_name} are missing: {missing}")
            return [folder / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return [folder / name]
    return []


def _load_weights(files: Sequence[Path], names: Iterable[str]) -> dict[str, Any]:
    """The named tensors from the weight files (names absent from every file are absent from the result)."""
    import torch
    from safetensors import safe_open

    wanted = set(names)
    found: dict[str, Any] = {}
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                for name in wanted.intersection(f.keys()):
                    found[name] = f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            found.update({k: v for k, v in state.items() if k in wanted})
    return found


def _check_model_folder(folder: Path) -> None:
    """Raise PublicationError unless `folder` holds a loadable model whose weights respect its masks."""
    if not folder.is_dir():
        raise PublicationError(f"{folder}: not a folder")
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    weights = _weight_files(folder)
    if not weights:
        missing.append("weights (model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin)")
    if missing:
        raise PublicationError(
            f"{folder} is not a model folder: missing {' and '.join(missing)}. "
            "Publish the folder that save_pretrained wrote (e.g. the run's final/ folder)."
        )
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise PublicationError(f"{folder / 'config.json'}: has no 'model_type'; not a transformers config")
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


def _head(config: Mapping[str, Any]) -> tuple[str, str | None]:
    """(Auto class, pipeline tag) of the config's first architecture; (AutoModel, None) when it names none."""
    architectures = config.get("architectures") or []
    arch = architectures[0] if architectures else ""
    for suffix, auto_class, tag in _HEADS:
        if arch.endswith(suffix):
            return auto_class, tag
    return "AutoModel", None


def _check_hub_id(field_name: str, value: str) -> None:
    try:
        validate_repo_id(value)
    except HFValidationError as exc:
        raise PublicationError(f"{field_name}={value!r} is not a Hub id ({exc})") from None


def _eval_entries(path: Path) -> list[dict[str, Any]]:
    data = _read_json(path)
    entries = data if isinstance(data, list) else [data]
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("metrics"), dict):
            raise PublicationError(f"{path}: entry {i} has no 'metrics' mapping")
    return entries


def _eval_results(path: Path, default_task_type: str | None) -> list[EvalResult]:
    """`model-index` results from eval_results.json: one EvalResult per numeric metric."""
    results = []
    for entry in _eval_entries(path):
        task = str(entry.get("task", ""))
        task_type = entry.get("task_type") or _TASK_TYPES.get(task) or default_task_type
        if not task_type:
            raise PublicationError(
                f"{path}: task {task!r} has no known Hub task type; add \"task_type\" (e.g. text-classification)"
            )
        dataset = entry.get("dataset") or task or "unknown"
        config, split = entry.get("dataset_config", entry.get("config")), entry.get("split")
        if isinstance(dataset, dict):
            config = dataset.get("config", config)
            split = dataset.get("split", split)
            dataset = dataset.get("name") or dataset.get("id") or dataset.get("path") or task
        if config is None and task in _GLUE_TASKS and "glue" in str(dataset).lower():
            config = task
        for metric, value in entry["metrics"].items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PublicationError(f"{path}: metrics.{metric} is {value!r}; expected a number")
            results.append(EvalResult(
                task_type=task_type,
                task_name=task or None,
                dataset_type=str(dataset),
                dataset_name=f"{dataset} ({config})" if config else str(dataset),
                dataset_config=config,
                dataset_split=split,
                metric_type=metric,
                metric_value=value,
            ))
    return results


def _sparsity_totals(report: Mapping[str, Any]) -> dict[str, Any]:
    """Whole-model figures of a sparsity report, under one set of names whichever way the report was written.

    Accepts `totals: {encoder_linear_sparsity, model_zero_fraction, ...}` and the layout of
    `pofa.sparsity.sparsity_report` (`targets: {sparsity, target_sparsity}`, `model: {sparsity}`; the targets are
    the encoder Linear weights unless the recipe chose others).
    """
    totals = dict(report.get("totals") or {})
    targets, whole = report.get("targets") or {}, report.get("model") or {}
    if "sparsity" in targets:
        totals.setdefault("encoder_linear_sparsity", targets["sparsity"])
    if "target_sparsity" in targets:
        totals.setdefault("target_sparsity", targets["target_sparsity"])
    if "sparsity" in whole:
        totals.setdefault("model_zero_fraction", whole["sparsity"])
    return totals


def _sparsity_table(report: Mapping[str, Any], path: Path) -> str:
    parameters = report.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise PublicationError(f"{path}: has no 'parameters' mapping")
    with_target = any(isinstance(p, dict) and "target_sparsity" in p for p in parameters.values())
    rows = ["| Parameter | Shape | Zeros / elements | Sparsity |" + (" Mask target |" if with_target else ""),
            "|---|---|---:|---:|" + ("---:|" if with_target else "")]
    for name, p in parameters.items():
        if not isinstance(p, dict):
            raise PublicationError(f"{path}: parameters.{name} is not a mapping")
        numel, zeros = p.get("numel"), p.get("zeros")
        sparsity = p.get("sparsity", zeros / numel if zeros is not None and numel else None)
        if not isinstance(sparsity, (int, float)):
            raise PublicationError(f"{path}: parameters.{name} has no numeric 'sparsity' (nor zeros and numel)")
        shape = "×".join(str(d) for d in p.get("shape", [])) or "?"
        counts = f"{zeros:,} / {numel:,}" if zeros is not None and numel is not None else "?"
        row = f"| `{name}` | {shape} | {counts} | {_percent(sparsity)} |"
        if with_target:
            target = p.get("target_sparsity")
            row += f" {_percent(target)} |" if isinstance(target, (int, float)) else " |"
        rows.append(row)
    return "\n".join(rows)


def _flatten(node: Any, prefix: str = "") -> Iterable[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _flatten(value, f"{prefix}.{key}" if prefix else str(key))
    else:
        yield prefix, node


def _recipe_stages(documents: Sequence[Any]) -> list[tuple[str, dict[str, Any]]]:
    """(stage name, stage mapping) pairs from a recipe: one mapping, a `stages:` list or mapping, or one doc each."""
    if len(documents) == 1 and isinstance(documents[0], dict) and isinstance(documents[0].get("stages"), (list, dict)):
        stages = documents[0]["stages"]
        items = list(stages.items()) if isinstance(stages, dict) else [(None, s) for s in stages]
    else:
        items = [(None, d) for d in documents]
    named = []
    for i, (key, stage) in enumerate(items):
        if isinstance(stage, dict):
            named.append((str(key or stage.get("stage") or stage.get("name") or f"stage {i + 1}"), stage))
    return named


def _how_it_was_made(folder: Path) -> str:
    path = folder / RECIPE_FILE
    lines = ["## How it was made", ""]
    lines.append(
        f"With pofa, following *Prune Once for All* ([arXiv:2111.05754]({PAPER_URL})): "
        "the model is pruned once, during pre-training, by gradual magnitude pruning with knowledge distillation "
        "from a dense teacher; the sparsity pattern is then kept fixed in every downstream fine-tuning."
    )
    if not path.is_file():
        lines += ["", f"No `{RECIPE_FILE}` was published with this model."]
        return "\n".join(lines)
    stages = _recipe_stages(_read_recipe(path))
    lines += ["", f"Stages recorded in `{RECIPE_FILE}`: " + (", ".join(f"**{n}**" for n, _ in stages) or "none") + "."]
    for name, stage in stages:
        rows = [(k, v) for k, v in _flatten(stage) if k.rsplit(".", 1)[-1] in _MAIN_HYPERPARAMETERS]
        lines += ["", f"### Stage: {name}", ""]
        if isinstance(stage.get("description"), str) and stage["description"].strip():
            lines += [stage["description"].strip(), ""]
        if rows:
            lines += ["| Hyperparameter | Value |", "|---|---|"]
            lines += [f"| `{k}` | `{json.dumps(v, default=str)}` |" for k, v in rows]
    recipe_text = path.read_text().rstrip()
    lines += [
        "",
        "<details>",
        f"<summary>The full resolved recipe ({RECIPE_FILE})</summary>",
        "",
        "```yaml",
        recipe_text,
        "```",
        "",
        "</details>",
    ]
    return "\n".join(lines)


def _artifact_rows(folder: Path) -> list[str]:
    descriptions = {
        "config.json": "model configuration",
        "model.safetensors": "weights (dense layout; pruned weights are stored as zeros)",
        MASKS_FILE: "sparsity masks, bit-packed (1 = weight kept)",
        RECIPE_FILE: "the resolved recipe that made this model",
        SPARSITY_FILE: "per-parameter sparsity report",
        EVAL_FILE: "evaluation results",
        "train_results.json": "training metrics",
        COMPACT_FILE: "compact sparse format (non-zero values and their positions only)",
        ONNX_INT8_FILE: "int8 ONNX export",
    }
    rows = ["| File | Contents | Size on disk |", "|---|---|---:|"]
    for name in publication_files(folder):
        if name == CARD_FILE:
            continue
        is_tokenizer = name.startswith(("tokenizer", "vocab", "special_tokens"))
        what = descriptions.get(name) or ("tokenizer" if is_tokenizer else "")
        rows.append(f"| `{name}` | {what} | {_format_size((folder / name).stat().st_size)} |")
    return rows


def _how_to_use(folder: Path, repo_id: str, auto_class: str) -> str:
    has_tokenizer = any((folder / name).is_file() for name in _TOKENIZER_FILES)
    code = [f"from transformers import {'AutoTokenizer, ' if has_tokenizer else ''}{auto_class}", ""]
    if has_tokenizer:
        code.append(f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")')
    code.append(f'model = {auto_class}.from_pretrained("{repo_id}")')
    lines = [
        "## How to use",
        "",
        "It is a plain transformers model (the zeros are stored in the ordinary dense weights):",
        "",
        "```python",
        *code,
        "```",
    ]
    if (folder / ONNX_INT8_FILE).is_file():
        lines += [
            "",
            "The int8 ONNX export runs with onnxruntime:",
            "",
            "```python",
            "import onnxruntime as ort",
            "from huggingface_hub import hf_hub_download",
            "",
            f'session = ort.InferenceSession(hf_hub_download("{repo_id}", "{ONNX_INT8_FILE}"))',
            "```",
        ]
    return "\n".join(lines)


def _how_to_finetune(folder: Path, repo_id: str) -> str:
    lines = [
        "## How to fine-tune it without losing the sparsity",
        "",
        "Ordinary fine-tuning fills the pruned weights back in. Fine-tune with pofa instead:",
        "",
        "```bash",
        f"pofa finetune --recipe path/to/finetune.yaml model.name_or_path={repo_id}",
        "```",
        "",
    ]
    if (folder / MASKS_FILE).is_file():
        lines.append(
            f"pofa loads `{MASKS_FILE}` from this repository together with the weights, and its optimizer keeps "
            "every pruned weight at zero after each step, so the fine-tuned model keeps exactly this sparsity "
            "pattern."
        )
    else:
        lines.append(f"No `{MASKS_FILE}` was published with this model.")
    return "\n".join(lines)


def _summary(
    folder: Path,
    title: str,
    model_type: str,
    base_model: str | None,
    totals: Mapping[str, Any],
    eval_results: Sequence[EvalResult],
) -> str:
    """The card's opening: what the model is, its overall sparsity, evaluation, and each file with its size."""
    summary = [f"# {title}", ""]
    if "encoder_linear_sparsity" in totals:
        summary.append(
            f"A sparse {model_type.upper() if model_type == 'bert' else model_type} model: "
            f"**{_percent(totals['encoder_linear_sparsity'])} of the encoder's Linear weights are zero**, "
            "pruned once during pre-training the *Prune Once for All* way, so that it can be fine-tuned on "
            "downstream tasks with the same sparsity pattern."
        )
    else:
        summary.append(f"A sparse {model_type} model made the *Prune Once for All* way (no sparsity report published).")
    if base_model:
        summary += ["", f"Pruned from [{base_model}](https://huggingface.co/{base_model})."]
    if totals:
        summary += ["", *[f"- `{k}`: {_percent(v) if isinstance(v, float) else v}" for k, v in totals.items()]]
    if eval_results:
        summary += ["", "Evaluation: " + ", ".join(
            f"{r.task_name or r.task_type} {r.metric_type} = {r.metric_value:.4g}" for r in eval_results) + "."]
    summary += ["", "### Files", "", *_artifact_rows(folder)]
    return "\n".join(summary)


def build_model_card(
    folder: Path,
    *,
    base_model: str | None,
    datasets: Sequence[str],
    license: str = "apache-2.0",
    pipeline_tag: str | None = None,
    extra_tags: Sequence[str] = (),
    repo_id: str | None = None,
) -> ModelCard:
    """The model card of the pofa model in `folder`, read from the files it holds; writes nothing.

    The YAML metadata carries base_model, datasets, license, library_name, pipeline_tag (from the config's head
    when not given), tags (pofa, sparse, pruned, the model type, plus quantized/int8 when an int8 artifact exists)
    and a `model-index` from eval_results.json. `repo_id` is the Hub id the card is written for: it appears in the
    snippets and names the model-index entry (default: `REPO_ID` and the folder's name). Absent optional files
    leave their section out or say so; present but malformed ones raise PublicationError naming the file.
    """
    folder = Path(folder)
    if base_model is not None:
        _check_hub_id("base_model", base_model)
    for dataset in datasets:
        _check_hub_id("datasets", dataset)
    config = _read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    auto_class, head_tag = _head(config)
    pipeline_tag = pipeline_tag or head_tag
    model_type = str(config.get("model_type") or "bert")

    tags = ["pofa", "sparse", "pruned", "bert"]
    if model_type != "bert":
        tags.append(model_type)
    if _has_int8(folder):
        tags += ["quantized", "int8"]
    tags += [t for t in extra_tags if t not in tags]

    eval_path = folder / EVAL_FILE
    eval_results = _eval_results(eval_path, pipeline_tag) if eval_path.is_file() else None
    shown_id = repo_id or "REPO_ID"
    data = ModelCardData(
        model_name=(repo_id or folder.resolve().name).split("/")[-1],
        base_model=base_model,
        datasets=list(datasets) or None,
        license=license,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=tags,
        eval_results=eval_results,
    )

    sparsity_path = folder / SPARSITY_FILE
    report = _read_json(sparsity_path) if sparsity_path.is_file() else None
    if report is not None and not isinstance(report, dict):
        raise PublicationError(f"{sparsity_path}: expected a JSON object with 'parameters'")
    totals = _sparsity_totals(report) if report is not None else {}
    title = repo_id.split("/")[-1] if repo_id else folder.resolve().name
    sections = [_summary(folder, title, model_type, base_model, totals, eval_results or [])]
    if report is not None:
        sections.append("\n".join([
            "## Sparsity per layer",
            "",
            f"From `{SPARSITY_FILE}`:",
            "",
            _sparsity_table(report, sparsity_path),
        ]))
    sections += [
        _how_it_was_made(folder),
        _how_to_use(folder, shown_id, auto_class),
        _how_to_finetune(folder, shown_id),
        "\n".join(["## Citation", "", "```bibtex", CITATION, "```"]),
    ]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


# --------------------------------------------------------------------------------------------------------------------
# Publication
# --------------------------------------------------------------------------------------------------------------------


def prepare_publication(folder: Path, out: Path | None = None, **card_kwargs: Any) -> Path:
    """Validate the model folder, write its model card as README.md and return the folder to upload.

    Raises PublicationError when `folder` lacks config.json or weights, or when its weights are non-zero where
    masks.safetensors says pruned. With `out`, the published files (see `publication_files`) are copied into
    `out`, which must be absent or empty, and the card is written there; otherwise README.md is (re)written in
    `folder`. `card_kwargs` go to `build_model_card` (base_model and datasets are required there).
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
