"""Teacher preparation and student pruning: one plain accelerate loop.

    accelerate launch pofa/pretrain.py --recipe recipes/minilm-offline-teacher.yaml [--output-dir DIR] [--resume]
    pofa pretrain --recipe RECIPE.yaml [a.b=value ...]

The loop, top to bottom (each technique is a pure function elsewhere; this file only attaches it):

    for step in range(start, max_steps):           # optimizer steps
        if pruning event at step:                  # pofa.sparsity.schedule: cubic_sparsity, is_pruning_step
            masks <- magnitude_masks(weights)      # pofa.sparsity.masks; the MaskStore is checkpointed
            guard.enforce_(optimizer)              # zero weights, Adam moments (and DeepSpeed master copies)
        for each micro-step:                       # accelerate.accumulate
            batch <- MLMBatcher.train_batch(micro) # pofa.data.mlm: packed blocks, deterministic masking
            loss  <- MLM CE at masked positions    # pofa.modeling.MaskedLM (projects masked positions only)
                     [+ kd_loss(student, teacher)] # pofa.distill, frozen teacher
            backward                               # MaskGuard's gradient hooks zero pruned gradients
        clip, optimizer step, lr <- lr_multiplier  # pofa.loop
        log / evaluate / checkpoint (atomic)       # pofa.checkpoint

A recipe with `pruning.enabled: false` and no teacher is teacher preparation (dense MLM); with pruning and a teacher
it is the student stage of Prune Once for All. The final model lands in `OUTPUT_DIR/final/` as a Hugging Face folder
with `recipe.yaml`, and for students `masks.safetensors` and `sparsity.json`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pofa.checkpoint import (RECIPE_FILE, Checkpointer, OutputDirError, check_resume_compatible, prepare_output_dir)
from pofa.data.corpus import CorpusError
from pofa.data.mlm import MLMBatcher, StreamingMLMBatcher, build_block_cache, split_blocks
from pofa.loop import (build_optimizer, configure_deepspeed, lr_multiplier, micro_step, plan_steps,
                       set_learning_rate)
from pofa.modeling import (MaskedLM, ModelLoadError, check_same_vocabulary, load_config, load_mlm_model,
                           load_tokenizer, max_positions, unpartitioned)
from pofa.recipe import PretrainRecipe, RecipeError, load_recipe, save_recipe

logger = logging.getLogger("pofa.pretrain")

# Keys that must match to resume a run: the rest (max_steps, eval/save/log cadence) may change between attempts.
RESUME_KEYS = ["stage", "model", "data", "training.seed", "training.per_device_batch_size",
               "training.gradient_accumulation_steps", "pruning", "distillation"]


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    eval_before: dict[str, float] | None
    eval_after: dict[str, float]
    steps: int


def _log(accelerator, message: str) -> None:
    if accelerator.is_main_process:
        print(message, flush=True)


def make_accelerator(recipe: PretrainRecipe, output_dir: Path):
    from pofa.loop import new_accelerator

    t = recipe.training
    return new_accelerator(
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        mixed_precision=t.mixed_precision,
        log_with=list(t.trackers) or None,
        project_dir=str(output_dir),
    )


def evaluate(model, batches, accelerator) -> dict[str, float]:
    """Held-out MLM loss (mean over masked tokens) and masked-token accuracy, reduced over processes."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss, logits, selected = model(**batch)
            labels = batch["labels"][selected]
            n = (labels != -100).sum()
            total_loss += loss.double() * n
            correct += (logits.argmax(-1) == labels).sum()
            count += n
    model.train()
    total_loss, correct, count = (accelerator.reduce(x, "sum") for x in (total_loss, correct, count))
    if count.item() == 0:
        return {"mlm_loss": float("nan"), "mlm_accuracy": float("nan"), "masked_tokens": 0}
    return {"mlm_loss": (total_loss / count).item(), "mlm_accuracy": (correct / count).item(),
            "masked_tokens": int(count.item())}


class Pruner:
    """Attaches gradual magnitude pruning to the loop: the schedule, the MaskStore and the MaskGuard."""

    def __init__(self, recipe: PretrainRecipe, model):
        from pofa.sparsity import DEFAULT_TARGETS, MaskGuard, MaskStore

        self.config = recipe.pruning
        self.model = model
        # Full shapes, also where DeepSpeed ZeRO-3 leaves each process an empty shard.
        self.store = MaskStore.dense(model.named_parameters(), include=self.config.include or DEFAULT_TARGETS,
                                     exclude=self.config.exclude)
        self.guard = MaskGuard(model, self.store)
        self.end_pruning_step = self.config.end_pruning_step or self.config.end_step

    def is_event(self, step: int) -> bool:
        from pofa.sparsity import is_pruning_step

        return is_pruning_step(step, start_step=self.config.start_step, frequency=self.config.frequency,
                               end_pruning_step=self.end_pruning_step)

    def last_event(self, step: int) -> int:
        """The latest pruning event at or before `step` (for learning-rate rewinding)."""
        c = self.config
        if step < c.start_step:
            return 0
        return c.start_step + ((min(step, self.end_pruning_step) - c.start_step) // c.frequency) * c.frequency

    def target(self, step: int) -> float:
        from pofa.sparsity import cubic_sparsity

        c = self.config
        return cubic_sparsity(step, initial=c.initial_sparsity, final=c.target_sparsity, start_step=c.start_step,
                              end_step=c.end_step)

    def prune(self, step: int, optimizer) -> tuple[float, float]:
        """Recompute masks at `step`; returns (target, achieved) sparsity over the targets."""
        from pofa.sparsity import check_masks

        target = self.target(step)
        self.guard.prune_(target, optimizer=optimizer, scope=self.config.scope)
        check_masks(self.model, self.store)
        return target, self.store.sparsity()

    def load(self, folder: Path) -> None:
        """Restore the masks of a checkpoint into the live store (the gradient hooks keep reading it)."""
        from pofa.sparsity import MaskStore

        self.store.load_state_dict(MaskStore.load(folder / "masks.safetensors").state_dict())


def mlm_loss(student, teacher, batch, distill_mask, distillation) -> torch.Tensor:
    """MLM cross-entropy at the masked positions, mixed with distillation from the teacher when there is one."""
    loss, logits, _ = student(**batch, distill_mask=distill_mask)
    if teacher is None:
        return loss
    from pofa.distill import distillation_loss

    with torch.no_grad():
        _, teacher_logits, _ = teacher(**batch, distill_mask=distill_mask)
    loss, _ = distillation_loss(loss, logits, teacher_logits, hard_weight=distillation.hard_weight,
                                soft_weight=distillation.soft_weight, temperature=distillation.temperature)
    return loss


def make_batcher(recipe: PretrainRecipe, tokenizer, accelerator) -> MLMBatcher:
    """Packed, cached blocks for map-style corpora; on-the-fly blocks when a source is streamed."""
    d, t = recipe.data, recipe.training
    common = dict(per_device_batch_size=t.per_device_batch_size, num_processes=accelerator.num_processes,
                  process_index=accelerator.process_index, seed=t.seed, mlm_probability=d.mlm_probability)
    if any(source.streaming for source in d.sources):
        return StreamingMLMBatcher(d.sources, tokenizer, block_length=d.max_seq_length,
                                   eval_blocks=d.max_eval_blocks if d.eval_fraction > 0 else 0, **common)
    with accelerator.main_process_first():
        blocks_path = build_block_cache(d.sources, tokenizer, d.max_seq_length, d.cache_dir,
                                        log=lambda m: _log(accelerator, m))
    split = split_blocks(np.load(blocks_path, mmap_mode="r"), eval_fraction=d.eval_fraction,
                         max_eval_blocks=d.max_eval_blocks, seed=t.seed)
    return MLMBatcher(split, tokenizer, **common)


def train(recipe: PretrainRecipe, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run the recipe; returns where the final model is and the held-out metrics before and after."""
    output_dir = Path(recipe.training.output_dir)
    t, d = recipe.training, recipe.data
    accelerator = make_accelerator(recipe, output_dir)
    prepare_output_dir(output_dir, resume=resume, overwrite=overwrite, create=False)  # refuse before any work

    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.name_or_path, recipe.model.revision)
    config = load_config(recipe.model.name_or_path, recipe.model.revision,
                         recipe.model.config_overrides if recipe.model.from_scratch else None)
    limit = max_positions(config)
    if limit is not None and d.max_seq_length > limit:
        raise RecipeError(f"data.max_seq_length: {d.max_seq_length} exceeds the model's maximum of {limit} positions "
                          f"({recipe.model.name_or_path})")

    batcher = make_batcher(recipe, tokenizer, accelerator)
    n_train = "streamed" if isinstance(batcher, StreamingMLMBatcher) else len(batcher.split.train_indices)
    plan = plan_steps(max_steps=t.max_steps, per_device_batch_size=t.per_device_batch_size,
                      gradient_accumulation_steps=t.gradient_accumulation_steps,
                      num_processes=accelerator.num_processes, warmup_ratio=t.warmup_ratio,
                      warmup_steps=t.warmup_steps)
    batcher.train_batch(0)  # fails now, with a clear message, if the data is smaller than one global batch

    torch.manual_seed(t.seed)
    model = load_mlm_model(recipe.model.name_or_path, revision=recipe.model.revision,
                           from_scratch=recipe.model.from_scratch, config_overrides=recipe.model.config_overrides)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelLoadError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{model.get_input_embeddings().num_embeddings}")
    teacher = None
    if recipe.distillation.teacher:
        teacher_dtype = torch.bfloat16 if recipe.distillation.teacher_dtype == "bfloat16" else torch.float32
        with unpartitioned():  # the frozen teacher is never wrapped by DeepSpeed
            teacher = load_mlm_model(recipe.distillation.teacher, dtype=teacher_dtype)
        check_same_vocabulary(teacher, model, recipe.distillation.teacher)
        teacher.requires_grad_(False).eval().to(accelerator.device)
        teacher = MaskedLM(teacher, all_logits=t.mlm_logits == "all")

    if accelerator.is_main_process:  # inputs are valid: only now is anything written to the output folder
        prepare_output_dir(output_dir, resume=resume, overwrite=overwrite)
    accelerator.wait_for_everyone()
    student = MaskedLM(model, all_logits=t.mlm_logits == "all")
    optimizer = build_optimizer(model, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                                betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
    configure_deepspeed(accelerator, t.per_device_batch_size)
    student, optimizer = accelerator.prepare(student, optimizer)
    pruner = Pruner(recipe, model) if recipe.pruning.enabled else None

    checkpointer = Checkpointer(accelerator, output_dir, t.keep_last)
    if pruner is not None:
        checkpointer.register(lambda folder: pruner.store.save(folder / "masks.safetensors"), pruner.load)
    step, tokens_seen, eval_before = 0, 0, None
    if resume:
        latest = checkpointer.latest()
        if latest is None:
            _log(accelerator, f"--resume: no complete checkpoint in {checkpointer.root}; starting from step 0")
        else:
            check_resume_compatible((latest / RECIPE_FILE).read_text(), recipe, latest, RESUME_KEYS)
            state = checkpointer.load(latest)
            step, tokens_seen, eval_before = state["step"], state["tokens_seen"], state.get("eval_before")
            if pruner is not None:
                pruner.guard.enforce_(optimizer)
            _log(accelerator, f"resumed from {latest} at step {step}")
    if accelerator.is_main_process:
        save_recipe(recipe, output_dir / RECIPE_FILE)
    if t.trackers:
        accelerator.init_trackers("pofa", config={"stage": recipe.stage, "max_steps": t.max_steps,
                                                  "learning_rate": t.learning_rate,
                                                  "global_batch_size": plan.global_batch_size})

    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 leaves p.numel() == 0
    _log(accelerator, f"{recipe.stage}: {recipe.model.name_or_path} ({n_params / 1e6:.1f} M parameters), "
                      f"{n_train} training blocks of {d.max_seq_length} tokens, "
                      f"{len(batcher.split.eval_indices)} held out; {plan.max_steps} steps x {plan.global_batch_size} "
                      f"sequences ({accelerator.num_processes} process(es) x {t.per_device_batch_size} x "
                      f"{t.gradient_accumulation_steps} accumulation)")
    if eval_before is None:
        eval_before = evaluate(student, batcher.eval_batches(t.eval_batches), accelerator)
        _log(accelerator, f"step 0: held-out mlm_loss {eval_before['mlm_loss']:.4f} "
                          f"accuracy {eval_before['mlm_accuracy']:.4f}")

    progress = None
    if accelerator.is_main_process and sys.stderr.isatty():
        from tqdm.auto import tqdm
        progress = tqdm(total=plan.max_steps, initial=step, desc=recipe.stage)
    student.train()
    window_start, window_tokens, window_loss, window_count = time.perf_counter(), 0, 0.0, 0
    last_eval = None
    while True:
        if pruner is not None and pruner.is_event(step):
            target, achieved = pruner.prune(step, optimizer)
            _log(accelerator, f"step {step}: pruning event, target sparsity {target:.4f}, achieved {achieved:.4f}")
        if step >= plan.max_steps:
            break
        warmup_from = pruner.last_event(step) if pruner is not None and recipe.pruning.lr_rewind else 0
        set_learning_rate(optimizer, t.learning_rate * lr_multiplier(
            step, max_steps=plan.max_steps, warmup_steps=plan.warmup_steps, schedule=t.lr_schedule,
            warmup_from=warmup_from))
        for accumulation_index in range(t.gradient_accumulation_steps):
            batch = batcher.train_batch(plan.micro_step(step, accumulation_index))
            batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
            distill_mask = batch["attention_mask"].bool() if (
                teacher is not None and recipe.distillation.positions == "all") else None
            loss = micro_step(accelerator, student, optimizer,
                              lambda: mlm_loss(student, teacher, batch, distill_mask, recipe.distillation),
                              t.max_grad_norm)
            window_loss += loss.float()  # stays on the device: .item() here would sync every micro-step
            window_count += 1
        step += 1
        tokens_seen += batcher.tokens_per_micro_step() * t.gradient_accumulation_steps * accelerator.num_processes
        window_tokens += batcher.tokens_per_micro_step() * t.gradient_accumulation_steps * accelerator.num_processes
        if progress is not None:
            progress.update(1)
        if step % t.log_every == 0 or step == plan.max_steps:
            elapsed = time.perf_counter() - window_start
            logs = {"loss": float(window_loss) / max(1, window_count), "lr": optimizer.param_groups[0]["lr"],
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9)}
            if pruner is not None:
                logs["sparsity"] = pruner.store.sparsity()
            _log(accelerator, f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in logs.items()))
            if t.trackers:
                accelerator.log(logs, step=step)
            window_start, window_tokens, window_loss, window_count = time.perf_counter(), 0, 0.0, 0
        if step % t.eval_every == 0 or step == plan.max_steps:
            last_eval = evaluate(student, batcher.eval_batches(t.eval_batches), accelerator)
            _log(accelerator, f"step {step}: held-out mlm_loss {last_eval['mlm_loss']:.4f} "
                              f"accuracy {last_eval['mlm_accuracy']:.4f}")
            if t.trackers:
                accelerator.log({f"eval/{k}": v for k, v in last_eval.items()}, step=step)
        if step % t.save_every == 0 and step < plan.max_steps:
            checkpointer.save(step, {"tokens_seen": tokens_seen, "eval_before": eval_before}, recipe)
    if progress is not None:
        progress.close()
    if last_eval is None:  # resumed at the end: nothing was trained in this process
        last_eval = evaluate(student, batcher.eval_batches(t.eval_batches), accelerator)
    checkpointer.save(step, {"tokens_seen": tokens_seen, "eval_before": eval_before}, recipe)
    final_dir = save_final(accelerator, student, model, tokenizer, recipe, output_dir,
                           pruner=pruner, metrics={"eval_before": eval_before, "eval_after": last_eval, "step": step})
    if t.trackers:
        accelerator.end_training()
    _log(accelerator, f"final model: {final_dir}")
    return RunResult(output_dir, final_dir, eval_before, last_eval, step)


def save_final(accelerator, wrapped, model, tokenizer, recipe, output_dir: Path, *, pruner=None, metrics=None
               ) -> Path:
    """Write `final/` atomically: the HF model, tokenizer, recipe, metrics, and for students masks + report.

    `wrapped` is the prepared `MaskedLM` (its state dict is gathered from every process under DeepSpeed ZeRO-3 or
    FSDP); `model` is the Hugging Face model inside it.
    """
    final_dir = output_dir / "final"
    tmp = output_dir / ".tmp-final"
    # A collective under ZeRO-3 / FSDP; only the main process receives the weights (the others get None).
    state_dict = {k.removeprefix("model."): v for k, v in (accelerator.get_state_dict(wrapped) or {}).items()}
    report = None
    if pruner is not None:  # collectives under DeepSpeed ZeRO / FSDP: every rank takes part
        from pofa.sparsity import check_masks, sparsity_report

        check_masks(model, pruner.store)
        report = sparsity_report(model, pruner.store)
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped = model
        unwrapped.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        save_recipe(recipe, tmp / RECIPE_FILE)
        if metrics is not None:
            (tmp / "train_results.json").write_text(json.dumps(metrics, indent=2))
        if pruner is not None:
            from pofa.sparsity import format_sparsity_table

            pruner.store.save(tmp / "masks.safetensors")
            (tmp / "sparsity.json").write_text(json.dumps(report, indent=2))
            print(format_sparsity_table(report), flush=True)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(tmp, final_dir)
    accelerator.wait_for_everyone()
    return final_dir


def build_parser(prog: str = "pofa pretrain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    parser.add_argument("--output-dir", help="overrides training.output_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides) + ([f"training.output_dir={args.output_dir}"] if args.output_dir else [])
    try:
        recipe = load_recipe(args.recipe, overrides, PretrainRecipe)
        train(recipe, resume=args.resume, overwrite=args.overwrite)
    except (RecipeError, CorpusError, ModelLoadError, OutputDirError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
