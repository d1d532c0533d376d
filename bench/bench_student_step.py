"""Cost of pofa's student machinery against a plain dense MLM step, measured in one process, alternated.

Six steps on the same model, batches and optimizer settings, run in turn so machine load hits all alike:
  dense      MLM step (masked-position logits), no pruning (twice, on two copies: the noise floor of the ratios)
  hooks      the same step with MaskGuard's gradient hooks at 90% sparsity (one pass per micro-step), plus a pruning
             event (magnitude masks, store update, optimizer-state zeroing, check_masks) amortized over
             `--frequency` steps
  pruning    the same with gradients="step", as pofa's loops run it: one in-place pass per optimizer step
  student    pruning + distillation from a frozen teacher (its forward at the same positions), fp32 and bf16
The ratios are what to read: pruning/dense is the pruning overhead (target <= 1%), student/dense the full cost. The
arms' medians differ by a few percent from step-to-step noise alone, so the machinery's own cost is also timed
directly (the gradient masking inside the pruning arm's steps, plus the amortized event).

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
    arms = ("dense", "dense-again", "hooks", "pruning", "student", "student-bf16")
    models = {name: copy.deepcopy(base).train() for name in arms}
    teacher = MaskedLM(copy.deepcopy(base).eval().requires_grad_(False))
    # distillation.teacher_dtype: bfloat16 (fast where the CPU has bf16 instructions, e.g. AVX512_BF16 / AMX, and
    # on GPUs; slower than float32 on AVX2-only CPUs)
    teacher_bf16 = MaskedLM(copy.deepcopy(base).eval().requires_grad_(False).to(torch.bfloat16))
    optimizers = {n: build_optimizer(m, learning_rate=1e-5, weight_decay=0.01) for n, m in models.items()}
    wrapped = {n: MaskedLM(m) for n, m in models.items()}
    guards = {}
    for name in ("hooks", "pruning", "student", "student-bf16"):
        store = MaskStore.dense(models[name].named_parameters(), DEFAULT_TARGETS)
        guards[name] = MaskGuard(models[name], store, gradients="hooks" if name == "hooks" else "step")
        guards[name].prune_(0.9, optimizer=optimizers[name])

    def batch(i):
        ids = torch.randint(1000, len(tokenizer), (args.batch, args.seq))
        inputs, labels = mask_tokens(ids, mask_token_id=tokenizer.mask_token_id, vocab_size=len(tokenizer),
                                     special_ids=[0], mlm_probability=0.15, generator=step_generator(0, i, 0))
        return inputs, torch.ones_like(inputs), labels

    mask_times = []

    def step(name, b):
        loss, logits, _ = wrapped[name](*b)
        if name.startswith("student"):
            with torch.no_grad():
                _, teacher_logits, _ = (teacher if name == "student" else teacher_bf16)(*b)
            loss, _ = distillation_loss(loss, logits, teacher_logits, hard_weight=0.5, soft_weight=0.5,
                                        temperature=2.0)
        loss.backward()
        if name in ("pruning", "student", "student-bf16"):
            start = time.perf_counter()
            guards[name].mask_gradients_()
            if name == "pruning":
                mask_times.append(time.perf_counter() - start)
        torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
        optimizers[name].step()
        optimizers[name].zero_grad()

    def pruning_event(name):
        guards[name].prune_(0.9, optimizer=optimizers[name])
        check_masks(models[name], guards[name].store)

    times = {n: [] for n in models}
    event_times = []
    names = list(models)
    for i in range(args.steps + 2):
        b = batch(i)
        # A different arm goes first at each step, so that no arm always runs right after another (cache, clocks).
        for name in names[i % len(names):] + names[: i % len(names)]:
            start = time.perf_counter()
            step(name, b)
            if i >= 2:
                times[name].append(time.perf_counter() - start)
    # Events timed apart: in a run they happen once per `--frequency` steps, so their after-effects (fresh masks and
    # optimizer state out of cache) must not land on every timed step of one arm.
    for _ in range(5):
        start = time.perf_counter()
        pruning_event("pruning")
        event_times.append(time.perf_counter() - start)
    first, again = statistics.median(times["dense"]), statistics.median(times["dense-again"])
    dense = (first + again) / 2  # the baseline: both identical copies, so that neither copy's luck sets it
    event = statistics.median(event_times) / args.frequency
    hooks = statistics.median(times["hooks"]) + event
    pruning = statistics.median(times["pruning"]) + event
    student = statistics.median(times["student"]) + event
    student_bf16 = statistics.median(times["student-bf16"]) + event
    print(f"model {args.model}, batch {args.batch} x seq {args.seq}, {args.steps} alternated steps, "
          f"{torch.get_num_threads()} threads; pruning event {statistics.median(event_times) * 1000:.0f} ms every "
          f"{args.frequency} steps")
    print(f"  dense MLM step            {dense * 1000:8.1f} ms   1.000x   (two identical copies: {first * 1000:.1f} and "
          f"{again * 1000:.1f} ms, the noise floor of these ratios: {100 * abs(again - first) / dense:.2f}%)")
    print(f"  + pruning, hooks          {hooks * 1000:8.1f} ms   {hooks / dense:.3f}x   "
          f"(overhead {100 * (hooks / dense - 1):+.2f}%)")
    print(f"  + pruning machinery       {pruning * 1000:8.1f} ms   {pruning / dense:.3f}x   "
          f"(overhead {100 * (pruning / dense - 1):+.2f}%)")
    machinery = statistics.median(mask_times[2:] or mask_times) + event
    print(f"  machinery timed directly  {machinery * 1000:8.1f} ms   (gradient masking {statistics.median(mask_times) * 1000:.1f}"
          f" ms per step + the pruning event amortized): {100 * machinery / dense:.2f}% of the dense step")
    print(f"  + distillation (student)  {student * 1000:8.1f} ms   {student / dense:.3f}x")
    print(f"  student tokens/s vs dense {dense / student:.3f}x")
    print(f"  + distillation, bf16 teacher {student_bf16 * 1000:5.1f} ms   {student_bf16 / dense:.3f}x   "
          f"(tokens/s vs dense {dense / student_bf16:.3f}x; bf16 instructions: "
          f"{torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()})")
    for name in ("hooks", "pruning", "student", "student-bf16"):
        check_masks(models[name], guards[name].store)


if __name__ == "__main__":
    main()
