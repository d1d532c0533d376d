"""End-to-end runs of the pre-training loop on a tiny BERT folder and the embedded corpus (seconds each)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pofa.checkpoint import OutputDirError, complete_checkpoints
from pofa.pretrain import main, train
from pofa.recipe import PretrainRecipe, recipe_from_dict
from tests.conftest import assert_same_safetensors


def tiny_recipe(model_dir: Path, out: Path, cache: Path, **sections) -> PretrainRecipe:
    data = {
        "model": {"name_or_path": str(model_dir)},
        "data": {"sources": [{"embedded": "python-docs", "max_documents": 60}], "max_seq_length": 32,
                 "eval_fraction": 0.1, "max_eval_blocks": 32, "cache_dir": str(cache)},
        "training": {"output_dir": str(out), "max_steps": 30, "per_device_batch_size": 8, "learning_rate": 2e-3,
                     "warmup_ratio": 0.1, "eval_every": 1000, "save_every": 1000, "log_every": 1000, "seed": 3},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return recipe_from_dict(PretrainRecipe, data)


def test_teacher_preparation_lowers_held_out_loss_and_saves_a_loadable_folder(tiny_model_dir, tmp_path, cache_dir):
    result = train(tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir))
    assert result.eval_after["mlm_loss"] < result.eval_before["mlm_loss"] - 0.3
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    model = AutoModelForMaskedLM.from_pretrained(result.final_dir)
    AutoTokenizer.from_pretrained(result.final_dir)
    assert (result.final_dir / "recipe.yaml").is_file()
    metrics = json.loads((result.final_dir / "train_results.json").read_text())
    assert metrics["step"] == 30
    saved = load_file(result.final_dir / "model.safetensors")
    assert torch.equal(model.bert.encoder.layer[0].output.dense.weight,
                       saved["bert.encoder.layer.0.output.dense.weight"])


def test_masked_only_logits_give_the_same_loss_as_full_logits(tiny_model_dir):
    from transformers import AutoModelForMaskedLM

    from pofa.modeling import MaskedLM

    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(5, 600, (2, 16))
    labels = torch.full_like(ids, -100)
    labels[:, 3] = ids[:, 3]
    labels[1, 7] = ids[1, 7]
    mask = torch.ones_like(ids)
    fast = MaskedLM(model)(ids, mask, labels)
    full = MaskedLM(model, all_logits=True)(ids, mask, labels)
    reference = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert torch.allclose(fast[0], reference, atol=1e-5) and torch.allclose(full[0], reference, atol=1e-5)
    assert torch.allclose(fast[1], full[1], atol=1e-5) and fast[1].shape == (3, model.config.vocab_size)


def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_model_dir, tmp_path, cache_dir, kill_after_checkpoint):
    sections = {"training": {"max_steps": 8, "save_every": 3, "gradient_accumulation_steps": 2, "eval_every": 4}}
    straight = train(tiny_recipe(tiny_model_dir, tmp_path / "straight", cache_dir, **sections))
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "killed", cache_dir, **sections)
    with pytest.raises(kill_after_checkpoint(6)):
        train(recipe)
    assert [p.name for p in complete_checkpoints(tmp_path / "killed" / "checkpoints")] == ["step-00000003", "step-00000006"]
    resumed = train(recipe, resume=True)

    assert_same_safetensors(straight.final_dir / "model.safetensors", resumed.final_dir / "model.safetensors",
                            "resumed weights vs the uninterrupted run")
    assert resumed.eval_after == straight.eval_after


def test_a_killed_save_leaves_no_complete_looking_checkpoint(tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    from accelerate import Accelerator

    class Killed(Exception):
        pass

    original = Accelerator.save_state
    calls = []

    def save_state_then_die(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:
            original(self, output_dir, **kwargs)
            raise Killed  # killed after the weights, before the checkpoint was completed
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state_then_die)
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir, training={"max_steps": 6, "save_every": 2})
    with pytest.raises(Killed):
        train(recipe)
    root = tmp_path / "run" / "checkpoints"
    assert [p.name for p in complete_checkpoints(root)] == ["step-00000002"]
    assert not (tmp_path / "run" / "final").exists()
    monkeypatch.setattr(Accelerator, "save_state", original)
    result = train(recipe, resume=True)
    assert result.steps == 6 and not list(root.glob(".tmp-*"))


def test_unrelated_output_dir_is_refused_unless_overwrite(tiny_model_dir, tmp_path, cache_dir):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    recipe = tiny_recipe(tiny_model_dir, out, cache_dir, training={"max_steps": 2})
    with pytest.raises(OutputDirError, match="--overwrite"):
        train(recipe)
    assert (out / "notes.txt").read_text() == "mine"
    train(recipe, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "final").is_dir()


def test_resume_refuses_a_different_recipe(tiny_model_dir, tmp_path, cache_dir):
    train(tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir, training={"max_steps": 2}))
    other = tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir, training={"max_steps": 2, "seed": 99})
    with pytest.raises(OutputDirError, match="training.seed"):
        train(other, resume=True)


def write_recipe(tmp_path: Path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("body, message", [
    ("data:\n  sources: [{files: [/nonexistent/corpus.txt]}]\n", "corpus file not found: /nonexistent/corpus.txt"),
    ("data:\n  max_seq_length: 4096\n", "data.max_seq_length: 4096 exceeds the model's maximum of 128"),
    ("training:\n  max_stepz: 3\n", "unknown key training.max_stepz"),
])
def test_bad_input_is_one_clear_line_and_writes_nothing(tiny_model_dir, tmp_path, cache_dir, capsys, body, message):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, f"model:\n  name_or_path: {tiny_model_dir}\n{body}")
    code = main(["--recipe", recipe, "--output-dir", str(out), f"data.cache_dir={cache_dir}"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_empty_corpus_and_hub_model_without_network(tiny_model_dir, tmp_path, cache_dir, capsys, monkeypatch):
    (tmp_path / "empty.txt").write_text("\n\n")
    recipe = write_recipe(tmp_path, f"model:\n  name_or_path: {tiny_model_dir}\n"
                                    f"data:\n  sources: [{{files: [{tmp_path / 'empty.txt'}]}}]\n")
    assert main(["--recipe", recipe, "--output-dir", str(tmp_path / "o1"), f"data.cache_dir={cache_dir}"]) == 2
    assert "corpus is empty" in capsys.readouterr().err

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = write_recipe(tmp_path, "model:\n  name_or_path: some-org/some-bert\n")
    assert main(["--recipe", recipe, "--output-dir", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err
    assert "some-org/some-bert" in err and "set model.name_or_path to that folder" in err
    assert not (tmp_path / "o2").exists()


def test_from_scratch_with_config_overrides(tiny_model_dir, tmp_path, cache_dir):
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir, training={"max_steps": 2},
                         model={"from_scratch": True, "config_overrides": {"num_hidden_layers": 1}})
    result = train(recipe)
    assert json.loads((result.final_dir / "config.json").read_text())["num_hidden_layers"] == 1


def test_streamed_corpus_trains_and_resumes_exactly(tiny_model_dir, tmp_path, cache_dir, kill_after_checkpoint):
    from pofa.data.corpus import python_docs_documents

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(python_docs_documents()[:40]))
    sections = {"data": {"sources": [{"files": [str(corpus)], "streaming": True}], "max_eval_blocks": 16},
                "training": {"max_steps": 6, "save_every": 3}}
    straight = train(tiny_recipe(tiny_model_dir, tmp_path / "a", cache_dir, **sections))
    assert not (cache_dir / "blocks").exists()  # streamed: nothing cached on disk
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "b", cache_dir, **sections)
    with pytest.raises(kill_after_checkpoint(3)):
        train(recipe)
    resumed = train(recipe, resume=True)
    assert_same_safetensors(straight.final_dir / "model.safetensors", resumed.final_dir / "model.safetensors")
    assert resumed.eval_after == straight.eval_after


def test_accumulation_counts_optimizer_steps_and_tensorboard_logs(tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    from pofa.data.mlm import MLMBatcher

    seen = []
    original = MLMBatcher.train_batch
    monkeypatch.setattr(MLMBatcher, "train_batch", lambda self, m: seen.append(m) or original(self, m))
    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir,
                         training={"max_steps": 4, "gradient_accumulation_steps": 3, "trackers": ["tensorboard"],
                                   "log_every": 2})
    result = train(recipe)
    assert result.steps == 4
    assert seen[1:] == list(range(12))  # (the first call checks the data is big enough) 4 steps x 3 micro-steps
    events = list((tmp_path / "run").rglob("events.out.tfevents.*"))
    assert events, "tensorboard wrote no event file"


def test_a_corrupt_checkpoint_is_named(tiny_model_dir, tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    recipe = tiny_recipe(tiny_model_dir, out, cache_dir, training={"max_steps": 2, "save_every": 1})
    train(recipe)
    latest = complete_checkpoints(out / "checkpoints")[-1]
    (latest / "model.safetensors").write_bytes(b"not safetensors")
    path = tmp_path / "r.yaml"
    from pofa.recipe import dump_recipe

    path.write_text(dump_recipe(recipe))
    assert main(["--recipe", str(path), "--resume"]) == 2
    err = capsys.readouterr().err
    assert str(latest) in err and "cannot be loaded" in err


def test_a_launcher_with_other_gradient_accumulation_is_refused(tiny_model_dir, tmp_path, cache_dir, monkeypatch,
                                                                capsys):
    """`accelerate launch` exports its config's accumulation to the process; accelerate would prefer it silently."""
    from pofa.recipe import save_recipe

    save_recipe(tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir), tmp_path / "r.yaml")
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    assert main(["--recipe", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err
    assert "training.gradient_accumulation_steps: the recipe says 1" in err and "says 4" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_unset_mixed_precision_defers_to_the_launcher(tiny_model_dir, tmp_path, cache_dir, monkeypatch):
    from pofa.stage import Stage

    recipe = tiny_recipe(tiny_model_dir, tmp_path / "run", cache_dir)
    assert recipe.training.mixed_precision is None
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")  # what `accelerate launch --mixed_precision bf16` sets
    assert Stage.start(recipe, resume=False, overwrite=False).accelerator.mixed_precision == "bf16"
    recipe.training.mixed_precision = "no"  # a recipe that says it, wins
    assert Stage.start(recipe, resume=False, overwrite=False).accelerator.mixed_precision == "no"


def test_weights_the_checkpoint_lacks_are_drawn_from_the_recipe_seed(tiny_tokenizer_dir, tmp_path, cache_dir):
    """A checkpoint without an MLM head (all-MiniLM-L6-v2 is one) gets a fresh head: the same one whatever ran before
    in the process, so a run is reproducible from its recipe."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from tests.conftest import TINY_BERT

    folder = tmp_path / "headless"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    BertModel(BertConfig(vocab_size=len(tokenizer), **TINY_BERT)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    finals = []
    for consumed in (0, 7):
        torch.manual_seed(1000 + consumed)  # whatever state the process is in
        torch.rand(consumed)
        result = train(tiny_recipe(folder, tmp_path / f"run{consumed}", cache_dir, training={"max_steps": 2}))
        finals.append(result.final_dir / "model.safetensors")
    assert_same_safetensors(finals[0], finals[1], "a run from the same recipe")
