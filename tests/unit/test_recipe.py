from pathlib import Path

import pytest

from pofa.recipe import PretrainRecipe, RecipeError, apply_overrides, dump_recipe, load_recipe, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[2] / "pofa" / "recipes"


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


# --- numbers as a person types them, in a file and as an override alike -------------------------------------------

NUMBERS = [  # (typed, dotted key, value the field receives)
    ("1e-4", "training.learning_rate", 1e-4),
    ("5E-5", "training.learning_rate", 5e-5),
    ("1.0e+5", "training.learning_rate", 1e5),
    ("+2.5e3", "training.learning_rate", 2500.0),
    (".5", "data.mlm_probability", 0.5),
    ("1_000", "training.max_steps", 1000),
    ("1_000", "training.learning_rate", 1000.0),
    ("-3", "training.seed", -3),
    ("1e5", "training.max_steps", 100_000),  # a whole number is an integer however it is written
    ("3", "training.learning_rate", 3.0),
]


def recipe_with(tmp_path, key: str, typed: str, how: str) -> PretrainRecipe:
    section, name = key.split(".")
    if how == "file":
        return load_recipe(write(tmp_path, f"{section}:\n  {name}: {typed}\n"))
    return load_recipe(write(tmp_path, "{}\n"), [f"{key}={typed}"])


@pytest.mark.parametrize("how", ["file", "override"])
@pytest.mark.parametrize("typed, key, expected", NUMBERS, ids=[f"{k}={t}" for t, k, _ in NUMBERS])
def test_numbers_parse_as_typed(tmp_path, typed, key, expected, how):
    section, name = key.split(".")
    got = getattr(getattr(recipe_with(tmp_path, key, typed, how), section), name)
    assert got == expected and type(got) is type(expected)  # plain int / float, whatever the YAML said


STRINGS = [("model.revision", "1e4"), ("model.revision", "20231101"), ("model.revision", "1_000"),
           ("model.revision", "1.10"), ("model.tokenizer", "0x1f"), ("training.output_dir", "-3")]


@pytest.mark.parametrize("how", ["file", "override"])
@pytest.mark.parametrize("key, typed", STRINGS, ids=[f"{k}={t}" for k, t in STRINGS])
def test_str_fields_keep_the_text_as_typed(tmp_path, key, typed, how):
    section, name = key.split(".")
    assert getattr(getattr(recipe_with(tmp_path, key, typed, how), section), name) == typed


def test_a_hub_config_that_looks_like_a_number_stays_text(tmp_path):
    text = "data:\n  sources: [{hub: wikimedia/wikipedia, config: 20231101.en}]\n"
    assert load_recipe(write(tmp_path, text)).data.sources[0].config == "20231101.en"
    recipe = load_recipe(write(tmp_path, "{}\n"), ["data.sources=[{hub: x, config: 20231101}]"])
    assert recipe.data.sources[0].config == "20231101"


@pytest.mark.parametrize("override, message", [
    ("training.learning_rate=.inf", r"training\.learning_rate: expected a finite number, got inf"),
    ("training.learning_rate=.nan", r"training\.learning_rate: expected a finite number, got nan"),
    ("distillation.temperature=-.inf", r"distillation\.temperature: expected a finite number"),
    ("training.max_grad_norm=.inf", r"training\.max_grad_norm: expected a finite number"),
    ("training.learning_rate=inf", r"training\.learning_rate: expected a number, got 'inf'"),
    ("training.max_steps=.inf", r"training\.max_steps: expected an integer, got inf"),
    ("training.max_steps=1.5", r"training\.max_steps: expected an integer, got 1\.5"),
    ("training.max_steps=1__0", r"training\.max_steps: expected an integer, got '1__0'"),
])
def test_non_finite_and_fractional_numbers_are_refused(tmp_path, override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(write(tmp_path, "{}\n"), [override])


def test_fields_typed_any_receive_plain_numbers(tmp_path):
    recipe = load_recipe(write(tmp_path, "model:\n  from_scratch: true\n  config_overrides: {layer_norm_eps: 1e-12}\n"),
                         ["model.config_overrides.num_hidden_layers=1_0"])
    overrides = recipe.model.config_overrides
    assert overrides == {"layer_norm_eps": 1e-12, "num_hidden_layers": 10}
    assert type(overrides["layer_norm_eps"]) is float and type(overrides["num_hidden_layers"]) is int


def test_apply_overrides_gives_numbers():
    data = apply_overrides({}, ["training.learning_rate=1e-4", "training.max_steps=1_000"])
    assert data == {"training": {"learning_rate": 1e-4, "max_steps": 1000}}


def test_recipe_class_for_reads_the_same_numbers(tmp_path):
    from pofa.recipe import FinetuneRecipe, recipe_class_for

    path = write(tmp_path, "stage: finetune\ntraining:\n  learning_rate: 2E-5\n  epochs: 1e0\n")
    recipe = load_recipe(path, cls=recipe_class_for(path))
    assert isinstance(recipe, FinetuneRecipe)
    assert recipe.training.learning_rate == 2e-5 and recipe.training.epochs == 1.0


def test_dumped_recipe_round_trips_with_number_like_text(tmp_path):
    import dataclasses

    import yaml

    recipe = recipe_from_dict(PretrainRecipe, {
        "description": "1_000", "model": {"revision": "1e4", "tokenizer": "1:30"},
        "training": {"learning_rate": 1e-4, "adam_epsilon": 1e-12}, "data": {"sources": [{"files": ["0x1f"]}]}})
    text = dump_recipe(recipe)
    assert "revision: '1e4'" in text
    assert load_recipe(write(tmp_path, text)) == recipe
    # checkpoint.check_resume_compatible and the model card read recipe.yaml with plain yaml.safe_load (YAML 1.1).
    assert yaml.safe_load(text) == dataclasses.asdict(recipe)


def test_mixed_precision_no_is_the_word_not_false(tmp_path):
    """YAML 1.1 reads a bare `no` as false; `training.mixed_precision=no` means the option "no"."""
    from pofa.recipe import FinetuneRecipe, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("stage: finetune\ntraining:\n  mixed_precision: no\n")
    assert load_recipe(path, [], FinetuneRecipe).training.mixed_precision == "no"
    assert load_recipe(path, ["training.mixed_precision=bf16"], FinetuneRecipe).training.mixed_precision == "bf16"
    path.write_text("stage: finetune\n")
    assert load_recipe(path, [], FinetuneRecipe).training.mixed_precision is None  # the launcher's


def test_output_dir_flag_is_taken_as_typed():
    """A path is not YAML: `runs/a #1` keeps its `#`, `runs: x` stays a string."""
    from pofa.pretrain import with_output_dir
    from pofa.recipe import PretrainRecipe

    for folder in ("runs/a #1", "runs: x", "1e4"):
        assert with_output_dir(PretrainRecipe(), folder).training.output_dir == folder


# --- shipped recipes, by name ----------------------------------------------------------------------------------------


def test_a_shipped_recipe_loads_by_name_and_a_file_by_path(tmp_path):
    from pofa.recipe import FinetuneRecipe, RECIPES_DIR, recipe_class_for, recipe_path, shipped_recipes

    assert recipe_path("bert-base-sparse90") == RECIPES_DIR / "bert-base-sparse90.yaml"
    assert recipe_path("bert-base-sparse90.yaml") == RECIPES_DIR / "bert-base-sparse90.yaml"
    assert load_recipe("quickstart-teacher").stage == "teacher"
    assert recipe_class_for("quickstart-qat") is FinetuneRecipe
    assert len(shipped_recipes()) >= 20 and set(shipped_recipes()) == {p.stem for p in RECIPES.glob("*.yaml")}
    local = write(tmp_path, "training:\n  max_steps: 3\n")  # a file of the same name as given: the file wins
    assert recipe_path(local) == local and load_recipe(local).training.max_steps == 3


@pytest.mark.parametrize("given, message", [
    ("recipes/bert-base-sparse90.yaml", r"not the name of a shipped recipe; did you mean the shipped recipe "
                                        r"`bert-base-sparse90`\?"),
    ("bert-base-sparse99", r"bert-base-sparse99: recipe file not found.*pofa recipes.*bert-base-sparse90"),
])
def test_an_unknown_recipe_names_the_shipped_ones(given, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(given)


def test_every_recipe_key_is_documented():
    from pofa.recipe import FinetuneRecipe, recipe_keys

    for cls in (PretrainRecipe, FinetuneRecipe):
        keys = recipe_keys(cls)
        undocumented = [k.key for k in keys if k.type != "section" and not k.doc]
        assert not undocumented, f"{cls.__name__}: fields without a docstring under them: {undocumented}"
        assert len({k.key for k in keys}) == len(keys)


def test_recipe_keys_give_type_default_and_the_field_docstring():
    from pofa.recipe import FinetuneRecipe, recipe_keys

    keys = {k.key: k for k in recipe_keys(FinetuneRecipe)}
    lr = keys["training.learning_rate"]  # FinetuneTrainingConfig's own default and docstring over OptimConfig's
    assert (lr.type, lr.default) == ("float", "2.0e-05") and lr.doc.startswith("Peak learning rate")
    assert keys["training.adam_beta1"].doc == "AdamW beta1."  # inherited from OptimConfig
    assert keys["training.mixed_precision"].type == "one of: no, bf16, fp16 or null"
    assert keys["hub.repo_id"].default == "null" and keys["hub"].type == "section"
    pretrain = {k.key: k for k in recipe_keys(PretrainRecipe)}
    assert pretrain["data.sources"].default == "[{config: null, embedded: python-docs, files: [], hub: null, " \
        "max_documents: null, revision: null, split: train, streaming: false, text_field: text}]"
    assert pretrain["data.sources[].hub"].doc.startswith("A `datasets` Hub id")


def test_the_description_of_a_recipe_is_its_first_sentence(tmp_path):
    from pofa.recipe import recipe_description

    path = write(tmp_path, "description: >-\n  Sparse transfer, e.g. to SST-2 (Zafrir et al. 2021). Second sentence.\n")
    assert recipe_description(path) == "Sparse transfer, e.g. to SST-2 (Zafrir et al. 2021)."
    assert recipe_description(write(tmp_path, "{}\n")) == ""


@pytest.mark.parametrize("repo_id, message", [("no-owner", "names no owner"), ("a b/c", "not a Hub repository id")])
def test_a_hub_repo_id_is_checked_before_any_work(tmp_path, repo_id, message):
    with pytest.raises(RecipeError, match=f"hub.repo_id: .*{message}"):
        load_recipe(write(tmp_path, "{}\n"), [f"hub.repo_id={repo_id}"])


def test_a_pruning_ramp_whose_end_misses_every_event_is_refused():
    """Masks change only at start_step + k x frequency: with end_step 10 and frequency 4 the last event is at 8
    (sparsity short of the target) unless end_pruning_step lets one happen at 12."""
    from pofa.recipe import PretrainRecipe, RecipeError, recipe_from_dict

    ramp = {"enabled": True, "start_step": 0, "end_step": 10, "frequency": 4}
    with pytest.raises(RecipeError, match=r"pruning.end_step: no pruning event falls at or after it .* >= 12"):
        recipe_from_dict(PretrainRecipe, {"pruning": ramp, "training": {"max_steps": 20}})
    recipe_from_dict(PretrainRecipe, {"pruning": {**ramp, "end_pruning_step": 12}, "training": {"max_steps": 20}})
    recipe_from_dict(PretrainRecipe, {"pruning": {**ramp, "end_step": 12}, "training": {"max_steps": 20}})
