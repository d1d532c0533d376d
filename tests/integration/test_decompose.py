"""Decomposition as a stage technique: student pre-training and fine-tuning on a tiny BERT, distilled from the
uncompressed model (logits and hidden states), composed with masks on the factors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from pofa.decompose import load_decomposed, parameter_count
from pofa.recipe import FinetuneRecipe, RecipeError, recipe_from_dict
from pofa.sparsity import MaskStore
from tests.integration.test_finetune import recipe, sentiment_files  # noqa: F401 (a fixture)
from tests.integration.test_pretrain import tiny_recipe

TECHNIQUES = {
    "lowrank": {"method": "lowrank", "rank": 8, "embeddings": True},
    "kronecker": {"method": "kronecker", "terms": 2},
    "tensor": {"method": "tensor", "rank": 16, "bank": 8},
    "rosita": {"method": "lowrank", "rank": 4, "heads": 0.5, "ffn": 0.5},
}
DISTILL = {"hard_weight": 0.5, "soft_weight": 0.5, "hidden_weight": 1.0}


def student(model_dir, out, cache, decomposition, **sections):
    sections.setdefault("training", {}).update({"max_steps": 6, "learning_rate": 1e-3})
    sections.setdefault("distillation", {}).update({"teacher": str(model_dir), **DISTILL})
    result = tiny_recipe(model_dir, out, cache, decomposition=decomposition, **sections)
    result.stage = "student"
    return result


@pytest.mark.parametrize("technique", sorted(TECHNIQUES))
def test_student_stage_decomposes_distils_and_saves_a_loadable_smaller_model(technique, tiny_model_dir, tmp_path,
                                                                             cache_dir, capsys):
    from transformers import AutoModelForMaskedLM

    from pofa.pretrain import train

    result = train(student(tiny_model_dir, tmp_path / technique, cache_dir, TECHNIQUES[technique]))
    assert "decomposition (" in capsys.readouterr().out
    assert result.eval_after["mlm_loss"] < result.eval_before["mlm_loss"]  # distillation trains the factors
    model = load_decomposed(result.final_dir)
    dense = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    assert parameter_count(model.bert.encoder) < parameter_count(dense.bert.encoder) / 2
    saved = load_file(result.final_dir / "model.safetensors")
    assert torch.equal(model.state_dict()["bert.encoder.layer.1.output.LayerNorm.weight"],
                       saved["bert.encoder.layer.1.output.LayerNorm.weight"])


def test_masks_on_the_factors_survive_pre_training_and_fine_tuning(tiny_model_dir, sentiment_files, tmp_path,
                                                                   cache_dir):
    from pofa.finetune import finetune
    from pofa.pretrain import train

    pruning = {"enabled": True, "target_sparsity": 0.5, "start_step": 0, "end_step": 4, "frequency": 2}
    pre = train(student(tiny_model_dir, tmp_path / "s", cache_dir, {"method": "lowrank", "rank": 8},
                        pruning=pruning))
    masks = MaskStore.load(pre.final_dir / "masks.safetensors")
    assert len(masks) == 24 and all(n.endswith((".first.weight", ".second.weight")) for n in masks.names())
    assert masks.sparsity() == pytest.approx(0.5, abs=1e-3)
    tuned = finetune(recipe(pre.final_dir, tmp_path / "ft", sentiment_files, training={"epochs": 1}))
    assert (tuned.final_dir / "compact.safetensors").is_file()
    weights = load_file(tuned.final_dir / "model.safetensors")
    for name, mask in masks.items():
        assert torch.equal(weights[name] != 0, mask), name  # the pattern, bit for bit, on the factors


@pytest.mark.parametrize("technique", ["kronecker", "tensor"])
def test_fine_tuning_stage_decomposes_with_distillation_from_the_dense_teacher(technique, tiny_model_dir,
                                                                              sentiment_files, tmp_path):
    from pofa.finetune import finetune

    result = finetune(recipe(tiny_model_dir, tmp_path / technique, sentiment_files,
                             sparsity={"masks": "none"}, decomposition=TECHNIQUES[technique],
                             distillation={"teacher": str(tiny_model_dir), **DISTILL},
                             training={"epochs": 1}, export={"compact": False, "onnx": True}))
    assert (result.final_dir / "model.onnx").is_file()  # exported and its parity checked by the stage
    assert technique in load_decomposed(result.final_dir).config.pofa_decomposition


def test_qat_is_refused_where_no_linear_remains():
    with pytest.raises(RecipeError, match="quantization.enabled"):
        recipe_from_dict(FinetuneRecipe, {"decomposition": {"method": "tensor", "rank": 8},
                                          "quantization": {"enabled": True}})
    recipe_from_dict(FinetuneRecipe, {"decomposition": {"method": "lowrank", "rank": 8},
                                      "quantization": {"enabled": True}})


# --- ROSITA's iterative schedule ------------------------------------------------------------------------------------

ITERATIVE = {"method": "lowrank", "rank": 8, "embeddings": True, "heads": 0.5, "ffn": 0.25,
             "schedule": "iterative", "start_step": 0, "end_step": 6, "frequency": 2}


def iterative_student(model_dir, out, cache):
    result = tiny_recipe(model_dir, out, cache, decomposition=ITERATIVE,
                         training={"max_steps": 10, "save_every": 3, "learning_rate": 1e-3},
                         distillation={"teacher": str(model_dir), **DISTILL})
    result.stage = "student"
    return result


def test_iterative_schedule_shrinks_at_its_events_reaches_the_targets_and_resumes_mid_schedule(
        tiny_model_dir, tmp_path, cache_dir, capsys, kill_after_checkpoint):
    import re

    from pofa.decompose import LowRankEmbedding, LowRankLinear
    from pofa.pretrain import train
    from tests.conftest import assert_same_safetensors

    straight = train(iterative_student(tiny_model_dir, tmp_path / "straight", cache_dir))
    out = capsys.readouterr().out
    assert "decomposition: iterative (ROSITA)" in out
    events = re.findall(r"step (\d+): decomposition event .*?: heads (\d+) of 2, FFN neurons (\d+) of 64", out)
    assert events == [("0", "2", "64"), ("2", "2", "48"), ("4", "1", "32"), ("6", "1", "16")]
    assert straight.eval_after["mlm_loss"] < straight.eval_before["mlm_loss"]
    model = load_decomposed(straight.final_dir)
    layer = model.bert.encoder.layer[1]
    assert isinstance(layer.attention.output.dense, LowRankLinear)
    assert layer.attention.output.dense.in_features == 16 and layer.output.dense.in_features == 16  # 1 head, 16
    assert {m.rank for m in model.modules() if isinstance(m, LowRankLinear)} == {8}
    assert isinstance(model.get_input_embeddings(), LowRankEmbedding) and model.get_input_embeddings().rank == 8

    # killed after the checkpoint of step 3 (between the events of steps 2 and 4), then resumed: the same model
    with pytest.raises(kill_after_checkpoint(3)):
        train(iterative_student(tiny_model_dir, tmp_path / "resumed", cache_dir))
    resumed = train(iterative_student(tiny_model_dir, tmp_path / "resumed", cache_dir), resume=True)
    assert_same_safetensors(straight.final_dir / "model.safetensors", resumed.final_dir / "model.safetensors")


def test_iterative_schedule_in_fine_tuning(tiny_model_dir, sentiment_files, tmp_path):
    from pofa.finetune import finetune

    decomposition = {"heads": 0.5, "ffn": 0.5, "schedule": "iterative", "start_step": 0, "end_step": 2,
                     "frequency": 1}
    result = finetune(recipe(tiny_model_dir, tmp_path / "ft", sentiment_files, sparsity={"masks": "none"},
                             decomposition=decomposition, distillation={"teacher": str(tiny_model_dir), **DISTILL},
                             training={"epochs": 1}, export={"compact": False, "onnx": True}))
    model = load_decomposed(result.final_dir)
    assert model.bert.encoder.layer[0].intermediate.dense.out_features == 32
    with pytest.raises(RecipeError, match="decomposition.end_step"):
        finetune(recipe(tiny_model_dir, tmp_path / "long", sentiment_files, sparsity={"masks": "none"},
                        decomposition={**decomposition, "end_step": 10_000}, training={"epochs": 1}))
