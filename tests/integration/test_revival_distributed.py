"""Revival under sharded training: 2 CPU processes (gloo) per test, launched with torchrun.

Each test runs _revival_dist_worker.py in one MODE (DeepSpeed ZeRO-2 / ZeRO-3 in bf16, FSDP2); see its docstring.
"""

import importlib.util
from pathlib import Path

import pytest

from tests.integration.test_distributed_masks import run_workers

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("_revival_dist_worker.py")


@pytest.mark.parametrize("mode", [
    pytest.param("zero2", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="deepspeed not installed")),
    pytest.param("zero3", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                   reason="deepspeed not installed")),
    "fsdp2",
])
def test_revived_weights_return_in_every_copy_with_zero_moments(mode, tmp_path):
    results = run_workers(mode, tmp_path, WORKER)
    assert results[0]["mask_digest"] == results[1]["mask_digest"], "masks differ between ranks"
    for result in results:
        # 90% -> 50%: exactly 40% of the weights come back (per tensor, rounded), with their stored values.
        assert result["revived"] == pytest.approx(0.4 * result["numel"], abs=6)
        assert result["sparsity"] == pytest.approx(0.5, abs=1e-3)
        assert result["stored_ok"] and result["master_ok"] and result["visible_ok"] and result["moments_zero"]
