"""Gradual magnitude pruning attached to a training loop (`Pruner`); the techniques are pure functions elsewhere:
`schedule` (when, how much), `masks` (which weights), `optim` (keeping zeros at zero), `revival` (their values)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from pofa.artifacts import MASKS_FILE, PRUNED_VALUES_FILE
from pofa.sparsity.masks import parse_block

if TYPE_CHECKING:
    from pofa.recipe import PruningConfig

__all__ = ["Pruner"]


class Pruner:
    """Attaches gradual magnitude pruning to a loop: the schedule, the MaskStore, the MaskGuard and, with
    `pruning.revive`, the pruned weights' values. Both stages use it: pre-training's student, and fine-tuning's
    downstream pruning of a dense model.

        pruner = Pruner(recipe.pruning, model)
        run.register(pruner.save, pruner.load)              # masks (and pruned values) in every checkpoint
        each step: if pruner.is_event(step): log(pruner.prune(step, optimizer))
                   ... micro-steps with before_clip=pruner.guard.mask_gradients_ ...
                   pruner.stepped(lr, weight_decay, skipped)
    """

    def __init__(self, config: PruningConfig, model: nn.Module):
        from pofa.families import pruning_targets
        from pofa.sparsity import MaskGuard, MaskStore

        self.config = c = config
        self.model = model
        include = pruning_targets(model, c.include, c.exclude, pooler=c.pooler, section="pruning")
        # Full shapes, also where DeepSpeed ZeRO-3 leaves each process an empty shard.
        self.store = MaskStore.dense(model.named_parameters(), include=include, exclude=c.exclude)
        self.guard = MaskGuard(model, self.store, gradients="step")  # the loop masks once per optimizer step
        self.end_pruning_step = c.end_pruning_step if c.end_pruning_step is not None else c.end_step
        self.pruned_values = None
        if c.revive:
            from pofa.sparsity import PrunedValues

            self.pruned_values = PrunedValues.zeros(self.store)

    def is_event(self, step: int) -> bool:
        from pofa.sparsity import is_pruning_step

        return is_pruning_step(step, start_step=self.config.start_step, frequency=self.config.frequency,
                               end_pruning_step=self.end_pruning_step)

    def target(self, step: int) -> float:
        from pofa.sparsity import cubic_sparsity

        c = self.config
        return cubic_sparsity(step, initial=c.initial_sparsity, final=c.target_sparsity, start_step=c.start_step,
                              end_step=c.end_step)

    def prune(self, step: int, optimizer) -> str:
        """Recompute the masks at `step`; returns the event's log line.

        With an N:M `pruning.pattern` the masks ramp group by group (`pofa.sparsity.nm_masks`) and are N:M from the
        event that reaches the target on; with a block pattern (`1x4`) they are whole blocks at every event. The
        store then records the pattern, so that `check_masks` verifies it at every later event and save, and the
        mask file carries it to fine-tuning.
        """
        from pofa.sparsity import check_masks

        c = self.config
        target = self.target(step)
        if self.pruned_values is None:
            self.guard.prune_(target, optimizer=optimizer, scope=c.scope, pattern=c.pattern)
            revived = ""
        else:
            changes = self.guard.prune_(target, optimizer=optimizer, scope=c.scope, revive=self.pruned_values,
                                        pattern=c.pattern)
            revived = f", revived {changes.num_revived()}"
        # N:M masks follow their pattern once the ramp reaches it; block masks are whole blocks at every event.
        if c.pattern != self.store.pattern and (target == c.target_sparsity or parse_block(c.pattern) is not None):
            self.store.pattern = c.pattern  # raises if a mask breaks it
        check_masks(self.model, self.store)
        # During an N:M ramp the masks are not N:M yet: say which the event's masks are.
        pattern = f", masks {self.store.pattern}" if c.pattern != "unstructured" else ""
        return (f"step {step}: pruning event, target sparsity {target:.4f}, achieved {self.store.sparsity():.4f}"
                f"{revived}{pattern}")

    def stepped(self, lr: float, weight_decay: float, skipped: bool) -> None:
        """After each optimizer step: the stored values of pruned weights decay as AdamW would decay them (not when
        the step was skipped, as fp16's loss scaler does on an overflow)."""
        if self.pruned_values is not None and not skipped:
            self.pruned_values.step_(lr, weight_decay)

    def save(self, folder: Path) -> None:
        self.store.save(folder / MASKS_FILE)
        if self.pruned_values is not None:
            self.pruned_values.save(folder / PRUNED_VALUES_FILE)

    def load(self, folder: Path) -> None:
        """Restore a checkpoint's masks (and stored values) into the live objects the gradient hooks read."""
        from pofa.sparsity import MaskStore, PrunedValues

        self.store.load_state_dict(MaskStore.load(folder / MASKS_FILE).state_dict())
        if self.pruned_values is not None:
            self.pruned_values.load_state_dict(PrunedValues.load(folder / PRUNED_VALUES_FILE).state_dict())
