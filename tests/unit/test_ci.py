"""The CI guard of tests/conftest.py: under POFA_REQUIRE_NETWORK=1 (set by .ci/run) a skipped `network` test fails
the run, unless POFA_CI_OFFLINE=1 says the machine is offline, which prints a banner instead.

Two cases run pytest in a subprocess on a generated test file, with a copy of the real conftest.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]

TESTS = '''
import pytest

@pytest.mark.network
def test_real_data_unreachable():
    pytest.skip("PyPI unreachable (simulated)")

@pytest.mark.network
def test_real_data_deselected():
    pass

@pytest.mark.network
def test_real_data_that_runs():
    pass

@pytest.mark.network
@pytest.mark.xfail(reason="an expected failure is not a skip")
def test_real_data_xfail():
    raise AssertionError

def test_offline():
    pass
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("guard")
    shutil.copy(ROOT / "tests" / "conftest.py", folder / "conftest.py")
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    network: real data\n")
    (folder / "test_fake.py").write_text(TESTS)
    return folder


def run_pytest(folder: Path, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("POFA_REQUIRE_NETWORK", "POFA_CI_OFFLINE")}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not deselected"],
                          cwd=folder, env={**clean, **env}, capture_output=True, text=True, timeout=300)


def test_ci_fails_when_a_network_test_is_skipped_or_deselected(project):
    done = run_pytest(project, POFA_REQUIRE_NETWORK="1")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "2 real-data (network) test(s) did not run" in done.stdout
    assert "test_real_data_unreachable: PyPI unreachable (simulated)" in done.stdout
    assert "test_real_data_deselected: deselected" in done.stdout
    assert "test_real_data_that_runs" not in done.stdout and "test_real_data_xfail" not in done.stdout
    assert "POFA_CI_OFFLINE=1" in done.stdout  # says how to accept it


def test_offline_ci_passes_with_a_banner(project):
    done = run_pytest(project, POFA_REQUIRE_NETWORK="1", POFA_CI_OFFLINE="1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "POFA_CI_OFFLINE=1: 2 REAL-DATA (network) TEST(S) DID NOT RUN" in done.stdout
    assert "test_real_data_unreachable: PyPI unreachable (simulated)" in done.stdout


@pytest.mark.parametrize("offline, before, after", [
    (False, pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED),
    (False, pytest.ExitCode.TESTS_FAILED, pytest.ExitCode.TESTS_FAILED),
    (False, pytest.ExitCode.NO_TESTS_COLLECTED, pytest.ExitCode.NO_TESTS_COLLECTED),  # never turned into a pass
    (True, pytest.ExitCode.OK, pytest.ExitCode.OK),
    (True, pytest.ExitCode.NO_TESTS_COLLECTED, pytest.ExitCode.NO_TESTS_COLLECTED),
])
def test_the_guard_only_turns_a_pass_into_a_failure(offline, before, after):
    from tests.conftest import NetworkGuard

    guard = NetworkGuard(offline=offline)
    session = SimpleNamespace(exitstatus=before)
    guard.pytest_sessionfinish(session, before)
    assert session.exitstatus == before  # nothing recorded: nothing changes
    guard.not_run["t.py::test_x"] = "deselected"
    guard.pytest_sessionfinish(session, before)
    assert session.exitstatus == after


def test_ci_runs_the_readme_test_command_with_the_guard_on():
    script = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q\n" in readme
    commands = [line for line in script.splitlines() if line.startswith("python -m pytest")]
    assert commands == ["python -m pytest -q -p no:cacheprovider"]  # README's command; the flag changes no test
    assert script.index("export POFA_REQUIRE_NETWORK=1") < script.index(commands[0])
