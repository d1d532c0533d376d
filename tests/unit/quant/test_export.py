"""ONNX export: int8 QDQ graphs run in onnxruntime and agree with the fake-quantized PyTorch model."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertForQuestionAnswering, BertForSequenceClassification

from pofa.quant.qat import export_mode
from pofa.quant import (
    QATConfig,
    check_onnx_parity,
    export_onnx,
    onnx_session,
    prepare_qat_,
    require_onnx_parity,
)

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def random_batch(batch_size: int = 8, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, TINY["vocab_size"], (batch_size, seq_len), generator=g)
    mask = torch.ones_like(ids)
    mask[0, seq_len // 2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def qat_model(
    cls=BertForSequenceClassification, *, quantize_embeddings: bool = False, seed: int = 0,
    config: QATConfig | None = None, **overrides,
):
    """A tiny model prepared for QAT whose observers have seen a few batches (training mode, no optimizer)."""
    torch.manual_seed(seed)
    model = cls(BertConfig(**(TINY | overrides)))
    prepare_qat_(model, config or QATConfig(quantize_embeddings=quantize_embeddings))
    model.train()
    with torch.no_grad():
        for i in range(4):
            model(**random_batch(seed=100 + i))
    return model.eval()


def parity_batches(n: int = 6) -> list[dict[str, torch.Tensor]]:
    return [random_batch(batch_size=16, seq_len=8 + 3 * i, seed=i) for i in range(n)]


# Exact integer kernels on any x86 CPU: 7-bit weights as int8 (U8S8 cannot saturate), or 8-bit weights as uint8 (U8U8).
EXACT_EXPORTS = [
    (QATConfig(weight_bits=7), "int8"),
    (QATConfig(weight_bits=7, per_channel=False), "int8"),
    (QATConfig(), "uint8"),
]


@pytest.mark.parametrize(("config", "weight_dtype"), EXACT_EXPORTS, ids=["7bit-int8", "7bit-per-tensor", "8bit-uint8"])
def test_int8_classifier_runs_in_onnxruntime_with_parity(tmp_path, config, weight_dtype):
    # Large initial weights so that quantization visibly moves the logits: the check below is then able to tell
    # "onnxruntime applied our scales" from "onnxruntime computed in float".
    model = qat_model(config=config, initializer_range=0.2)
    path = export_onnx(model, random_batch(2, 7), tmp_path / "cls.int8.onnx", int8=True, weight_dtype=weight_dtype)
    report = check_onnx_parity(model, path, parity_batches())
    assert report["quantized_file"]
    assert report["n_predictions"] == 6 * 16
    assert report["agreement"] >= 0.99, report
    with torch.no_grad(), export_mode(model, "float"):
        float_logits = model(**parity_batches()[0]).logits
    with torch.no_grad():
        quantization_effect = float((model(**parity_batches()[0]).logits - float_logits).abs().max())
    assert report["max_abs_diff"] < 0.1 * quantization_effect, (report, quantization_effect)

    graph = onnx.load(str(path)).graph
    ops = Counter(node.op_type for node in graph.node)
    assert ops["QuantizeLinear"] == 12 and ops["DequantizeLinear"] >= 24
    initializers = {i.name: i for i in graph.initializer}
    qweight = initializers["bert.encoder.layer.0.attention.self.query.onnx_qweight_t"]
    assert qweight.data_type == (onnx.TensorProto.INT8 if weight_dtype == "int8" else onnx.TensorProto.UINT8)
    assert "bert.encoder.layer.0.attention.self.query.weight" not in initializers  # no fp32 copy left behind


def test_default_8bit_int8_export_agrees(tmp_path):
    model = qat_model()  # QATConfig() defaults, BERT's initializer range
    path = export_onnx(model, random_batch(2, 7), tmp_path / "cls.int8.onnx", int8=True)
    assert check_onnx_parity(model, path, parity_batches())["agreement"] >= 0.99


def test_int8_export_has_dynamic_batch_and_sequence(tmp_path):
    model = qat_model()
    path = export_onnx(model, random_batch(2, 7), tmp_path / "cls.onnx", int8=True)
    session = onnx_session(path)
    for batch_size, seq_len in [(1, 5), (3, 30)]:
        feed = {k: v.numpy() for k, v in random_batch(batch_size, seq_len).items()}
        (logits,) = session.run(None, feed)
        assert logits.shape == (batch_size, 2)


def test_onnxruntime_fuses_qdq_into_integer_matmuls(tmp_path):
    import onnxruntime as ort

    model = qat_model()
    path = export_onnx(model, random_batch(2, 7), tmp_path / "cls.onnx", int8=True)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = Counter(node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    integer_matmuls = ops["MatMulIntegerToFloat"] + ops["QLinearMatMul"] + ops["MatMulInteger"]
    assert integer_matmuls == 12, ops


@pytest.mark.parametrize("cls", [BertForQuestionAnswering, BertForMaskedLM])
def test_int8_qa_and_mlm_parity(tmp_path, cls):
    model = qat_model(cls, quantize_embeddings=True)
    path = export_onnx(model, random_batch(2, 7), tmp_path / "m.onnx", int8=True)
    report = require_onnx_parity(model, path, parity_batches(3), min_agreement=0.99)
    names = set(report["per_output"])
    assert names == ({"start_logits", "end_logits"} if cls is BertForQuestionAnswering else {"logits"})


def test_int8_file_is_much_smaller_than_float(tmp_path):
    model = qat_model(quantize_embeddings=True, hidden_size=128, intermediate_size=512, vocab_size=1000)
    int8 = export_onnx(model, random_batch(2, 7), tmp_path / "q.onnx", int8=True).stat().st_size
    fp32 = export_onnx(model, random_batch(2, 7), tmp_path / "f.onnx", int8=False).stat().st_size
    # Not 4x at this size: the float pooler, per-row scales and the graph itself weigh more in a tiny model.
    assert fp32 / int8 > 3.0, (fp32, int8)


def test_int8_export_without_qat_raises_naming_the_fix(tmp_path):
    model = BertForSequenceClassification(BertConfig(**TINY))
    with pytest.raises(ValueError, match=r"prepare_qat_.*int8=False"):
        export_onnx(model, random_batch(), tmp_path / "x.onnx", int8=True)
    assert not (tmp_path / "x.onnx").exists()


def test_int8_export_needs_8_bit_activations(tmp_path):
    model = qat_model(config=QATConfig(activation_bits=6))
    with pytest.raises(ValueError, match="activation_bits=8"):
        export_onnx(model, random_batch(), tmp_path / "x.onnx", int8=True)


def test_float_export_matches_and_restores_training_mode(tmp_path):
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TINY)).train()
    path = export_onnx(model, random_batch(2, 7), tmp_path / "f.onnx", int8=False, parity_batches=parity_batches(2))
    assert model.training
    report = check_onnx_parity(model, path, parity_batches(2))
    assert report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4 and not report["quantized_file"]


def test_export_from_a_tokenizer(tmp_path):
    class Tokenizer:  # the part of the HF tokenizer API export_onnx uses
        def __call__(self, texts, padding, return_tensors):
            ids = torch.tensor([[2, 5, 7, 3, 0], [2, 9, 9, 9, 3]])
            return {"input_ids": ids, "attention_mask": (ids != 0).long(), "token_type_ids": torch.zeros_like(ids)}

    model = qat_model()
    path = export_onnx(model, Tokenizer(), tmp_path / "t.onnx", int8=True)
    assert [i.name for i in onnx_session(path).get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]


def test_require_parity_raises_below_threshold(tmp_path):
    model = qat_model()
    path = export_onnx(model, random_batch(2, 7), tmp_path / "cls.onnx", int8=True)
    other = qat_model(seed=1)  # a different model: predictions disagree often
    report = check_onnx_parity(other, path, parity_batches())
    assert report["agreement"] < 1.0
    with pytest.raises(ValueError, match="agreement"):
        require_onnx_parity(other, path, parity_batches(), min_agreement=0.999)
    assert np.isfinite(report["mean_abs_diff"])


def test_distilbert_int8_export(tmp_path):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    torch.manual_seed(0)
    config = DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    model = DistilBertForSequenceClassification(config)
    prepare_qat_(model, QATConfig(weight_bits=7)).train()
    with torch.no_grad():
        model(input_ids=random_batch()["input_ids"])
    batches = parity_batches(2)  # they carry token_type_ids, which DistilBERT does not take: export drops them
    path = export_onnx(model.eval(), batches[0], tmp_path / "d.onnx", int8=True, parity_batches=batches)
    assert [i.name for i in onnx_session(path).get_inputs()] == ["input_ids", "attention_mask"]


# --------------------------------------------------------------------------------------------------------------------
# `pofa export`: one file name, parity on real rows only
# --------------------------------------------------------------------------------------------------------------------

SENTENCES = [
    "the class statement creates a new object type", "a list is a mutable sequence of values",
    "an exception is raised when an error occurs", "the function returns none when it has no return statement",
    "strings are immutable sequences of unicode code points", "the module is imported once per interpreter",
    "a dictionary maps keys to values", "the loop ends when the iterator is exhausted",
]


def _validation_sentences(n: int = 40) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} {SENTENCES[(3 * i + 1) % len(SENTENCES)]}" for i in range(n)]


@pytest.fixture(scope="module")
def finetuned_folder(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny classifier folder as `pofa finetune` leaves it: weights, tokenizer, and a recipe naming sst2 on local
    CSV files (its train file and its validation file, 40 rows)."""
    import csv

    from transformers import AutoTokenizer

    from pofa.artifacts import RECIPE_FILE
    from pofa.recipe import FinetuneRecipe, recipe_from_dict, save_recipe

    root = tmp_path_factory.mktemp("finetuned")
    files = {}
    for split, sentences in (("train", SENTENCES), ("validation", _validation_sentences())):
        files[split] = str(root / f"{split}.csv")
        with open(files[split], "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            writer.writerows((s, i % 2) for i, s in enumerate(sentences))
    folder = root / "final"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(**(TINY | {"vocab_size": len(tokenizer)}))).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    save_recipe(recipe_from_dict(FinetuneRecipe, {
        "model": {"name_or_path": "google-bert/bert-base-uncased"},
        "task": {"name": "sst2", "data_files": files, "max_seq_length": 32},
    }), folder / RECIPE_FILE)
    return folder


@pytest.fixture
def parity_calls(monkeypatch):
    """The batches every parity check of `pofa export` ran on."""
    import pofa.quant

    calls = []
    original = pofa.quant.require_onnx_parity

    def spy(model, path, batches, **kwargs):
        batches = list(batches)
        calls.append(batches)
        return original(model, path, batches, **kwargs)

    monkeypatch.setattr(pofa.quant, "require_onnx_parity", spy)
    return calls


def _copy(folder, tmp_path, name="model"):
    import shutil

    return shutil.copytree(folder, tmp_path / name)


def _pofa(*argv):
    from pofa.cli import main

    return main(["export", *map(str, argv)])


def _quantized(path) -> bool:
    return any(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node)


def test_export_checks_parity_on_the_task_s_evaluation_rows(finetuned_folder, tmp_path, parity_calls, capsys):
    from transformers import AutoTokenizer

    from pofa.artifacts import ONNX_FILE

    folder = _copy(finetuned_folder, tmp_path)
    assert _pofa(folder) == 0
    out = capsys.readouterr().out
    assert f"wrote {folder / ONNX_FILE}" in out and "float" in out
    assert "task sst2 split validation" in out and "over 40 predictions" in out
    assert not _quantized(folder / ONNX_FILE)
    (batches,) = parity_calls
    assert sum(len(b["input_ids"]) for b in batches) == 40
    tokenizer = AutoTokenizer.from_pretrained(folder)
    expected = tokenizer(_validation_sentences()[:32], truncation=True, max_length=32, padding=True,
                         return_tensors="pt")
    assert torch.equal(batches[0]["input_ids"], expected["input_ids"])  # the real rows, tokenized as fine-tuning


def test_export_of_a_qat_folder_writes_the_int8_graph_under_the_one_name(finetuned_folder, tmp_path, parity_calls,
                                                                          capsys):
    from pofa.artifacts import COMPACT_FILE, ONNX_FILE, RECIPE_FILE
    from pofa.compact import save_compact
    from pofa.quant.qat import freeze_observers_

    folder = _copy(finetuned_folder, tmp_path)
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(folder)
    prepare_qat_(model, QATConfig(weight_bits=7))
    model.train()
    with torch.no_grad():
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            model(input_ids=torch.randint(5, model.config.vocab_size, (8, 16), generator=g))
    freeze_observers_(model)
    save_compact(model.eval(), folder / COMPACT_FILE)
    recipe = (folder / RECIPE_FILE).read_text().replace("quantization:\n  enabled: false",
                                                        "quantization:\n  enabled: true")
    (folder / RECIPE_FILE).write_text(recipe)
    assert _pofa(folder) == 0  # int8 without --int8: the folder was trained with QAT
    assert _quantized(folder / ONNX_FILE) and "int8" in capsys.readouterr().out
    assert not (folder / "model.int8.onnx").exists()
    assert _pofa(folder, "--float", "--output", tmp_path / "float.onnx") == 0
    assert not _quantized(tmp_path / "float.onnx")
    assert [sum(len(b["input_ids"]) for b in call) for call in parity_calls] == [40, 40]


def test_export_checks_parity_on_rows_the_user_gives(finetuned_folder, tiny_model_dir, tmp_path, parity_calls,
                                                     capsys):
    import csv

    lines = tmp_path / "rows.txt"
    lines.write_text("\n".join(SENTENCES[:5]) + "\n\n")
    mlm = _copy(tiny_model_dir, tmp_path, "mlm")  # no recipe.yaml: nothing else to check on
    assert _pofa(mlm, "--rows", lines) == 0
    assert f"5 rows of {lines}" in capsys.readouterr().out
    table = tmp_path / "rows.csv"
    with open(table, "w", newline="") as f:
        csv.writer(f).writerows([["sentence", "label"], *[[s, 0] for s in SENTENCES[:3]]])
    folder = _copy(finetuned_folder, tmp_path)
    assert _pofa(folder, "--rows", table) == 0
    assert f"3 rows of {table}" in capsys.readouterr().out
    assert [sum(len(b["input_ids"]) for b in call) for call in parity_calls] == [5, 3]
    table.write_text("text\nno sentence column here\n")
    assert _pofa(folder, "--rows", table) == 2
    assert "needs the column(s) sentence" in capsys.readouterr().err


def test_export_checks_a_pre_trained_model_on_held_out_text(tiny_model_dir, tmp_path, parity_calls, capsys):
    from pofa.artifacts import RECIPE_FILE
    from pofa.recipe import PretrainRecipe, recipe_from_dict, save_recipe

    folder = _copy(tiny_model_dir, tmp_path)
    save_recipe(recipe_from_dict(PretrainRecipe, {
        "model": {"name_or_path": "embedded:minilm"},
        "data": {"max_seq_length": 32, "max_eval_blocks": 12, "cache_dir": str(tmp_path / "cache")},
    }), folder / RECIPE_FILE)
    assert _pofa(folder) == 0
    assert "12 held-out blocks of embedded:python-docs" in capsys.readouterr().out
    (batches,) = parity_calls
    assert sum(len(b["input_ids"]) for b in batches) == 12 and batches[0]["input_ids"].shape[1] == 32


def test_export_without_real_rows_fails_naming_the_flag(finetuned_folder, tiny_model_dir, tmp_path, capsys):
    from pofa.artifacts import ONNX_FILE, RECIPE_FILE
    from pofa.recipe import PretrainRecipe, recipe_from_dict, save_recipe

    mlm = _copy(tiny_model_dir, tmp_path, "mlm")
    assert _pofa(mlm) == 2
    err = capsys.readouterr().err
    assert "has no recipe.yaml" in err and "Pass --rows FILE" in err
    save_recipe(recipe_from_dict(PretrainRecipe, {"data": {"sources": [{"hub": "wikimedia/wikipedia"}]}}),
                mlm / RECIPE_FILE)
    assert _pofa(mlm) == 2
    err = capsys.readouterr().err
    assert "corpus comes from the Hub" in err and "Pass --rows FILE" in err
    folder = _copy(finetuned_folder, tmp_path)
    recipe = (folder / RECIPE_FILE).read_text()
    (folder / RECIPE_FILE).write_text(recipe.replace("validation.csv", "moved-away.csv"))
    assert _pofa(folder) == 2
    err = capsys.readouterr().err
    assert "cannot read the evaluation rows of task 'sst2'" in err and "Pass --rows FILE" in err
    assert not (mlm / ONNX_FILE).exists() and not (folder / ONNX_FILE).exists()
