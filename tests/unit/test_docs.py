"""Docs agree with the repository: no file refers to a path outside it (a reader of a clone cannot follow one)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# `[w]`, `[s]`: so that this file does not match itself.
# The project's notes outside the repository (the data and style notes) are cited by bare file name too.
OUTSIDE = re.compile(r"/[w]ork/|\.\.[/\\][s]hared\b|(?<![\w./-])[s]hared/|\b[D]ATA\.md|\b[S]TYLE\.md")


def repository_files() -> list[Path]:
    """Tracked files, and new files git would add (not ignored), that exist in the working tree."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return [ROOT / name for name in sorted(set(listed)) if name and (ROOT / name).is_file()]


def test_no_file_refers_to_a_path_outside_the_repository():
    found = []
    for path in repository_files():
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        for number, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE.search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, "paths outside the repository (state the facts, or cite a file in it):\n" + "\n".join(found)


@pytest.mark.parametrize("text", ["see /{0}/shared/{1}.md".format("work", "DATA"), "in ../{0}".format("shared"),
                                  "({0}/{1}.md)".format("shared", "DATA"), "`{0}/{1}.md`".format("shared", "STYLE"),
                                  "(see {0}.md)".format("DATA")])
def test_the_pattern_catches_outside_paths(text):
    assert OUTSIDE.search(text)


@pytest.mark.parametrize("text", ['TarInfo("../outside.txt")', "DeepSpeed's shared-memory op", "runs/shared/x"])
def test_the_pattern_leaves_repository_paths_alone(text):
    assert not OUTSIDE.search(text)
