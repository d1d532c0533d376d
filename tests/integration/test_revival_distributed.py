"""Revival under sharded training: 2 CPU processes (gloo) per test, launched with torchrun.

Each test runs _revival_dist_worker.py in one MODE (DeepSpeed ZeRO-2 / ZeRO-3 in bf16, FSDP2); see its docstring.
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
WORKER = Path(__file__).with_name("_revival_dist_worker.py")
TIMEOUT_S = 170  # each run takes 20-40 s alone; leave room for a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_workers(mode: str, out_dir: Path) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(WORKER), mode, str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"{mode}: workers did not finish in {TIMEOUT_S} s\n{(error.stderr or '')[-4000:]}")
    if result.returncode != 0:
        output = f"{result.stdout[-2000:]}\n{result.stderr[-6000:]}"
        pytest.fail(f"{mode}: torchrun exited with {result.returncode}\n{output}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.parametrize("mode", [
    pytest.param("zero2", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="deepspeed not installed")),
    pytest.param("zero3", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="deepspeed not installed")),
    "fsdp2",
])
def test_revived_weights_return_in_every_copy_with_zero_moments(mode, tmp_path):
    results = run_workers(mode, tmp_path)
    assert results[0]["mask_digest"] == results[1]["mask_digest"], "masks differ between ranks"
    for result in results:
        # 90% -> 50%: exactly 40% of the weights come back (per tensor, rounded), with their stored values.
        assert result["revived"] == pytest.approx(0.4 * result["numel"], abs=6)
        assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert result["stored_ok"] and result["master_ok"] and result["visible_ok"] and result["moments_zero"]
