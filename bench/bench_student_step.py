"""Cost of pofa's student machinery against a plain dense MLM step, measured in one process, alternated.

Four steps on the same model, batches and optimizer settings, run in turn so machine load hits all alike:
  dense      MLM step (masked-position logits), no pruning
  hooks      the same step with MaskGuard's gradient hooks at 90% sparsity (one pass per micro-step), plus a pruning
             event (magnitude masks, store update, optimizer-state zeroing, check_masks) amortized over
             `--frequency` steps
  pruning    the same with gradients="step", as pofa's loops run it: one in-place pass per optimizer step
  student    pruning + distillation from a frozen teacher (its forward at the same positions)
The ratios are what to read: pruning/dense is the pruning overhead (target <= 1%), student/dense the full cost.

    python bench/bench_student_step.py [--model embedded:minilm] [--steps 20] [--batch 16] [--seq 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from pofa.data.mlm import mask_tokens, step_generator
from pofa.distill import distillation_loss
from pofa.loop import build_optimizer
from pofa.modeling import MaskedLM, load_mlm_model, load_tokenizer
from pofa.sparsity import DEFAULT_TARGETS, MaskGuard, MaskStore, check_masks


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="embedded:minilm")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--frequency", type=int, default=100, help="optimizer steps between pruning events")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    base = load_mlm_model(args.model)
    models = {name: copy.deepcopy(base).train() for name in ("dense", "hooks", "pruning", "student")}
    teacher = MaskedLM(copy.deepcopy(base).eval().requires_grad_(False))
    optimizers = {n: build_optimizer(m, learning_rate=1e-5, weight_decay=0.01) for n, m in models.items()}
    wrapped = {n: MaskedLM(m) for n, m in models.items()}
    guards = {}
    for name in ("hooks", "pruning", "student"):
        store = MaskStore.dense(models[name].named_parameters(), DEFAULT_TARGETS)
        guards[name] = MaskGuard(models[name], store, gradients="hooks" if name == "hooks" else "step")
        guards[name].prune_(0.9, optimizer=optimizers[name])

    def batch(i):
        ids = torch.randint(1000, len(tokenizer), (args.batch, args.seq))
        inputs, labels = mask_tokens(ids, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                     special_ids=[0], mlm_probability=0.15, generator=step_generator(0, i, 0))
        return inputs, torch.ones_like(inputs), labels

    def step(name, b):
        loss, logits, _ = wrapped[name](*b)
        if name == "student":
            with torch.no_grad():
                _, teacher_logits, _ = teacher(*b)
            loss, _ = distillation_loss(loss, logits, teacher_logits, hard_weight=0.5, soft_weight=0.5,
                                        temperature=2.0)
        loss.backward()
        if name in ("pruning", "student"):
            guards[name].mask_gradients_()
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
        optimizers[name].step()
        optimizers[name].zero_grad()

    def pruning_event(name):
        guards[name].prune_(0.9, optimizer=optimizers[name])
        check_masks(models[name], guards[name].store)

    times = {n: [] for n in models}
    event_times = []
    for i in range(args.steps + 2):
        b = batch(i)
        for name in models:
            start = time.perf_counter()
            step(name, b)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        pruning_event("pruning")
        if i >= 2:
            event_times.append(time.perf_counter() - start)
    dense = statistics.median(times["dense"])
    event = statistics.median(event_times) / args.frequency
    hooks = statistics.median(times["hooks"]) + event
    pruning = statistics.median(times["pruning"]) + event
    student = statistics.median(times["student"]) + event
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, {args.steps} alternated steps, "
          f"{torch.get_num_threads()} threads; pruning event {statistics.median(event_times) * 1000:.0f} ms every "
          f"{args.frequency} steps")
    print(f"  dense MLM step            {dense * 1000:8.1f} ms   1.000x")
    print(f"  + pruning, hooks          {hooks * 1000:8.1f} ms   {hooks / dense:.3f}x   "
          f"(overhead {100 * (hooks / dense - 1):+.2f}%)")
    print(f"  + pruning machinery       {pruning * 1000:8.1f} ms   {pruning / dense:.3f}x   "
          f"(overhead {100 * (pruning / dense - 1):+.2f}%)")
    print(f"  + distillation (student)  {student * 1000:8.1f} ms   {student / dense:.3f}x")
    print(f"  student tokens/s vs dense {dense / student:.3f}x")
    for name in ("hooks", "pruning", "student"):
        check_masks(models[name], guards[name].store)


if __name__ == "__main__":
    main()
