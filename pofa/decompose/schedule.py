"""ROSITA's iterative compression: heads, feed-forward neurons and low-rank ranks shrink a little at a time while
distillation trains, instead of all at once when the stage starts (`decomposition.schedule: iterative`).

What ROSITA did (Liu, Lin, Yuan, "ROSITA: Refined BERT cOmpreSsion with InTegrAted techniques", AAAI 2021; code
github.com/llyx97/Rosita, `KD/train.py`): in its width-pruning mode one attention head per layer goes at each event,
so there are (heads - kept heads) events; `pruning_schedule` interpolates the FFN width and the embedding's
factorization rank *linearly* in the event count (width_k = width_0 - (width_0 - width_final) x k / events); events
fall every `prun_step` optimizer steps, where `prun_step` spreads them over the first `prun_period_proportion` of
training (`init_prun`); the first comes after one period of training, the last ends the pruning period, and the
model then trains at its final shape. At each event its `pruning.py` slices the weights (by accumulated first-order
Taylor importance), the embedding's SVD factors are cut to the new rank, and a new optimizer is built whose linear
learning-rate decay restarts from the current rate over the remaining steps (the same line as one linear decay).

Built here, in optimizer steps as all pofa schedules: `kept_fraction(step, final, start_step, end_step)` is 1 up to
`start_step`, `final` from `end_step`, linear between; events at `start_step + k x frequency` up to `end_step`
(`is_event`; the recipe requires end_step - start_step to be a multiple of frequency, so the last event reaches the
target). ROSITA's run is `start_step: 0`, `frequency: prun_step`, `end_step: events x prun_step` and
`frequency = (end_step - start_step) / (heads - kept heads)`, which removes exactly one head per event: per block
round(heads x kept_fraction) heads are kept, and so do the neurons; each low-rank module's rank goes linearly from its
dense rank min(in, out) to `rank` (`scheduled_rank`), or the kept energy from 1 to `energy`, and the embedding's from
the hidden size to `embedding_rank`. Differences: importance is magnitude (`pofa.decompose.structured`), not Taylor;
ROSITA factorizes only the embedding, pofa also the encoder Linears when `method: lowrank`; a Linear stays dense until
its factors at the scheduled rank would be smaller than it (or the last event), then is factorized by SVD, and a
factorized one is truncated to the best approximation of its current product (`pofa.decompose.lowrank.refactor`);
the learning-rate schedule is the stage's own (`training.lr_schedule`, linear: ROSITA's); and the optimizer is not
rebuilt: its state is sliced along with the weights (`retarget_optimizer_`: the kept rows keep their Adam moments;
new factors start afresh), where ROSITA's rebuilt optimizer forgets every moment.

    decomposer = Decomposer.for_stage(recipe.decomposition, model, run)   # None unless schedule: iterative
    ... run.prepare(...); run.register(decomposer.save, decomposer.load)
    each step: if decomposer.is_event(step): run.log(decomposer.apply(step, run.optimizer))

Parameters change shape mid-run, so the schedule runs on one process (DDP, DeepSpeed and FSDP keep flat buffers of the
shapes they were prepared with), without masks (`pruning.enabled`, locked `sparsity.masks`) or QAT, whose state is
per parameter too; the recipe checks say so. A checkpoint holds the structure (`DECOMPOSITION_FILE`); `--resume`
rebuilds it before the optimizer is made (`for_stage`), so accelerate restores weights and moments of those shapes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from pofa.artifacts import DECOMPOSITION_FILE
from pofa.decompose.common import (CONFIG_KEY, base_of, decomposition_record, encoder_filter, retarget_optimizer_)
from pofa.decompose.lowrank import LowRankEmbedding, LowRankLinear, shrink_embedding, shrink_low_rank
from pofa.decompose.structured import (StructuredConfig, effective_weight, encoder_blocks, head_size_of, layout_of,
                                       original_counts, prune_structured)
from pofa.sparsity.schedule import require_int

__all__ = ["DECOMPOSITION_FILE", "Decomposer", "describe", "is_event", "kept_fraction", "progress", "scheduled_rank"]



def progress(step: int, *, start_step: int, end_step: int) -> float:
    """How far the schedule is after `step` completed optimizer steps: 0 up to `start_step`, 1 from `end_step`."""
    require_int("step", step, minimum=0)
    require_int("start_step", start_step, minimum=0)
    require_int("end_step", end_step, minimum=0)
    if end_step <= start_step:
        raise ValueError(f"end_step ({end_step}) must be greater than start_step ({start_step})")
    return min(1.0, max(0.0, (step - start_step) / (end_step - start_step)))


def kept_fraction(step: int, *, final: float, start_step: int, end_step: int) -> float:
    """Fraction of heads (or neurons) kept after `step` steps: 1 -> `final`, linearly (ROSITA's `pruning_schedule`)."""
    if isinstance(final, bool) or not 0.0 < float(final) <= 1.0:
        raise ValueError(f"final must lie in (0, 1], got {final!r}")
    return 1.0 - (1.0 - final) * progress(step, start_step=start_step, end_step=end_step)


def scheduled_rank(step: int, *, full: int, final: int, start_step: int, end_step: int) -> int:
    """Rank after `step` steps: `full` (the dense rank) -> `final`, linearly, rounded; never below `final`."""
    require_int("full", full, minimum=1)
    require_int("final", final, minimum=1)
    final = min(final, full)
    return max(final, round(full - (full - final) * progress(step, start_step=start_step, end_step=end_step)))


def is_event(step: int, *, start_step: int, frequency: int, end_step: int) -> bool:
    """Whether the model is compressed after `step` steps: at start_step, start_step + frequency, ... <= end_step."""
    require_int("step", step, minimum=0)
    require_int("frequency", frequency, minimum=1)
    if step < start_step or step > end_step:
        return False
    return (step - start_step) % frequency == 0


class Decomposer:
    """Attaches the iterative schedule of a recipe's `decomposition` section to a stage's loop (the shape of
    `pofa.sparsity.pruner.Pruner`; see the module docstring)."""

    def __init__(self, section: Any, model: nn.Module) -> None:
        self.section, self.model = section, model
        self.select = encoder_filter(model, section.include, section.exclude)
        self.structured = section.heads < 1.0 or section.ffn < 1.0
        self.last_event: int | None = None
        if self.structured:
            layout_of(model)  # FamilyError now, not at the first event

    @classmethod
    def for_stage(cls, section: Any, model: nn.Module, run: Any) -> Decomposer | None:
        """The stage's decomposer (None unless `schedule: iterative`): refuses several processes; with `--resume`,
        gives `model` the structure of the latest checkpoint. Call it before the optimizer is made."""
        from pofa.recipe import RecipeError

        if section.schedule != "iterative":
            return None
        accelerator = run.accelerator
        if accelerator.num_processes > 1 or str(accelerator.distributed_type).endswith(("DEEPSPEED", "FSDP")):
            raise RecipeError("decomposition.schedule: iterative changes parameter shapes during the run, which DDP, "
                              "DeepSpeed and FSDP cannot follow (they keep buffers of the prepared shapes); run it on "
                              "one process, or use schedule: oneshot")
        decomposer = cls(section, model)
        if run.resuming:  # the checkpoint that `run.resume` will load: its shapes, before the optimizer is made
            from pofa.artifacts import CHECKPOINTS_DIR
            from pofa.checkpoint import complete_checkpoints

            found = complete_checkpoints(Path(run.output_dir) / CHECKPOINTS_DIR)
            if found:
                decomposer.restore_(found[-1])
        return decomposer

    def check_fits(self, max_steps: int) -> None:
        """The run reaches `end_step` (fine-tuning knows its length only with the data)."""
        from pofa.recipe import RecipeError

        if self.section.end_step > max_steps:
            raise RecipeError(f"decomposition.end_step: {self.section.end_step} is beyond the run's {max_steps} "
                              "optimizer steps; the target shape would not be reached (lower it, or train longer)")

    def is_event(self, step: int) -> bool:
        """An event of the schedule not applied yet (the last step's event is in the final checkpoint already: a
        resumed run must not apply it twice, which `energy` would not survive: it re-measures the weights)."""
        c = self.section
        already = self.last_event is not None and step <= self.last_event
        return not already and is_event(step, start_step=c.start_step, frequency=c.frequency, end_step=c.end_step)

    def apply(self, step: int, optimizer: Any) -> str:
        """Compress the model to the schedule's shape at `step`, move `optimizer` onto the new parameters; returns the
        event's log line."""
        c, model = self.section, self.model
        at = dict(start_step=c.start_step, end_step=c.end_step)
        final = progress(step, **at) >= 1.0
        if self.structured:
            retarget_optimizer_(optimizer, prune_structured(model, StructuredConfig(
                heads=kept_fraction(step, final=c.heads, **at), ffn=kept_fraction(step, final=c.ffn, **at))))
        if c.method == "lowrank":
            if c.rank is not None:
                swaps = shrink_low_rank(model, self.select, final=final, rank=lambda full: scheduled_rank(
                    step, full=full, final=c.rank, **at))
            else:
                swaps = shrink_low_rank(model, self.select, final=final,
                                        energy=1.0 - (1.0 - c.energy) * progress(step, **at))
            retarget_optimizer_(optimizer, swaps)
            if c.embeddings:
                hidden = model.get_input_embeddings().embedding_dim
                target = c.embedding_rank or c.rank
                swaps = (shrink_embedding(model, rank=scheduled_rank(step, full=hidden, final=target, **at))
                         if target is not None else
                         shrink_embedding(model, energy=1.0 - (1.0 - c.energy) * progress(step, **at)))
                retarget_optimizer_(optimizer, swaps)
        self.last_event = step
        return f"step {step}: decomposition event ({progress(step, **at):.0%} of the schedule): {describe(model)}"

    def state_dict(self) -> dict[str, Any]:
        return {"last_event": self.last_event, "structure": decomposition_record(self.model)}

    def save(self, folder: Path) -> None:
        (Path(folder) / DECOMPOSITION_FILE).write_text(json.dumps(self.state_dict(), indent=2))

    def load(self, folder: Path) -> None:
        """After accelerate restored the checkpoint: the live structure must be the saved one (`for_stage` rebuilt
        it before the optimizer was made)."""
        saved = json.loads((Path(folder) / DECOMPOSITION_FILE).read_text())
        if saved["structure"] != json.loads(json.dumps(decomposition_record(self.model))):
            raise ValueError(f"{folder}/{DECOMPOSITION_FILE} records another structure than the model's; the "
                             "structure must be restored before the optimizer is made (Decomposer.for_stage)")
        self.last_event = saved["last_event"]

    def restore_(self, checkpoint: Path) -> None:
        """Give the (freshly loaded, uncompressed) model the structure saved in `checkpoint`."""
        from pofa.decompose import rebuild_

        path = Path(checkpoint) / DECOMPOSITION_FILE
        saved = json.loads(path.read_text()) if path.is_file() else {"last_event": None, "structure": {}}
        if saved["structure"]:
            rebuild_(self.model, saved["structure"])
            setattr(self.model.config, CONFIG_KEY, saved["structure"])
        self.last_event = saved["last_event"]


def describe(model: nn.Module) -> str:
    """The compressed shape in one line: heads and neurons per block, the factorized modules' ranks, parameters."""
    from pofa.decompose import parameter_count

    parts = []
    try:
        layout = layout_of(model)
    except Exception:  # noqa: BLE001 - a family without a block layout: no head count to show
        layout = None
    if layout is not None:
        base = base_of(model)
        heads, ffn = original_counts(model)
        widths = []
        for block in encoder_blocks(model):
            attention = base.get_submodule(f"{block}.{layout.attention}")
            columns = effective_weight(base.get_submodule(f"{block}.{layout.head_columns}")).shape[1]
            widths.append((columns // head_size_of(model, attention),
                           effective_weight(base.get_submodule(f"{block}.{layout.ffn_columns}")).shape[1]))
        parts.append(f"heads {_span([h for h, _ in widths])} of {heads}, FFN neurons {_span([f for _, f in widths])} "
                     f"of {ffn} per block")
    ranks = [m.rank for m in model.modules() if isinstance(m, LowRankLinear)]
    if ranks:
        parts.append(f"{len(ranks)} low-rank Linears of rank {_span(ranks)}")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embedding, LowRankEmbedding):
        parts.append(f"embedding rank {embedding.rank}")
    parts.append(f"{parameter_count(model) / 1e6:.3f} M parameters")
    return ", ".join(parts)


def _span(values: list[int]) -> str:
    return str(values[0]) if min(values) == max(values) else f"{min(values)}-{max(values)}"
