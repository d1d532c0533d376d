"""The parts every training loop of pofa shares: step arithmetic, the optimizer, the learning rate.

Steps are optimizer steps. One optimizer step is `gradient_accumulation_steps` micro-steps on every process; a
micro-step consumes `per_device_batch_size` examples on each of `num_processes` processes. `StepPlan` owns that
arithmetic; nothing else in pofa multiplies those numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn


@dataclass(frozen=True)
class StepPlan:
    max_steps: int
    per_device_batch_size: int
    gradient_accumulation_steps: int
    num_processes: int
    warmup_steps: int

    @property
    def global_batch_size(self) -> int:
        """Examples per optimizer step, over all processes and micro-steps."""
        return self.per_device_batch_size * self.gradient_accumulation_steps * self.num_processes

    @property
    def micro_steps(self) -> int:
        """Micro-steps each process runs in the whole run."""
        return self.max_steps * self.gradient_accumulation_steps

    def micro_step(self, step: int, accumulation_index: int) -> int:
        """Index of the global micro-step `accumulation_index` of optimizer step `step` (both from 0)."""
        if not 0 <= accumulation_index < self.gradient_accumulation_steps:
            raise ValueError(f"accumulation_index {accumulation_index} outside [0, {self.gradient_accumulation_steps})")
        return step * self.gradient_accumulation_steps + accumulation_index

    def examples_seen(self, steps: int) -> int:
        return steps * self.global_batch_size

    def epochs_seen(self, steps: int, num_examples: int) -> float:
        return self.examples_seen(steps) / num_examples


def plan_steps(*, max_steps: int, per_device_batch_size: int, gradient_accumulation_steps: int, num_processes: int,
               warmup_ratio: float = 0.0, warmup_steps: int | None = None) -> StepPlan:
    """The run's step arithmetic; warm-up is `warmup_steps` if given, else ceil(warmup_ratio * max_steps)."""
    warmup = warmup_steps if warmup_steps is not None else math.ceil(warmup_ratio * max_steps)
    return StepPlan(max_steps, per_device_batch_size, gradient_accumulation_steps, num_processes, warmup)


def steps_for_epochs(*, num_examples: int, epochs: float, per_device_batch_size: int, gradient_accumulation_steps: int,
                     num_processes: int) -> int:
    """Optimizer steps needed to see `epochs` passes over `num_examples` (at least one step)."""
    per_step = per_device_batch_size * gradient_accumulation_steps * num_processes
    return max(1, math.ceil(epochs * num_examples / per_step))


def lr_multiplier(step: int, *, max_steps: int, warmup_steps: int, schedule: str = "linear") -> float:
    """Factor applied to the peak learning rate for the optimizer step `step` (counted from 0).

    Linear warm-up over `warmup_steps` ((step + 1) / warmup_steps, so the first update already moves), then linear
    decay to 0 at `max_steps` (`schedule="linear"`) or constant.
    """
    if schedule not in ("linear", "constant"):
        raise ValueError(f"unknown learning-rate schedule {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


def rewinding_lr_multiplier(step: int, *, max_steps: int, warmup_steps: int, ramp_start: int, ramp_end: int,
                            rewind_every: int) -> float:
    """Prune Once for All's learning rate with rewinding: the factor for optimizer step `step` (counted from 0).

    The authors' schedule (`get_linear_rewinding_schedule_with_warmup` in IntelLabs Model-Compression-Research-
    Package's `api_utils.py`, which their `run_mlm.py --lr_rewind` installs with the pruning config's
    `policy_begin_step`, `policy_end_step` and `pruning_frequency`). The run is read as if the sparsity ramp
    [`ramp_start`, `ramp_end`) were cut out: a linear decay over the remaining `max_steps - (ramp_end - ramp_start)`
    steps. Inside the ramp the step is wound back to the latest pruning event, so the rate stays near the value it
    had when the ramp began (about 1.02x the peak for the paper's 100k-step run) and rewinds slightly at every event;
    after the ramp it decays linearly to 0 at `max_steps`. Warm-up: `step / warmup_steps` (0 at step 0, as theirs).
    """
    ramp = ramp_end - ramp_start
    steps_without_ramp = max_steps - ramp
    slope = float(max(1, steps_without_ramp - warmup_steps))
    if step < warmup_steps:
        return step / max(1.0, warmup_steps)
    if ramp_start <= step < ramp_end:
        rewound = (step - ramp_start) // rewind_every * rewind_every
        return max(0.0, (steps_without_ramp - step + rewound) / slope)
    skipped = ramp if step < ramp_start else 0
    return max(0.0, (max_steps - skipped - step) / slope)


def due(step: int, every: int, last: int) -> bool:
    """Whether a periodic action (log, evaluation, checkpoint) runs after `step` completed optimizer steps: every
    `every` steps and at the last step `last`."""
    return step % every == 0 or step == last


class LossWindow:
    """Running mean of the loss between two log lines, kept on the device.

    `add` only adds tensors (no host synchronisation inside the step); `mean` reads the value once, when a line is
    logged, and starts a new window.
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | float = 0.0
        self.count = 0

    def add(self, loss: torch.Tensor) -> None:
        self.total = self.total + loss.detach().float()
        self.count += 1

    def mean(self) -> float:
        value = float(self.total) / max(1, self.count)
        self.total, self.count = 0.0, 0
        return value


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on matrices only.

    Biases and LayerNorm weights (every tensor with dim < 2) get none: decaying a LayerNorm gain towards zero
    fights the normalisation it exists for.
    """
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if param.requires_grad:
            (decay if param.dim() >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, *, learning_rate: float, weight_decay: float, betas=(0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `decay_groups`. On a CUDA machine its fused kernel (one launch for all parameters instead of a
    few per tensor; parameters may still be on the CPU here, they move in `prepare`); elsewhere torch's default, so
    CPU runs keep the numerics their tests pin."""
    fused = True if torch.cuda.is_available() else None
    return torch.optim.AdamW(decay_groups(model, weight_decay), lr=learning_rate, betas=betas, eps=eps, fused=fused)


def micro_step(accelerator, model, optimizer, compute_loss, max_grad_norm: float | None,
               before_clip=None) -> torch.Tensor:
    """One micro-step: forward under autocast, backward, and on the last micro-step of an optimizer step,
    `before_clip()` (the MaskGuard's once-per-step gradient masking), gradient clipping and the optimizer step.
    Returns the detached loss.

    accelerate decides which micro-step synchronises (`sync_gradients`); the optimizer wrapper skips the others.
    """
    with accelerator.accumulate(model):
        with accelerator.autocast():
            loss = compute_loss()
        accelerator.backward(loss)
        if accelerator.sync_gradients and before_clip is not None:
            before_clip()
        if accelerator.sync_gradients and max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def new_accelerator(**kwargs):
    """An `Accelerator` for one stage, forgetting the settings of any stage run before it in this process.

    accelerate keeps its state in process-wide singletons; the quickstart (and a notebook) runs several stages, with
    different precision and accumulation, in one process. The process group itself (PartialState) is kept.
    """
    import os

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import InitProcessGroupKwargs

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
        # Several processes without a GPU (torchrun on CPUs): accelerate only sets up the process group when told
        # cpu=True, except under DeepSpeed, which must not get cpu=True and needs the gloo backend instead.
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            kwargs["kwargs_handlers"] = [*kwargs.get("kwargs_handlers", []), InitProcessGroupKwargs(backend="gloo")]
        else:
            kwargs["cpu"] = True
    return Accelerator(**kwargs)


def configure_deepspeed(accelerator, per_device_batch_size: int) -> None:
    """Fill what DeepSpeed needs from the recipe before `prepare`, when DeepSpeed is on.

    pofa's loops feed batches themselves (no DataLoader for accelerate to infer the micro-batch from), and the final
    model is written as a whole Hugging Face folder, which under ZeRO-3 needs the weights gathered at save time.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = per_device_batch_size
    zero = config.setdefault("zero_optimization", {})
    if zero.get("stage") == 3:  # accelerate's own default is False, which would make `final/` impossible to write
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        plugin.zero3_save_16bit_model = True


def count_parameters(params: Iterable[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


def learning_rate_factor(step: int, *, max_steps: int, warmup_steps: int, schedule: str = "linear",
                         pruning=None) -> float:  # noqa: ANN001 - pofa.recipe.PruningConfig or None
    """The peak learning rate's factor at `step`: the authors' rewinding schedule (`rewinding_lr_multiplier`) when
    pruning is enabled with `lr_rewind`, else `lr_multiplier`."""
    if pruning is not None and pruning.enabled and pruning.lr_rewind:
        return rewinding_lr_multiplier(step, max_steps=max_steps, warmup_steps=warmup_steps,
                                       ramp_start=pruning.start_step, ramp_end=pruning.end_step,
                                       rewind_every=pruning.frequency)
    return lr_multiplier(step, max_steps=max_steps, warmup_steps=warmup_steps, schedule=schedule)
