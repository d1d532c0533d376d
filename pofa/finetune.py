"""Sparse transfer: fine-tune a sparse pre-trained model on a downstream task without losing a single zero.

    accelerate launch pofa/finetune.py --recipe recipes/quickstart-finetune.yaml [--seeds 1,2,3] [KEY=VALUE ...]
    pofa finetune --recipe RECIPE.yaml

The loop is the pre-training loop's shape with a task head:

    masks  <- masks.safetensors of the model folder, or its zeros      (sparsity.masks: auto | file | zeros | none)
    guard  <- MaskGuard(model, masks)                                  gradient hooks: pruned gradients are zero
    [prepare_qat_(model)]                                              fake int8 on the encoder Linears (QAT)
    for step in range(max_steps):
        loss <- task loss [+ kd_loss(student, dense fine-tuned teacher)]
        backward, clip, AdamW step                                     pruned weights stay exactly zero
    check_masks; evaluate; save final/ (model, masks, sparsity.json, eval_results.json, compact, ONNX)

With `sparsity.masks: none` the same script fine-tunes a dense model, e.g. the teacher for distillation.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pofa.checkpoint import (RECIPE_FILE, Checkpointer, OutputDirError, check_resume_compatible, prepare_output_dir)
from pofa.data.mlm import batch_indices
from pofa.loop import (build_optimizer, configure_deepspeed, lr_multiplier, micro_step, plan_steps,
                       set_learning_rate, steps_for_epochs)
from pofa.modeling import (ModelLoadError, check_same_vocabulary, load_tokenizer, resolve_model_path,
                           unpartitioned)
from pofa.recipe import FinetuneRecipe, RecipeError, load_recipe, save_recipe

RESUME_KEYS = ["model", "task", "training.seed", "training.per_device_batch_size",
               "training.gradient_accumulation_steps", "sparsity", "distillation", "quantization"]
MASK_FILE = "masks.safetensors"


@dataclass
class FinetuneResult:
    output_dir: Path
    final_dir: Path
    metrics: dict[str, float]
    sparsity: float | None
    seconds: float


def _log(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, flush=True)


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
    from pofa.data.tasks import get_task, load_task, tokenize_classification, tokenize_squad

    task = recipe.task
    try:
        spec = get_task(task.name)
    except (KeyError, ValueError) as exc:
        raise RecipeError(f"task.name: {exc}") from None
    if task.max_seq_length > tokenizer.model_max_length:
        raise RecipeError(f"task.max_seq_length: {task.max_seq_length} exceeds the model's maximum of "
                          f"{tokenizer.model_max_length} tokens ({recipe.model.name_or_path})")
    raw = load_task(task.name, data_files=task.data_files or None, text_fields=task.text_fields,
                    label_field=task.label_field, cache_dir=task.cache_dir,
                    max_train_examples=task.max_train_examples, max_eval_examples=task.max_eval_examples,
                    seed=recipe.training.seed)
    if spec.kind == "classification":
        train = tokenize_classification(raw["train"], tokenizer, spec, task.max_seq_length)
        evals = {s: tokenize_classification(raw[s], tokenizer, spec, task.max_seq_length) for s in spec.eval_splits}
    else:
        train = tokenize_squad(raw["train"], tokenizer, train=True, max_length=task.max_seq_length,
                               doc_stride=task.doc_stride)
        evals = {s: tokenize_squad(raw[s], tokenizer, train=False, max_length=task.max_seq_length,
                                   doc_stride=task.doc_stride) for s in spec.eval_splits}
    return TaskData(spec, raw, train, evals)


MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels", "start_positions", "end_positions")


def collate(features, rows, tokenizer) -> dict[str, torch.Tensor]:
    """Pad the selected rows of a tokenized dataset into a batch of model inputs."""
    batch = features[rows if isinstance(rows, list) else [int(i) for i in rows]]
    batch = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    return dict(tokenizer.pad(batch, return_tensors="pt"))


# ---------------------------------------------------------------------------------------------------------------------
# Model, masks, teacher
# ---------------------------------------------------------------------------------------------------------------------


def load_task_model(name_or_path: str, spec, revision: str | None = None):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification

    path = resolve_model_path(name_or_path)
    try:
        if spec.kind == "classification":
            return AutoModelForSequenceClassification.from_pretrained(
                path, revision=revision, num_labels=spec.num_labels,
                id2label=dict(enumerate(spec.label_names)), label2id={n: i for i, n in enumerate(spec.label_names)})
        return AutoModelForQuestionAnswering.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as exc:
        from pofa.modeling import _explain

        raise _explain(path, "model", exc) from None


def find_mask_file(name_or_path: str, revision: str | None = None) -> Path | None:
    """The model's masks.safetensors: in its folder, or on the Hub for a Hub id (None when it has none)."""
    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return path / MASK_FILE if (path / MASK_FILE).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, MASK_FILE, revision=revision))
    except Exception:  # noqa: BLE001 - no mask file on the Hub, or no network: the zeros will be used
        return None


def locked_masks(recipe: FinetuneRecipe, model):
    """The MaskStore that fine-tuning must keep, per `sparsity.masks`; None for dense fine-tuning."""
    from pofa.sparsity import DEFAULT_TARGETS, MaskStore, check_masks

    mode = recipe.sparsity.masks
    if mode == "none":
        return None
    mask_file = find_mask_file(recipe.model.name_or_path, recipe.model.revision) if mode in ("auto", "file") else None
    if mode == "file" and mask_file is None:
        raise RecipeError(f"sparsity.masks: file, but {recipe.model.name_or_path} has no {MASK_FILE}; "
                          "use `zeros` to lock the pattern of its zero weights")
    if mask_file is not None:
        store = MaskStore.load(mask_file)
        check_masks(model, store)  # the weights must already be zero where the masks say pruned
        return store
    store = MaskStore.from_zeros(model.named_parameters(), include=recipe.sparsity.include or DEFAULT_TARGETS,
                                 exclude=recipe.sparsity.exclude)
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


def task_loss(model, batch, teacher, recipe: FinetuneRecipe, is_qa: bool):
    """Task loss, with distillation from the teacher when one is given."""
    outputs = model(**batch)
    if teacher is None:
        return outputs.loss
    from pofa.distill import distillation_loss

    inputs = {k: v for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
    with torch.no_grad():
        teacher_out = teacher(**inputs)
    k = recipe.distillation
    if not is_qa:
        loss, _ = distillation_loss(outputs.loss, outputs.logits, teacher_out.logits, hard_weight=k.hard_weight,
                                    soft_weight=k.soft_weight, temperature=k.temperature)
        return loss
    mask = batch["attention_mask"].bool()
    losses = [distillation_loss(outputs.loss, getattr(outputs, f), getattr(teacher_out, f), hard_weight=k.hard_weight,
                                soft_weight=k.soft_weight, temperature=k.temperature, mask=mask)[0]
              for f in ("start_logits", "end_logits")]
    return (losses[0] + losses[1]) / 2


def predict(model, features, tokenizer, accelerator, batch_size: int, is_qa: bool) -> list[np.ndarray]:
    """Logits for every feature, in order ([N, C] for classification; start and end [N, L] for QA)."""
    from accelerate.utils import gather_object

    model.eval()
    indices = list(range(accelerator.process_index, len(features), accelerator.num_processes))
    # Equal batch counts on every process (ZeRO-3 / FSDP run collectives in each forward): pad with row 0, marked -1.
    shard = -(-len(features) // accelerator.num_processes)
    indices += [-1] * (shard - len(indices))
    local: list[tuple[int, tuple[np.ndarray, ...]]] = []
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
    n_parts = 2 if is_qa else 1
    if is_qa:  # windows have different lengths only when unpadded: pad the logits with -inf
        width = max(len(g[1][0]) for g in gathered)
        return [np.stack([np.pad(g[1][p], (0, width - len(g[1][p])), constant_values=-1e9) for g in gathered])
                for p in range(n_parts)]
    return [np.stack([g[1][0] for g in gathered])]


def evaluate(model, data: TaskData, tokenizer, accelerator, recipe: FinetuneRecipe) -> dict[str, float]:
    """The task's metrics on every evaluation split, keyed `split/metric` (accuracy and F1 in 0-1, SQuAD 0-100)."""
    from pofa.data.tasks import postprocess_squad_predictions, squad_references
    from pofa.metrics import classification_metrics, squad_metrics

    is_qa = data.spec.kind == "extractive_qa"
    results: dict[str, float] = {}
    for split, features in data.evals.items():
        logits = predict(model, features, tokenizer, accelerator, recipe.training.eval_batch_size, is_qa)
        if is_qa:
            answers = postprocess_squad_predictions(data.raw[split], features, logits[0], logits[1],
                                                    n_best_size=recipe.task.n_best_size,
                                                    max_answer_length=recipe.task.max_answer_length)
            metrics = squad_metrics(answers, squad_references(data.raw[split]))
        else:
            metrics = classification_metrics(logits[0].argmax(-1), np.asarray(features["labels"]),
                                              data.spec.metrics)
        results.update({f"{split}/{name}": value for name, value in metrics.items()})
    return results


# ---------------------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------------------


def finetune(recipe: FinetuneRecipe, *, resume: bool = False, overwrite: bool = False) -> FinetuneResult:
    """Fine-tune per the recipe; returns the final folder, the evaluation metrics and the locked sparsity."""
    from pofa.loop import new_accelerator

    started = time.perf_counter()
    t = recipe.training
    output_dir = Path(t.output_dir)
    accelerator = new_accelerator(gradient_accumulation_steps=t.gradient_accumulation_steps,
                                  mixed_precision=t.mixed_precision, log_with=list(t.trackers) or None,
                                  project_dir=str(output_dir))
    prepare_output_dir(output_dir, resume=resume, overwrite=overwrite, create=False)
    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path, recipe.model.revision)
    with accelerator.main_process_first():
        data = load_task_data(recipe, tokenizer)
    is_qa = data.spec.kind == "extractive_qa"
    torch.manual_seed(t.seed)
    model = load_task_model(recipe.model.name_or_path, data.spec, recipe.model.revision)
    store = locked_masks(recipe, model)
    pattern_before = zero_pattern(model, store) if store is not None else None
    teacher = None
    if recipe.distillation.teacher:
        with unpartitioned():  # the frozen teacher is never wrapped by DeepSpeed
            teacher = load_task_model(recipe.distillation.teacher, data.spec)
        check_same_vocabulary(teacher, model, recipe.distillation.teacher)
        teacher.requires_grad_(False).eval().to(accelerator.device)
    max_steps = t.max_steps or steps_for_epochs(
        num_examples=len(data.train), epochs=t.epochs, per_device_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, num_processes=accelerator.num_processes)
    plan = plan_steps(max_steps=max_steps, per_device_batch_size=t.per_device_batch_size,
                      gradient_accumulation_steps=t.gradient_accumulation_steps,
                      num_processes=accelerator.num_processes, warmup_ratio=t.warmup_ratio,
                      warmup_steps=t.warmup_steps)
    qat_config = None
    if recipe.quantization.enabled:
        from pofa.quant import QATConfig, prepare_qat_

        q = recipe.quantization
        freeze_at = q.freeze_observers_after_step
        qat_config = QATConfig(weight_bits=q.weight_bits, per_channel=q.per_channel,
                               activation_observer_momentum=q.activation_observer_momentum,
                               freeze_observers_after_step=max(1, int(0.9 * plan.max_steps)) if freeze_at is None
                               else freeze_at, quantize_embeddings=q.quantize_embeddings)
        prepare_qat_(model, qat_config)  # keeps the Parameter objects: masks, hooks and optimizer still apply
    if len(data.train) < plan.per_device_batch_size * plan.num_processes:
        raise RecipeError(f"training.per_device_batch_size: the training set has {len(data.train)} examples, fewer "
                          f"than one batch of {plan.per_device_batch_size} x {plan.num_processes} processes")

    if accelerator.is_main_process:
        prepare_output_dir(output_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    optimizer = build_optimizer(model, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                                betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    configure_deepspeed(accelerator, t.per_device_batch_size)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    guard = None
    if store is not None:
        from pofa.sparsity import MaskGuard, check_masks

        guard = MaskGuard(model, store)
        guard.enforce_(optimizer)
        check_masks(model, store)

    checkpointer = Checkpointer(accelerator, output_dir, t.keep_last)
    step = 0
    if resume and (latest := checkpointer.latest()) is not None:
        check_resume_compatible((latest / RECIPE_FILE).read_text(), recipe, latest, RESUME_KEYS)
        step = checkpointer.load(latest)["step"]
        if guard is not None:
            guard.enforce_(optimizer)
        _log(accelerator, f"resumed from {latest} at step {step}")
    if accelerator.is_main_process:
        save_recipe(recipe, output_dir / RECIPE_FILE)
    sparsity_text = f", locked sparsity {store.sparsity():.2%} over {len(store)} weights" if store is not None else \
        ", dense (no masks)"
    _log(accelerator, f"finetune {data.spec.name}: {recipe.model.name_or_path}{sparsity_text}; {len(data.train)} "
                      f"training features, {plan.max_steps} steps x {plan.global_batch_size}"
                      f"{', distilling from ' + recipe.distillation.teacher if teacher is not None else ''}"
                      f"{', QAT int8' if qat_config is not None else ''}")

    prepared.train()
    window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
    while step < plan.max_steps:
        set_learning_rate(optimizer, t.learning_rate * lr_multiplier(
            step, max_steps=plan.max_steps, warmup_steps=plan.warmup_steps, schedule=t.lr_schedule))
        for accumulation_index in range(t.gradient_accumulation_steps):
            rows = batch_indices(plan.micro_step(step, accumulation_index), num_examples=len(data.train),
                                 per_device_batch_size=t.per_device_batch_size,
                                 num_processes=accelerator.num_processes, process_index=accelerator.process_index,
                                 seed=t.seed)
            batch = {k: v.to(accelerator.device) for k, v in collate(data.train, rows, tokenizer).items()}
            loss = micro_step(accelerator, prepared, optimizer,
                              lambda: task_loss(prepared, batch, teacher, recipe, is_qa), t.max_grad_norm)
            window_loss += loss.float()  # stays on the device: .item() here would sync every micro-step
            window_count += 1
        step += 1
        if qat_config is not None:
            from pofa.quant import qat_step_

            qat_step_(model, step, qat_config)
        if step % t.log_every == 0 or step == plan.max_steps:
            rate = window_count * t.per_device_batch_size / max(time.perf_counter() - window_start, 1e-9)
            _log(accelerator, f"step {step}: loss {float(window_loss) / max(window_count, 1):.4f} "
                              f"lr {optimizer.param_groups[0]['lr']:.3g} examples_per_s {rate:.1f}")
            window_loss, window_count, window_start = 0.0, 0, time.perf_counter()
        if step % t.eval_every == 0 and step < plan.max_steps:
            _log(accelerator, f"step {step}: " + _format(evaluate(prepared, data, tokenizer, accelerator, recipe)))
        if step % t.save_every == 0 and step < plan.max_steps:
            checkpointer.save(step, {}, recipe)

    metrics = evaluate(prepared, data, tokenizer, accelerator, recipe)
    _log(accelerator, f"step {step}: " + _format(metrics))
    if store is not None:
        from pofa.sparsity import check_masks

        check_masks(model, store)
        after = {name: (weight == 0).cpu() for name, weight in guard.full_weights().items()}
        changed = [n for n in pattern_before if not torch.equal(pattern_before[n], after[n])]
        if changed:  # a zero was revived, or a kept weight became exactly zero: the pattern is not the input's
            raise RuntimeError(f"the zero pattern changed during fine-tuning in {changed[:3]}")
    checkpointer.save(step, {}, recipe)
    final_dir = save_final(accelerator, model, tokenizer, recipe, output_dir, store=store, metrics=metrics,
                           data=data)
    _log(accelerator, f"final model: {final_dir}")
    return FinetuneResult(output_dir, final_dir, metrics, store.sparsity() if store is not None else None,
                          time.perf_counter() - started)


def _format(metrics: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4f}" for k, v in metrics.items())


def parity_batches(data: TaskData, tokenizer, size: int = 32, limit: int = 256) -> list[dict[str, torch.Tensor]]:
    """Real evaluation inputs (the first split, up to `limit` examples) for the ONNX parity check."""
    features = next(iter(data.evals.values()))
    n = min(limit, len(features))
    batches = []
    for start in range(0, n, size):
        batch = collate(features, list(range(start, min(n, start + size))), tokenizer)
        batches.append({k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")})
    return batches


def save_final(accelerator, model, tokenizer, recipe: FinetuneRecipe, output_dir: Path, *, store, metrics,
               data: TaskData) -> Path:
    """Write `final/` atomically: model, tokenizer, recipe, eval results, masks + sparsity report, compact, ONNX."""
    final_dir, tmp = output_dir / "final", output_dir / ".tmp-final"
    state_dict = accelerator.get_state_dict(model)
    report = None
    if store is not None:  # a collective under DeepSpeed ZeRO / FSDP: every rank takes part
        from pofa.sparsity import sparsity_report

        report = sparsity_report(accelerator.unwrap_model(model), store)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = accelerator.unwrap_model(model)
        qat_buffers = _qat_buffer_keys(unwrapped)  # observer state: in checkpoints, not in the plain HF folder
        unwrapped.save_pretrained(tmp, state_dict={k: v for k, v in state_dict.items() if k not in qat_buffers},
                                  safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_recipe(recipe, tmp / RECIPE_FILE)
        source = recipe.task.data_files or data.spec.hub_path or data.spec.name
        (tmp / "eval_results.json").write_text(json.dumps(
            {"task": data.spec.name, "dataset": source if isinstance(source, str) else data.spec.name,
             "metrics": metrics}, indent=2))
        if store is not None:
            store.save(tmp / MASK_FILE)
            (tmp / "sparsity.json").write_text(json.dumps(report, indent=2))
        if recipe.export.compact:
            from pofa.compact import save_compact

            save_compact(unwrapped, tmp / "compact.safetensors",
                         masks=_bound_masks(unwrapped, store) if store is not None else None)
        if recipe.export.onnx:
            from pofa.quant import export_onnx

            export_onnx(unwrapped, parity_batches(data, tokenizer)[0], tmp / "model.onnx",
                        int8=recipe.quantization.enabled, parity_batches=parity_batches(data, tokenizer))
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    accelerator.wait_for_everyone()
    return final_dir


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

    root = Path(recipe.training.output_dir)
    runs = {}
    for seed in seeds:
        run = replace(recipe, training=replace(recipe.training, seed=seed, output_dir=str(root / f"seed-{seed}")))
        runs[seed] = finetune(run, resume=resume, overwrite=overwrite).metrics
    summary = {"seeds": {str(s): m for s, m in runs.items()}, "aggregate": aggregate_seeds(list(runs.values()))}
    root.mkdir(parents=True, exist_ok=True)
    (root / "seeds.json").write_text(json.dumps(summary, indent=2))
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
    from pofa.pretrain import build_parser

    parser = build_parser("pofa finetune")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--seeds", help="comma-separated seeds: one run each, then the mean (e.g. 1,2,3)")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"training.output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        recipe = load_recipe(args.recipe, overrides, FinetuneRecipe)
        if args.seeds:
            finetune_seeds(recipe, parse_seeds(args.seeds), resume=args.resume, overwrite=args.overwrite)
        else:
            finetune(recipe, resume=args.resume, overwrite=args.overwrite)
    except (RecipeError, ModelLoadError, OutputDirError, TaskDataError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
