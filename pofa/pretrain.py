"""Teacher preparation and student pruning: one plain accelerate loop.

    accelerate launch -m pofa.pretrain --recipe minilm-offline-teacher [--output-dir DIR] [--resume]
    pofa pretrain --recipe RECIPE [a.b=value ...]          (RECIPE: a YAML file, or a shipped recipe's name)

The loop, top to bottom (each technique is a pure function elsewhere; this file only attaches it, and the set-up,
resume, cadence and final write that both stages share are `pofa.stage.Stage`'s):

    [apply_recipe_(model, decomposition)]          # pofa.decompose: heads/neurons, low-rank, Kronecker, tensor
    for step in range(start, max_steps):           # optimizer steps
        [if decomposition event at step:           # schedule: iterative (ROSITA), pofa.decompose.Decomposer
            heads/neurons/ranks shrink linearly    # the optimizer's state is sliced with the weights]
        if pruning event at step:                  # pofa.sparsity.schedule: cubic_sparsity, is_pruning_step
            masks <- magnitude_masks(weights)      # pofa.sparsity.masks; the MaskStore is checkpointed
                     [pruned weights may return]   # pruning.revive: PrunedValues keeps their values
                     [in groups: N of M kept]      # pruning.pattern: 2:4 (pofa.sparsity.nm_masks)
            guard.enforce_(optimizer)              # zero weights, Adam moments (and DeepSpeed master copies)
        lr <- learning_rate_factor(step)           # pofa.loop (pruning.lr_rewind: the authors' schedule)
        for each micro-step:                       # accelerate.accumulate
            batch <- MLMBatcher.train_batch(micro) # pofa.data.mlm: packed blocks, deterministic masking
            loss  <- MLM CE at masked positions    # pofa.modeling.MaskedLM (projects masked positions only)
                     [+ kd_loss(student, teacher)] # pofa.distill, frozen teacher
                     [+ intermediate_loss(...)]    # hidden states / attentions of mapped layers (layer_map)
            backward
        zero pruned gradients, clip, step          # MaskGuard.mask_gradients_ once per step; pofa.loop.micro_step
        log / evaluate / checkpoint (atomic)       # pofa.stage, pofa.checkpoint

A recipe with `pruning.enabled: false` and no teacher is teacher preparation (dense MLM); with pruning and a teacher
it is the student stage of Prune Once for All. The final model lands in `OUTPUT_DIR/final/` as a Hugging Face folder
with `recipe.yaml`, and for students `masks.safetensors` and `sparsity.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from pofa.artifacts import MASKS_FILE, SPARSITY_FILE, TRAIN_RESULTS_FILE
from pofa.checkpoint import OutputDirError
from pofa.data.corpus import CorpusError
from pofa.decompose import Decomposer, apply_recipe_
from pofa.data.mlm import MLMBatcher, StreamingMLMBatcher, build_block_cache, split_blocks
from pofa.distill import intermediate_distillation
from pofa.families import FamilyError, family_of
from pofa.hub import PublicationError
from pofa.loop import LossWindow, learning_rate_factor
from pofa.modeling import (MaskedLM, ModelLoadError, load_config, load_mlm_model, load_tokenizer, max_positions,
                           selected_positions)
from pofa.recipe import PretrainRecipe, RecipeError, load_recipe
from pofa.sparsity.pruner import Pruner
from pofa.stage import Stage, format_metrics

# Keys that must match to resume a run: the rest (max_steps, eval/save/log cadence) may change between attempts.
RESUME_KEYS = ["stage", "model", "data", "training.seed", "training.per_device_batch_size",
               "training.gradient_accumulation_steps", "pruning", "distillation", "decomposition"]


@dataclass
class RunResult:
    output_dir: Path
    final_dir: Path
    eval_before: dict[str, float] | None
    eval_after: dict[str, float]
    steps: int


def evaluate(model, batches, accelerator) -> dict[str, float]:
    """Held-out MLM loss (mean over masked tokens) and masked-token accuracy, summed over processes then divided once.

    The held-out blocks and their masks depend on the seed only, not on the number of processes (see
    `MLMBatcher.eval_batches`); padding batches carry no label and add nothing.
    """
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                # the summed cross-entropy, not the mean: a batch without labels adds 0, and no mean is re-weighted
                loss_sum, logits, selected = model(**batch, reduction="sum")
            labels = batch["labels"][selected]
            total_loss += loss_sum.double()
            correct += (logits.argmax(-1) == labels).sum()
            count += (labels != -100).sum()
    model.train()
    total_loss, correct, count = (accelerator.reduce(x, "sum") for x in (total_loss, correct, count))
    if count.item() == 0:
        return {"mlm_loss": float("nan"), "mlm_accuracy": float("nan"), "masked_tokens": 0}
    return {"mlm_loss": (total_loss / count).item(), "mlm_accuracy": (correct / count).item(),
            "masked_tokens": int(count.item())}


def mlm_loss(student, teacher, batch, distillation, layers=None, projection=None) -> torch.Tensor:
    """MLM cross-entropy at the masked positions (`batch["selected_index"]`: the labelled ones, or all for
    `distillation.positions: all`), mixed with distillation from the teacher when there is one: of the logits, and
    with `layers` (the layer map's pairs) of hidden states (through `projection`) and attentions."""
    internals = layers is not None
    student_out = student(**batch, internals=internals)
    loss, logits = student_out[0], student_out[1]
    if teacher is None:
        return loss
    from pofa.distill import distillation_loss, intermediate_loss

    with torch.no_grad():
        teacher_out = teacher(**batch, internals=internals)
    loss, _ = distillation_loss(loss, logits, teacher_out[1], hard_weight=distillation.hard_weight,
                                soft_weight=distillation.soft_weight, temperature=distillation.temperature)
    if internals:
        intermediate, _ = intermediate_loss(
            student_out[3], teacher_out[3], student_out[4], teacher_out[4], pairs=layers,
            mask=batch["attention_mask"].bool(), hidden_weight=distillation.hidden_weight,
            attention_weight=distillation.attention_weight, projection=projection)
        loss = loss + intermediate
    return loss


def make_batcher(recipe: PretrainRecipe, tokenizer, run: Stage) -> MLMBatcher:
    """Packed, cached blocks for map-style corpora (tokenized by `data.preprocessing_workers` processes); blocks
    packed on the fly when a source is streamed, each process reading its own share of the stream."""
    d, t, accelerator = recipe.data, recipe.training, run.accelerator
    common = dict(per_device_batch_size=t.per_device_batch_size, num_processes=accelerator.num_processes,
                  process_index=accelerator.process_index, seed=t.seed, mlm_probability=d.mlm_probability)
    if any(source.streaming for source in d.sources):
        from accelerate.utils import gather_object

        return StreamingMLMBatcher(d.sources, tokenizer, block_length=d.max_seq_length,
                                   eval_blocks=d.max_eval_blocks if d.eval_fraction > 0 else 0,
                                   shuffle_buffer=d.shuffle_buffer,
                                   gather=lambda state: gather_object([state]), **common)
    with accelerator.main_process_first():
        blocks_path = build_block_cache(d.sources, tokenizer, d.max_seq_length, d.cache_dir, log=run.log,
                                        workers=d.preprocessing_workers)
    split = split_blocks(np.load(blocks_path, mmap_mode="r"), eval_fraction=d.eval_fraction,
                         max_eval_blocks=d.max_eval_blocks, seed=t.seed)
    return MLMBatcher(split, tokenizer, **common)


def load_student(recipe: PretrainRecipe):
    """The tokenizer and the model to train, checked against the data section."""
    m, d = recipe.model, recipe.data
    config = load_config(m.name_or_path, m.revision, m.config_overrides if m.from_scratch else None)
    tokenizer = load_tokenizer(m.tokenizer or m.name_or_path, m.revision, inputs_for=config)
    limit = max_positions(config)
    if limit is not None and d.max_seq_length > limit:
        raise RecipeError(f"data.max_seq_length: {d.max_seq_length} exceeds the model's maximum of {limit} positions "
                          f"({m.name_or_path})")
    model = load_mlm_model(m.name_or_path, revision=m.revision, from_scratch=m.from_scratch,
                           config_overrides=m.config_overrides,
                           keep_pooler=recipe.pruning.enabled and recipe.pruning.pooler)
    if recipe.pruning.enabled and recipe.pruning.pooler and getattr(model.base_model, "pooler", None) is None:
        raise RecipeError(f"pruning.pooler: {type(model).__name__} ({m.name_or_path}) has no pooler to prune "
                          f"({family_of(model).name} models have none); set pruning.pooler: false")
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        raise ModelLoadError(f"tokenizer has {len(tokenizer)} tokens but the model's embedding only "
                             f"{model.get_input_embeddings().num_embeddings}")
    return tokenizer, model


def train(recipe: PretrainRecipe, *, resume: bool = False, overwrite: bool = False) -> RunResult:
    """Run the recipe; returns where the final model is and the held-out metrics before and after."""
    t, d, k = recipe.training, recipe.data, recipe.distillation
    run = Stage.start(recipe, resume=resume, overwrite=overwrite)
    torch.manual_seed(t.seed)  # before loading: weights the checkpoint lacks (an MLM head, a pooler) are drawn
    tokenizer, model = load_student(recipe)
    if (decomposed := apply_recipe_(model, recipe.decomposition)) is not None:  # before the optimizer and masks
        run.log(decomposed)
    decomposer = Decomposer.for_stage(recipe.decomposition, model, run)  # iterative; --resume: the saved shapes
    batcher = make_batcher(recipe, tokenizer, run)
    plan = run.plan_steps(t.max_steps)
    batcher.train_batch(0)  # fails now, with a clear message, if the data is smaller than one global batch
    teacher_model = None
    if k.teacher:
        dtype = torch.bfloat16 if k.teacher_dtype == "bfloat16" else torch.float32
        teacher_model = run.load_teacher(lambda: load_mlm_model(k.teacher, dtype=dtype), model)
    try:
        layers, projection = intermediate_distillation(k, model, teacher_model)
    except ValueError as exc:  # depths that the layer map cannot pair
        raise RecipeError(str(exc)) from None
    teacher = MaskedLM(teacher_model, all_logits=t.mlm_logits == "all") if teacher_model is not None else None

    run.open()
    student = run.prepare(MaskedLM(model, all_logits=t.mlm_logits == "all", projection=projection))
    pruner = Pruner(recipe.pruning, model) if recipe.pruning.enabled else None
    if pruner is not None:
        run.register(pruner.save, pruner.load)
    if decomposer is not None:
        run.register(decomposer.save, decomposer.load)
    state = run.resume(RESUME_KEYS)
    batcher.load_state_dict(state)  # a streamed corpus continues where each process's stream stopped
    if pruner is not None and state["step"] > 0:
        pruner.guard.enforce_(run.optimizer)
    step, tokens_seen, eval_before = state["step"], state.get("tokens_seen", 0), state.get("eval_before")
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 leaves p.numel() == 0
    n_train = "streamed" if isinstance(batcher, StreamingMLMBatcher) else len(batcher.split.train_indices)
    run.log(f"{recipe.stage}: {recipe.model.name_or_path} ({n_params / 1e6:.1f} M parameters), {n_train} training "
            f"blocks of {d.max_seq_length} tokens, {len(batcher.split.eval_indices)} held out; {plan.max_steps} steps "
            f"x {plan.global_batch_size} sequences ({run.accelerator.num_processes} process(es) x "
            f"{t.per_device_batch_size} x {t.gradient_accumulation_steps} accumulation)"
            f"{', distilling from ' + k.teacher if teacher is not None else ''}")
    if eval_before is None:
        eval_before = evaluate(student, batcher.eval_batches(t.eval_batches), run.accelerator)
        run.log(f"step 0: held-out {format_metrics(eval_before)}")

    student.train()
    window, last_eval = LossWindow(), None
    tokens_per_step = batcher.tokens_per_micro_step() * t.gradient_accumulation_steps * run.accelerator.num_processes
    while True:
        if pruner is not None and pruner.is_event(step):
            run.log(pruner.prune(step, run.optimizer))
        if decomposer is not None and decomposer.is_event(step):
            run.log(decomposer.apply(step, run.optimizer))
        if step >= plan.max_steps:
            break
        run.set_lr(learning_rate_factor(step, max_steps=t.max_steps, warmup_steps=plan.warmup_steps,
                                        schedule=t.lr_schedule, pruning=recipe.pruning))
        for accumulation_index in range(t.gradient_accumulation_steps):
            batch = batcher.train_batch(plan.micro_step(step, accumulation_index))
            all_positions = teacher is not None and k.positions == "all"
            batch["selected_index"] = selected_positions(batch["labels"],
                                                         batch["attention_mask"] if all_positions else None)
            batch = {key: v.to(run.accelerator.device, non_blocking=True) for key, v in batch.items()}
            window.add(micro_step(run, student, lambda: mlm_loss(student, teacher, batch, k, layers, projection),
                                  pruner))
        step += 1
        tokens_seen += tokens_per_step
        run.stepped(tokens_per_step)
        if pruner is not None:
            pruner.stepped(run.lr, t.weight_decay, run.accelerator.optimizer_step_was_skipped)
        if run.due_log(step):
            sparsity = {"sparsity": pruner.store.sparsity()} if pruner is not None else {}
            run.log_step(step, window.mean(), "tokens", **sparsity)
        if run.due_eval(step):
            last_eval = evaluate(student, batcher.eval_batches(t.eval_batches), run.accelerator)
            run.log(f"step {step}: held-out {format_metrics(last_eval)}")
            run.track({f"eval/{name}": value for name, value in last_eval.items()}, step)
        if run.due_save(step):
            run.save(step, {"tokens_seen": tokens_seen, "eval_before": eval_before, **batcher.state_dict()})
    if last_eval is None:  # resumed at the end: nothing was trained in this process
        last_eval = evaluate(student, batcher.eval_batches(t.eval_batches), run.accelerator)
    metrics = {"eval_before": eval_before, "eval_after": last_eval, "step": step}
    final_dir = run.finish(step, {"tokens_seen": tokens_seen, "eval_before": eval_before, **batcher.state_dict()},
                           final_writer(run, student, model, tokenizer, pruner, metrics))
    return RunResult(run.output_dir, final_dir, eval_before, last_eval, step)


def micro_step(run: Stage, module, compute_loss, pruner) -> torch.Tensor:
    from pofa.loop import micro_step as one_micro_step

    return one_micro_step(run.accelerator, module, run.optimizer, compute_loss, run.recipe.training.max_grad_norm,
                          before_clip=pruner.guard.mask_gradients_ if pruner is not None else None)


def final_writer(run: Stage, wrapped, model, tokenizer, pruner, metrics):
    """What `final/` holds: the Hugging Face model, tokenizer, metrics, and for students masks + sparsity report.

    The collectives (gathering the weights under DeepSpeed ZeRO-3 / FSDP, the sparsity report) run here on every
    process; the returned function writes on the main process only.
    """
    # Only the main process receives the gathered weights (the others get None).
    # The wrapped model's tensors only: what MaskedLM trains beside it (a distillation projection) is not the model.
    state_dict = {key.removeprefix("model."): v for key, v in (run.accelerator.get_state_dict(wrapped) or {}).items()
                  if key.startswith("model.")}
    report = None
    if pruner is not None:
        from pofa.sparsity import check_masks, sparsity_report

        check_masks(model, pruner.store)
        report = sparsity_report(model, pruner.store)

    def write(folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(folder)
        (folder / TRAIN_RESULTS_FILE).write_text(json.dumps(metrics, indent=2))
        if pruner is not None:
            pruner.store.save(folder / MASKS_FILE)
            (folder / SPARSITY_FILE).write_text(json.dumps(report, indent=2))
            total = report["targets"]
            run.log(f"sparsity: {total['sparsity']:.2%} over {len(report['parameters'])} weights "
                    f"({total['zeros']:,} zeros of {total['numel']:,}); per layer in {SPARSITY_FILE}")

    return write


def build_parser(prog: str = "pofa pretrain") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="a YAML recipe file, or the name of a shipped recipe "
                        "(`pofa recipes` lists them)")
    parser.add_argument("--output-dir", help="overrides training.output_dir")
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output dir")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted recipe overrides")
    return parser


def with_output_dir(recipe, output_dir: str | None):
    """The recipe with `--output-dir` as its `training.output_dir` (taken as typed: a path is not YAML)."""
    if not output_dir:
        return recipe
    return replace(recipe, training=replace(recipe.training, output_dir=output_dir))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        recipe = with_output_dir(load_recipe(args.recipe, args.overrides, PretrainRecipe), args.output_dir)
        train(recipe, resume=args.resume, overwrite=args.overwrite)
    except (RecipeError, CorpusError, ModelLoadError, OutputDirError, FamilyError,
            PublicationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
