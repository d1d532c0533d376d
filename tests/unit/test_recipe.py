from pathlib import Path

import pytest

from pofa.recipe import PretrainRecipe, RecipeError, apply_overrides, dump_recipe, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(text)
    return path


def test_unknown_key_names_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "training:\n  max_stepz: 3\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: unknown key training\.max_stepz"):
        load_recipe(path)


def test_unknown_section(tmp_path):
    with pytest.raises(RecipeError, match="unknown key trainig"):
        load_recipe(write(tmp_path, "trainig: {}\n"))


@pytest.mark.parametrize("text, message", [
    ("training:\n  max_steps: many\n", r"training\.max_steps: expected an integer, got 'many'"),
    ("training:\n  max_steps: 0\n", r"training\.max_steps: must be >= 1"),
    ("training:\n  learning_rate: true\n", r"training\.learning_rate: expected a number"),
    ("training:\n  mixed_precision: fp8\n", r"training\.mixed_precision: 'fp8' is not one of"),
    ("data:\n  mlm_probability: 1.5\n", r"data\.mlm_probability: must be in \(0, 1\)"),
    ("data:\n  sources: [{hub: x, files: [a]}]\n", r"data\.sources\[0\]: must set exactly one"),
    ("data:\n  sources: [{embedded: nope}]\n", r"data\.sources\[0\]\.embedded: unknown embedded corpus"),
    ("data:\n  sources: [{files: a.txt}]\n", r"data\.sources\[0\]\.files: expected a list"),
    ("pruning:\n  enabled: true\n  end_step: 5000\ntraining:\n  max_steps: 100\n", r"pruning\.end_step: must be <="),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_bad_values_name_the_key(tmp_path, text, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, text))


def test_missing_file():
    with pytest.raises(RecipeError, match="nowhere.yaml: recipe file not found"):
        load_recipe("nowhere.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "training:\n  max_steps: 3\n")
    recipe = load_recipe(path, ["training.max_steps=7", "data.sources=[{embedded: python-docs}]",
                                "training.max_grad_norm=null"])
    assert recipe.training.max_steps == 7 and recipe.training.max_grad_norm is None
    assert recipe.data.sources[0].embedded == "python-docs"
    with pytest.raises(RecipeError, match=r"r\.yaml: training\.max_steps: expected an integer"):
        load_recipe(path, ["training.max_steps=abc"])
    with pytest.raises(RecipeError, match="expected KEY=VALUE"):
        load_recipe(path, ["training.max_steps"])


def test_round_trip_of_the_resolved_recipe(tmp_path):
    recipe = recipe_from_dict(PretrainRecipe, {"training": {"max_steps": 11}})
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again == recipe


def test_apply_overrides_does_not_mutate():
    data = {"training": {"max_steps": 1}}
    assert apply_overrides(data, ["training.max_steps=2"])["training"]["max_steps"] == 2
    assert data["training"]["max_steps"] == 1


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_is_valid(path):
    from pofa.recipe import recipe_class_for

    load_recipe(path, cls=recipe_class_for(path))
