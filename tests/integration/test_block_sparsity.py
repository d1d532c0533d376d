"""1x4 block sparsity through the real loops: student pruning with `pruning.pattern: 1x4` keeps whole blocks at
every event, sparse transfer with QAT locks them, and the compact checkpoint, the int8 ONNX file and the sparse int8
runtime all keep them (the runtime then runs one group of 4 input features per kept block)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pofa.sparsity import MaskStore, block_violations
from tests.integration.test_finetune import recipe as finetune_recipe
from tests.integration.test_finetune import sentiment_files  # noqa: F401 (a fixture)
from tests.integration.test_student import student_recipe

ONE_BY_FOUR = {"pattern": "1x4", "target_sparsity": 0.75}


def assert_blocks(state: dict[str, torch.Tensor], masks: MaskStore, where: str) -> None:
    """Every masked weight of `state` is zero where pruned and its non-zeros lie in whole kept 1x4 blocks."""
    for name, mask in masks.items():
        weight = state[name]
        assert not bool((weight[~mask] != 0).any()), f"{where}: {name} is non-zero where pruned"
        assert block_violations(mask, (1, 4), name) == 0, f"{where}: {name} mask is not whole 1x4 blocks"


@pytest.fixture(scope="module")
def block_student(tiny_model_dir, tmp_path_factory):
    from pofa.pretrain import train

    out = tmp_path_factory.mktemp("block")
    return train(student_recipe(tiny_model_dir, out / "student", out / "cache", pruning=ONE_BY_FOUR)).final_dir


def test_student_stage_prunes_whole_blocks_at_every_event(tiny_model_dir, tmp_path, capsys):
    from pofa.pretrain import train

    result = train(student_recipe(tiny_model_dir, tmp_path / "s", tmp_path / "cache", pruning=ONE_BY_FOUR))
    events = [line for line in capsys.readouterr().out.splitlines() if "pruning event" in line]
    assert len(events) >= 3 and all(line.endswith("masks 1x4") for line in events), events
    masks = MaskStore.load(result.final_dir / "masks.safetensors")
    assert masks.pattern == "1x4" and len(masks) == 12
    weights = load_file(result.final_dir / "model.safetensors")
    assert_blocks(weights, masks, "student")
    for name, mask in masks.items():
        assert torch.equal(mask, weights[name] != 0), name
        assert int((~mask).sum()) == round(0.75 * mask.numel() / 4) * 4, name
    report = json.loads((result.final_dir / "sparsity.json").read_text())
    assert report["pattern"] == "1x4" and report["targets"]["sparsity"] == pytest.approx(0.75)


def test_qat_transfer_keeps_the_blocks_in_the_model_the_compact_file_onnx_and_the_runtime(block_student, tmp_path,
                                                                                          sentiment_files):
    import onnx
    from onnx import numpy_helper

    from pofa.compact import load_compact
    from pofa.finetune import finetune
    from pofa.runtime import SparseInt8Linear, compiler_available, load_sparse_model

    masks = MaskStore.load(block_student / "masks.safetensors")
    result = finetune(finetune_recipe(block_student, tmp_path / "qat", sentiment_files, training={"max_steps": 4},
                                      quantization={"enabled": True, "weight_bits": 7},
                                      export={"onnx": True, "compact": True}))
    final = result.final_dir
    locked = MaskStore.load(final / "masks.safetensors")
    assert locked.pattern == "1x4" and all(torch.equal(locked[name], masks[name]) for name in masks)
    assert_blocks(load_file(final / "model.safetensors"), locked, "fine-tuned with QAT")
    assert_blocks(load_compact(final / "compact.safetensors"), locked, "compact (int8)")

    graph = onnx.load(str(final / "model.onnx")).graph
    int8 = [torch.from_numpy(numpy_helper.to_array(t).copy()) != 0 for t in graph.initializer
            if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    for name, mask in locked.items():
        assert any(not bool((nonzero & ~mask).any()) for candidate in int8 for nonzero in (candidate, candidate.T)
                   if nonzero.shape == mask.shape), f"no int8 ONNX weight is zero where {name} is pruned"

    if not compiler_available():
        pytest.skip("no C compiler: the sparse int8 runtime cannot be built")
    runtime = load_sparse_model(final)
    linears = {n: m for n, m in runtime.named_modules() if isinstance(m, SparseInt8Linear)}
    assert len(linears) == 12
    for name, module in linears.items():
        mask = locked[f"{name}.weight"]
        # One kernel group per kept block (a kept block's int8 weights may round to 0, never a pruned one's).
        assert module.groups <= int(mask.sum()) // 4, name
