"""The Dockerfile, read with a Dockerfile parser (no Docker engine needed): a pinned CUDA PyTorch base whose torch
satisfies pyproject.toml, pofa installed from the checkout with the DeepSpeed extra at the exact versions of
launch/docker-constraints.txt, a user that is not root, the Hugging Face cache on a volume, no secret in the image,
a .dockerignore that keeps runs/ and .git out, and every copied path present."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
CONSTRAINTS = ROOT / "launch" / "docker-constraints.txt"
# The official images: pytorch/pytorch:<torch>-cuda<x.y>-cudnn<n>-<runtime|devel>, optionally with a digest.
PYTORCH_TAG = re.compile(r"^(?:docker\.io/)?pytorch/pytorch:(?P<torch>\d+\.\d+\.\d+)-cuda(?P<cuda>\d+\.\d+)"
                         r"-cudnn(?P<cudnn>\d+)-(?:runtime|devel)(?:@sha256:[0-9a-f]{64})?$")
# A name part that says secret: HF_TOKEN, WANDB_API_KEY, AWS_SECRET_ACCESS_KEY (not TOKENIZERS_PARALLELISM).
SECRET_NAME = re.compile(r"(^|_)(\w*TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|(API|ACCESS)_?KEY)(_|$)", re.IGNORECASE)


@pytest.fixture(scope="module")
def dockerfile():
    pytest.importorskip("dockerfile_parse", reason="the dev extra's Dockerfile parser: pip install -e '.[dev]'")
    from dockerfile_parse import DockerfileParser

    return DockerfileParser(path=str(ROOT / "Dockerfile"))


def instructions(dockerfile, name: str) -> list[str]:
    return [item["value"] for item in dockerfile.structure if item["instruction"] == name]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def pins() -> dict[str, Version]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            specifiers = list(requirement.specifier)
            assert len(specifiers) == 1 and specifiers[0].operator == "==", f"not an exact pin: {line}"
            out[canonicalize_name(requirement.name)] = Version(specifiers[0].version)
    return out


def base_torch(dockerfile) -> Version:
    match = PYTORCH_TAG.match(dockerfile.baseimage)
    assert match, f"FROM {dockerfile.baseimage}: expected an official pytorch/pytorch:<torch>-cuda<x.y>-... tag"
    return Version(match["torch"])


def test_base_image_is_a_pinned_cuda_pytorch_tag_that_satisfies_the_torch_requirement(dockerfile):
    froms = instructions(dockerfile, "FROM")
    assert len(froms) == 1, "one stage: the image the tests describe"
    assert ":latest" not in dockerfile.baseimage and ":" in dockerfile.baseimage.split("/")[-1]
    torch_version = base_torch(dockerfile)
    torch_requirement = next(Requirement(r) for r in pyproject()["project"]["dependencies"]
                             if canonicalize_name(Requirement(r).name) == "torch")
    assert torch_requirement.specifier.contains(torch_version), f"{torch_version} fails pyproject's {torch_requirement}"


def test_pip_installs_the_checkout_with_the_deepspeed_extra_at_the_pinned_versions(dockerfile):
    assert "deepspeed" in pyproject()["project"]["optional-dependencies"]
    installs = [shlex.split(run) for run in instructions(dockerfile, "RUN") if "pip install" in run]
    checkout = [words for words in installs if ".[deepspeed]" in words]
    assert len(checkout) == 1, "expected one `pip install ... .[deepspeed]` of the checkout"
    words = checkout[0]
    assert "-e" not in words and words[words.index("-c") + 1] == "launch/docker-constraints.txt"
    # Every pip install in the image is held to the pins (as requirements or as constraints).
    for words in installs:
        assert "launch/docker-constraints.txt" in words, f"pip install without the pins: {shlex.join(words)}"
    assert dockerfile.envs.get("DS_BUILD_OPS") == "0"  # DeepSpeed's ops: compiled at first use, not at install


def test_constraints_pin_every_dependency_within_pyproject_ranges_and_the_image_torch(dockerfile):
    pinned = pins()
    project = pyproject()["project"]
    for line in project["dependencies"] + project["optional-dependencies"]["deepspeed"]:
        requirement = Requirement(line)
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{name}: a dependency of pofa[deepspeed] without a pin in {CONSTRAINTS.name}"
        assert requirement.specifier.contains(pinned[name]), f"{name}=={pinned[name]} fails pyproject's {requirement}"
    image_torch = base_torch(dockerfile)
    assert pinned["torch"] == image_torch, "the torch pin must be the base image's torch (or pip replaces it)"
    cuda_build = f"{image_torch}+cu{PYTORCH_TAG.match(dockerfile.baseimage)['cuda'].replace('.', '')}"
    assert SpecifierSet(f"=={pinned['torch']}").contains(cuda_build)  # the image's local build label satisfies it


def test_a_user_that_is_not_root_runs_the_entrypoint(dockerfile):
    order = [(item["instruction"], item["value"].strip()) for item in dockerfile.structure]
    users = [i for i, (name, _) in enumerate(order) if name == "USER"]
    assert users, "no USER: the image would run as root"
    last = users[-1]
    assert order[last][1].split(":")[0] not in ("root", "0")
    starts = [i for i, (name, _) in enumerate(order) if name in ("ENTRYPOINT", "CMD")]
    assert starts and all(i > last for i in starts)


def test_hugging_face_cache_is_a_declared_volume(dockerfile):
    hf_home = dockerfile.envs.get("HF_HOME")
    assert hf_home == "/data/hf"
    volumes = []
    for value in instructions(dockerfile, "VOLUME"):
        volumes += json.loads(value) if value.strip().startswith("[") else value.split()
    assert hf_home in volumes
    assert dockerfile.envs.get("POFA_CACHE", "").startswith(hf_home)  # tokenized corpora survive the container too


def test_no_token_or_secret_is_baked_into_the_image(dockerfile):
    for name in (*dockerfile.envs, *dockerfile.args):
        assert not SECRET_NAME.search(name), f"{name}: pass secrets at run time (docker run -e NAME), not in the image"
    text = (ROOT / "Dockerfile").read_text()
    assert not re.search(r"\bhf_[A-Za-z0-9]{20,}", text), "a Hugging Face token is written in the Dockerfile"
    # The README passes the token by name (taken from the caller's environment), never by value.
    runs = [c for c in readme_lines() if c.startswith("docker run")]
    assert runs and all("-e HF_TOKEN " in c and "HF_TOKEN=" not in c for c in runs)
    assert all(f":{dockerfile.envs['HF_HOME']}" in c for c in runs), "the README's docker run mounts no Hub cache"


@pytest.mark.parametrize("name, secret", [("HF_TOKEN", True), ("HUGGING_FACE_HUB_TOKEN", True), ("HFTOKEN", True),
                                          ("WANDB_API_KEY", True), ("AWS_SECRET_ACCESS_KEY", True),
                                          ("TOKENIZERS_PARALLELISM", False), ("USER_UID", False),
                                          ("PIP_DISABLE_PIP_VERSION_CHECK", False)])
def test_secret_names_are_recognised(name, secret):
    assert bool(SECRET_NAME.search(name)) == secret


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str) -> bool:
    """Whether .dockerignore leaves `path` (relative, '/'-separated) out of the build context: a pattern excludes a
    path or any folder above it, `**/` at any depth, and a later `!pattern` brings a path back."""
    parts = path.strip("/").split("/")
    result = False
    for pattern in dockerignore():
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        anywhere = pattern.startswith("**/")
        pattern = pattern.removeprefix("**/")
        for end in range(1, len(parts) + 1):  # the path and every folder above it
            starts = range(end) if anywhere else [0]
            if any(fnmatch.fnmatchcase("/".join(parts[start:end]), pattern) for start in starts):
                result = not keep
    return result


@pytest.mark.parametrize("path", ["runs", "runs/x/final/model.safetensors", ".git", ".git/HEAD",
                                  "pofa/__pycache__/x.pyc", "pofa.egg-info", ".pytest_cache"])
def test_dockerignore_keeps_results_history_and_caches_out(path):
    assert ignored(path), path


def test_every_copied_path_exists_and_reaches_the_build_context(dockerfile):
    copied = []
    for value in instructions(dockerfile, "COPY") + instructions(dockerfile, "ADD"):
        words = [w for w in shlex.split(value) if not w.startswith("--")]
        assert len(words) >= 2 and "--from" not in value, value
        copied += words[:-1]
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source), f"COPY {source}: left out of the build context by .dockerignore"
    # What README and the entry point run from the working directory: the code (its recipes inside), the launch files.
    assert dockerfile.structure and instructions(dockerfile, "WORKDIR") == ["/workspace"]
    assert {"pofa/", "launch/"} <= set(copied)


def test_entrypoint_shows_the_usage_and_runs_a_given_command(dockerfile):
    entrypoint = json.loads(instructions(dockerfile, "ENTRYPOINT")[-1])
    script = entrypoint[-1]
    assert script.startswith("/workspace/launch/")
    local = ROOT / script.removeprefix("/workspace/")
    assert json.loads(instructions(dockerfile, "CMD")[-1]) == ["--help"]
    usage = subprocess.run(["bash", str(local)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0, usage.stderr
    assert "usage: docker run" in usage.stdout and "accelerate launch --config_file launch/" in usage.stdout
    for path in re.findall(r"\b(?:launch|pofa/recipes)/[\w.-]+\.yaml", usage.stdout):
        assert (ROOT / path).is_file(), f"the usage names {path}, which does not exist"
    done = subprocess.run(["bash", str(local), "echo", "ran", "a command"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout == "ran a command\n"


def readme_lines() -> list[str]:
    from tests.integration.test_readme import readme_commands

    return readme_commands(ROOT / "README.md")


def test_readme_shows_how_to_build_and_run_the_image():
    lines = readme_lines()
    assert "docker build -t pofa ." in lines
    runs = [c for c in lines if c.startswith("docker run")]
    assert runs and all("--gpus all" in c and "/workspace/runs" in c and " pofa accelerate launch " in c for c in runs)
