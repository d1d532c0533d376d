"""bench/gpu_check.py is never shipped un-run: its smoke mode (CPU, tiny BERT) goes through the same launches, the same
`pofa.pretrain` loop and the same checks as the GPU run, and its arithmetic is checked here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import BertConfig

from tests.conftest import load_bench_script

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def load_script():
    return load_bench_script("gpu_check", SCRIPT)


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H200", 989.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0), ("NVIDIA A10", 125.0),
    ("Tesla V100-SXM2-16GB", None),
])
def test_peak_table_matches_device_names(name, peak):
    assert load_script().peak_bf16_tflops(name) == peak


def test_flops_per_token_of_the_bert_base_student_step():
    check = load_script()
    config = BertConfig()
    # Per token, forward: 12 layers x (2 x 7,077,888 Linear weights + 2 x 2 x 128 x 768 attention) + MLM head at
    # every position 2 x (768^2 + 768 x 30522).
    forward = 12 * (2 * (4 * 768**2 + 2 * 768 * 3072) + 4 * 128 * 768) + 2 * (768**2 + 768 * 30522)
    assert check.forward_flops_per_token(config, 128, 1.0) == forward
    assert check.student_step_flops_per_token(config, 128, 1.0) == 4 * forward
    assert check.student_step_flops_per_token(config, 128, 1.0, teacher=False) == 3 * forward
    assert forward == pytest.approx(2 * 109e6, rel=0.1)  # the "2 x params" rule, attention included


def test_steady_throughput_reads_the_stage_log_after_warm_up():
    lines = ["step 0: held-out mlm_loss 10", "step 10: loss 9 lr 1e-05 tokens_per_s 1000 sparsity 0.9",
             "step 20: loss 8 lr 1e-05 tokens_per_s 2000 sparsity 0.9",
             "step 30: loss 8 lr 1e-05 tokens_per_s 4000 sparsity 0.9"]
    rate, steps = load_script().steady_tokens_per_s(lines, after_step=10)
    assert steps == 20 and rate == pytest.approx(20 / (10 / 2000 + 10 / 4000))
    assert load_script().steady_tokens_per_s(lines[:2], after_step=10) is None


def test_arguments_are_checked():
    check = load_script()
    with pytest.raises(SystemExit, match="unknown"):
        check.parse_args(["--backends", "ddp,zero5"])
    with pytest.raises(SystemExit, match="multiple"):
        check.parse_args(["--warmup-steps", "10", "--steady-steps", "15"])


def test_smoke_run_prints_one_json_line_with_every_backend_checked(tmp_path):
    process = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--work-dir", str(tmp_path)], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    lines = process.stdout.strip().splitlines()
    assert len(lines) == 1, process.stdout[-2000:] + process.stderr[-2000:]
    report = json.loads(lines[0])
    assert process.returncode == 0 and report["ok"], json.dumps(report, indent=1)
    backends = report["backends"]
    assert backends["zero2"]["distributed_type"] == "DistributedType.DEEPSPEED"
    for name in ("ddp", "zero2"):
        entry = backends[name]
        assert entry["tokens_per_s"] > 0 and entry["steady_steps"] == 2, name
        assert entry["masks"] == {"checked": True, "pattern": "unstructured", "weights": 13, "sparsity": 0.9002}
        assert entry["attention"] == "sdpa"
        assert "pruning event, target sparsity 0.9000" in entry["events"][0]
    assert "FSDP" in backends["fsdp2"]["skipped"]
    assert report["semi_structured_2_4"]["two_four_linears"] == 12
    assert not list(tmp_path.iterdir())  # the temporary folders are removed
