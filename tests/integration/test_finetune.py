"""Sparse transfer through the real fine-tuning loop, on a tiny BERT and small local task files."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pofa.finetune import finetune, finetune_seeds, main
from pofa.recipe import FinetuneRecipe, recipe_from_dict
from pofa.sparsity import DEFAULT_TARGETS, MaskStore, magnitude_masks, select_targets
from tests.conftest import assert_same_safetensors

WORDS_POS = ["true", "value", "object", "class", "method", "list"]
WORDS_NEG = ["false", "error", "exception", "raise", "none", "fail"]


@pytest.fixture(scope="module")
def sentiment_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 96), ("validation", 40)):
        path = folder / f"{split}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for i in range(n):
                label = i % 2
                words = rng.choices(WORDS_POS if label else WORDS_NEG, k=4) + rng.choices(WORDS_POS + WORDS_NEG, k=2)
                rng.shuffle(words)
                writer.writerow([" ".join(words), label])
        files[split] = str(path)
    return files


@pytest.fixture(scope="module")
def sparse_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny BERT with 70% of its encoder Linear weights pruned by magnitude, and its mask file."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("sparse_bert")
    model = AutoModelForMaskedLM.from_pretrained(tiny_model_dir)
    params = dict(model.named_parameters())
    names = select_targets(params.items(), DEFAULT_TARGETS)
    masks = magnitude_masks({n: params[n].detach() for n in names}, 0.7)
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    MaskStore(masks).save(folder / "masks.safetensors")
    return folder


def recipe(model_dir, out, files, **sections) -> FinetuneRecipe:
    data = {
        "model": {"name_or_path": str(model_dir)},
        "task": {"name": "sst2", "data_files": dict(files), "max_seq_length": 32},
        "training": {"output_dir": str(out), "epochs": 2, "per_device_batch_size": 8, "learning_rate": 1e-3,
                     "warmup_ratio": 0.1, "log_every": 100, "eval_batch_size": 16},
    }
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return recipe_from_dict(FinetuneRecipe, data)


def encoder_zeros(folder: Path) -> dict[str, torch.Tensor]:
    weights = load_file(Path(folder) / "model.safetensors")
    return {n.split("encoder.", 1)[1]: weights[n] == 0 for n in select_targets(weights.items(), DEFAULT_TARGETS)}


def assert_same_pattern(before: Path, after: Path):
    a, b = encoder_zeros(before), encoder_zeros(after)
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        assert torch.equal(a[name], b[name]), f"zero pattern of {name} changed"
        assert a[name].float().mean().item() == pytest.approx(0.7, abs=1e-3)


def test_pattern_is_identical_after_fine_tuning(sparse_model_dir, sentiment_files, tmp_path):
    result = finetune(recipe(sparse_model_dir, tmp_path / "ft", sentiment_files))
    assert_same_pattern(sparse_model_dir, result.final_dir)
    assert result.sparsity == pytest.approx(0.7, abs=1e-3)
    evaluation = json.loads((result.final_dir / "eval_results.json").read_text())
    assert set(evaluation["metrics"]) == {"validation/accuracy"}
    for name in ("masks.safetensors", "sparsity.json", "recipe.yaml", "compact.safetensors"):
        assert (result.final_dir / name).is_file(), name
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(result.final_dir)


def test_pattern_holds_with_distillation_accumulation_and_bf16(sparse_model_dir, tiny_model_dir, sentiment_files,
                                                               tmp_path):
    teacher = finetune(recipe(tiny_model_dir, tmp_path / "teacher", sentiment_files, sparsity={"masks": "none"}))
    assert teacher.sparsity is None
    student = finetune(recipe(sparse_model_dir, tmp_path / "student", sentiment_files,
                              distillation={"teacher": str(teacher.final_dir), "hard_weight": 0.0,
                                            "soft_weight": 1.0, "temperature": 2.0},
                              training={"gradient_accumulation_steps": 2, "mixed_precision": "bf16"}))
    assert_same_pattern(sparse_model_dir, student.final_dir)


def test_pattern_lock_from_zeros_when_there_is_no_mask_file(sparse_model_dir, sentiment_files, tmp_path):
    import shutil

    folder = tmp_path / "no_masks"
    shutil.copytree(sparse_model_dir, folder)
    (folder / "masks.safetensors").unlink()
    result = finetune(recipe(folder, tmp_path / "ft", sentiment_files))
    assert_same_pattern(sparse_model_dir, result.final_dir)
    with pytest.raises(Exception, match="has no masks.safetensors"):
        finetune(recipe(folder, tmp_path / "ft2", sentiment_files, sparsity={"masks": "file"}))


def test_dense_model_warns_loudly(tiny_model_dir, sentiment_files, tmp_path, capsys):
    finetune(recipe(tiny_model_dir, tmp_path / "ft", sentiment_files, training={"max_steps": 2}))
    assert "nothing to lock" in capsys.readouterr().err


def test_pairs_qqp_from_local_jsonl_report_accuracy_and_f1(sparse_model_dir, tmp_path):
    rng = random.Random(1)
    files = {}
    for split, n in (("train", 48), ("validation", 24)):
        path = tmp_path / f"{split}.jsonl"
        rows = [{"question1": " ".join(rng.choices(WORDS_POS, k=4)), "question2": " ".join(rng.choices(WORDS_NEG, k=3)),
                 "label": i % 2} for i in range(n)]
        path.write_text("\n".join(json.dumps(r) for r in rows))
        files[split] = str(path)
    result = finetune(recipe(sparse_model_dir, tmp_path / "qqp", files, task={"name": "qqp"},
                             training={"max_steps": 3}))
    assert set(result.metrics) == {"validation/accuracy", "validation/f1"}
    assert_same_pattern(sparse_model_dir, result.final_dir)


def write_squad_json(path: Path) -> Path:
    """A small SQuAD v1.1-format file; contexts of different lengths, so that batches hold padded windows."""
    contexts = ["the class statement creates a new object type", "a list is a mutable sequence of values",
                "an exception is raised when an error occurs and the method cannot return a value to the caller"]
    paragraphs = []
    for c, context in enumerate(contexts):
        answer = context.split()[-2]
        qas = [{"id": f"{c}-{q}", "question": f"what does the text say {q}",
                "answers": [{"text": answer, "answer_start": context.index(answer)}]} for q in range(6)]
        paragraphs.append({"context": context, "qas": qas})
    path.write_text(json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": paragraphs}]}))
    return path


@pytest.fixture(scope="module")
def squad_files(tmp_path_factory) -> dict[str, str]:
    path = write_squad_json(tmp_path_factory.mktemp("squad") / "squad.json")
    return {"train": str(path), "validation": str(path)}


SQUAD_TASK = {"name": "squad", "max_seq_length": 32, "doc_stride": 8}


def test_squad_format_json_trains_and_evaluates(sparse_model_dir, squad_files, tmp_path):
    result = finetune(recipe(sparse_model_dir, tmp_path / "qa", squad_files, task=SQUAD_TASK,
                             training={"max_steps": 4}))
    assert set(result.metrics) == {"validation/exact_match", "validation/f1"}
    assert 0.0 <= result.metrics["validation/f1"] <= 100.0
    assert_same_pattern(sparse_model_dir, result.final_dir)


@pytest.mark.parametrize("sections", [
    {},
    {"training": {"gradient_accumulation_steps": 2, "mixed_precision": "bf16"}},
    {"quantization": {"enabled": True, "weight_bits": 7}},
], ids=["plain", "accumulation-bf16", "qat"])
def test_squad_distillation_from_a_teacher_keeps_the_pattern(sparse_model_dir, tiny_model_dir, squad_files, tmp_path,
                                                             capsys, sections):
    """Start and end logits are distilled over each window's positions, padding excluded (`span_kd_loss`)."""
    sections = {k: dict(v) for k, v in sections.items()}
    sections.setdefault("training", {}).update(max_steps=2, log_every=1, per_device_batch_size=6)
    result = finetune(recipe(sparse_model_dir, tmp_path / "qa", squad_files, task=SQUAD_TASK,
                             distillation={"teacher": str(tiny_model_dir), "hard_weight": 0.0, "soft_weight": 1.0,
                                           "temperature": 2.0}, **sections))
    losses = [float(line.split("loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("step ") and " loss " in line]
    assert len(losses) == 2 and all(math.isfinite(v) and v > 0 for v in losses), losses
    assert set(result.metrics) == {"validation/exact_match", "validation/f1"}
    assert_same_pattern(sparse_model_dir, result.final_dir)


def test_several_seeds_report_each_and_the_mean(sparse_model_dir, sentiment_files, tmp_path):
    summary = finetune_seeds(recipe(sparse_model_dir, tmp_path / "seeds", sentiment_files,
                                    training={"max_steps": 3}), [1, 2])
    accs = [summary["seeds"][s]["validation/accuracy"] for s in ("1", "2")]
    assert summary["aggregate"]["validation/accuracy"]["mean"] == pytest.approx(sum(accs) / 2)
    assert (tmp_path / "seeds" / "seed-1" / "final").is_dir() and (tmp_path / "seeds" / "seeds.json").is_file()


@pytest.mark.parametrize("body, message", [
    ("task:\n  name: mnli2\n", "task.name"),
    ("task:\n  name: sst2\n  label_field: polarity\n", "polarity"),
    ("task:\n  name: sst2\n  max_seq_length: 4096\n", "task.max_seq_length: 4096 exceeds"),
    ("training:\n  epochz: 1\n", "unknown key training.epochz"),
])
def test_bad_input_names_the_field(sparse_model_dir, sentiment_files, tmp_path, capsys, body, message):
    text = f"stage: finetune\nmodel:\n  name_or_path: {sparse_model_dir}\n" + body
    if "task:" not in body:
        text += "task:\n  name: sst2\n"
    text += "  data_files: {train: %s, validation: %s}\n" % (sentiment_files["train"], sentiment_files["validation"]) \
        if "task:" in text else ""
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert main(["--recipe", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_labels_out_of_range_name_the_value(sparse_model_dir, tmp_path, capsys):
    path = tmp_path / "bad.csv"
    path.write_text("sentence,label\nthe class,0\nthe list,7\n")
    r = tmp_path / "r.yaml"
    r.write_text(f"stage: finetune\nmodel:\n  name_or_path: {sparse_model_dir}\n"
                 f"task:\n  name: sst2\n  data_files: {{train: {path}, validation: {path}}}\n")
    assert main(["--recipe", str(r), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "7" in err and "label" in err


def test_qat_fine_tuning_killed_and_resumed_equals_straight_run(sparse_model_dir, sentiment_files, tmp_path,
                                                                kill_after_checkpoint):
    sections = {"training": {"max_steps": 6, "save_every": 3}, "quantization": {"enabled": True},
                "export": {"compact": True}}
    straight = finetune(recipe(sparse_model_dir, tmp_path / "a", sentiment_files, **sections))
    run = recipe(sparse_model_dir, tmp_path / "b", sentiment_files, **sections)
    with pytest.raises(kill_after_checkpoint(3)):
        finetune(run)
    resumed = finetune(run, resume=True)
    assert_same_safetensors(straight.final_dir / "model.safetensors", resumed.final_dir / "model.safetensors")
    assert resumed.metrics == straight.metrics
    # int8 values and activation scales too
    assert_same_safetensors(straight.final_dir / "compact.safetensors", resumed.final_dir / "compact.safetensors")
    assert_same_pattern(sparse_model_dir, resumed.final_dir)


@pytest.fixture(scope="module")
def qat_final(sparse_model_dir, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qat") / "run"
    result = finetune(recipe(sparse_model_dir, out, sentiment_files, training={"max_steps": 4},
                             quantization={"enabled": True, "weight_bits": 7}, export={"onnx": True, "compact": True}))
    return result.final_dir


def test_qat_stage_exports_int8_onnx_and_compact_with_zeros_kept(qat_final, sparse_model_dir):
    import onnx

    from pofa.compact import compact_size_report, load_compact_model

    assert_same_pattern(sparse_model_dir, qat_final)
    graph = onnx.load(str(qat_final / "model.onnx")).graph
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_weights) == 12  # every encoder Linear is int8 in the file
    from pofa.quant import convert_to_int8

    model = load_compact_model(qat_final / "compact.safetensors", qat_final)
    masks = MaskStore.load(qat_final / "masks.safetensors")
    q = {f"{name}.weight": m.weight.q for name, m in convert_to_int8(model).items()}
    for name, mask in masks.items():
        assert int(q[name][~mask].abs().sum()) == 0, f"{name}: a pruned weight has a non-zero int8 value"
    assert compact_size_report(qat_final / "compact.safetensors")["encoder_linear_weights"]["ratio"] > 4


def test_export_command(qat_final, sparse_model_dir, tmp_path, capsys):
    from pofa.cli import main as pofa

    assert pofa(["export", str(qat_final), "--int8", "--output", str(tmp_path / "m.onnx"), "--seq-len", "16"]) == 0
    assert (tmp_path / "m.onnx").is_file()
    assert pofa(["export", str(sparse_model_dir), "--int8"]) == 2
    assert "QAT" in capsys.readouterr().err
    assert pofa(["export", str(tmp_path), "--int8"]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_push_dry_run_and_bench_commands(qat_final, tmp_path, capsys):
    import shutil

    from huggingface_hub import ModelCard

    from pofa.cli import main as pofa

    folder = tmp_path / "pub"
    shutil.copytree(qat_final, folder)
    assert pofa(["push", str(folder), "someone/tiny-sparse", "--dry-run", "--base-model", "google-bert/bert-base-uncased",
                 "--dataset", "stanfordnlp/sst2"]) == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "google-bert/bert-base-uncased" and "sparse" in card.data.tags
    assert pofa(["push", str(tmp_path / "nothing"), "someone/x", "--dry-run"]) == 2
    assert pofa(["bench-inference", str(qat_final), "--onnx", str(qat_final / "model.onnx"), "--batch-sizes", "1",
                 "--seq-len", "16", "--repeats", "1"]) == 0
    assert "onnx_int8" in capsys.readouterr().out


def test_a_teacher_with_another_vocabulary_is_refused(sparse_model_dir, sentiment_files, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from pofa.modeling import ModelLoadError

    other = tmp_path / "other"
    BertForSequenceClassification(BertConfig(vocab_size=77, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=2)).save_pretrained(other)
    with pytest.raises(ModelLoadError, match="distillation.teacher: .* 77 tokens"):
        finetune(recipe(sparse_model_dir, tmp_path / "ft", sentiment_files, distillation={"teacher": str(other)}))
