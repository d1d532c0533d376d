"""Atomic, resumable checkpoints and output folders.

A checkpoint is written into a hidden temporary folder by every process (accelerate's `save_state`, plus the files
that stages register: masks, ...), completed with `trainer_state.json`, and only then renamed to `step-NNNNNNNN`.
A rename within one file system is atomic, so a killed save never leaves a folder that looks complete; leftovers of
killed saves are hidden (`.tmp-*`) and removed at the next save. The last `keep_last` complete checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from pofa.recipe import dump_recipe

from pofa.artifacts import CHECKPOINTS_DIR, RECIPE_FILE, TRAINER_STATE_FILE as STATE_FILE  # noqa: F401 (re-export)
STEP_DIR = re.compile(r"^step-(\d{8})$")


class OutputDirError(RuntimeError):
    """The output folder cannot be used as asked; the message says what to pass instead."""


def prepare_output_dir(path: Path, *, resume: bool, overwrite: bool, create: bool = True) -> None:
    """Refuse to write into a non-empty folder unless resuming it or told to overwrite it.

    With `create=False` only the checks run (nothing is written or removed), so a run can refuse early and write
    nothing until its inputs have been validated.
    """
    if resume and overwrite:
        raise OutputDirError("--resume and --overwrite exclude each other")
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"output dir {path} exists and is a file")
    if path.is_dir() and any(path.iterdir()):
        if overwrite:
            if create:
                shutil.rmtree(path)
        elif not resume:
            what = "a pofa run" if (path / RECIPE_FILE).exists() else "files of something else"
            raise OutputDirError(f"output dir {path} already holds {what}; pass --resume to continue that run, "
                                 "--overwrite to replace it, or choose another --output-dir")
    if create:
        path.mkdir(parents=True, exist_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def read_state(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise OutputDirError(f"checkpoint {folder} is unreadable ({exc}); delete it to resume from an older one")


class Checkpointer:
    """Saves and restores the whole training state with accelerate, plus registered extras.

    `register(save, load)`: `save(folder)` runs on the main process after `save_state`; `load(folder)` runs on every
    process after `load_state`. Stages use it for what accelerate does not know about (masks, ...).
    """

    def __init__(self, accelerator, output_dir: Path, keep_last: int):
        self.accelerator = accelerator
        self.root = Path(output_dir) / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.extras: list[tuple[Callable[[Path], None], Callable[[Path], None]]] = []

    def register(self, save: Callable[[Path], None], load: Callable[[Path], None]) -> None:
        self.extras.append((save, load))

    def save(self, step: int, state: dict[str, Any], recipe: Any) -> Path:
        acc = self.accelerator
        final = self.root / f"step-{step:08d}"
        tmp = self.root / f".tmp-step-{step:08d}"
        if acc.is_main_process:
            for leftover in self.root.glob(".tmp-*"):
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()  # every rank's shard (DeepSpeed, FSDP) must be on disk before the folder is completed
        if acc.is_main_process:
            for save, _ in self.extras:
                save(tmp)
            (tmp / RECIPE_FILE).write_text(dump_recipe(recipe))
            (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))  # written last
            if final.exists():  # a checkpoint of this step from before a resume
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.root)[: -self.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root)
        return found[-1] if found else None

    def load(self, folder: Path) -> dict[str, Any]:
        state = read_state(folder)
        try:
            self.accelerator.load_state(str(folder))
            for _, load in self.extras:
                load(folder)
        except Exception as exc:  # noqa: BLE001 - any unreadable part makes this checkpoint unusable: say which
            raise OutputDirError(f"checkpoint {folder} cannot be loaded ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''}); delete that folder to resume "
                                 "from an older checkpoint, or start over with --overwrite") from exc
        return state


def check_resume_compatible(saved_recipe_text: str, recipe: Any, folder: Path, keys: list[str]) -> None:
    """Refuse to resume a checkpoint made by a recipe that differs in a key that changes the run's meaning."""
    import yaml

    saved = yaml.safe_load(saved_recipe_text) or {}
    current = yaml.safe_load(dump_recipe(recipe))
    for key in keys:
        a, b = saved, current
        for part in key.split("."):
            a = a.get(part) if isinstance(a, dict) else None
            b = b.get(part) if isinstance(b, dict) else None
        if a != b:
            raise OutputDirError(f"cannot resume from {folder}: its recipe has {key}={a!r}, this one {b!r}; "
                                 "use the same recipe, or --overwrite / another --output-dir to start a new run")
