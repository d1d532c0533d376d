"""Every command the README shows is run here, as far as offline allows; `pofa quickstart` runs for real (--fast) from
a wheel install in tests/integration/test_packaging.py, the way a user who ran `pip install .` starts it."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
READMES = [ROOT / "README.md", ROOT / "launch" / "README.md"]


def readme_commands(path: Path = READMES[0]) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip() and not line.startswith("#")]


ALL_COMMANDS = [c for path in READMES for c in readme_commands(path)]


def in_image(command: str) -> str:
    """`docker run ... pofa accelerate launch ...` runs its tail in the image's checkout (Dockerfile): check that."""
    if command.startswith("docker run ") and " accelerate launch " in command:
        return command[command.index("accelerate launch"):]
    return command


def test_readme_shows_the_install_and_test_commands_that_ci_runs():
    commands = readme_commands()
    install = next(c for c in commands if "pofa quickstart" in c)
    assert "pip install torch==2.13.0" in install and 'pip install -e ".[dev' in install
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in commands and "python -m pytest -q" in ci
    for extra in re.findall(r'pip install -e "(\.\[[^\]]+\])"', install):
        assert extra in ci


@pytest.mark.parametrize("command", [in_image(c) for c in ALL_COMMANDS
                                     if in_image(c).startswith(("pofa ", "accelerate launch", "torchrun"))])
def test_every_pofa_command_in_the_readmes_parses_and_its_recipe_is_valid(command):
    from pofa.recipe import load_recipe, recipe_class_for

    words = shlex.split(command)
    if "--config_file" in words:
        from accelerate.commands.config.config_args import load_config_from_file

        load_config_from_file(str(ROOT / words[words.index("--config_file") + 1]))
    for i, word in enumerate(words):
        if word == "--recipe":
            recipe = ROOT / words[i + 1] if (ROOT / words[i + 1]).is_file() else words[i + 1]  # a path, or a name
            overrides = [w for w in words[i + 2 :] if "=" in w and not w.startswith("-")]
            load_recipe(recipe, overrides, recipe_class_for(recipe))
    if words[0] == "pofa":
        from pofa.cli import COMMANDS

        assert words[1] in COMMANDS, f"README shows an unknown command: {command}"
