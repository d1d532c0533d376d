"""`pofa push` reads the repository and the card's origin from the recipe chain; `pofa recipes` and `pofa recipe-keys`
make the recipes discoverable."""

from __future__ import annotations

from pathlib import Path

import yaml

from pofa.artifacts import CARD_FILE, RECIPE_FILE
from pofa.commands import push_main, recipe_keys_main, recipes_main
from pofa.recipe import FinetuneRecipe, PretrainRecipe, recipe_keys, shipped_recipes
from tests.unit._fake_hub import FakeHub
from tests.unit.test_hub import TOKEN, _no_telemetry, finetuned, finetuned_dir, model_dir, online  # noqa: F401


def set_hub(folder: Path, **hub) -> None:
    recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())
    recipe["hub"] = hub
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))


def test_push_without_a_repo_id_anywhere_says_where_to_give_one(finetuned: Path, capsys) -> None:
    assert push_main([str(finetuned), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no REPO_ID given" in err and f"{finetuned / RECIPE_FILE} names none (hub.repo_id)" in err


def test_push_takes_the_repo_from_the_recipe_and_the_origin_from_the_chain(finetuned: Path, capsys) -> None:
    set_hub(finetuned, repo_id="me/tiny-mnli")
    assert push_main([str(finetuned), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"recipe chain: finetune ({finetuned}) <- student (" in out and "<- teacher (" in out
    assert "base model: google-bert/bert-base-uncased" in out
    assert "data sets on the Hub: nyu-mll/glue, wikimedia/wikipedia" in out
    assert f"prepared (dry run): {finetuned}" in out
    card = (finetuned / CARD_FILE).read_text()
    assert "base_model: google-bert/bert-base-uncased" in card and "me/tiny-mnli" in card


def test_push_uses_the_recipe_hub_settings_and_flags_override_them(finetuned: Path, online, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with FakeHub(token=TOKEN) as hub:
        set_hub(finetuned, repo_id="me/tiny-mnli", private=True, endpoint=hub.url)
        assert push_main([str(finetuned)]) == 0
        assert push_main([str(finetuned), "me/public-mnli", "--no-private"]) == 0
    assert hub.errors == [] and hub.unexpected == []
    assert hub.repos["me/tiny-mnli"]["visibility"] == "private"
    assert hub.repos["me/public-mnli"]["visibility"] == "public"
    assert ("me/tiny-mnli", "main", CARD_FILE) in hub.files


def test_push_of_a_missing_folder_is_named(tmp_path: Path, capsys) -> None:
    assert push_main([str(tmp_path / "nowhere"), "me/x"]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err


def test_recipes_lists_every_shipped_recipe_with_its_stage_and_description(capsys) -> None:
    assert recipes_main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line.split()[1] for line in lines[lines.index(next(l for l in lines if l.startswith(
        "NAME"))) + 1:]}
    assert set(rows) == set(shipped_recipes())
    assert rows["bert-base-sparse90"] == "student" and rows["quickstart-qat"] == "finetune"
    assert any(line.startswith("bert-base-teacher") and "Teacher preparation of bert-base-uncased." in line
               for line in lines)


def test_recipes_prints_one_by_name_and_names_an_unknown_one(capsys) -> None:
    assert recipes_main(["quickstart-student"]) == 0
    out = capsys.readouterr().out
    assert out.endswith(shipped_recipes()["quickstart-student"].read_text()) and "stage: student" in out
    assert recipes_main(["no-such-recipe"]) == 2
    assert "no shipped recipe named 'no-such-recipe'" in capsys.readouterr().err


def test_recipe_keys_prints_every_key_with_type_default_and_doc(capsys) -> None:
    assert recipe_keys_main([]) == 0
    out = capsys.readouterr().out
    for cls in (PretrainRecipe, FinetuneRecipe):
        for key in recipe_keys(cls):
            assert f"\n{key.key}:" in out or f"\n{key.key}  (" in out, key.key
    assert "\ntraining.max_steps  (int; default 1000)\n    Number of optimizer steps" in out


def test_recipe_keys_by_stage_and_prefix(capsys) -> None:
    assert recipe_keys_main(["--stage", "student", "pruning.target"]) == 0
    out = capsys.readouterr().out
    assert "PretrainRecipe" in out and "FinetuneRecipe" not in out
    assert [line.split()[0] for line in out.splitlines() if line.startswith("pruning.")] == [
        "pruning.target_sparsity"]
    assert recipe_keys_main(["nope"]) == 2
    assert "no recipe key starts with 'nope'" in capsys.readouterr().err
