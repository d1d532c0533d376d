"""SparsityLockCallback: a plain transformers.Trainer loses a pofa model's zero pattern; with the callback the pattern
is bit-identical after training (also with gradient accumulation and bf16), checked and saved at every checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from pofa.artifacts import MASKS_FILE
from pofa.sparsity import MaskStore, MaskViolationError, sparsity_report
from pofa.trainer import SparsityLockCallback
from tests.conftest import TINY_BERT

SPARSITY = 0.9
STEPS = 4


# Each Trainer / Accelerator here sets accelerate's process-wide state: start from none and leave none.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def save_sparse_classifier(folder: Path, *, with_mask_file: bool = True) -> MaskStore:
    """A tiny BERT classifier pruned to 90% in every encoder Linear weight, saved as pofa saves a sparse model."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, num_labels=2, **TINY_BERT))
    params = dict(model.named_parameters())
    store = MaskStore({name: keep_largest(params[name].detach(), 1 - SPARSITY)
                       for name in MaskStore.dense(model.named_parameters())})
    with torch.no_grad():
        for name, keep in store.items():
            params[name].mul_(keep)
    model.save_pretrained(folder)
    if with_mask_file:
        store.save(folder / MASKS_FILE)
    return store


def keep_largest(weight: torch.Tensor, fraction: float) -> torch.Tensor:
    """Magnitude mask keeping round(fraction * numel) weights (random init: no ties)."""
    keep = torch.zeros(weight.numel(), dtype=torch.bool)
    keep[weight.abs().flatten().topk(round(fraction * weight.numel())).indices] = True
    return keep.reshape(weight.shape)


def rows(n: int = 32, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 100, (n, length), generator=generator)
    return [{"input_ids": ids[i].tolist(), "attention_mask": [1] * length, "labels": int(ids[i, 0]) % 2}
            for i in range(n)]


def train(folder: Path, out: Path, callbacks: list, resume: Path | None = None,
          **arguments) -> BertForSequenceClassification:
    model = BertForSequenceClassification.from_pretrained(folder)
    args = TrainingArguments(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-3,
                             weight_decay=0.01, max_grad_norm=1.0, use_cpu=True, report_to="none", seed=0,
                             save_strategy="steps", save_steps=2, logging_strategy="no", disable_tqdm=True,
                             **arguments)
    Trainer(model=model, args=args, train_dataset=rows(), callbacks=callbacks).train(
        resume_from_checkpoint=str(resume) if resume else None)
    return model


def pattern_kept(model, store: MaskStore) -> bool:
    """Every pruned position still zero, every kept one still non-zero: the zero pattern, bit for bit."""
    params = dict(model.named_parameters())
    return all(torch.equal(params[name].detach() != 0, keep) for name, keep in store.items())


def test_a_plain_trainer_loses_the_pattern(tmp_path):
    store = save_sparse_classifier(tmp_path / "sparse")
    model = train(tmp_path / "sparse", tmp_path / "out", [])
    after = sparsity_report(model, store)["targets"]["sparsity"]
    print(f"plain Trainer, {STEPS} steps AdamW wd 0.01: encoder sparsity {store.sparsity():.2%} -> {after:.2%}")
    assert store.sparsity() == pytest.approx(SPARSITY, abs=1e-3)
    assert after < 0.01 and not pattern_kept(model, store)


@pytest.mark.parametrize("arguments", [{}, {"gradient_accumulation_steps": 2}, {"bf16": True}],
                         ids=["plain", "accumulation", "bf16"])
def test_the_callback_keeps_the_pattern_bit_for_bit(tmp_path, arguments):
    store = save_sparse_classifier(tmp_path / "sparse")
    before = BertForSequenceClassification.from_pretrained(tmp_path / "sparse")
    lock = SparsityLockCallback()
    model = train(tmp_path / "sparse", tmp_path / "out", [lock], **arguments)
    after = sparsity_report(model, store)["targets"]["sparsity"]
    print(f"Trainer + SparsityLockCallback {arguments}: encoder sparsity {store.sparsity():.2%} -> {after:.2%}")
    assert pattern_kept(model, store) and after == store.sparsity()
    # It trained: the kept weights moved.
    name = store.names()[0]
    assert not torch.equal(dict(model.named_parameters())[name], dict(before.named_parameters())[name])
    # The pattern came from the model folder's mask file, and each checkpoint holds it.
    assert all(torch.equal(lock.store[n], store[n]) for n in store)
    for step in (2, 4):
        saved = MaskStore.load(tmp_path / "out" / f"checkpoint-{step}" / MASKS_FILE)
        assert all(torch.equal(saved[n], store[n]) for n in store)
    assert pattern_kept(BertForSequenceClassification.from_pretrained(tmp_path / "out" / "checkpoint-4"), store)
    final = lock.save_masks(tmp_path / "final")
    assert final == tmp_path / "final" / MASKS_FILE and MaskStore.load(final).names() == store.names()


def test_a_resumed_run_keeps_the_pattern(tmp_path):
    """Resuming reloads the checkpoint's weights and Adam moments; the lock takes over from there, bit for bit."""
    store = save_sparse_classifier(tmp_path / "sparse")
    train(tmp_path / "sparse", tmp_path / "out", [SparsityLockCallback()])
    model = train(tmp_path / "sparse", tmp_path / "out", [SparsityLockCallback()],
                  resume=tmp_path / "out" / "checkpoint-2")
    assert pattern_kept(model, store)
    name = store.names()[0]
    start = dict(BertForSequenceClassification.from_pretrained(tmp_path / "sparse").named_parameters())[name]
    assert not torch.equal(dict(model.named_parameters())[name], start)


def test_without_a_mask_file_the_zeros_are_the_pattern(tmp_path):
    store = save_sparse_classifier(tmp_path / "sparse", with_mask_file=False)
    lock = SparsityLockCallback()
    model = train(tmp_path / "sparse", tmp_path / "out", [lock])
    assert lock.store.names() == store.names() and pattern_kept(model, store)


def test_a_save_with_a_revived_weight_is_refused(tmp_path):
    from transformers import TrainerCallback

    store = save_sparse_classifier(tmp_path / "sparse")
    name = store.names()[0]
    pruned = (~store[name]).nonzero()[0].tolist()

    class Revive(TrainerCallback):  # stands for anything that writes a pruned weight behind the optimizer's back
        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                dict(model.named_parameters())[name][tuple(pruned)] = 1.0

    with pytest.raises(MaskViolationError, match=f"{name}.*1 of .* pruned positions are non-zero"):
        train(tmp_path / "sparse", tmp_path / "out", [SparsityLockCallback(), Revive()])


def test_a_mask_file_the_weights_disagree_with_is_refused(tmp_path):
    save_sparse_classifier(tmp_path / "sparse")
    dense = tmp_path / "dense"
    torch.manual_seed(3)
    BertForSequenceClassification(BertConfig(vocab_size=100, num_labels=2, **TINY_BERT)).save_pretrained(dense)
    with pytest.raises(MaskViolationError, match="pruned positions are non-zero"):
        train(dense, tmp_path / "out", [SparsityLockCallback(tmp_path / "sparse" / MASKS_FILE)])
