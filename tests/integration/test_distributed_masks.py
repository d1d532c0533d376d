"""Masks under real multi-process training: 2 CPU processes (gloo) per test, launched with torchrun.

Each test runs tests/integration/_dist_masks_worker.py in one MODE: a tiny BERT trains with different data per rank,
is pruned to 90% after dense AdamW steps, trains on, and every rank reports what it sees. See the worker's docstring.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("_dist_masks_worker.py")
TIMEOUT_S = 170  # each run takes 15-35 s alone; leave room for a busy 2-core machine

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(mode: str, out_dir: Path, worker: Path = WORKER) -> list[dict]:
    """`worker MODE OUT_DIR` on 2 torchrun processes (loopback only); each rank's `rankN.json`."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
        str(worker), mode, str(out_dir),
    ]
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_path)
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{mode}: workers did not finish in {TIMEOUT_S} s\n{(error.stderr or '')[-4000:]}")
    if result.returncode != 0:
        output = f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
        pytest.fail(f"{mode}: torchrun exited with {result.returncode}\n{output}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


def assert_same_on_both_ranks(results: list[dict], *keys: str) -> None:
    for key in keys:
        assert results[0][key] == results[1][key], f"{key} differs between ranks"


def test_ddp_masks_identical_and_pruned_weights_zero(tmp_path):
    results = run_workers("ddp", tmp_path)
    assert results[0]["losses"] != results[1]["losses"], "ranks must see different data"
    assert_same_on_both_ranks(results, "mask_digest", "weight_digest")
    for result in results:
        assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert result["pruned_nonzero"] == 0 and result["pruned_exp_avg_nonzero"] == 0
        assert result["check"] == "ok"


def assert_deepspeed_copies_zero(results: list[dict]) -> None:
    assert results[0]["losses"] != results[1]["losses"], "ranks must see different data"
    assert_same_on_both_ranks(results, "mask_digest")
    for result in results:
        assert result["has_masters"], "DeepSpeed should expose fp32 master copies via safe_get_full_fp32_param"
        assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert result["pruned_master_nonzero"] == 0
        assert result["pruned_visible_nonzero"] == 0
        assert result["pruned_exp_avg_nonzero"] == 0
        assert result["check"] == "ok"


@needs_deepspeed
def test_deepspeed_zero2_fp32_master_copies_stay_zero(tmp_path):
    assert_deepspeed_copies_zero(run_workers("zero2", tmp_path))


@needs_deepspeed
def test_deepspeed_zero2_without_guard_revives_master_copies(tmp_path):
    """Sanity check for the test above: zeroing only the visible weights is undone by DeepSpeed's master copies."""
    results = run_workers("zero2-unguarded", tmp_path)
    for result in results:
        assert result["pruned_visible_after_prune"] == 0
        assert result["pruned_master_nonzero"] > 0
        assert result["pruned_visible_nonzero"] > 0
        assert "(fp32 master)" in result["check"]


@needs_deepspeed
def test_deepspeed_zero2_bf16_with_gradient_accumulation(tmp_path):
    assert_deepspeed_copies_zero(run_workers("zero2-bf16-accum", tmp_path))


@needs_deepspeed
def test_deepspeed_zero3_bf16_with_gradient_accumulation(tmp_path):
    assert_deepspeed_copies_zero(run_workers("zero3-bf16-accum", tmp_path))


def test_fsdp2_sharded_weights_and_states_stay_zero(tmp_path):
    pytest.importorskip("torch.distributed.fsdp", reason="torch without FSDP2")
    from torch.distributed import fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip("this torch has no fully_shard (FSDP2)")
    results = run_workers("fsdp2", tmp_path)
    assert results[0]["losses"] != results[1]["losses"], "ranks must see different data"
    assert_same_on_both_ranks(results, "mask_digest")
    for result in results:
        assert result["sharded"], "parameters should be DTensors after fully_shard"
        assert result["sparsity"] == pytest.approx(0.9, abs=1e-3)
        assert result["pruned_nonzero"] == 0 and result["pruned_exp_avg_nonzero"] == 0
        assert result["check"] == "ok"
