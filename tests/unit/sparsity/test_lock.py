"""lock_sparsity: one call keeps a sparse model's zero pattern in a plain torch or accelerate loop."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from pofa.artifacts import MASKS_FILE
from pofa.sparsity import check_masks
from pofa.sparsity.lock import lock_sparsity, model_masks
from tests.conftest import TINY_BERT
from tests.unit.test_trainer import pattern_kept, save_sparse_classifier


# Each Trainer / Accelerator here sets accelerate's process-wide state: start from none and leave none.
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def batch(seed: int = 0) -> dict:
    ids = torch.randint(5, 100, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids[:, 0] % 2}


def steps(model, optimizer, n: int) -> None:
    for i in range(n):
        model(**batch(i)).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


def adamw(model) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def test_a_plain_loop_keeps_the_pattern_with_one_call(tmp_path):
    store = save_sparse_classifier(tmp_path / "sparse")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "sparse")
    optimizer = adamw(model)
    guard = lock_sparsity(model, optimizer)
    steps(model, optimizer, 3)
    check_masks(model, guard.store)
    assert pattern_kept(model, store)
    guard.remove()  # unlocked: the next steps fill the zeros in
    steps(model, optimizer, 1)
    assert not pattern_kept(model, store)


def test_moments_of_a_resumed_optimizer_cannot_revive_a_zero(tmp_path):
    """An optimizer that stepped before the lock holds moments at pruned positions; with zero gradients alone those
    would still move the weights. The lock zeroes them."""
    store = save_sparse_classifier(tmp_path / "sparse")

    def resumed_model_and_optimizer():
        model = BertForSequenceClassification.from_pretrained(tmp_path / "sparse")
        optimizer = adamw(model)
        steps(model, optimizer, 1)  # dense step: moments everywhere
        with torch.no_grad():  # back to the sparse weights, moments kept (as a resumed dense optimizer would be)
            for name, param in BertForSequenceClassification.from_pretrained(tmp_path / "sparse").named_parameters():
                dict(model.named_parameters())[name].copy_(param)
        return model, optimizer

    model, optimizer = resumed_model_and_optimizer()
    lock_sparsity(model, optimizer)
    steps(model, optimizer, 2)
    assert pattern_kept(model, store)

    model, optimizer = resumed_model_and_optimizer()
    lock_sparsity(model)  # hooks only, moments left as they were: the pruned weights move
    steps(model, optimizer, 1)
    assert not pattern_kept(model, store)


def test_an_accelerate_loop_with_accumulation_keeps_the_pattern(tmp_path):
    from accelerate import Accelerator

    store = save_sparse_classifier(tmp_path / "sparse")
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2, mixed_precision="bf16")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "sparse")
    model, optimizer = accelerator.prepare(model, adamw(model))
    lock_sparsity(model, optimizer)
    for i in range(6):
        with accelerator.accumulate(model):
            accelerator.backward(model(**batch(i)).loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
    assert pattern_kept(accelerator.unwrap_model(model), store)


def test_masks_come_from_the_argument_the_folder_or_the_zeros(tmp_path):
    store = save_sparse_classifier(tmp_path / "sparse")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "sparse")
    from_file = model_masks(model)
    given = model_masks(model, tmp_path / "sparse" / MASKS_FILE)
    (tmp_path / "sparse" / MASKS_FILE).unlink()
    from_zeros = model_masks(BertForSequenceClassification.from_pretrained(tmp_path / "sparse"))
    for masks in (from_file, given, from_zeros):
        assert masks.names() == store.names() and all(torch.equal(masks[n], store[n]) for n in store)
    only_query = model_masks(model, include=[r"attention\.self\.query\.weight$"])
    assert only_query.names() == [n for n in store.names() if n.endswith("query.weight")]


def test_a_model_built_from_a_config_uses_its_zeros_not_the_working_directory(tmp_path, monkeypatch):
    save_sparse_classifier(tmp_path)  # a masks.safetensors in the working directory must not be picked up
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(5)
    dense = BertForSequenceClassification(BertConfig(vocab_size=100, num_labels=2, **TINY_BERT))
    assert model_masks(dense).sparsity() == 0.0


def test_a_missing_mask_file_is_named(tmp_path):
    save_sparse_classifier(tmp_path / "sparse")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "sparse")
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors: no such file"):
        lock_sparsity(model, masks=tmp_path / "nowhere.safetensors")
