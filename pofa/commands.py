"""Small sub-commands of `pofa` that attach existing functions to the command line: export, push, bench-inference."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from pofa.artifacts import COMPACT_FILE, ONNX_FILE, RECIPE_FILE


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


class ParityRowsError(ValueError):
    """No real rows to check an export on; the message says which file or flag to give."""


def _folder_recipe(folder: Path):  # noqa: ANN202 - PretrainRecipe | FinetuneRecipe | None
    """The typed recipe saved in the model folder, or None when it has none."""
    from pofa.recipe import load_recipe, recipe_class_for

    path = folder / RECIPE_FILE
    return load_recipe(path, (), recipe_class_for(path)) if path.is_file() else None


def _rows_columns(recipe) -> list[tuple[str, ...]]:  # noqa: ANN001
    """The text columns a --rows table may use, in order of preference: the task's (or the names its recipe gave
    its local files), else `text`."""
    if recipe is None or recipe.stage != "finetune":
        return [("text",)]
    from pofa.data.tasks import recipe_task_spec

    columns = [recipe_task_spec(recipe.task).text_fields]
    if recipe.task.text_fields:
        columns.append(tuple(recipe.task.text_fields))
    return columns


def read_rows(path: Path, columns: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """Texts of each example of a --rows file: one column (or a pair) of a .csv / .tsv / .jsonl / .json table, or
    the lines of any other file (a pair: the two texts separated by a tab). Raises ParityRowsError naming the file."""
    from pofa.data.tasks import TaskDataError, read_task_file

    if not path.is_file():
        raise ParityRowsError(f"--rows {path}: no such file")
    width = len(columns[0])
    if path.suffix.lower() in (".csv", ".tsv", ".jsonl", ".json"):
        try:
            table = read_task_file(path)
        except TaskDataError as exc:
            raise ParityRowsError(f"--rows {exc}") from None
        chosen = next((c for c in columns if all(name in table.column_names for name in c)), None)
        if chosen is None:
            wanted = " or ".join(", ".join(c) for c in columns)
            raise ParityRowsError(f"--rows {path}: needs the column(s) {wanted}; it has {table.column_names}")
        rows = list(zip(*(table[name] for name in chosen)))
    else:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = [tuple(line.split("\t")) if width == 2 else (line,) for line in lines]
        bad = next((i for i, row in enumerate(rows) if len(row) != width), None)
        if bad is not None:
            raise ParityRowsError(f"--rows {path}: line {bad + 1} is not two texts separated by a tab (the model "
                                  "takes sentence pairs)")
    rows = [row for row in rows if all(isinstance(t, str) and t.strip() for t in row)]
    if not rows:
        raise ParityRowsError(f"--rows {path}: holds no example")
    return rows


def _row_batches(rows: list[tuple[str, ...]], tokenizer, max_length: int, qa: bool, size: int = 32  # noqa: ANN001
                 ) -> list[dict]:
    """Tokenize texts as fine-tuning does: a pair cut longest-first (SQuAD: the context only), a text cut at
    max_length, each batch padded to its longest row."""
    truncation = "only_second" if qa else ("longest_first" if len(rows[0]) == 2 else True)
    batches = []
    for start in range(0, len(rows), size):
        chunk = rows[start : start + size]
        encoded = tokenizer(*[list(texts) for texts in zip(*chunk)], truncation=truncation, max_length=max_length,
                            padding=True, return_tensors="pt")
        batches.append({k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def _task_batches(recipe, tokenizer, max_length: int | None, limit: int) -> tuple[list[dict], str]:  # noqa: ANN001
    """The first evaluation split of a fine-tuning recipe's task (the rows fine-tuning scored and checked its own
    export on: the same subset and seed), tokenized and batched as fine-tuning does."""
    from pofa.data.offline import OfflineDataError
    from pofa.data.tasks import (HubUnreachableError, TaskDataError, load_task, recipe_task_spec, source_columns,
                                 tokenize_task, with_label_names)
    from pofa.finetune import TaskData, parity_batches

    task = recipe.task
    try:
        spec = recipe_task_spec(task)
    except ValueError as exc:
        raise ParityRowsError(f"the recipe's task.{exc}") from None
    files = None
    if task.data_files:
        files = {split: path for split, path in task.data_files.items() if split in spec.eval_splits}
        if not files:
            raise ParityRowsError(f"the recipe's task.data_files has no evaluation split {list(spec.eval_splits)}")
    try:
        text_fields, label_field = source_columns(spec, task.text_fields, task.label_field)
        raw = load_task(spec, data_files=files, text_fields=text_fields, label_field=label_field,
                        cache_dir=task.cache_dir, max_eval_examples=task.max_eval_examples, seed=recipe.training.seed)
        spec = with_label_names(spec, raw)
    except (FileNotFoundError, TaskDataError, HubUnreachableError, OfflineDataError) as exc:
        raise ParityRowsError(f"cannot read the evaluation rows of task {task.name!r} ({exc})") from None
    split = next(s for s in spec.eval_splits if s in raw)
    length = max_length or task.max_seq_length
    features = tokenize_task(raw[split], tokenizer, spec, train=False, max_length=length,
                             doc_stride=min(task.doc_stride, length // 2))
    batches = parity_batches(TaskData(spec, raw, None, {split: features}), tokenizer, limit=limit)
    source = f"task {task.name} split {split}" + (f" ({', '.join(files.values())})" if files else "")
    return batches, source


def _held_out_batches(recipe, tokenizer, max_length: int | None, limit: int) -> tuple[list[dict], str]:  # noqa: ANN001
    """The held-out blocks of a pre-training recipe's corpus, when the corpus is embedded or local (cheap to
    re-read: the block cache of the run is reused); a Hub corpus is not fetched for this."""
    import numpy as np
    import torch

    from pofa.data.corpus import CorpusError, describe_source
    from pofa.data.mlm import build_block_cache, split_blocks

    d = recipe.data
    if any(source.hub for source in d.sources):
        raise ParityRowsError("its pre-training corpus comes from the Hub, which export does not download")
    if d.eval_fraction <= 0:
        raise ParityRowsError("its pre-training recipe held out no text (data.eval_fraction: 0)")
    try:
        path = build_block_cache(d.sources, tokenizer, d.max_seq_length, d.cache_dir, log=lambda message: None)
    except (CorpusError, OSError) as exc:
        raise ParityRowsError(f"cannot read its pre-training corpus ({exc})") from None
    split = split_blocks(np.load(path, mmap_mode="r"), eval_fraction=d.eval_fraction,
                         max_eval_blocks=d.max_eval_blocks, seed=recipe.training.seed)
    ids = torch.from_numpy(np.asarray(split.blocks[split.eval_indices[:limit]], dtype=np.int64))
    ids = ids[:, :max_length] if max_length else ids
    batches = [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "token_type_ids": torch.zeros_like(chunk)}
               for chunk in ids.split(8)]  # MLM logits are [batch, length, vocab]: small batches
    return batches, f"{len(ids)} held-out blocks of {', '.join(describe_source(s) for s in d.sources)}"


def parity_rows(folder: Path, recipe, tokenizer, rows_file: Path | None, *,  # noqa: ANN001
                max_length: int | None = None, limit: int = 256) -> tuple[list[dict], str]:
    """Real rows to check an export of `folder` on, batched as model inputs, and where they come from in words.

    `rows_file` (see `read_rows`) when given; else the evaluation split of a fine-tuned model's task; else the
    held-out text of a pre-trained model's embedded or local corpus. Never synthetic rows: without any of these,
    raises ParityRowsError saying to pass --rows. At most `limit` rows (or blocks).
    """
    if rows_file is not None:
        qa = recipe is not None and recipe.stage == "finetune" and recipe.task.name == "squad"
        default_length = (recipe.task.max_seq_length if recipe.stage == "finetune" else recipe.data.max_seq_length) \
            if recipe is not None else min(getattr(tokenizer, "model_max_length", 512), 512)
        rows = read_rows(rows_file, _rows_columns(recipe))[:limit]
        return _row_batches(rows, tokenizer, max_length or default_length, qa), f"{len(rows)} rows of {rows_file}"
    if recipe is None:
        raise ParityRowsError(f"{folder} has no {RECIPE_FILE} naming its task or corpus")
    if recipe.stage == "finetune":
        return _task_batches(recipe, tokenizer, max_length, limit)
    return _held_out_batches(recipe, tokenizer, max_length, limit)


def export_main(argv: Sequence[str] | None = None) -> int:
    """`pofa export MODEL_DIR [--int8 | --float] [--rows FILE] [--output PATH]`: ONNX export checked on real rows.

    Writes MODEL_DIR/model.onnx: the int8 QDQ graph for a model trained with QAT (its compact file), the float graph
    otherwise. onnxruntime's predictions are then compared with PyTorch's on real rows, never synthetic ones: the
    evaluation split of the task named in MODEL_DIR/recipe.yaml (a fine-tuned model; the rows fine-tuning
    scored), the held-out text of the corpus (a pre-trained model whose corpus is embedded or local files), or
    --rows FILE: a .csv/.tsv/.jsonl/.json table with the task's text columns (`text` for a model without a task),
    or any other file as plain text, one example per line (a sentence pair: the two texts separated by a tab).
    """
    parser = argparse.ArgumentParser(prog="pofa export", description=export_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path, help="a final/ folder written by pofa")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("--int8", action="store_true", help="int8 QDQ graph (needs a model trained with QAT)")
    kind.add_argument("--float", action="store_true", help="float graph, also for a model trained with QAT")
    parser.add_argument("--rows", type=Path, help="real examples to check parity on (default: the recipe's "
                        "evaluation split or held-out text); .csv/.tsv/.jsonl/.json with the task's text columns, or "
                        "plain text, one example per line (pairs: tab-separated)")
    parser.add_argument("--max-rows", type=int, default=256, help="check on at most this many rows (default 256)")
    parser.add_argument("--output", type=Path, help=f"ONNX file to write (default MODEL_DIR/{ONNX_FILE})")
    parser.add_argument("--seq-len", type=int, help="cut rows at this many tokens (default: the recipe's "
                        "max_seq_length)")
    args = parser.parse_args(argv)
    import torch

    from pofa.compact import load_compact_model
    from pofa.modeling import load_tokenizer
    from pofa.quant import export_onnx, is_qat_prepared, require_onnx_parity
    from pofa.recipe import RecipeError

    folder = args.model_dir
    if args.max_rows < 1:
        return _fail(f"--max-rows {args.max_rows}: must be at least 1")
    if not (folder / "config.json").is_file():
        return _fail(f"{folder} is not a model folder (no config.json)")
    try:
        recipe = _folder_recipe(folder)
    except RecipeError as exc:
        return _fail(str(exc))
    qat_recipe = recipe is not None and recipe.stage == "finetune" and recipe.quantization.enabled
    int8 = args.int8 or (qat_recipe and not args.float)
    compact = folder / COMPACT_FILE
    if int8:
        if not compact.is_file():
            return _fail(f"{folder} has no {COMPACT_FILE}: an int8 export needs the QAT stage's output (a finetune "
                         "recipe with quantization.enabled: true and export.compact: true)"
                         + ("; pass --float to export the float weights" if qat_recipe else ""))
        model = load_compact_model(compact, folder)
        if not is_qat_prepared(model):
            return _fail(f"{folder} was not trained with QAT (its compact file holds float weights): run the QAT "
                         "stage (quantization.enabled: true), or export without --int8")
    else:
        from transformers import AutoConfig

        import transformers

        config = AutoConfig.from_pretrained(folder)
        model = getattr(transformers, config.architectures[0]).from_pretrained(folder)
    tokenizer = load_tokenizer(str(folder))
    try:
        batches, source = parity_rows(folder, recipe, tokenizer, args.rows, max_length=args.seq_len,
                                      limit=args.max_rows)
    except ParityRowsError as exc:
        return _fail(f"no real rows to check the export of {folder} on: {exc}. Pass --rows FILE (a .csv/.jsonl "
                     "with the task's text columns, or a text file with one example per line)")
    output = args.output or folder / ONNX_FILE
    with torch.no_grad():
        export_onnx(model, batches[0], output, int8=int8)
        try:
            report = require_onnx_parity(model, output, batches)
        except ValueError as exc:
            return _fail(f"{exc} (rows: {source}); {output} is left for inspection")
    print(f"wrote {output} ({output.stat().st_size / 1e6:.1f} MB, {'int8' if int8 else 'float'}); parity with "
          f"PyTorch on {source}: agreement {report['agreement']:.4f} over {report['n_predictions']} predictions, "
          f"max |diff| {report['max_abs_diff']:.3g}")
    return 0


def push_main(argv: Sequence[str] | None = None) -> int:
    """`pofa push DIR [REPO_ID] [--dry-run]`: publish a model folder with its generated model card.

    The card's base model and data sets are read from DIR/recipe.yaml and the recipes of the local pofa folders it
    names (`model.name_or_path`), back to a Hub id; --base-model and --dataset add to or override them. REPO_ID and
    the repository settings default to the recipe's `hub` section (hub.repo_id, hub.private, hub.revision,
    hub.license, hub.endpoint).
    """
    parser = argparse.ArgumentParser(prog="pofa push", description=push_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="a final/ folder written by pofa")
    parser.add_argument("repo_id", nargs="?", help="model repository, OWNER/NAME (default: hub.repo_id of "
                        "DIR/recipe.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="prepare the folder and card; upload nothing")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=None,
                        help="create the repository private (default: hub.private of the recipe, else public)")
    parser.add_argument("--revision", help="branch to push to (default: hub.revision of the recipe, else main)")
    parser.add_argument("--base-model", help="Hub id of the model it was made from (default: read from recipe.yaml, "
                        "following the local pofa folders it names back to a Hub id)")
    parser.add_argument("--dataset", action="append", default=[],
                        help="Hub id of a data set used, besides the Hub data sets the recipes name (repeatable)")
    parser.add_argument("--license", help="license of the card's metadata (default: hub.license of the recipe, "
                        "else apache-2.0)")
    parser.add_argument("--endpoint", help="Hub endpoint (default: hub.endpoint of the recipe, else HF_ENDPOINT or "
                        "huggingface.co)")
    args = parser.parse_args(argv)
    from huggingface_hub.errors import HfHubHTTPError

    from pofa.hub import HubUnreachableError, PublicationError, provenance, push_to_hub
    from pofa.recipe import HubConfig, RecipeError

    folder = args.folder
    if not folder.is_dir():
        return _fail(f"{folder}: no such folder (a final/ folder written by pofa)")
    try:
        recipe = _folder_recipe(folder)
    except RecipeError as exc:
        return _fail(str(exc))
    hub = recipe.hub if recipe is not None else HubConfig()
    repo_id = args.repo_id or hub.repo_id
    if not repo_id:
        return _fail(f"no REPO_ID given, and {folder / RECIPE_FILE} names none (hub.repo_id): pass one, e.g. "
                     f"`pofa push {folder} my-user/my-model`")
    try:
        print(_provenance_lines(provenance(folder), args.base_model, args.dataset))
        where = push_to_hub(folder, repo_id, private=hub.private if args.private is None else args.private,
                            revision=args.revision or hub.revision, dry_run=args.dry_run,
                            endpoint=args.endpoint or hub.endpoint, base_model=args.base_model,
                            datasets=args.dataset, license=args.license or hub.license)
    except (PublicationError, HubUnreachableError) as exc:
        return _fail(str(exc))
    except (HfHubHTTPError, OSError) as exc:  # refused by the Hub (401, 403, ...), or no token at all
        return _fail(f"pushing {folder} to {repo_id} failed: {exc}")
    print(f"{'prepared (dry run)' if args.dry_run else 'pushed'}: {where}")
    return 0


def _provenance_lines(found, base_model: str | None, datasets: Sequence[str]) -> str:  # noqa: ANN001 - Provenance
    """What the card will say about the model's origin, and where that was read from."""
    chain = " <- ".join(f"{stage} ({folder})" for stage, folder in found.stages) or f"no {RECIPE_FILE}"
    base = (f"{base_model} (--base-model)" if base_model else found.base_model or found.origin or "unknown")
    hub_data = list(dict.fromkeys([*found.datasets, *datasets]))
    lines = [f"recipe chain: {chain}", f"base model: {base}",
             f"data sets on the Hub: {', '.join(hub_data) or 'none'}"]
    if found.other_data:
        lines.append(f"other data: {'; '.join(found.other_data)}")
    return "\n".join(lines)


def recipes_main(argv: Sequence[str] | None = None) -> int:
    """`pofa recipes [NAME]`: the recipes shipped with pofa, each with its stage and the first sentence of its
    description; with NAME, that recipe's file (to read, or to copy and edit). Each runs as `pofa pretrain --recipe
    NAME` (stages teacher and student) or `pofa finetune --recipe NAME` (stage finetune)."""
    parser = argparse.ArgumentParser(prog="pofa recipes", description=recipes_main.__doc__)
    parser.add_argument("name", nargs="?", help="print this recipe's file")
    args = parser.parse_args(argv)
    import shutil
    import textwrap

    from pofa.recipe import RECIPES_DIR, RecipeError, recipe_class_for, recipe_description, shipped_recipes

    shipped = shipped_recipes()
    if args.name is not None:
        name = args.name.removesuffix(".yaml")
        if name not in shipped:
            return _fail(f"no shipped recipe named {args.name!r}; `pofa recipes` lists them")
        print(f"# {shipped[name]}\n{shipped[name].read_text()}", end="")
        return 0
    try:
        rows = [(name, _recipe_stage(path, recipe_class_for(path)), recipe_description(path))
                for name, path in shipped.items()]
    except RecipeError as exc:
        return _fail(str(exc))
    width = max(len(name) for name, _, _ in rows) + 2
    columns = max(shutil.get_terminal_size((120, 24)).columns, width + 40)
    print(textwrap.fill(f"{len(rows)} recipes shipped with pofa (in {RECIPES_DIR}). Run one by name: `pofa pretrain "
                        "--recipe NAME` (teacher, student) or `pofa finetune --recipe NAME` (finetune); `pofa recipes "
                        "NAME` prints it.", width=columns) + "\n")
    print(f"{'NAME':<{width}}{'STAGE':<10}DESCRIPTION")
    for name, stage, description in rows:
        room = columns - width - 10
        text = description if len(description) <= room else description[: room - 1].rstrip() + "…"
        print(f"{name:<{width}}{stage:<10}{text}")
    return 0


def _recipe_stage(path: Path, cls: type) -> str:
    """The stage a recipe file runs: its `stage:` key, else the recipe class's default."""
    import yaml

    data = yaml.safe_load(path.read_text()) or {}
    return str(data.get("stage") or cls().stage)


STAGE_CLASSES = {"pretrain": "PretrainRecipe", "teacher": "PretrainRecipe", "student": "PretrainRecipe",
                 "finetune": "FinetuneRecipe"}


def recipe_keys_main(argv: Sequence[str] | None = None) -> int:
    """`pofa recipe-keys [--stage STAGE] [PREFIX]`: every key a recipe may set, with its type, its default and its
    documentation (the docstrings of pofa/recipe.py), dotted as files nest them and overrides name them
    (`training.max_steps=200`). PREFIX keeps the keys that start with it (`pruning`, `training.warmup`)."""
    parser = argparse.ArgumentParser(prog="pofa recipe-keys", description=recipe_keys_main.__doc__)
    parser.add_argument("prefix", nargs="?", default="", help="only keys that start with this")
    parser.add_argument("--stage", choices=sorted(STAGE_CLASSES), help="only the recipes of this stage: pretrain "
                        "(= teacher, student) or finetune (default: both)")
    args = parser.parse_args(argv)
    import textwrap

    from pofa import recipe as recipes

    wanted = [STAGE_CLASSES[args.stage]] if args.stage else ["PretrainRecipe", "FinetuneRecipe"]
    found = 0
    for class_name in wanted:
        cls = getattr(recipes, class_name)
        keys = [k for k in recipes.recipe_keys(cls) if k.key.startswith(args.prefix)]
        found += len(keys)
        if not keys:
            continue
        command = "pofa finetune" if class_name == "FinetuneRecipe" else "pofa pretrain"
        print(f"== {class_name} (`{command} --recipe R`): {' '.join(cls.__doc__.split())}\n")
        for k in keys:
            head = f"{k.key}:" if k.type == "section" else f"{k.key}  ({k.type}; default {k.default})"
            print(head)
            if k.doc:
                print(textwrap.fill(" ".join(k.doc.split()), width=116, initial_indent="    ",
                                    subsequent_indent="    "))
        print()
    if not found:
        return _fail(f"no recipe key starts with {args.prefix!r}; `pofa recipe-keys` lists them all")
    return 0


def bench_main(argv: Sequence[str] | None = None) -> int:
    """`pofa bench-inference MODEL [--qat DIR] [--onnx PATH]`: latency of pofa's sparse runtimes and of what a user
    would run instead (dense torch, dense onnxruntime fp32 and int8), alternated in one process, as ratios.

    MODEL is a model folder: a QAT folder (its compact checkpoint is int8) gives every variant, its own ONNX export
    included when it has one; a float sparse folder gives the dense and sparse fp32 variants, plus the int8 ones
    with --qat (the QAT folder of the same model) and --onnx (pofa's int8 export).
    """
    from pofa.runtime import VARIANTS, benchmark_latency

    parser = argparse.ArgumentParser(prog="pofa bench-inference", description=bench_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a model folder (sparse weights; a QAT folder for every variant)")
    parser.add_argument("--qat", type=Path, help="the QAT folder of the same model (sparse int8 and pofa int8 ONNX)")
    parser.add_argument("--onnx", type=Path, help=f"pofa's int8 ONNX export of the model (default: MODEL's or "
                        f"--qat's {ONNX_FILE} if there, else exported from the QAT model)")
    parser.add_argument("--variants", help=f"comma-separated subset of {','.join(VARIANTS)} (default: all that the "
                        "folders allow)")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    for folder in (args.model, args.qat):
        if folder is not None and not folder.is_dir():
            return _fail(f"model folder not found: {folder}")
    if args.onnx is not None and not args.onnx.is_file():
        return _fail(f"ONNX file not found: {args.onnx}")
    onnx = args.onnx or next((f / ONNX_FILE for f in (args.qat, args.model) if f and (f / ONNX_FILE).is_file()), None)
    variants = args.variants.split(",") if args.variants else None
    try:
        rows = benchmark_latency(args.model, qat_model=args.qat, onnx_int8_path=onnx, variants=variants,
                                 batch_sizes=[int(b) for b in args.batch_sizes.split(",")], seq_len=args.seq_len,
                                 repeats=args.repeats)
    except ValueError as exc:
        return _fail(str(exc))
    print(f"{'batch':>5} {'variant':<18} {'latency ms':>11} {'vs torch_fp32_dense':>20} {'vs ort_int8_dense':>18}")
    for row in rows:
        dense, user = (row.get(k) for k in ("speedup_vs_dense", "speedup_vs_ort_int8_dense"))
        print(f"{row['batch_size']:>5} {row['variant']:<18} {row['latency_ms']:>11.1f} "
              f"{(f'{dense:.2f}x' if dense else '-'):>20} {(f'{user:.2f}x' if user else '-'):>18}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
