"""2:4 sparsity through the real loops: student pruning with `pruning.pattern: 2:4`, sparse transfer with QAT, and
the exports (compact checkpoint, int8 ONNX) all keep a pattern that is N:M, not only the same zeros."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pofa.sparsity import MaskStore, nm_violations
from tests.integration.test_finetune import recipe as finetune_recipe
from tests.integration.test_finetune import sentiment_files  # noqa: F401 (a fixture)
from tests.integration.test_student import student_recipe

TWO_FOUR = {"pattern": "2:4", "target_sparsity": 0.5}


def assert_two_four(state: dict[str, torch.Tensor], masks: MaskStore, where: str) -> None:
    """Every masked weight of `state` is zero where pruned and has at most 2 non-zeros in each group of 4."""
    for name, mask in masks.items():
        weight = state[name]
        assert not bool((weight[~mask] != 0).any()), f"{where}: {name} is non-zero where pruned"
        assert nm_violations(weight != 0, (2, 4)) == 0, f"{where}: {name} is not 2:4"


@pytest.fixture(scope="module")
def two_four_student(tiny_model_dir, tmp_path_factory):
    from pofa.pretrain import train

    out = tmp_path_factory.mktemp("nm")
    result = train(student_recipe(tiny_model_dir, out / "student", out / "cache", pruning=TWO_FOUR))
    return result.final_dir


def test_student_stage_ramps_to_two_four_and_records_it(two_four_student, capsys):
    final = two_four_student
    masks = MaskStore.load(final / "masks.safetensors")
    assert masks.pattern == "2:4" and len(masks) == 12
    weights = load_file(final / "model.safetensors")
    assert_two_four(weights, masks, "student")
    for name, mask in masks.items():
        assert torch.equal(mask, weights[name] != 0) and int((~mask).sum()) == mask.numel() // 2, name
    report = json.loads((final / "sparsity.json").read_text())
    assert report["pattern"] == "2:4" and report["targets"]["sparsity"] == pytest.approx(0.5)


def test_ramp_events_say_when_the_masks_become_two_four(tiny_model_dir, tmp_path, capsys):
    from pofa.pretrain import train

    train(student_recipe(tiny_model_dir, tmp_path / "s", tmp_path / "cache", pruning=TWO_FOUR,
                         training={"max_steps": 9}))
    events = [line for line in capsys.readouterr().out.splitlines() if "pruning event" in line]
    # end_step 8, frequency 2: the ramp's masks are not 2:4 yet; from the event at the target on they are.
    assert [line.rsplit("masks ", 1)[1] for line in events] == ["unstructured"] * 4 + ["2:4"]
    assert "target sparsity 0.5000, achieved 0.5000, masks 2:4" in events[-1]


def test_a_run_killed_after_the_pattern_is_reached_resumes_with_it(two_four_student, tiny_model_dir, tmp_path,
                                                                    kill_after_checkpoint):
    from pofa.pretrain import train
    from tests.conftest import assert_same_safetensors

    recipe = student_recipe(tiny_model_dir, tmp_path / "s", tmp_path / "cache", pruning=TWO_FOUR)
    with pytest.raises(kill_after_checkpoint(10)):  # after the event at step 8 reached 2:4; another event at 10
        train(recipe)
    assert MaskStore.load(tmp_path / "s" / "checkpoints" / "step-00000010" / "masks.safetensors").pattern == "2:4"
    resumed = train(recipe, resume=True)
    assert MaskStore.load(resumed.final_dir / "masks.safetensors").pattern == "2:4"
    assert_same_safetensors(two_four_student / "model.safetensors", resumed.final_dir / "model.safetensors",
                            "weights after a resume at 2:4")


def test_fine_tuning_with_qat_keeps_two_four_in_the_model_the_compact_file_and_onnx(two_four_student, tmp_path,
                                                                                   sentiment_files):
    import onnx
    from onnx import numpy_helper

    from pofa.compact import load_compact, save_compact
    from pofa.finetune import finetune

    masks = MaskStore.load(two_four_student / "masks.safetensors")
    # The pre-trained model round-trips through the compact format bit for bit, its 2:4 zeros included.
    weights = load_file(two_four_student / "model.safetensors")
    compact = save_compact(weights, tmp_path / "student.compact.safetensors", masks=dict(masks.items()))
    restored = load_compact(compact)
    assert all(torch.equal(restored[name], weights[name]) for name in weights)
    assert_two_four(restored, masks, "compact (fp32)")

    result = finetune(finetune_recipe(two_four_student, tmp_path / "qat", sentiment_files, training={"max_steps": 4},
                                      quantization={"enabled": True, "weight_bits": 7},
                                      export={"onnx": True, "compact": True}))
    final = result.final_dir
    locked = MaskStore.load(final / "masks.safetensors")
    assert locked.pattern == "2:4"
    assert all(torch.equal(locked[name], masks[name]) for name in masks)
    tuned = load_file(final / "model.safetensors")
    assert_two_four(tuned, locked, "fine-tuned with QAT")
    assert json.loads((final / "sparsity.json").read_text())["pattern"] == "2:4"
    assert_two_four(load_compact(final / "compact.safetensors"), locked, "compact (int8)")

    # int8 ONNX: each encoder Linear's int8 initializer (W, or W^T for MatMul) is zero wherever its mask prunes (a
    # small kept weight may round to 0 as well), so its non-zeros are 2:4.
    graph = onnx.load(str(final / "model.onnx")).graph
    int8 = [torch.from_numpy(numpy_helper.to_array(t).copy()) != 0 for t in graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8) == 12
    for name, mask in locked.items():
        oriented = [nonzero for candidate in int8 for nonzero in (candidate, candidate.T)
                    if nonzero.shape == mask.shape and not bool((nonzero & ~mask).any())]
        assert oriented, f"no int8 ONNX weight is zero where {name} is pruned"
        assert nm_violations(oriented[0], (2, 4)) == 0, name
