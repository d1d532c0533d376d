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
    from pofa.data.tasks import get_task

    columns = [get_task(recipe.task.name).text_fields]
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
    from pofa.data.tasks import (HubUnreachableError, TaskDataError, get_task, load_task, tokenize_classification,
                                 tokenize_squad)
    from pofa.finetune import TaskData, parity_batches

    task = recipe.task
    spec = get_task(task.name)
    files = None
    if task.data_files:
        files = {split: path for split, path in task.data_files.items() if split in spec.eval_splits}
        if not files:
            raise ParityRowsError(f"the recipe's task.data_files has no evaluation split {list(spec.eval_splits)}")
    try:
        raw = load_task(task.name, data_files=files, text_fields=task.text_fields, label_field=task.label_field,
                        cache_dir=task.cache_dir, max_eval_examples=task.max_eval_examples, seed=recipe.training.seed)
    except (FileNotFoundError, TaskDataError, HubUnreachableError, OfflineDataError) as exc:
        raise ParityRowsError(f"cannot read the evaluation rows of task {task.name!r} ({exc})") from None
    split = next(s for s in spec.eval_splits if s in raw)
    length = max_length or task.max_seq_length
    if spec.kind == "classification":
        features = tokenize_classification(raw[split], tokenizer, spec, length)
    else:
        features = tokenize_squad(raw[split], tokenizer, train=False, max_length=length,
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
    """`pofa push DIR REPO_ID [--dry-run]`: publish a model folder with its generated model card."""
    parser = argparse.ArgumentParser(prog="pofa push", description=push_main.__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("repo_id")
    parser.add_argument("--dry-run", action="store_true", help="prepare the folder and card; upload nothing")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--base-model", help="Hub id of the model it was made from (default: read from recipe.yaml, "
                        "following the local pofa folders it names back to a Hub id)")
    parser.add_argument("--dataset", action="append", default=[],
                        help="Hub id of a data set used, besides the Hub data sets the recipes name (repeatable)")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--endpoint", help="Hub endpoint (default: HF_ENDPOINT or huggingface.co)")
    args = parser.parse_args(argv)
    from pofa.hub import HubUnreachableError, PublicationError, push_to_hub

    try:
        where = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                            dry_run=args.dry_run, endpoint=args.endpoint, base_model=args.base_model,
                            datasets=args.dataset, license=args.license)
    except (PublicationError, HubUnreachableError) as exc:
        return _fail(str(exc))
    print(f"{'prepared (dry run)' if args.dry_run else 'pushed'}: {where}")
    return 0


def bench_main(argv: Sequence[str] | None = None) -> int:
    """`pofa bench-inference MODEL [--onnx PATH]`: latency of dense fp32, sparse kernels and int8 ONNX, as ratios."""
    parser = argparse.ArgumentParser(prog="pofa bench-inference", description=bench_main.__doc__)
    parser.add_argument("model", help="a model folder (sparse weights)")
    parser.add_argument("--onnx", type=Path, help=f"an int8 ONNX export of the same model (e.g. a QAT folder's "
                        f"{ONNX_FILE})")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args(argv)
    from pofa.runtime import benchmark_latency

    if not Path(args.model).is_dir():
        return _fail(f"model folder not found: {args.model}")
    if args.onnx is not None and not args.onnx.is_file():
        return _fail(f"ONNX file not found: {args.onnx}")
    rows = benchmark_latency(args.model, batch_sizes=[int(b) for b in args.batch_sizes.split(",")],
                             seq_len=args.seq_len, onnx_int8_path=args.onnx, repeats=args.repeats)
    print(f"{'batch':>5} {'variant':<14} {'latency ms':>11} {'vs dense fp32':>14}")
    for row in rows:
        print(f"{row['batch_size']:>5} {row['variant']:<14} {row['latency_ms']:>11.1f} "
              f"{row['speedup_vs_dense']:>13.2f}x")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
