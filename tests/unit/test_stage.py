"""The stage skeleton's console: one line per event, library chatter silenced, trackers checked up front."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

from pofa.recipe import RecipeError
from pofa.stage import check_trackers, configure_console, format_metrics, get_logger

TINY = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def test_loading_a_model_with_missing_heads_prints_no_report(tmp_path, capfd):
    BertModel(BertConfig(**TINY)).save_pretrained(tmp_path)  # no MLM head: transformers would print a LOAD REPORT
    configure_console()
    BertForMaskedLM.from_pretrained(tmp_path)
    captured = capfd.readouterr()
    assert "LOAD REPORT" not in captured.out + captured.err
    assert "Loading weights" not in captured.err  # no progress bar per load


def test_log_lines_are_bare_and_on_the_main_process(capsys):
    from accelerate import PartialState

    PartialState()
    configure_console()
    get_logger().info("step 3: loss 0.5")
    assert capsys.readouterr().out == "step 3: loss 0.5\n"


def test_format_metrics_keeps_integers_whole():
    assert format_metrics({"loss": 0.123456, "masked_tokens": 76}) == "loss 0.1235 masked_tokens 76"


def test_a_tracker_that_is_not_installed_is_named():
    from accelerate.tracking import get_available_trackers

    if "wandb" in {str(kind.value) for kind in get_available_trackers()}:
        pytest.skip("wandb is installed here")
    with pytest.raises(RecipeError, match="training.trackers: wandb is not installed"):
        check_trackers(["wandb"])
    check_trackers(["tensorboard"])


# ---------------------------------------------------------------------------------------------------------------------
# Publication at the end of a stage (hub.repo_id), against the local fake Hub of tests/unit/_fake_hub.py
# ---------------------------------------------------------------------------------------------------------------------

HUB_TOKEN = "hf_fake_token_for_tests"


def tiny_teacher_recipe(model_dir, out, cache, **hub):
    from tests.integration.test_pretrain import tiny_recipe

    return tiny_recipe(model_dir, out, cache, training={"max_steps": 2, "eval_every": 2}, hub=hub)


@pytest.fixture
def online(monkeypatch):
    """huggingface_hub may make requests (tests/conftest.py sets HF_HUB_OFFLINE=1); they only reach 127.0.0.1."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)


def test_a_recipe_naming_a_hub_repo_pushes_its_final_folder_with_the_card(tiny_model_dir, tmp_path, cache_dir,
                                                                          online, capsys):
    from pofa.artifacts import CARD_FILE, RECIPE_FILE
    from pofa.pretrain import train
    from tests.unit._fake_hub import FakeHub

    with FakeHub(token=HUB_TOKEN) as hub:
        recipe = tiny_teacher_recipe(tiny_model_dir, tmp_path / "run", cache_dir, repo_id="me/tiny-teacher",
                                     private=True, endpoint=hub.url)
        final = train(recipe).final_dir
    assert hub.unexpected == [] and hub.errors == []
    assert hub.repos["me/tiny-teacher"]["visibility"] == "private"
    pushed = {path: data for (repo, revision, path), data in hub.files.items() if repo == "me/tiny-teacher"}
    assert {CARD_FILE, RECIPE_FILE, "config.json", "model.safetensors"} <= set(pushed)
    assert pushed[CARD_FILE] == (final / CARD_FILE).read_bytes()  # the card generated in final/, as pushed
    assert "How to fine-tune it without losing the sparsity" in pushed[CARD_FILE].decode()
    assert f"published: {hub.url}/me/tiny-teacher/commit/" in capsys.readouterr().out


def test_a_failed_push_keeps_the_model_and_says_how_to_push_it_again(tiny_model_dir, tmp_path, cache_dir, online,
                                                                     capsys):
    import socket

    from pofa.pretrain import main

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    recipe = tiny_teacher_recipe(tiny_model_dir, tmp_path / "run", cache_dir)
    path = tmp_path / "r.yaml"
    from pofa.recipe import save_recipe

    save_recipe(recipe, path)
    assert main(["--recipe", str(path), "hub.repo_id=me/tiny-teacher", f"hub.endpoint={endpoint}"]) == 2
    final = tmp_path / "run" / "final"
    err = capsys.readouterr().err
    assert f"pushing {final} to me/tiny-teacher failed" in err and f"`pofa push {final}`" in err
    assert (final / "model.safetensors").is_file() and (final / "recipe.yaml").is_file()


def test_seeds_with_a_hub_repo_are_refused_before_any_run(tmp_path):
    from pofa.finetune import finetune_seeds
    from pofa.recipe import FinetuneRecipe, recipe_from_dict

    recipe = recipe_from_dict(FinetuneRecipe, {"training": {"output_dir": str(tmp_path / "run")},
                                               "hub": {"repo_id": "me/model"}})
    with pytest.raises(RecipeError, match="hub.repo_id: --seeds makes 3 models.*pofa push"):
        finetune_seeds(recipe, [1, 2, 3])
    assert not (tmp_path / "run").exists()
