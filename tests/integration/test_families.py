"""Every registered model family through the whole pipeline, on a tiny random config of its own.

Per family: student pruning (MLM + distillation from the dense model + gradual magnitude pruning) for a few steps;
then sparse transfer with QAT on a small local sentiment task, the zero pattern checked against the student's masks,
the int8 ONNX export checked for parity by the stage itself, the compact checkpoint loaded back and computing what
the ONNX file computes, and the sparse int8 runtime computing it too. About 5 seconds per family.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pofa.families import encoder_linear_weights, family_of
from pofa.finetune import finetune
from pofa.pretrain import train
from pofa.recipe import FinetuneRecipe, PretrainRecipe, recipe_from_dict
from pofa.sparsity import MaskStore
from tests._tiny_families import MODEL_TYPES, tiny_config

pytestmark = pytest.mark.slow

WORDS = {1: ["true", "value", "object", "class", "method", "list"],
         0: ["false", "error", "exception", "raise", "none", "fail"]}
SPARSITY = 0.5


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 48), ("validation", 24)):
        with open(folder / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for i in range(n):
                writer.writerow([" ".join(rng.choices(WORDS[i % 2], k=5)), i % 2])
        files[split] = str(folder / f"{split}.csv")
    return files


def tiny_family_folder(folder: Path, model_type: str, tokenizer_dir: Path) -> Path:
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    family = family_of(model_type)
    # as the family's own tokenizers: segment ids only where the models read them
    tokenizer.model_input_names = list(family.input_names)
    torch.manual_seed(0)
    AutoModelForMaskedLM.from_config(tiny_config(model_type, vocab_size=len(tokenizer))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def student_recipe(model_dir: Path, out: Path, cache: Path) -> PretrainRecipe:
    return recipe_from_dict(PretrainRecipe, {
        "stage": "student",
        "model": {"name_or_path": str(model_dir)},
        "data": {"sources": [{"embedded": "python-docs", "max_documents": 20}], "max_seq_length": 32,
                 "eval_fraction": 0.1, "max_eval_blocks": 8, "cache_dir": str(cache)},
        "training": {"output_dir": str(out), "max_steps": 4, "per_device_batch_size": 4, "learning_rate": 1e-3,
                     "eval_every": 1000, "save_every": 1000, "log_every": 1000, "seed": 1},
        "pruning": {"enabled": True, "target_sparsity": SPARSITY, "start_step": 0, "end_step": 2, "frequency": 1},
        "distillation": {"teacher": str(model_dir)},
    })


def transfer_recipe(model_dir: Path, out: Path, files: dict[str, str]) -> FinetuneRecipe:
    return recipe_from_dict(FinetuneRecipe, {
        "model": {"name_or_path": str(model_dir)},
        "task": {"name": "sst2", "data_files": files, "max_seq_length": 16},
        "training": {"output_dir": str(out), "epochs": 1, "per_device_batch_size": 16, "learning_rate": 1e-3,
                     "log_every": 100, "eval_batch_size": 32},
        "quantization": {"enabled": True, "weight_bits": 7},
        "export": {"onnx": True, "compact": True},
    })


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_end_to_end(model_type, tiny_tokenizer_dir, sentiment_files, tmp_path, cache_dir):
    from pofa.compact import load_compact_model
    from pofa.quant.export import check_onnx_parity

    dense = tiny_family_folder(tmp_path / "dense", model_type, tiny_tokenizer_dir)

    student = train(student_recipe(dense, tmp_path / "student", cache_dir))
    masks = MaskStore.load(student.final_dir / "masks.safetensors")
    from transformers import AutoModelForMaskedLM

    mlm = AutoModelForMaskedLM.from_pretrained(student.final_dir)
    assert sorted(masks.names()) == sorted(encoder_linear_weights(mlm)), "every encoder Linear is pruned"
    for name, sparsity in masks.layer_sparsity().items():
        assert sparsity == pytest.approx(SPARSITY, abs=0.02), name
    weights = load_file(student.final_dir / "model.safetensors")
    for name, mask in masks.items():
        assert not weights[name][~mask].any(), f"{name} is non-zero where pruned"

    transfer = finetune(transfer_recipe(student.final_dir, tmp_path / "transfer", sentiment_files))
    task_weights = load_file(transfer.final_dir / "model.safetensors")
    for name, mask in masks.items():
        assert torch.equal(task_weights[name] == 0, weights[name] == 0), f"zero pattern of {name} changed"
    assert (transfer.final_dir / "model.onnx").is_file()  # written after the stage's own parity check passed

    # the compact file holds the int8 model: the same zeros, and the weights of the exported ONNX graph
    model = load_compact_model(transfer.final_dir / "compact.safetensors", transfer.final_dir)
    restored = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(restored[name] == 0, weights[name] == 0), f"compact zeros of {name}"
    # the compact model computes what the exported ONNX file computes
    ids = torch.randint(5, 100, (4, 9))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if "token_type_ids" in family_of(model_type).input_names:
        batch["token_type_ids"] = torch.zeros_like(ids)
    parity = check_onnx_parity(model, transfer.final_dir / "model.onnx", [batch])
    assert parity["agreement"] == 1.0 and parity["max_abs_diff"] < 1e-4
    # and the sparse int8 CPU runtime computes it too (the family says which Linears run sparse)
    from pofa.runtime import load_sparse_model

    runtime = load_sparse_model(transfer.final_dir)
    with torch.no_grad():
        expected, got = model(**batch).logits, runtime(**batch).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-3)
