"""Student pruning through the real loop: MLM + distillation + gradual magnitude pruning, on a tiny BERT."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pofa.sparsity import DEFAULT_TARGETS, MaskStore, select_targets
from tests.integration.test_pretrain import tiny_recipe
from tests.conftest import assert_same_safetensors
from tests.integration.test_finetune import sentiment_files  # noqa: F401 (a fixture)

STUDENT = {
    "stage": "student",
    "pruning": {"enabled": True, "target_sparsity": 0.8, "start_step": 0, "end_step": 8, "frequency": 2,
                "end_pruning_step": 10},
    "training": {"max_steps": 12, "save_every": 5, "eval_every": 6, "learning_rate": 1e-3},
}


def student_recipe(model_dir, out, cache, **extra):
    sections = {k: dict(v) for k, v in STUDENT.items() if k != "stage"}
    sections["distillation"] = {"teacher": str(model_dir), "hard_weight": 0.5, "soft_weight": 0.5, "temperature": 2.0}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    recipe = tiny_recipe(model_dir, out, cache, **sections)
    recipe.stage = "student"
    return recipe


def test_student_reaches_exact_layer_sparsity_and_saves_masks(tiny_model_dir, tmp_path, cache_dir, capsys):
    from pofa.pretrain import train

    result = train(student_recipe(tiny_model_dir, tmp_path / "s", cache_dir))
    out = capsys.readouterr().out
    assert "pruning event, target sparsity 0.8000, achieved 0.7998" in out  # round(0.8 * 1024) = 819 zeros
    weights = load_file(result.final_dir / "model.safetensors")
    targets = select_targets(weights.items(), DEFAULT_TARGETS)
    assert len(targets) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    for name in targets:
        zeros = int((weights[name] == 0).sum())
        assert zeros == round(0.8 * weights[name].numel()), name
    masks = MaskStore.load(result.final_dir / "masks.safetensors")
    for name, mask in masks.items():
        assert torch.equal(mask, weights[name] != 0)
    report = json.loads((result.final_dir / "sparsity.json").read_text())
    assert report  # the per-layer report is written
    assert not any("embeddings" in n or n.startswith("cls.") for n in masks.names())


@pytest.mark.parametrize("pruning", [{}, {"pooler": True, "revive": True, "lr_rewind": True}],
                         ids=["monotone", "paper"])
def test_killed_mid_pruning_and_resumed_equals_straight_run(tiny_model_dir, tmp_path, cache_dir,
                                                            kill_after_checkpoint, pruning):
    """Also with revival (its stored values and decay are in the checkpoint) and the rewinding schedule."""
    from pofa.pretrain import train

    straight = train(student_recipe(tiny_model_dir, tmp_path / "a", cache_dir, pruning=pruning))
    recipe = student_recipe(tiny_model_dir, tmp_path / "b", cache_dir, pruning=pruning)
    with pytest.raises(kill_after_checkpoint(5)):  # mid-ramp: sparsity between 0 and the target, masks changing
        train(recipe)
    saved_masks = MaskStore.load(tmp_path / "b" / "checkpoints" / "step-00000005" / "masks.safetensors")
    assert 0 < saved_masks.sparsity() < 0.8
    resumed = train(recipe, resume=True)

    assert_same_safetensors(straight.final_dir / "model.safetensors", resumed.final_dir / "model.safetensors",
                            "weights after a resume mid-pruning")
    ma, mb = MaskStore.load(straight.final_dir / "masks.safetensors"), MaskStore.load(resumed.final_dir / "masks.safetensors")
    assert all(torch.equal(ma[n], mb[n]) for n in ma.names())


@pytest.mark.parametrize("positions", ["all", "masked"])
def test_distillation_positions_and_gradient_accumulation(tiny_model_dir, tmp_path, cache_dir, positions):
    from pofa.pretrain import train

    recipe = student_recipe(tiny_model_dir, tmp_path / positions, cache_dir,
                            distillation={"positions": positions},
                            training={"gradient_accumulation_steps": 2, "max_steps": 10, "save_every": 100})
    result = train(recipe)
    weights = load_file(result.final_dir / "model.safetensors")
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    assert (weights[name] == 0).float().mean().item() == pytest.approx(0.8, abs=1e-3)


PAPER_PRUNING = {"pooler": True, "revive": True, "lr_rewind": True}


def test_the_paper_settings_prune_the_pooler_and_fine_tuning_keeps_it(tiny_model_dir, tmp_path, cache_dir,
                                                                       sentiment_files):
    """pooler / revive / lr_rewind as the paper recipes set them: the pooler is pruned with the encoder, the masks
    hold at the end, and sparse transfer locks the pooler too (a QA head has none: its mask is left out)."""
    from pofa.finetune import finetune
    from pofa.pretrain import train
    from tests.integration.test_finetune import SQUAD_TASK, recipe as finetune_recipe, write_squad_json

    result = train(student_recipe(tiny_model_dir, tmp_path / "s", cache_dir, pruning=PAPER_PRUNING))
    weights = load_file(result.final_dir / "model.safetensors")
    pooler = "bert.pooler.dense.weight"
    assert pooler in MaskStore.load(result.final_dir / "masks.safetensors").names()
    assert (weights[pooler] == 0).sum().item() == round(0.8 * weights[pooler].numel())

    classified = finetune(finetune_recipe(result.final_dir, tmp_path / "cls", sentiment_files,
                                          training={"max_steps": 2}))
    after = load_file(classified.final_dir / "model.safetensors")
    assert torch.equal(after[pooler] == 0, weights[pooler] == 0)

    squad = str(write_squad_json(tmp_path / "squad.json"))
    answered = finetune(finetune_recipe(result.final_dir, tmp_path / "qa", {"train": squad, "validation": squad},
                                        task=SQUAD_TASK, training={"max_steps": 2, "per_device_batch_size": 4}))
    assert pooler not in MaskStore.load(answered.final_dir / "masks.safetensors").names()
    assert answered.sparsity == pytest.approx(0.8, abs=1e-3)


def test_pooler_pruning_needs_a_pooler(tmp_path, cache_dir, tiny_tokenizer_dir):
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForMaskedLM

    from pofa.pretrain import main

    folder = tmp_path / "distil"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    DistilBertForMaskedLM(DistilBertConfig(vocab_size=len(tokenizer), dim=32, n_layers=1, n_heads=2,
                                           hidden_dim=64)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    recipe = student_recipe(folder, tmp_path / "out", cache_dir, pruning=PAPER_PRUNING)
    from pofa.recipe import save_recipe

    save_recipe(recipe, tmp_path / "r.yaml")
    assert main(["--recipe", str(tmp_path / "r.yaml")]) == 2
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_masks_are_fixed_after_the_last_pruning_step_even_with_revival(tiny_model_dir, tmp_path, cache_dir, capsys):
    """Events at 0, 2, ..., 8 (end_pruning_step 9); the checkpoint at step 10 and the final model (step 12) have the
    same masks, and no event is logged after step 8."""
    from pofa.pretrain import train

    result = train(student_recipe(tiny_model_dir, tmp_path / "s", cache_dir,
                                  pruning={**PAPER_PRUNING, "end_pruning_step": 9},
                                  training={"save_every": 10}))
    events = [int(line.split(":")[0].split()[1]) for line in capsys.readouterr().out.splitlines()
              if "pruning event" in line]
    assert events == [0, 2, 4, 6, 8]
    at_10 = MaskStore.load(tmp_path / "s" / "checkpoints" / "step-00000010" / "masks.safetensors")
    final = MaskStore.load(result.final_dir / "masks.safetensors")
    assert all(torch.equal(at_10[name], final[name]) for name in final.names())


def attention_gap(student_dir, teacher_dir, tokenizer_dir) -> float:
    """Mean attention KL between the student's single layer and the teacher's last, on fixed text."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pofa.distill import attention_loss

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    batch = tokenizer(["the value of the object is returned by the method", "a class holds a list"],
                      padding=True, return_tensors="pt")
    outputs = []
    for folder in (student_dir, teacher_dir):
        model = AutoModelForMaskedLM.from_pretrained(folder, attn_implementation="eager").eval()
        with torch.no_grad():
            outputs.append(model(**batch, output_attentions=True).attentions[-1])
    return attention_loss(outputs[0], outputs[1], batch["attention_mask"].bool()).item()


def test_a_shallower_narrower_student_learns_the_teachers_hidden_states_and_attentions(tiny_model_dir, tmp_path,
                                                                                      cache_dir, kill_after_checkpoint):
    """A 1-layer, 16-wide student from scratch against the 2-layer, 32-wide teacher: uniform layer map (student
    layer 1 with teacher layer 2), a learned projection for the hidden states, trained and checkpointed with the
    student (a resume reproduces the run) but not saved in its final folder."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from pofa.pretrain import train

    # a teacher with peaked attention (a random tiny BERT attends almost uniformly: nothing to learn from)
    teacher_dir = tmp_path / "teacher"
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        for layer in teacher.bert.encoder.layer:
            layer.attention.self.query.weight.mul_(8.0)
            layer.attention.self.key.weight.mul_(8.0)
    teacher.save_pretrained(teacher_dir)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(teacher_dir)

    def recipe(out):
        r = tiny_recipe(tiny_model_dir, out, cache_dir,
                        model={"from_scratch": True,
                               "config_overrides": {"hidden_size": 16, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "intermediate_size": 32}},
                        training={"max_steps": 16, "save_every": 4, "learning_rate": 1e-2},
                        distillation={"teacher": str(teacher_dir), "hidden_weight": 1.0, "attention_weight": 10.0})
        r.stage = "student"
        return r

    initial = recipe(tmp_path / "init")
    initial.training.max_steps = 0  # the same seed draws the same initial student
    untrained = train(initial)
    straight = train(recipe(tmp_path / "straight"))
    before = attention_gap(untrained.final_dir, teacher_dir, tiny_model_dir)
    after = attention_gap(straight.final_dir, teacher_dir, tiny_model_dir)
    assert after < 0.8 * before, (before, after)
    # the projection trained beside the student is not part of the published model
    _, info = AutoModelForMaskedLM.from_pretrained(straight.final_dir, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    saved = load_file(straight.final_dir / "model.safetensors")
    assert not any("projection" in name for name in saved)

    killed = recipe(tmp_path / "killed")
    with pytest.raises(kill_after_checkpoint(8)):
        train(killed)
    resumed = train(killed, resume=True)
    assert_same_safetensors(straight.final_dir / "model.safetensors", resumed.final_dir / "model.safetensors",
                            "resumed with the projection vs the uninterrupted run")


def test_intermediate_distillation_needs_a_layer_map_that_fits(tiny_model_dir, tmp_path, cache_dir):
    from pofa.pretrain import train
    from pofa.recipe import RecipeError

    r = tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir,
                    model={"from_scratch": True, "config_overrides": {"num_hidden_layers": 1}},
                    training={"max_steps": 1},
                    distillation={"teacher": str(tiny_model_dir), "hidden_weight": 1.0, "layer_map": "identity"})
    with pytest.raises(RecipeError, match="identity needs equal depths, got student 1 and teacher 2"):
        train(r)
