"""The Trainer adapter under DeepSpeed: a user's own `transformers.Trainer` with `SparsityLockCallback`, 2 CPU
processes (torchrun, gloo), ZeRO-2 in fp32 and ZeRO-3 in bf16, gradient accumulation, a checkpoint mid-run and a
resume from it.

DeepSpeed keeps fp32 master copies that its optimizer updates and copies back over the module's weights, so a lock
that only looked at the module would be undone at the next step; the worker reads those master copies back. Without
the callback the same run makes the model dense, which shows what is being tested. FSDP through the Trainer is not
run here: accelerate applies its FSDP plugin to GPU processes only (pofa's own FSDP2 masks are tested directly in
test_distributed_masks.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tests.integration.test_distributed_masks import run_workers

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")]
WORKER = Path(__file__).with_name("_trainer_deepspeed_worker.py")


def assert_locked(mode: str, results: list[dict]) -> None:
    for rank, result in enumerate(results):
        print(f"{mode} rank {rank}: {result}")
        assert result["pruned"] > 0 and result["kept_moved"] > 0, "nothing was pruned, or nothing trained"
        assert result["nonzero_visible"] == 0, f"rank {rank}: pruned weights became non-zero in the module"
        assert result["nonzero_master"] == 0, f"rank {rank}: DeepSpeed's fp32 master copies revived pruned weights"
        assert result["checkpoint_pattern"], f"rank {rank}: a checkpoint lacks the pattern in masks.safetensors"
    assert results[0]["weight_digest"] == results[1]["weight_digest"], "the ranks' models differ"


@pytest.mark.parametrize("mode", ["zero2", "zero3-bf16"])
def test_the_callback_keeps_deepspeeds_master_copies_pruned(tmp_path, mode):
    assert_locked(mode, run_workers(mode, tmp_path / mode, worker=WORKER))
    # Resumed from the step-2 checkpoint: DeepSpeed reloads its master copies and moments, the lock takes them over.
    resumed = f"{mode}-resume"
    assert_locked(resumed, run_workers(resumed, tmp_path / resumed, worker=WORKER))


def test_without_the_callback_deepspeed_makes_the_model_dense(tmp_path):
    results = run_workers("zero2-unlocked", tmp_path, worker=WORKER)
    for result in results:
        assert result["nonzero_master"] > 0.9 * result["pruned"]
        assert result["nonzero_visible"] > 0.9 * result["pruned"]
        assert not result["checkpoint_pattern"]
