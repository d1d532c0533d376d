"""Sparse CPU execution matches dense; the latency benchmark runs (no timing assertions, ever)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel

from pofa.runtime import (
    CSRLinear,
    NumbaCSRLinear,
    SparseRuntimeConfig,
    benchmark_latency,
    numba_available,
    sparsify_,
)

TINY = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
BACKENDS = [CSRLinear] + ([NumbaCSRLinear] if numba_available() else [])
needs_numba = pytest.mark.skipif(not numba_available(), reason="numba not installed (pofa[sparse-runtime])")


def pruned_linear(in_features: int, out_features: int, sparsity: float, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.mul_(torch.rand_like(linear.weight) >= sparsity)
        linear.weight[3] = 0.0  # an empty CSR row
    return linear


def tiny_pruned_encoder(sparsity: float = 0.9) -> BertModel:
    torch.manual_seed(0)
    model = BertModel(BertConfig(**TINY)).eval()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and name.startswith("encoder.layer."):
            with torch.no_grad():
                w = module.weight
                threshold = w.abs().flatten().kthvalue(int(sparsity * w.numel())).values
                w.mul_(w.abs() > threshold)
    return model


@pytest.mark.parametrize("module_cls", BACKENDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(5,), (2, 7), (3, 1, 4)])
def test_sparse_linear_matches_dense(module_cls, bias, shape):
    linear = pruned_linear(48, 40, 0.9, bias=bias)
    sparse = module_cls(linear)
    x = torch.randn(*shape, 48)
    with torch.no_grad():
        expected = linear(x)
        got = sparse(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch"] + (["numba"] if numba_available() else []))
def test_sparsified_encoder_matches_dense(backend):
    dense = tiny_pruned_encoder()
    sparse = sparsify_(copy.deepcopy(dense), SparseRuntimeConfig(backend=backend))
    swapped = [m for m in sparse.modules() if isinstance(m, (CSRLinear, NumbaCSRLinear))]
    assert len(swapped) == 2 * 6
    assert type(sparse.pooler.dense) is nn.Linear  # dense weights stay dense
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    with torch.no_grad():
        expected = dense(input_ids=ids, attention_mask=mask).last_hidden_state
        got = sparse(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_sparsify_refuses_a_dense_model():
    with pytest.raises(ValueError, match="prune the model first"):
        sparsify_(BertModel(BertConfig(**TINY)), SparseRuntimeConfig(backend="torch"))


def test_config_validation():
    with pytest.raises(ValueError, match="backend"):
        SparseRuntimeConfig(backend="scipy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_sparsity"):
        SparseRuntimeConfig(min_sparsity=1.5)
    assert SparseRuntimeConfig(backend="auto").resolved_backend() == ("numba" if numba_available() else "torch")


def test_benchmark_latency_reports_every_variant(tmp_path):
    from pofa.quant import QATConfig, export_onnx, prepare_qat_

    model = tiny_pruned_encoder()
    qat = prepare_qat_(copy.deepcopy(model), QATConfig()).train()
    ids = torch.randint(1, 100, (2, 8))
    with torch.no_grad():
        qat(input_ids=ids)
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    onnx_path = export_onnx(qat, example, tmp_path / "q.onnx", int8=True)

    rows = benchmark_latency(model, batch_sizes=(1, 2), seq_len=8, onnx_int8_path=onnx_path, repeats=2, warmup=1)
    expected_variants = {"dense_fp32", "sparse_torch", "onnx_int8"} | ({"sparse_numba"} if numba_available() else set())
    assert {r["variant"] for r in rows} == expected_variants
    assert len(rows) == 2 * len(expected_variants)
    for row in rows:
        assert row["latency_ms"] > 0 and row["speedup_vs_dense"] > 0 and row["repeats"] == 2
    assert all(r["speedup_vs_dense"] == 1.0 for r in rows if r["variant"] == "dense_fp32")
