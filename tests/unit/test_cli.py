"""The `pofa` command as users reach it: `pofa --version`, `python -m pofa`, `accelerate launch -m pofa.pretrain`."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version

import pytest

import pofa
from pofa.cli import COMMANDS, main


def test_version_is_the_package_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"pofa {pofa.__version__}\n"
    assert version("pofa") == pofa.__version__  # pyproject reads it from pofa.__version__


def test_an_unknown_command_suggests_the_closest(capsys):
    assert main(["recipe"]) == 2
    assert "unknown command 'recipe'; did you mean 'recipes'?" in capsys.readouterr().err


def test_every_command_resolves_to_a_function():
    import importlib

    for name, (target, _) in COMMANDS.items():
        module, _, function = target.partition(":")
        assert callable(getattr(importlib.import_module(module), function or "main")), name


def test_python_dash_m_pofa_is_the_pofa_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pofa", "recipes"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "bert-base-sparse90" in done.stdout


@pytest.mark.parametrize("module", ["pofa.pretrain"])  # pofa.finetune is launched the same way
def test_accelerate_launch_runs_a_stage_as_a_module(tmp_path, module):
    env = {**os.environ, "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", module,
                           "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"usage: pofa {module.split('.')[1]} [-h] --recipe RECIPE" in done.stdout
