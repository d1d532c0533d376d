"""What the two training stages share: set-up, resume, cadence, the console and the atomic final write.

`pofa.pretrain.train` and `pofa.finetune.finetune` are each one plain loop over optimizer steps. Everything that both
need and that decides nothing about a technique lives here, in the order a stage uses it:

    run = Stage.start(recipe, resume=..., overwrite=...)  # accelerator; refuses a used output folder before any work
    ... the stage loads its data, model and teacher (run.load_teacher) ...
    run.open()                                            # inputs are valid: only now is the output folder written
    prepared = run.prepare(module)                        # AdamW groups, DeepSpeed settings, accelerate.prepare
    state = run.resume(RESUME_KEYS)                       # the latest checkpoint's state, or {"step": 0}
    for step in range(state["step"], run.plan.max_steps):
        run.set_lr(factor)
        ... micro-steps ...
        if run.due_log(step + 1): run.log_step(step + 1, window, ...)
        if run.due_eval(step + 1): ...
        if run.due_save(step + 1): run.save(step + 1, state)
    run.finish(step, state, write_final)                  # last checkpoint, then final/ written atomically
                                                          # [and pushed to the Hub: the recipe's hub.repo_id]

Decisions stay in the stage's loop: the schedule, what is logged, what is evaluated. `Stage` only owns the arithmetic
of "when" (`pofa.loop.due`) and the mechanics of "how" (accelerate, checkpoints, files).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate.logging import MultiProcessAdapter

from pofa.artifacts import FINAL_DIR, RECIPE_FILE
from pofa.checkpoint import Checkpointer, check_resume_compatible, prepare_output_dir
from pofa.loop import (StepPlan, build_optimizer, configure_deepspeed, due, new_accelerator, plan_steps,
                       set_learning_rate)
from pofa.recipe import save_recipe

LOGGER_NAME = "pofa"


# ---------------------------------------------------------------------------------------------------------------------
# The console: one line per event, on the main process
# ---------------------------------------------------------------------------------------------------------------------


class _ConsoleHandler(logging.Handler):
    """Writes each record as one line on the current `sys.stdout`, through tqdm so a progress bar stays intact.

    The stream is looked up at every record (not bound at creation) so that redirected or captured output works.
    """

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging must never take the run down
            self.handleError(record)


def configure_console() -> None:
    """Route pofa's log lines to stdout as bare lines, and silence the notices of libraries that are known harmless.

    Idempotent. Library warnings and errors still come through; what is silenced is informational chatter that a
    person cannot act on: transformers' per-load report tables and weight-loading progress bars, DeepSpeed's
    "Setting accelerator to CPU", and safetensors' "Removed shared tensor" for tied weights (pofa writes the model
    folder itself, with the ties restored by `from_pretrained`).
    """
    logger = logging.getLogger(LOGGER_NAME)
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        handler = _ConsoleHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    _quiet_libraries()


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # load reports (MISSING / UNEXPECTED tables) are info/warning level
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    try:
        import datasets

        datasets.disable_progress_bars()  # one "Map" bar per split and tokenization pass
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    # accelerate prints "Removed shared tensor ... while saving" for tied embeddings at every checkpoint.
    logging.getLogger("accelerate.checkpointing").setLevel(logging.ERROR)
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    # DeepSpeed warns, once per process, that it "fell back" to the CPU when it finds no accelerator; on a machine
    # that has none, name the CPU up front (what DeepSpeed would pick anyway) so it does not need to guess.
    if "DS_ACCELERATOR" not in os.environ and _only_cpu():
        os.environ["DS_ACCELERATOR"] = "cpu"


def _only_cpu() -> bool:
    import importlib.util

    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return False
    if torch.backends.mps.is_available():
        return False
    plugins = ("torch_npu", "habana_frameworks", "torch_mlu", "torch_sdaa", "torch_supa", "torch_xmlir")
    return not any(importlib.util.find_spec(name) for name in plugins)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


class _MainProcessLogger(MultiProcessAdapter):
    """accelerate's adapter without its `[RANK n]` prefix: only the main process prints, so no line needs it."""

    def process(self, msg, kwargs):
        kwargs.setdefault("stacklevel", 2)
        return msg, kwargs


def get_logger() -> MultiProcessAdapter:
    """pofa's logger through accelerate's multi-process adapter: `info` prints on the main process only, and
    `main_process_only=False` on every process."""
    return _MainProcessLogger(logging.getLogger(LOGGER_NAME), {})


def check_trackers(names: list[str]) -> None:
    """Every tracker the recipe names must be usable here: accelerate would otherwise drop it with a warning."""
    from accelerate.tracking import get_available_trackers

    from pofa.recipe import RecipeError

    available = {str(kind.value if hasattr(kind, "value") else kind) for kind in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        raise RecipeError(f"training.trackers: {missing[0]} is not installed here (pip install {missing[0]}); "
                          f"available: {', '.join(sorted(available)) or 'none'}")


def check_launcher_agrees(recipe, accelerator) -> None:
    """The recipe's gradient accumulation is the run's: `accelerate launch` exports its config's value to the process
    (and DeepSpeed's config has its own), which accelerate would silently prefer over the recipe's."""
    from pofa.recipe import RecipeError

    wanted = recipe.training.gradient_accumulation_steps
    plugin = accelerator.state.deepspeed_plugin
    deepspeed_value = plugin.deepspeed_config.get("gradient_accumulation_steps") if plugin is not None else None
    for source, value in (("the launcher (accelerate config / ACCELERATE_GRADIENT_ACCUMULATION_STEPS)",
                           accelerator.gradient_accumulation_steps),
                          ("the DeepSpeed config", deepspeed_value)):
        if isinstance(value, int) and value != wanted:
            raise RecipeError(f"training.gradient_accumulation_steps: the recipe says {wanted}, {source} says {value}; "
                              "make them equal, or remove it from the launcher's config so the recipe decides")


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


# ---------------------------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Stage:
    """One training stage's accelerator, output folder, optimizer, checkpoints and console (see the module doc)."""

    recipe: Any
    accelerator: Any
    output_dir: Path
    resuming: bool
    overwrite: bool
    plan: StepPlan | None = None
    optimizer: Any = None
    checkpointer: Checkpointer | None = None
    started: float = field(default_factory=time.perf_counter)
    _progress: Any = None
    _window_start: float = field(default_factory=time.perf_counter)
    _window_items: int = 0

    # --- set-up -------------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, recipe, *, resume: bool, overwrite: bool) -> Stage:
        """The stage's accelerator; refuses an output folder it may not use before anything is loaded or written."""
        configure_console()
        t = recipe.training
        output_dir = Path(t.output_dir)
        check_trackers(t.trackers)
        accelerator = new_accelerator(gradient_accumulation_steps=t.gradient_accumulation_steps,
                                      mixed_precision=t.mixed_precision, log_with=list(t.trackers) or None,
                                      project_dir=str(output_dir))
        check_launcher_agrees(recipe, accelerator)
        prepare_output_dir(output_dir, resume=resume, overwrite=overwrite, create=False)
        return cls(recipe, accelerator, output_dir, resume, overwrite)

    def log(self, message: str) -> None:
        get_logger().info(message)

    def plan_steps(self, max_steps: int) -> StepPlan:
        t = self.recipe.training
        self.plan = plan_steps(max_steps=max_steps, per_device_batch_size=t.per_device_batch_size,
                               gradient_accumulation_steps=t.gradient_accumulation_steps,
                               num_processes=self.accelerator.num_processes, warmup_ratio=t.warmup_ratio,
                               warmup_steps=t.warmup_steps)
        return self.plan

    def load_teacher(self, load: Callable[[], torch.nn.Module], student: torch.nn.Module) -> torch.nn.Module:
        """The frozen teacher from `load()`: never partitioned or wrapped by DeepSpeed, same vocabulary as the student,
        in eval mode on this process's device."""
        from pofa.modeling import check_same_vocabulary, unpartitioned

        with unpartitioned():
            teacher = load()
        check_same_vocabulary(teacher, student, self.recipe.distillation.teacher)
        return teacher.requires_grad_(False).eval().to(self.accelerator.device)

    def open(self) -> None:
        """The inputs are valid: create (or clear, with --overwrite) the output folder."""
        if self.accelerator.is_main_process:
            prepare_output_dir(self.output_dir, resume=self.resuming, overwrite=self.overwrite)
        self.accelerator.wait_for_everyone()

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """AdamW over `module`'s parameters (the model's, and any a technique trains beside it, e.g. a hidden-state
        projection; decay on matrices only), DeepSpeed's batch settings, then `accelerate.prepare(module,
        optimizer)`; returns the prepared module and keeps the optimizer."""
        t = self.recipe.training
        optimizer = build_optimizer(module, learning_rate=t.learning_rate, weight_decay=t.weight_decay,
                                    betas=(t.adam_beta1, t.adam_beta2), eps=t.adam_epsilon)
        configure_deepspeed(self.accelerator, t.per_device_batch_size)
        prepared, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.checkpointer = Checkpointer(self.accelerator, self.output_dir, t.keep_last)
        return prepared

    def register(self, save: Callable[[Path], None], load: Callable[[Path], None]) -> None:
        """Files a checkpoint must hold besides accelerate's state (masks, ...): `save(folder)` on the main process,
        `load(folder)` on every process."""
        self.checkpointer.register(save, load)

    def resume(self, keys: list[str], *, tracker_config: dict[str, Any] | None = None) -> dict[str, Any]:
        """With --resume, load the latest complete checkpoint (refusing one made by a recipe that differs in `keys`)
        and return its state; else `{"step": 0}`. Then record the recipe and start the trackers."""
        state: dict[str, Any] = {"step": 0}
        if self.resuming:
            latest = self.checkpointer.latest()
            if latest is None:
                self.log(f"--resume: no complete checkpoint in {self.checkpointer.root}; starting from step 0")
            else:
                check_resume_compatible((latest / RECIPE_FILE).read_text(), self.recipe, latest, keys)
                state = self.checkpointer.load(latest)
                self.log(f"resumed from {latest} at step {state['step']}")
        if self.accelerator.is_main_process:
            save_recipe(self.recipe, self.output_dir / RECIPE_FILE)
        t = self.recipe.training
        if t.trackers:
            config = {"stage": self.recipe.stage, "max_steps": self.plan.max_steps, "learning_rate": t.learning_rate,
                      "global_batch_size": self.plan.global_batch_size, **(tracker_config or {})}
            self.accelerator.init_trackers("pofa", config=config)
        if self.accelerator.is_main_process and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._progress = tqdm(total=self.plan.max_steps, initial=state["step"], desc=self.recipe.stage,
                                  dynamic_ncols=True, leave=False)
        self._window_start = time.perf_counter()
        return state

    def seconds(self) -> float:
        """Wall time since the stage started."""
        return time.perf_counter() - self.started

    # --- each step ----------------------------------------------------------------------------------------------
    def set_lr(self, factor: float) -> None:
        set_learning_rate(self.optimizer, self.recipe.training.learning_rate * factor)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def stepped(self, items: int) -> None:
        """One optimizer step is done; `items` (tokens or examples, over all processes) were consumed."""
        self._window_items += items
        if self._progress is not None:
            self._progress.update(1)

    def due_log(self, step: int) -> bool:
        return due(step, self.recipe.training.log_every, self.plan.max_steps)

    def due_eval(self, step: int) -> bool:
        return due(step, self.recipe.training.eval_every, self.plan.max_steps)

    def due_save(self, step: int) -> bool:
        """A periodic checkpoint (the last step's is written by `finish`)."""
        return step % self.recipe.training.save_every == 0 and step < self.plan.max_steps

    def log_step(self, step: int, loss: float, unit: str, **extra: float) -> None:
        """The step's log line and tracker values: mean loss since the last line, learning rate, throughput of
        `unit`s (tokens or examples) per second over all processes, and the stage's extras."""
        elapsed = max(time.perf_counter() - self._window_start, 1e-9)
        logs = {"loss": loss, "lr": self.lr, f"{unit}_per_s": self._window_items / elapsed, **extra}
        self.log(f"step {step}: {format_metrics(logs)}")
        self.track(logs, step)
        self._window_start, self._window_items = time.perf_counter(), 0

    def track(self, values: dict[str, Any], step: int) -> None:
        if self.recipe.training.trackers:
            self.accelerator.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def save(self, step: int, state: dict[str, Any]) -> None:
        self.checkpointer.save(step, state, self.recipe)

    # --- the end ------------------------------------------------------------------------------------------------
    def finish(self, step: int, state: dict[str, Any], write: Callable[[Path], None]) -> Path:
        """Write the last checkpoint, then `final/` atomically: `write(folder)` fills a hidden temporary folder on
        the main process, which is renamed to `final/` only once complete. Returns `final/`."""
        if self._progress is not None:
            self._progress.close()
        self.save(step, state)
        final_dir, tmp = self.output_dir / FINAL_DIR, self.output_dir / f".tmp-{FINAL_DIR}"
        if self.accelerator.is_main_process:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
            write(tmp)
            save_recipe(self.recipe, tmp / RECIPE_FILE)
            if final_dir.exists():
                shutil.rmtree(final_dir)
            os.replace(tmp, final_dir)
        self.accelerator.wait_for_everyone()
        if self.recipe.training.trackers:
            self.accelerator.end_training()
        self.log(f"final model: {final_dir} ({self.seconds():.0f} s)")
        # After the last barrier: an upload may take longer than a collective's timeout, so no rank waits for it.
        if self.recipe.hub.repo_id and self.accelerator.is_main_process:
            self.log(f"published: {publish(final_dir, self.recipe.hub)}")
        return final_dir


def publish(final_dir: Path, hub) -> str:  # noqa: ANN001 - pofa.recipe.HubConfig
    """Push `final_dir` with its generated model card (base model and data sets read from the recipe chain) to
    `hub.repo_id`; returns the commit URL. A failure raises PublicationError saying that the model is safe in
    `final_dir` and how to push it again."""
    from huggingface_hub.errors import HfHubHTTPError

    from pofa.hub import HubUnreachableError, PublicationError, push_to_hub

    try:
        return push_to_hub(final_dir, hub.repo_id, private=hub.private, revision=hub.revision, endpoint=hub.endpoint,
                           license=hub.license)
    except (PublicationError, HubUnreachableError, HfHubHTTPError, OSError) as exc:  # OSError: no token
        raise PublicationError(f"hub.repo_id: pushing {final_dir} to {hub.repo_id} failed ({exc}); the model is "
                               f"complete there: push it again with `pofa push {final_dir}`") from exc
