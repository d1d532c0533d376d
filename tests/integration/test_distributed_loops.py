"""The real `pofa/pretrain.py` under 2 CPU processes (torchrun, gloo): DDP, DeepSpeed ZeRO-2 and ZeRO-3.

Student pruning with distillation runs to 80% sparsity in each; the final models must agree with each other, be
exactly sparse, and DeepSpeed's own fp32 master copies (read back from its checkpoint) must be zero where pruned.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pofa.sparsity import MaskStore

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_model_dir) -> Path:
    folder = tmp_path_factory.mktemp("dist")
    recipe = {
        "stage": "student", "model": {"name_or_path": str(tiny_model_dir)},
        "data": {"sources": [{"embedded": "python-docs", "max_documents": 60}], "max_seq_length": 32,
                 "eval_fraction": 0.1, "max_eval_blocks": 32, "cache_dir": str(folder / "cache")},
        "training": {"max_steps": 8, "per_device_batch_size": 4, "learning_rate": 1e-3, "eval_every": 4,
                     "save_every": 4, "log_every": 4},
        "pruning": {"enabled": True, "target_sparsity": 0.8, "end_step": 6, "frequency": 2},
        "distillation": {"teacher": str(tiny_model_dir)},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def launch(recipe: Path, out: Path, **env_extra: str) -> str:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(REPO / "pofa" / "pretrain.py"), "--recipe", str(recipe),
               "--output-dir", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env_extra)
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    assert "8 steps x 8 sequences (2 process(es)" in result.stdout  # really two processes
    return result.stdout


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM.from_pretrained(out / "final").state_dict()


def assert_exactly_sparse(out: Path) -> MaskStore:
    masks = MaskStore.load(out / "final" / "masks.safetensors")
    weights = final_weights(out)
    for name, mask in masks.items():
        assert torch.equal(weights[name] != 0, mask), name
        assert int((~mask).sum()) == round(0.8 * mask.numel())
    return masks


def assert_same_training(reference: Path, other: Path) -> None:
    """The two runs did the same optimisation, up to the order in which floats were summed.

    Pruning is discontinuous: ZeRO's bucketed reduce-scatter sums gradients in another order than DDP's all-reduce
    (and another CPU takes other kernels), so a weight within float noise of the magnitude threshold (about 1e-5 apart
    in these 32x32 matrices) may be pruned in one run and kept in the other, and it moves its neighbours' Adam steps a
    little. Such ties may flip a few entries; a real fault (gradients not averaged across ranks, a step lost, masks
    applied to the wrong shard) moves most entries by about the learning rate (1e-3 per step).
    """
    reference_masks = MaskStore.load(reference / "final" / "masks.safetensors")
    other_masks = dict(MaskStore.load(other / "final" / "masks.safetensors").items())
    for name, mask in reference_masks.items():
        flipped = int((mask != other_masks[name]).sum())
        assert flipped <= 0.01 * mask.numel(), f"{name}: {flipped} of {mask.numel()} mask entries differ"
    first, second = final_weights(reference), final_weights(other)
    for name in first:
        close = torch.isclose(first[name], second[name], rtol=0, atol=1e-4)
        largest = (first[name] - second[name]).abs().max().item()
        assert close.float().mean() >= 0.99, (
            f"{name}: {int((~close).sum())} of {close.numel()} weights differ by more than 1e-4 (largest {largest:.2e})")


@pytest.fixture(scope="module")
def ddp_run(recipe_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "run"
    launch(recipe_file, out)
    return out


def test_ddp_student_is_exactly_sparse(ddp_run):
    assert_exactly_sparse(ddp_run)


@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_keeps_master_copies_pruned_and_matches_ddp(recipe_file, ddp_run, tmp_path, stage):
    out = tmp_path / f"zero{stage}"
    launch(recipe_file, out, ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE=str(stage))
    masks = assert_exactly_sparse(out)
    assert_same_training(ddp_run, out)

    # DeepSpeed's fp32 master weights, as its checkpoint stores them (what the optimizer actually updates).
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = out / "checkpoints" / "step-00000008"
    master = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag="pytorch_model")
    for name, mask in masks.items():
        value = master[f"model.{name}"].reshape(mask.shape)
        assert int((value[~mask] != 0).sum()) == 0, f"{name}: DeepSpeed fp32 master copy revived pruned weights"


@pytest.mark.parametrize("deepspeed", [False, pytest.param(True, marks=needs_deepspeed)], ids=["ddp", "zero2"])
def test_sparse_transfer_under_two_processes_keeps_the_pattern(ddp_run, tiny_model_dir, tmp_path, deepspeed):
    import csv
    import json
    import random

    rng = random.Random(0)
    files = {}
    for split, n in (("train", 64), ("validation", 21)):  # 21: uneven shards over 2 processes
        files[split] = tmp_path / f"{split}.csv"
        with open(files[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for i in range(n):
                writer.writerow([" ".join(rng.choices(["true", "value"] if i % 2 else ["false", "error"], k=5)), i % 2])
    recipe = tmp_path / "ft.yaml"
    recipe.write_text(yaml.safe_dump({
        "stage": "finetune", "model": {"name_or_path": str(ddp_run / "final")},
        "task": {"name": "sst2", "data_files": {k: str(v) for k, v in files.items()}, "max_seq_length": 32},
        "training": {"max_steps": 6, "per_device_batch_size": 4, "learning_rate": 1e-3, "eval_batch_size": 4},
        "distillation": {"teacher": str(tiny_model_dir)}}))
    out = tmp_path / "ft"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    if deepspeed:
        env.update(ACCELERATE_USE_DEEPSPEED="true", ACCELERATE_DEEPSPEED_ZERO_STAGE="2")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), str(REPO / "pofa" / "finetune.py"), "--recipe", str(recipe),
               "--output-dir", str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-5000:]
    masks = MaskStore.load(ddp_run / "final" / "masks.safetensors")
    weights = load_file(out / "final" / "model.safetensors")
    for name, mask in masks.items():
        assert torch.equal(weights[name] != 0, mask), f"{name}: zero pattern changed"
    metrics = json.loads((out / "final" / "eval_results.json").read_text())["metrics"]
    assert 0.0 <= metrics["validation/accuracy"] <= 1.0
    assert round(metrics["validation/accuracy"] * 21) == pytest.approx(metrics["validation/accuracy"] * 21)
