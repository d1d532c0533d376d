"""Lock a sparse model's zero pattern in a training loop that is not pofa's: one call.

    guard = lock_sparsity(model, optimizer)        # a plain torch or accelerate loop (after accelerator.prepare)
    ... loss.backward(); clip; optimizer.step() ...  # unchanged
    check_masks(model, guard.store)                 # before a save: raises if any pruned weight is non-zero

`pofa.trainer.SparsityLockCallback` does the same for `transformers.Trainer`. The pattern is the model's
`masks.safetensors` (in the folder or Hub repo it was loaded from), or without one the zeros of its pruning targets
(every encoder Linear weight by default). The lock is :class:`pofa.sparsity.MaskGuard` with gradient hooks: the
gradient of every pruned position is exactly zero before anything else sees it (gradient accumulation, DDP's
all-reduce, DeepSpeed's reduce-scatter, clipping norms, Adam's moments), and the optimizer's per-weight state is
zeroed there once (a resumed optimizer may hold moments from before the pattern). An optimizer then cannot move a
pruned weight: its update is a function of zero gradients and zero moments, and decoupled weight decay scales zero.
Without the lock, fine-tuning a 90% sparse model with AdamW makes it dense within one step (tests/unit/test_trainer.py
measures it).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from pofa.artifacts import MASKS_FILE
from pofa.sparsity.masks import POOLER_TARGET, MaskStore, check_masks, unwrap_model
from pofa.sparsity.optim import MaskGuard

__all__ = ["find_mask_file", "lock_sparsity", "model_masks", "without_absent_pooler"]


def _loaded_from_masks(model: nn.Module) -> Path | None:
    """The mask file of the folder or Hub repo `model` was loaded from (`name_or_path`); None when it has none or was
    built from a config (an empty `name_or_path` would otherwise mean the working directory)."""
    source = str(getattr(unwrap_model(model), "name_or_path", "") or "")
    if not source:
        return None
    return find_mask_file(source)


def find_mask_file(name_or_path: str, revision: str | None = None) -> Path | None:
    """The model's masks.safetensors: in its folder, or on the Hub for a Hub id (None when it has none)."""
    from pofa.modeling import resolve_model_path

    path = Path(resolve_model_path(name_or_path))
    if path.is_dir():
        return path / MASKS_FILE if (path / MASKS_FILE).is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(name_or_path, MASKS_FILE, revision=revision))
    except Exception:  # noqa: BLE001 - no mask file on the Hub, or no network: the zeros will be used
        return None


def without_absent_pooler(store, model):
    """The store without the pooler's mask when the task model has no pooler (extractive QA heads read every
    position, not the pooled [CLS]); every other mask must bind."""
    names = {name for name, _ in model.named_parameters()}
    if any(re.search(POOLER_TARGET, name) for name in names):
        return store
    # The pattern travels with the masks: an N:M store stays N:M (checked by check_masks, saved with final/).
    return MaskStore({name: mask for name, mask in store.items() if not re.search(POOLER_TARGET, name)},
                     pattern=store.pattern)


def model_masks(
    model: nn.Module,
    masks: MaskStore | str | os.PathLike[str] | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> MaskStore:
    """The zero pattern to lock on `model`: `masks` when given (a MaskStore, or a masks.safetensors path), else the
    mask file of the folder or Hub repo the model was loaded from, else the zeros of its pruning targets (`include`
    / `exclude`: regexes over parameter names; default pofa's targets, every encoder Linear weight).

    A mask file must agree with the weights: raises MaskViolationError naming each weight that is non-zero where
    the file says pruned (the model is not the one the masks were made for, or it was trained without the lock).
    """
    if isinstance(masks, MaskStore):
        store = masks
    else:
        path = Path(masks) if masks is not None else _loaded_from_masks(model)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"masks {path}: no such file (a {MASKS_FILE} written by pofa)")
        if path is None:
            targets = {"include": list(include)} if include else {}  # else the targets pofa selects by default
            return MaskStore.from_zeros(unwrap_model(model).named_parameters(), exclude=exclude, **targets)
        # A QA head reads every position, so its model has no pooler: a pruned pooler's mask has nothing to bind.
        store = without_absent_pooler(MaskStore.load(path), unwrap_model(model))
    check_masks(model, store)
    return store


def lock_sparsity(
    model: nn.Module,
    optimizer: Any = None,
    masks: MaskStore | str | os.PathLike[str] | None = None,
    *,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
) -> MaskGuard:
    """Keep `model`'s zero pattern (see `model_masks` for where it comes from) through any later training.

    Registers one gradient hook per masked weight and zeroes `optimizer`'s per-weight state (Adam's moments,
    momentum) at the pruned positions. `model` may be plain, DDP- or accelerate-wrapped, compiled, or a DeepSpeed
    engine; call once, before the first backward. Returns the MaskGuard: its `store` is the pattern
    (`check_masks(model, guard.store)` raises MaskViolationError if a pruned weight is non-zero, `guard.store.save(
    folder / "masks.safetensors")` records it beside a saved model), and `guard.remove()` unlocks.
    """
    store = model_masks(model, masks, include=include, exclude=exclude)
    guard = MaskGuard(model, store)
    # The weights are zero where pruned already (checked above); this zeroes what a resumed optimizer remembers.
    guard.enforce_(optimizer)
    return guard
