"""Fine-tune a pofa model with your own `transformers.Trainer` without losing a single zero.

    from pofa.trainer import SparsityLockCallback

    lock = SparsityLockCallback()                 # the model's masks.safetensors, else its zeros
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[lock])
    trainer.train()
    trainer.save_model(out); lock.save_masks(out)  # masks.safetensors beside the final model

A thin adapter from the Trainer's events to `pofa.sparsity.lock.lock_sparsity` (pofa's own loops do not use it):

    on_train_begin   lock: gradient hooks on the masked weights, the optimizer's moments zeroed where pruned. The
                     Trainer has built its optimizer and loaded a resumed checkpoint by then; the hooks act at every
                     backward, so before gradient accumulation, DDP's all-reduce and the Trainer's clipping (which
                     runs before `on_pre_optimizer_step`, too late to mask there).
    on_save          check_masks on the saved weights, then masks.safetensors into the checkpoint folder.
    on_train_end     check_masks, hooks removed.

A plain Trainer with AdamW (weight decay 0.01) makes a 90% sparse model dense within one optimizer step;
tests/unit/test_trainer.py measures both ways, with gradient accumulation and bf16. Under DeepSpeed (the Trainer's
`deepspeed=` config) the lock also zeroes DeepSpeed's fp32 master copies and its Adam moments, at the start and after
a resume from a checkpoint: tests/integration/test_trainer_deepspeed.py runs ZeRO-2 (fp32) and ZeRO-3 (bf16) on two
processes, with a checkpoint and a resume from it, and reads the master copies back.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from pofa.artifacts import MASKS_FILE
from pofa.sparsity.lock import lock_sparsity
from pofa.sparsity.masks import MaskStore, check_masks
from pofa.sparsity.optim import MaskGuard

__all__ = ["SparsityLockCallback"]


class SparsityLockCallback(TrainerCallback):
    """Keeps the zero pattern of the Trainer's model bit for bit (see the module docstring).

    `masks`: a MaskStore or a masks.safetensors path; default the mask file of the folder or Hub repo the model was
    loaded from, else the zeros of `include` (regexes; default every encoder Linear weight) minus `exclude`. A
    pruned weight found non-zero (at the start, at a save, at the end) raises MaskViolationError naming it.
    """

    def __init__(
        self,
        masks: MaskStore | str | os.PathLike[str] | None = None,
        *,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        self._masks = masks
        self._include = include
        self._exclude = exclude
        self._guard: MaskGuard | None = None
        self._store: MaskStore | None = None

    @property
    def store(self) -> MaskStore:
        """The locked pattern (known once training has begun)."""
        if self._store is None:
            raise RuntimeError("SparsityLockCallback: no pattern yet; it is taken when the Trainer begins training")
        return self._store

    def save_masks(self, folder: str | os.PathLike[str]) -> Path:
        """Write the pattern to `folder`/masks.safetensors (e.g. after `trainer.save_model(folder)`); returns the
        path. pofa's fine-tuning, export and card read it from there."""
        path = Path(folder) / MASKS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.store.save(path)
        return path

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        if model is None:
            raise RuntimeError("SparsityLockCallback: the Trainer passed no model to on_train_begin")
        if self._guard is not None:  # a second trainer.train() on the same callback: one set of hooks
            self._guard.remove()
        masks = self._store if self._store is not None else self._masks
        self._guard = lock_sparsity(model, optimizer, masks, include=self._include, exclude=self._exclude)
        self._store = self._guard.store

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None or self._store is None:
            return
        check_masks(model, self._store)  # every rank: a collective on sharded backends
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"  # as Trainer._save_checkpoint
        if state.is_world_process_zero and folder.is_dir():
            self._store.save(folder / MASKS_FILE)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self._guard is None:
            return
        if model is not None:
            check_masks(model, self._guard.store)
        self._guard.remove()
        self._guard = None
