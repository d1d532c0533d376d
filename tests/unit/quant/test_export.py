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
