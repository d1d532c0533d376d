"""Worker for tests/integration/test_trainer_deepspeed.py; run with ``torchrun --nproc_per_node 2``.

    torchrun --nproc_per_node 2 tests/integration/_trainer_deepspeed_worker.py MODE OUT_DIR

A user's own `transformers.Trainer` fine-tunes a 90%-sparse tiny BERT classifier under DeepSpeed (CPU, gloo), with
gradient accumulation and a checkpoint every 2 steps. MODE: ``zero2`` (fp32), ``zero3-bf16`` (parameters sharded,
bf16 with fp32 master copies), ``zero2-unlocked`` (no SparsityLockCallback: what the callback prevents), and
``zero2-resume`` / ``zero3-bf16-resume`` (the run in OUT_DIR/../zero2 or ../zero3-bf16 resumed from its step-2
checkpoint). Each rank writes OUT_DIR/rank{R}.json: non-zero pruned positions in the module's weights and in
DeepSpeed's fp32 master copies, the pattern in every checkpoint folder, and a digest of the final weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

from pofa.artifacts import MASKS_FILE
from pofa.sparsity import MaskStore
from pofa.sparsity.masks import deepspeed_master_weight, gathered_param
from pofa.trainer import SparsityLockCallback
from tests.unit.test_trainer import rows, save_sparse_classifier

STEPS = 4


def main(mode: str, out: Path) -> None:
    rank = int(os.environ["RANK"])
    folder = out / f"model-rank{rank}"  # the same seeded weights on every rank, as one shared folder would give
    store = save_sparse_classifier(folder)
    bf16 = "bf16" in mode
    deepspeed_config = {
        "zero_optimization": {"stage": 3 if mode.startswith("zero3") else 2},
        "bf16": {"enabled": "auto"}, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto"}},
    }
    args = TrainingArguments(
        output_dir=str(out / "run"), max_steps=STEPS, per_device_train_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, weight_decay=0.01, max_grad_norm=1.0, bf16=bf16, deepspeed=deepspeed_config,
        use_cpu=True, report_to="none", seed=0, save_strategy="steps", save_steps=2, logging_strategy="no",
        disable_tqdm=True,
    )
    model = BertForSequenceClassification.from_pretrained(folder)
    before = {}
    for name, param in model.named_parameters():  # ZeRO-3 partitions the weights at load (zero.Init): gather them
        if name in store.names():
            with gathered_param(param) as value:
                before[name] = value.detach().float().reshape(store[name].shape).clone()
    callbacks = [] if "unlocked" in mode else [SparsityLockCallback()]
    trainer = Trainer(model=model, args=args, train_dataset=rows(64), callbacks=callbacks)
    # MODE-resume: continue the MODE run written beside OUT_DIR (in ../MODE) from its step-2 checkpoint, where
    # DeepSpeed reloads its fp32 master copies and Adam moments.
    resume = out.parent / mode.removesuffix("-resume") / "run" / "checkpoint-2" if mode.endswith("-resume") else None
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    result = pruned_nonzero(trainer.model_wrapped, store, before)
    checkpoints = sorted((out / "run").glob("checkpoint-*"))
    same_pattern = bool(checkpoints) and all(
        (c / MASKS_FILE).is_file()
        and all(torch.equal(MaskStore.load(c / MASKS_FILE)[n], store[n]) for n in store.names())
        for c in checkpoints)
    result.update(pruned=int(sum((~store[n]).sum() for n in store.names())), checkpoint_pattern=same_pattern)
    (out / f"rank{rank}.json").write_text(json.dumps(result))


def pruned_nonzero(engine, store: MaskStore, before: dict[str, torch.Tensor]) -> dict:
    """Pruned positions non-zero in the module's weights and in DeepSpeed's fp32 master copies, kept positions that
    moved since `before`, and a digest of the weights (every rank must call: the gathers are collectives)."""
    visible = master = moved = 0
    digest = hashlib.sha256()
    for name, param in engine.module.named_parameters():
        if name not in store.names():
            continue
        pruned = ~store[name]
        with gathered_param(param) as value:
            weight = value.detach().float().reshape(pruned.shape).clone()
        full = deepspeed_master_weight(param)
        visible += int((weight[pruned] != 0).sum())
        master += int((full.reshape(pruned.shape)[pruned] != 0).sum())
        moved += int((weight[~pruned] != before[name][~pruned]).sum())
        digest.update(name.encode() + weight.numpy().tobytes())
    return {"nonzero_visible": visible, "nonzero_master": master, "kept_moved": moved,
            "weight_digest": digest.hexdigest()}


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
