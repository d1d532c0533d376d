"""Sparse transfer: fine-tune a sparse pre-trained model on a downstream task without losing a single zero.

    accelerate launch -m pofa.finetune --recipe quickstart-finetune [--seeds 1,2,3] [KEY=VALUE ...]
    pofa finetune --recipe RECIPE          (RECIPE: a YAML file, or a shipped recipe's name)

The loop is the pre-training loop's shape with a task head:

    masks  <- masks.safetensors of the model folder, or its zeros      (sparsity.masks: auto | file | zeros | none)
              [the file's N:M pattern, e.g. 2:4, is kept and checked]
    [apply_recipe_(model, decomposition)]                              low-rank / Kronecker / tensor (pofa.decompose)
                                                                       [or at events: schedule: iterative (ROSITA)]
    guard  <- MaskGuard(model, masks)                                  gradient hooks: pruned gradients are zero
    [prepare_qat_(model)]                                              fake int8 on the encoder Linears (QAT)
    for step in range(max_steps):
        loss <- task loss [+ kd_loss | span_kd_loss (QA) from a dense fine-tuned teacher]    (pofa.distill)
        backward, clip, AdamW step                                     pruned weights stay exactly zero
        log / evaluate / checkpoint                                    pofa.stage (shared with pre-training)
    check_masks, same zero pattern; save final/ (model, masks, sparsity.json, eval_results.json, compact, ONNX)

With `sparsity.masks: none` the same script fine-tunes a dense model, e.g. the teacher for distillation.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pofa.artifacts import (COMPACT_FILE, EVAL_RESULTS_FILE, MASKS_FILE, ONNX_FILE, SEEDS_FILE, SPARSITY_FILE)
from pofa.checkpoint import OutputDirError
from pofa.data.mlm import batch_indices
from pofa.decompose import Decomposer, apply_recipe_
from pofa.families import FamilyError
from pofa.hub import PublicationError
from pofa.loop import LossWindow, learning_rate_factor, micro_step, steps_for_epochs
from pofa.modeling import ModelLoadError, load_config, load_tokenizer, resolve_model_path
from pofa.recipe import FinetuneRecipe, RecipeError, load_recipe
from pofa.sparsity.lock import find_mask_file, without_absent_pooler
from pofa.sparsity.pruner import Pruner
from pofa.stage import Stage, format_metrics

RESUME_KEYS = ["model", "task", "training.seed", "training.per_device_batch_size",
               "training.gradient_accumulation_steps", "sparsity", "distillation", "quantization", "pruning",
               "decomposition"]


@dataclass
class FinetuneResult:
    output_dir: Path
    final_dir: Path
    metrics: dict[str, float]
    sparsity: float | None
    seconds: float


def _warn(message: str) -> None:
    print(f"WARNING: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TaskData:
    spec: Any
    raw: Any  # DatasetDict of the task's examples
    train: Any  # tokenized training features
    evals: dict[str, Any]  # split -> tokenized evaluation features


def load_task_data(recipe: FinetuneRecipe, tokenizer) -> TaskData:
    """The recipe's task (its spec with the label names settled), its examples and their model features.
    A task the recipe cannot describe, or a column it names that the data lacks, is a RecipeError naming the
    `task.` field."""
    from pofa.data.tasks import (TASKS, MissingColumnError, load_task, recipe_task_spec, source_columns,
                                 tokenize_task, with_label_names)

    task = recipe.task
    try:
        spec = recipe_task_spec(task)
    except ValueError as exc:
        raise RecipeError(f"task.{exc}") from None
    if spec.hub_path is None and not task.data_files and spec.name not in TASKS:
        raise RecipeError(f"task.data_files: task {spec.name!r} has no data: give task.dataset (a Hub data set) or "
                          "task.data_files (local files by split)")
    if task.max_seq_length > tokenizer.model_max_length:
        raise RecipeError(f"task.max_seq_length: {task.max_seq_length} exceeds the model's maximum of "
                          f"{tokenizer.model_max_length} tokens ({recipe.model.name_or_path})")
    text_fields, label_field = source_columns(spec, task.text_fields, task.label_field)
    try:
        raw = load_task(spec, data_files=task.data_files or None, text_fields=text_fields, label_field=label_field,
                        cache_dir=task.cache_dir, max_train_examples=task.max_train_examples,
                        max_eval_examples=task.max_eval_examples, seed=recipe.training.seed)
    except MissingColumnError as exc:
        raise RecipeError(f"task.{exc.field}: {exc}") from None
    if "train" not in raw:
        raise RecipeError(f"task.data_files: no training split 'train' (given: {sorted(task.data_files)})")
    missing = [split for split in spec.eval_splits if split not in raw]
    if missing:
        raise RecipeError(f"task.data_files: no evaluation split {missing} (task.eval_splits: "
                          f"{list(spec.eval_splits)})")
    spec = with_label_names(spec, raw)
    features = {split: tokenize_task(raw[split], tokenizer, spec, train=split == "train",
                                     max_length=task.max_seq_length, doc_stride=task.doc_stride)
                for split in spec.splits}
    return TaskData(spec, raw, features["train"], {s: features[s] for s in spec.eval_splits})


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


def collate(features, rows, tokenizer) -> dict[str, torch.Tensor]:
    """Pad the selected rows of a tokenized dataset into a batch of model inputs. Labels stay as the task has
    them: class ids (long), scores (float32), or one label per token, padded with the ignored label -100 on the
    tokenizer's padding side."""
    batch = features[rows if isinstance(rows, list) else [int(i) for i in rows]]
    batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    labels = batch.pop("labels", None)
    padded = dict(tokenizer.pad(batch, return_tensors="pt"))
    if labels is not None:
        padded["labels"] = label_tensor(labels, padded["input_ids"].shape[1], tokenizer.padding_side)
    return padded


def label_tensor(labels: list, width: int, padding_side: str = "right") -> torch.Tensor:
    """A batch's labels as a tensor: per-token lists padded to `width` with -100 (the ignored label), float
    scores as float32 (the regression loss needs the logits' dtype), class ids as int64."""
    from pofa.data.tasks import IGNORED_LABEL

    if labels and isinstance(labels[0], list):
        pad = [[IGNORED_LABEL] * (width - len(row)) for row in labels]
        rows = [p + row if padding_side == "left" else row + p for row, p in zip(labels, pad)]
        return torch.tensor(rows, dtype=torch.long)
    if labels and isinstance(labels[0], float):
        return torch.tensor(labels, dtype=torch.float32)
    return torch.tensor(labels, dtype=torch.long)


# ---------------------------------------------------------------------------------------------------------------------
# Model, masks, teacher
# ---------------------------------------------------------------------------------------------------------------------


def load_task_model(name_or_path: str, spec, revision: str | None = None):
    """The model with the head of the task's kind: sequence classification (num_labels and the label set as
    id2label / label2id in its config), sequence classification with one output and problem_type regression,
    token classification (the tag set as id2label), or extractive QA (start and end logits)."""
    from transformers import (AutoModelForQuestionAnswering, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification)

    from pofa.modeling import load_pretrained  # a decomposed folder is rebuilt before its weights load

    path = resolve_model_path(name_or_path)
    labels = {"id2label": dict(enumerate(spec.label_names)), "label2id": {n: i for i, n in enumerate(spec.label_names)}}
    try:
        if spec.kind == "classification":
            return load_pretrained(AutoModelForSequenceClassification, path, revision=revision,
                                   num_labels=spec.num_labels, **labels)
        if spec.kind == "regression":
            return load_pretrained(AutoModelForSequenceClassification, path, revision=revision, num_labels=1,
                                   problem_type="regression")
        if spec.kind == "token_classification":
            return load_pretrained(AutoModelForTokenClassification, path, revision=revision,
                                   num_labels=spec.num_labels, **labels)
        return load_pretrained(AutoModelForQuestionAnswering, path, revision=revision)
    except (OSError, ValueError) as exc:
        from pofa.modeling import _explain

        raise _explain(path, "model", exc) from None


def locked_masks(recipe: FinetuneRecipe, model):
    """The MaskStore that fine-tuning must keep, per `sparsity.masks`; None for dense fine-tuning."""
    from pofa.families import pruning_targets
    from pofa.sparsity import MaskStore, check_masks

    mode = recipe.sparsity.masks
    if mode == "none":
        return None
    mask_file = find_mask_file(recipe.model.name_or_path, recipe.model.revision) if mode in ("auto", "file") else None
    if mode == "file" and mask_file is None:
        raise RecipeError(f"sparsity.masks: file, but {recipe.model.name_or_path} has no {MASKS_FILE}; "
                          "use `zeros` to lock the pattern of its zero weights")
    if mask_file is not None:
        store = without_absent_pooler(MaskStore.load(mask_file), model)
        check_masks(model, store)  # the weights must already be zero where the masks say pruned
        return store
    include = pruning_targets(model, recipe.sparsity.include, recipe.sparsity.exclude, pooler=recipe.sparsity.pooler,
                              section="sparsity")
    store = MaskStore.from_zeros(model.named_parameters(), include=include, exclude=recipe.sparsity.exclude)
    if store.sparsity() < 0.01:
        _warn(f"{recipe.model.name_or_path} has {store.sparsity():.2%} zeros in its targeted weights: there is "
              "nothing to lock, this fine-tuning is dense. Point model.name_or_path at a sparse pre-trained model "
              "(from `pofa pretrain` with pruning), or set sparsity.masks: none to silence this")
    return store


def zero_pattern(model, store) -> dict[str, torch.Tensor]:
    """name -> bool tensor of exact zeros of each masked weight (to prove the pattern is unchanged)."""
    from pofa.sparsity import bind_masks

    return {name: (param.detach() == 0).cpu() for name, param in bind_masks(model, store).items()}


# ---------------------------------------------------------------------------------------------------------------------
# Loss and evaluation
# ---------------------------------------------------------------------------------------------------------------------


def task_loss(model, batch, teacher, recipe: FinetuneRecipe, kind: str, layers=None, projection=None):
    """Task loss, with distillation from the teacher when one is given.

    Classification distils the class distribution of each example (`kd_loss`); token classification that of each
    labelled token (first sub-tokens; `kd_loss` with the label mask); regression matches the teacher's score (mean
    squared error, no temperature); extractive QA distils the start and the end distributions over each example's
    positions, padding excluded (`span_kd_loss`), weighted 1/2 each as the authors' code. With `layers` (the layer
    map's pairs), hidden states (through `projection`) and attentions are distilled too (`intermediate_loss`).
    Everything stays on the device: no host sync in the step.
    """
    internals = {}
    if layers is not None:
        internals = {"output_hidden_states": True,
                     "output_attentions": recipe.distillation.attention_weight > 0}
    outputs = model(**batch, **internals)
    if teacher is None:
        return outputs.loss
    from pofa.distill import intermediate_loss, kd_loss, span_kd_loss

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    with torch.no_grad():
        teacher_out = teacher(**inputs, **internals)
    k = recipe.distillation
    intermediate = 0.0
    if layers is not None:
        intermediate, _ = intermediate_loss(outputs.hidden_states, teacher_out.hidden_states, outputs.attentions,
                                            teacher_out.attentions, pairs=layers, mask=batch["attention_mask"].bool(),
                                            hidden_weight=k.hidden_weight, attention_weight=k.attention_weight,
                                            projection=projection)
    if kind == "question_answering":
        valid = batch["attention_mask"].bool()
        soft = sum(span_kd_loss(getattr(outputs, f), getattr(teacher_out, f), temperature=k.temperature, valid=valid)
                   for f in ("start_logits", "end_logits")) / 2
    elif kind == "regression":
        soft = torch.nn.functional.mse_loss(outputs.logits.float(), teacher_out.logits.detach().float())
    elif kind == "token_classification":
        soft = kd_loss(outputs.logits, teacher_out.logits, temperature=k.temperature, mask=batch["labels"] != -100)
    else:
        soft = kd_loss(outputs.logits, teacher_out.logits, temperature=k.temperature)
    return k.hard_weight * outputs.loss.float() + k.soft_weight * soft + intermediate


def _stack_rows(rows: list[np.ndarray], fill: float) -> np.ndarray:
    """Per-feature arrays as one array; rows of different lengths (unpadded windows or sentences) are padded at
    the end of their first axis with `fill`."""
    width = max(row.shape[0] for row in rows)
    return np.stack([np.pad(row, [(0, width - row.shape[0])] + [(0, 0)] * (row.ndim - 1), constant_values=fill)
                     for row in rows])


def predict(model, features, tokenizer, accelerator, batch_size: int, kind: str) -> list[np.ndarray]:
    """Outputs for every feature, in order: logits [N, C] (classification; regression C = 1), [N, L, C] (token
    classification, positions past a row's end padded with 0), or start and end logits [N, L] (QA, padded with
    -1e9 so that no decoding picks them)."""
    from accelerate.utils import gather_object

    model.eval()
    indices = list(range(accelerator.process_index, len(features), accelerator.num_processes))
    # Equal batch counts on every process (ZeRO-3 / FSDP run collectives in each forward): pad with row 0, marked -1.
    shard = -(-len(features) // accelerator.num_processes)
    indices += [-1] * (shard - len(indices))
    local: list[tuple[int, tuple[np.ndarray, ...]]] = []
    is_qa = kind == "question_answering"
    with torch.no_grad():
        for start in range(0, len(indices), batch_size):
            rows = indices[start : start + batch_size]
            batch = collate(features, [max(row, 0) for row in rows], tokenizer)
            batch = {k: v.to(accelerator.device) for k, v in batch.items() if k not in ("labels",)}
            with accelerator.autocast():
                out = model(**batch)
            parts = (out.start_logits, out.end_logits) if is_qa else (out.logits,)
            parts = tuple(p.float().cpu().numpy() for p in parts)
            local += [(row, tuple(p[i] for p in parts)) for i, row in enumerate(rows) if row >= 0]
    model.train()
    gathered = sorted(gather_object(local) if accelerator.num_processes > 1 else local, key=lambda x: x[0])
    return [_stack_rows([g[1][p] for g in gathered], -1e9 if is_qa else 0.0) for p in range(len(gathered[0][1]))]


def evaluate(model, data: TaskData, tokenizer, accelerator, recipe: FinetuneRecipe) -> dict[str, float]:
    """The task's metrics on every evaluation split, keyed `split/metric` (`pofa.data.tasks.score_predictions`:
    accuracy, F1 and entity scores in 0-1, correlations in -1..1, SQuAD in 0-100)."""
    from pofa.data.tasks import score_predictions

    results: dict[str, float] = {}
    for split, features in data.evals.items():
        outputs = predict(model, features, tokenizer, accelerator, recipe.training.eval_batch_size, data.spec.kind)
        metrics = score_predictions(data.spec, data.raw[split], features, outputs,
                                    n_best_size=recipe.task.n_best_size,
                                    max_answer_length=recipe.task.max_answer_length,
                                    null_score_diff_threshold=recipe.task.null_score_diff_threshold)
        results.update({f"{split}/{name}": value for name, value in metrics.items()})
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def finetune(recipe: FinetuneRecipe, *, resume: bool = False, overwrite: bool = False) -> FinetuneResult:
    """Fine-tune per the recipe; returns the final folder, the evaluation metrics and the locked sparsity."""
    t, k = recipe.training, recipe.distillation
    run = Stage.start(recipe, resume=resume, overwrite=overwrite)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path, recipe.model.revision,
                               inputs_for=load_config(recipe.model.name_or_path, recipe.model.revision))
    with run.accelerator.main_process_first():
        data = load_task_data(recipe, tokenizer)
    kind = data.spec.kind
    torch.manual_seed(t.seed)
    model = load_task_model(recipe.model.name_or_path, data.spec, recipe.model.revision)
    if (decomposed := apply_recipe_(model, recipe.decomposition)) is not None:  # before masks, QAT, optimizer
        run.log(decomposed)
    decomposer = Decomposer.for_stage(recipe.decomposition, model, run)  # iterative; --resume: the saved shapes
    store = locked_masks(recipe, model)
    pattern_before = zero_pattern(model, store) if store is not None else None
    teacher = run.load_teacher(lambda: load_task_model(k.teacher, data.spec), model) if k.teacher else None
    layers, projection = attach_intermediate_distillation(recipe, model, teacher)
    plan = run.plan_steps(t.max_steps or steps_for_epochs(
        num_examples=len(data.train), epochs=t.epochs, per_device_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_processes=run.accelerator.num_processes))
    check_pruning_fits(recipe, plan.max_steps)
    if decomposer is not None:
        decomposer.check_fits(plan.max_steps)
    qat_config = prepare_quantization(recipe, model, plan.max_steps)
    if len(data.train) < plan.per_device_batch_size * plan.num_processes:
        raise RecipeError(f"training.per_device_batch_size: the training set has {len(data.train)} examples, fewer "
                          f"than one batch of {plan.per_device_batch_size} x {plan.num_processes} processes")

    run.open()
    prepared = run.prepare(model)
    guard, pruner = None, None
    if store is not None:
        from pofa.sparsity import MaskGuard, check_masks

        guard = MaskGuard(model, store, gradients="step")  # the loop masks once per optimizer step
        guard.enforce_(run.optimizer)
        check_masks(model, store)
    elif recipe.pruning.enabled:  # downstream pruning: the masks grow from dense during fine-tuning
        pruner = Pruner(recipe.pruning, model)
        store, guard = pruner.store, pruner.guard
        run.register(pruner.save, pruner.load)
    if decomposer is not None:
        run.register(decomposer.save, decomposer.load)
    step = run.resume(RESUME_KEYS)["step"]
    if guard is not None and step > 0:
        guard.enforce_(run.optimizer)
    locked = (f"locked sparsity {store.sparsity():.2%} ({store.pattern}) over {len(store)} weights"
              if store is not None else "dense")
    if pruner is not None:
        locked = (f"pruning {len(store)} weights to {recipe.pruning.target_sparsity:.0%} "
                  f"(steps {recipe.pruning.start_step}-{recipe.pruning.end_step})")
    run.log(f"finetune {data.spec.name}: {recipe.model.name_or_path}, {locked}; {len(data.train)} training "
            f"features, {plan.max_steps} steps x {plan.global_batch_size}"
            f"{', distilling from ' + k.teacher if teacher is not None else ''}{', QAT int8' if qat_config else ''}")

    prepared.train()
    window, metrics = LossWindow(), None
    while True:
        if pruner is not None and pruner.is_event(step):
            run.log(pruner.prune(step, run.optimizer))
        if decomposer is not None and decomposer.is_event(step):
            run.log(decomposer.apply(step, run.optimizer))
        if step >= plan.max_steps:
            break
        run.set_lr(learning_rate_factor(step, max_steps=plan.max_steps, warmup_steps=plan.warmup_steps,
                                        schedule=t.lr_schedule, pruning=recipe.pruning))
        for accumulation_index in range(t.gradient_accumulation_steps):
            rows = batch_indices(plan.micro_step(step, accumulation_index), num_examples=len(data.train),
                                 per_device_batch_size=t.per_device_batch_size,
                                 num_processes=run.accelerator.num_processes,
                                 process_index=run.accelerator.process_index, seed=t.seed)
            batch = {key: v.to(run.accelerator.device) for key, v in collate(data.train, rows, tokenizer).items()}
            window.add(micro_step(run.accelerator, prepared, run.optimizer,
                                  lambda: task_loss(prepared, batch, teacher, recipe, kind, layers, projection),
                                  t.max_grad_norm,
                                  before_clip=guard.mask_gradients_ if guard is not None else None))
        step += 1
        run.stepped(plan.global_batch_size)
        if pruner is not None:
            pruner.stepped(run.lr, t.weight_decay, run.accelerator.optimizer_step_was_skipped)
        if qat_config is not None:
            from pofa.quant import qat_step_

            qat_step_(model, step, qat_config)
        if run.due_log(step):
            run.log_step(step, window.mean(), "examples")
        if run.due_eval(step):
            metrics = evaluate(prepared, data, tokenizer, run.accelerator, recipe)
            run.log(f"step {step}: {format_metrics(metrics)}")
            run.track({f"eval/{name}": value for name, value in metrics.items()}, step)
        if run.due_save(step):
            run.save(step, {})
    if metrics is None:  # resumed at the end: nothing was trained in this process
        metrics = evaluate(prepared, data, tokenizer, run.accelerator, recipe)
    if pruner is not None:
        from pofa.sparsity import check_masks

        check_masks(model, store)
    elif store is not None:
        check_pattern_kept(model, store, guard, pattern_before)
    final_dir = run.finish(step, {}, final_writer(run, model, tokenizer, store, metrics, data))
    return FinetuneResult(run.output_dir, final_dir, metrics, store.sparsity() if store is not None else None,
                          run.seconds())


# The hidden-state distillation's projection rides on the task model (so that DDP, the optimizer and checkpoints see
# it) under this name, and is left out of the final model.
PROJECTION = "pofa_hidden_projection"


def attach_intermediate_distillation(recipe: FinetuneRecipe, model, teacher):
    """The layer pairs and projection of `distillation.hidden_weight` / `attention_weight` (`pofa.distill.
    intermediate_distillation`); a projection is attached to `model` as `PROJECTION`."""
    from pofa.distill import intermediate_distillation

    try:
        layers, projection = intermediate_distillation(recipe.distillation, model, teacher)
    except ValueError as exc:  # depths that the layer map cannot pair
        raise RecipeError(str(exc)) from None
    if projection is not None:
        model.add_module(PROJECTION, projection)
    return layers, projection


def check_pruning_fits(recipe: FinetuneRecipe, max_steps: int) -> None:
    """Downstream pruning must reach its target within the run (its length is known only with the data)."""
    p = recipe.pruning
    if p.enabled and p.end_step > max_steps:
        raise RecipeError(f"pruning.end_step: {p.end_step} is beyond the run's {max_steps} optimizer steps; the "
                          "target sparsity would not be reached (lower it, or train longer)")


def prepare_quantization(recipe: FinetuneRecipe, model, max_steps: int):
    """With `quantization.enabled`, fake int8 on the encoder Linears (same Parameter objects: masks, hooks and the
    optimizer still apply); returns the QAT config, or None."""
    if not recipe.quantization.enabled:
        return None
    from pofa.quant import QATConfig, prepare_qat_

    q = recipe.quantization
    freeze_at = max(1, int(0.9 * max_steps)) if q.freeze_observers_after_step is None else q.freeze_observers_after_step
    config = QATConfig(weight_bits=q.weight_bits, per_channel=q.per_channel,
                       activation_observer_momentum=q.activation_observer_momentum,
                       freeze_observers_after_step=freeze_at, quantize_embeddings=q.quantize_embeddings)
    prepare_qat_(model, config)
    return config


def check_pattern_kept(model, store, guard, pattern_before: dict[str, torch.Tensor]) -> None:
    """The masks hold and the zero pattern is the input's, bit for bit (no zero revived, no kept weight zeroed)."""
    from pofa.sparsity import check_masks

    check_masks(model, store)
    after = {name: (weight == 0).cpu() for name, weight in guard.full_weights().items()}
    changed = [name for name in pattern_before if not torch.equal(pattern_before[name], after[name])]
    if changed:
        raise RuntimeError(f"the zero pattern changed during fine-tuning in {changed[:3]}")


def parity_batches(data: TaskData, tokenizer, size: int = 32, limit: int = 256) -> list[dict[str, torch.Tensor]]:
    """Real evaluation inputs (the first split, up to `limit` examples) for the ONNX parity check."""
    features = next(iter(data.evals.values()))
    n = min(limit, len(features))
    batches = []
    for start in range(0, n, size):
        batch = collate(features, list(range(start, min(n, start + size))), tokenizer)
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def final_writer(run: Stage, model, tokenizer, store, metrics, data: TaskData):
    """What `final/` holds: model, tokenizer, eval results, masks + sparsity report, compact file, ONNX.

    The collectives (gathering the weights under DeepSpeed ZeRO-3 / FSDP, the sparsity report) run here on every
    process; the returned function writes on the main process only.
    """
    recipe = run.recipe
    # The distillation projection trained beside the model is not part of it.
    state_dict = {k: v for k, v in (run.accelerator.get_state_dict(model) or {}).items()
                  if not k.startswith(f"{PROJECTION}.")}
    report = None
    if store is not None:
        from pofa.sparsity import sparsity_report

        report = sparsity_report(run.accelerator.unwrap_model(model), store)

    def write(folder: Path) -> None:
        unwrapped = run.accelerator.unwrap_model(model)
        unwrapped._modules.pop(PROJECTION, None)  # nothing trains after this: the model is published without it
        qat_buffers = _qat_buffer_keys(unwrapped)  # observer state: in checkpoints, not in the plain HF folder
        unwrapped.save_pretrained(folder, state_dict={k: v for k, v in state_dict.items() if k not in qat_buffers},
                                  safe_serialization=True)
        tokenizer.save_pretrained(folder)
        source = recipe.task.data_files or data.spec.hub_path or data.spec.name
        (folder / EVAL_RESULTS_FILE).write_text(json.dumps(
            {"task": data.spec.name, "dataset": source if isinstance(source, str) else data.spec.name,
             "metrics": metrics}, indent=2))
        if store is not None:
            store.save(folder / MASKS_FILE)
            (folder / SPARSITY_FILE).write_text(json.dumps(report, indent=2))
        if recipe.export.compact:
            from pofa.compact import save_compact

            save_compact(unwrapped, folder / COMPACT_FILE,
                         masks=_bound_masks(unwrapped, store) if store is not None else None)
        if recipe.export.onnx:
            from pofa.quant import export_onnx

            batches = parity_batches(data, tokenizer)
            export_onnx(unwrapped, batches[0], folder / ONNX_FILE, int8=recipe.quantization.enabled,
                        parity_batches=batches)

    return write


def _bound_masks(model, store) -> dict[str, torch.Tensor]:
    """The store's masks keyed by this model's parameter names (mask files may come from the MLM model)."""
    from pofa.sparsity import bind_masks

    params = bind_masks(model, store)
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(param)]: store[name] for name, param in params.items()}


def _qat_buffer_keys(model) -> set[str]:
    from pofa.quant import qat_modules

    return {f"{fqn}.{name}" for fqn, module in qat_modules(model).items()
            for name, _ in module.named_buffers(recurse=False)}


# ---------------------------------------------------------------------------------------------------------------------
# Several seeds, command line
# ---------------------------------------------------------------------------------------------------------------------


def finetune_seeds(recipe: FinetuneRecipe, seeds: Sequence[int], *, resume: bool = False, overwrite: bool = False
                   ) -> dict[str, Any]:
    """Run one fine-tuning per seed under `output_dir/seed-N`; write and return each seed's metrics and the mean."""
    from pofa.metrics import aggregate_seeds

    if recipe.hub.repo_id:  # one repository cannot hold several models: the user picks which seed to publish
        raise RecipeError(f"hub.repo_id: --seeds makes {len(seeds)} models; run without hub.repo_id and publish the "
                          "one you choose with `pofa push OUTPUT_DIR/seed-N/final REPO_ID`")
    root = Path(recipe.training.output_dir)
    runs = {}
    for seed in seeds:
        run = replace(recipe, training=replace(recipe.training, seed=seed, output_dir=str(root / f"seed-{seed}")))
        runs[seed] = finetune(run, resume=resume, overwrite=overwrite).metrics
    summary = {"seeds": {str(s): m for s, m in runs.items()}, "aggregate": aggregate_seeds(list(runs.values()))}
    root.mkdir(parents=True, exist_ok=True)
    (root / SEEDS_FILE).write_text(json.dumps(summary, indent=2))
    for metric, stats in summary["aggregate"].items():
        print(f"{metric}: mean {stats['mean']:.4f} std {stats['std']:.4f} over {stats['n']} seeds "
              f"({', '.join(f'{runs[s][metric]:.4f}' for s in seeds)})")
    return summary


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise RecipeError(f"--seeds {text!r}: expected integers separated by commas, e.g. 1,2,3") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise RecipeError(f"--seeds {text!r}: expected distinct integers separated by commas")
    return seeds


def main(argv: Sequence[str] | None = None) -> int:
    from pofa.data.tasks import TaskDataError
    from pofa.pretrain import build_parser, with_output_dir

    parser = build_parser("pofa finetune")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--seeds", help="comma-separated seeds: one run each, then the mean (e.g. 1,2,3)")
    args = parser.parse_args(argv)
    try:
        recipe = with_output_dir(load_recipe(args.recipe, args.overrides, FinetuneRecipe), args.output_dir)
        if args.seeds:
            finetune_seeds(recipe, parse_seeds(args.seeds), resume=args.resume, overwrite=args.overwrite)
        else:
            finetune(recipe, resume=args.resume, overwrite=args.overwrite)
    except (RecipeError, ModelLoadError, OutputDirError, TaskDataError, ConnectionError, FamilyError,
            PublicationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
