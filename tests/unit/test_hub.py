"""pofa.hub: model card, folder validation, dry run, and the upload path against a local fake Hub."""

from __future__ import annotations

import json
import shutil
import socket
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants
from safetensors.torch import save_file
from transformers import BertConfig, BertForMaskedLM, BertTokenizer

from pofa import hub
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
RECIPE = {
    "stage": "student",
    "description": "90% sparse student distilled from the prepared teacher",
    "model": {"name_or_path": "runs/teacher/final"},
    "training": {"max_steps": 100, "learning_rate": 1e-4, "per_device_batch_size": 8},
    "pruning": {"enabled": True, "target_sparsity": 0.5, "start_step": 0, "end_step": 80, "frequency": 10},
    "distillation": {"teacher": "runs/teacher/final", "temperature": 2.0},
}


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


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BertForMaskedLM at 50% encoder sparsity with every pofa artifact, written as pofa's stages write them."""
    folder = tmp_path_factory.mktemp("pofa") / "final"
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(59)]
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=32)
    model = BertForMaskedLM(config)
    masks = {}
    with torch.no_grad():
        for name in _targets(model):
            weight = model.get_parameter(name)
            masks[name] = weight.abs() > weight.abs().flatten().median()
            weight.mul_(masks[name])
    store = MaskStore(masks)
    model.save_pretrained(folder)
    vocab_file = folder.parent / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    BertTokenizer(vocab_file=str(vocab_file)).save_pretrained(folder)
    store.save(folder / "masks.safetensors")
    (folder / "sparsity.json").write_text(json.dumps(sparsity_report(model, store)))
    (folder / "recipe.yaml").write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    (folder / "eval_results.json").write_text(json.dumps(
        {"task": "sst2", "dataset": "glue", "split": "validation", "metrics": {"accuracy": 0.91}}))
    return folder


@pytest.fixture
def folder(model_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the model folder that a test may change."""
    return Path(shutil.copytree(model_dir, tmp_path / "model"))


def _read_card(folder: Path) -> ModelCard:
    return ModelCard.load(folder / "README.md")


# --------------------------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------------------------


def test_card_metadata_parses_back(folder: Path) -> None:
    prepare_publication(folder, **CARD, repo_id="pofa/tiny-bert-50")
    card = _read_card(folder)
    data = card.data
    assert data.base_model == "bert-base-uncased"
    assert data.datasets == ["wikimedia/wikipedia"]
    assert data.license == "apache-2.0"
    assert data.library_name == "transformers"
    assert data.pipeline_tag == "fill-mask"  # from the BertForMaskedLM head
    assert {"pofa", "sparse", "pruned", "bert"} <= set(data.tags)
    assert not {"quantized", "int8"} & set(data.tags)
    assert data.model_name == "tiny-bert-50"
    (result,) = data.eval_results
    assert (result.task_type, result.metric_type, result.metric_value) == ("text-classification", "accuracy", 0.91)
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("glue", "sst2", "validation")
    assert data.to_dict()["model-index"][0]["results"][0]["metrics"] == [{"type": "accuracy", "value": 0.91}]


def test_card_tags_int8_when_an_int8_artifact_exists(folder: Path) -> None:
    (folder / "model.int8.onnx").write_bytes(b"not really onnx")
    assert {"quantized", "int8"} <= set(build_model_card(folder, **CARD).data.tags)
    (folder / "model.int8.onnx").unlink()
    save_file({"values": torch.zeros(4, dtype=torch.int8)}, str(folder / "compact.safetensors"))
    assert {"quantized", "int8"} <= set(build_model_card(folder, **CARD, extra_tags=["glue"]).data.tags)
    save_file({"values": torch.zeros(4)}, str(folder / "compact.safetensors"))
    tags = build_model_card(folder, **CARD, extra_tags=["glue"]).data.tags
    assert "int8" not in tags and "glue" in tags


def test_card_sparsity_table_lists_every_targeted_layer(folder: Path) -> None:
    text = build_model_card(folder, **CARD).text
    targets = json.loads((folder / "sparsity.json").read_text())["parameters"]
    assert len(targets) == 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    for name, p in targets.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| `{name}` |"))
        assert f"{100 * p['sparsity']:.2f}%" in row
        assert "×".join(map(str, p["shape"])) in row


def test_card_body_sections(folder: Path) -> None:
    text = build_model_card(folder, **CARD, repo_id="pofa/tiny-bert-50").text
    assert "**50.00% of the encoder's Linear weights are zero**" in text
    for name in ("model.safetensors", "masks.safetensors", "recipe.yaml", "sparsity.json", "config.json"):
        size = (folder / name).stat().st_size
        assert any(f"| `{name}` |" in line and ("B |" in line) for line in text.splitlines()), name
        assert size > 0
    assert "## How it was made" in text and "### Stage: student" in text
    assert "| `pruning.target_sparsity` | `0.5` |" in text and "| `training.learning_rate` | `0.0001` |" in text
    assert "<details>" in text and "target_sparsity: 0.5" in text  # the full recipe, collapsible
    assert 'AutoModelForMaskedLM.from_pretrained("pofa/tiny-bert-50")' in text
    assert 'AutoTokenizer.from_pretrained("pofa/tiny-bert-50")' in text
    assert "pofa finetune --recipe path/to/finetune.yaml model.name_or_path=pofa/tiny-bert-50" in text
    assert "masks.safetensors" in text and "keeps every pruned weight at zero" in text
    assert "arXiv:2111.05754" in text and "Prune Once for All: Sparse Pre-Trained Language Models" in text


def test_card_reads_a_report_with_totals(folder: Path) -> None:
    report = json.loads((folder / "sparsity.json").read_text())
    totals = {"encoder_linear_sparsity": 0.9, "model_zero_fraction": 0.6}
    report = {"parameters": report["parameters"], "totals": totals}
    (folder / "sparsity.json").write_text(json.dumps(report))
    text = build_model_card(folder, **CARD).text
    assert "**90.00% of the encoder's Linear weights are zero**" in text and "- `model_zero_fraction`: 60.00%" in text


def test_card_without_optional_files(folder: Path) -> None:
    for name in ("eval_results.json", "recipe.yaml", "sparsity.json", "masks.safetensors"):
        (folder / name).unlink()
    prepare_publication(folder, base_model=None, datasets=[])
    card = _read_card(folder)
    assert card.data.eval_results is None and card.data.base_model is None
    assert "No `recipe.yaml` was published" in card.text and "## Sparsity per layer" not in card.text


def test_card_reads_a_multi_stage_recipe(folder: Path) -> None:
    stages = [dict(RECIPE, stage="teacher", pruning={"enabled": False}), RECIPE]
    (folder / "recipe.yaml").write_text(yaml.safe_dump_all(stages, sort_keys=False))
    text = build_model_card(folder, **CARD).text
    assert "Stages recorded in `recipe.yaml`: **teacher**, **student**." in text


@pytest.mark.parametrize("field, value", [("base_model", "./runs/teacher"), ("datasets", ["/data/wiki"])])
def test_card_rejects_paths_as_hub_ids(folder: Path, field: str, value: object) -> None:
    with pytest.raises(PublicationError, match=field):
        build_model_card(folder, **{**CARD, field: value})


def test_card_rejects_malformed_eval_results(folder: Path) -> None:
    (folder / "eval_results.json").write_text(json.dumps({"task": "sst2", "metrics": {"accuracy": "high"}}))
    with pytest.raises(PublicationError, match=r"eval_results.json: metrics.accuracy is 'high'"):
        build_model_card(folder, **CARD)


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
