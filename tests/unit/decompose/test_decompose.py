"""The decomposition verbs: exact initialisation on exactly decomposable inputs, error bounds otherwise, forward
without the dense weight, save / load round trip, ONNX parity, masks on the factors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import AutoModel, AutoModelForSequenceClassification, BertConfig, BertForMaskedLM

from pofa.decompose import (KroneckerConfig, KroneckerLinear, LowRankConfig, LowRankLinear, StructuredConfig,
                            TensorConfig, TuckerLinear, is_decomposed, kronecker_, load_decomposed, low_rank_,
                            parameter_count, prune_structured_, tensor_)
from pofa.decompose.kronecker import balanced_divisor, kronecker_matrix, nearest_kronecker
from pofa.decompose.lowrank import choose_rank, svd_factors
from pofa.decompose.tensor import slices

HIDDEN = 32


def tiny_bert(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=2 * HIDDEN, max_position_embeddings=64)
    return BertForMaskedLM(config).eval()


def dense(module: nn.Module) -> torch.Tensor:
    """The weight a module computes, recovered from its forward on the identity (bias removed)."""
    eye = torch.eye(module.in_features)
    with torch.no_grad():
        out = module(eye) - (module.bias if getattr(module, "bias", None) is not None else 0)
    return out.t()


def set_weight_(linear: nn.Linear, weight: torch.Tensor) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)


# --- low rank ---------------------------------------------------------------------------------------------------


def test_svd_of_an_exactly_low_rank_matrix_is_exact_and_energy_finds_its_rank():
    torch.manual_seed(0)
    w = torch.randn(48, 5) @ torch.randn(5, 40)
    left, right = svd_factors(w, rank=5)
    assert left.shape == (48, 5) and torch.allclose(left @ right, w, atol=1e-4)
    assert svd_factors(w, energy=1.0)[0].shape[1] == 5
    s = torch.tensor([3.0, 2.0, 1.0])  # energies 9/14, 13/14, 1
    assert [choose_rank(s, energy=e) for e in (0.5, 0.9, 0.95)] == [1, 2, 3]


def test_truncation_error_is_the_dropped_singular_values():
    torch.manual_seed(1)
    w = torch.randn(30, 20)
    s = torch.linalg.svdvals(w.double())
    left, right = svd_factors(w, rank=6)
    error = torch.linalg.norm(w.double() - (left @ right).double())
    assert error.item() == pytest.approx(s[6:].square().sum().sqrt().item(), rel=1e-4)


def test_low_rank_replaces_encoder_linears_and_the_embedding_exactly_at_full_rank():
    model = tiny_bert()
    ids = torch.randint(0, 100, (2, 9))
    reference = model(input_ids=ids).logits
    low_rank_(model, LowRankConfig(rank=HIDDEN, embeddings=True))
    assert sum(isinstance(m, LowRankLinear) for m in model.modules()) == 12
    assert torch.allclose(model(input_ids=ids).logits, reference, atol=1e-4)
    assert model.config.tie_word_embeddings is False
    assert model.config.pofa_decomposition["lowrank"]["embedding_rank"] == HIDDEN


def test_low_rank_with_energy_keeps_dense_what_it_cannot_shrink():
    model = tiny_bert()
    query = model.bert.encoder.layer[0].attention.self.query
    set_weight_(query, torch.randn(HIDDEN, 3) @ torch.randn(3, HIDDEN))
    low_rank_(model, LowRankConfig(energy=0.999))
    assert model.config.pofa_decomposition["lowrank"]["modules"]["encoder.layer.0.attention.self.query"] == 3
    # random 32 x 32 weights need nearly full rank for 99.9%: kept dense (a factorization would be larger)
    assert type(model.bert.encoder.layer[1].attention.self.key) is nn.Linear


# --- Kronecker --------------------------------------------------------------------------------------------------


def test_nearest_kronecker_recovers_a_sum_of_products_exactly():
    torch.manual_seed(2)
    a, b = torch.randn(3, 4, 6), torch.randn(3, 8, 5)
    w = kronecker_matrix(a, b)  # [32, 30]
    fa, fb = nearest_kronecker(w, 4, 6, terms=3)
    assert torch.allclose(kronecker_matrix(fa, fb), w, atol=1e-4)
    one_a, one_b = nearest_kronecker(w, 4, 6, terms=1)
    assert torch.linalg.norm(kronecker_matrix(one_a, one_b) - w) < torch.linalg.norm(w)  # the best single product


def test_kronecker_linear_computes_the_product_without_forming_it():
    torch.manual_seed(3)
    linear = nn.Linear(30, 32)
    set_weight_(linear, kronecker_matrix(torch.randn(2, 4, 6), torch.randn(2, 8, 5)))
    module = KroneckerLinear.from_linear(linear, KroneckerConfig(terms=2, left_shape=(4, 6)))
    x = torch.randn(3, 7, 30)
    assert torch.allclose(module(x), linear(x), atol=1e-4)
    assert balanced_divisor(768) in (24, 32) and balanced_divisor(3072) in (48, 64)


def test_kronecker_on_a_model_records_shapes_and_shrinks_it():
    model = tiny_bert()
    before = parameter_count(model.bert.encoder)
    kronecker_(model, KroneckerConfig(terms=1))
    table = model.config.pofa_decomposition["kronecker"]["modules"]
    assert len(table) == 12
    assert table["encoder.layer.0.intermediate.dense"] == [8, 4, 8, 8, 1]  # [64, 32]: divisors nearest the roots
    assert parameter_count(model.bert.encoder) < before / 4


# --- tensor (Ren, Wang et al.) ----------------------------------------------------------------------------------


def _shared_rank_model(rank: int, bank: int | None = None) -> tuple[BertForMaskedLM, dict[str, torch.Tensor]]:
    """Every D x D slice of every encoder Linear = U0 S V0^T with shared U0, V0 of width `rank` (and, with `bank`,
    cores mixing `bank` shared matrices): exactly what the decomposition can represent."""
    model = tiny_bert()
    torch.manual_seed(4)
    u0 = torch.linalg.qr(torch.randn(HIDDEN, rank)).Q
    v0 = torch.linalg.qr(torch.randn(HIDDEN, rank)).Q
    bank_matrices = torch.randn(bank, rank, rank) if bank else None
    weights = {}
    for name, module in model.bert.named_modules():
        if type(module) is nn.Linear and ".layer." in f".{name}":
            m, n = module.out_features // HIDDEN, module.in_features // HIDDEN
            cores = (torch.einsum("ijk,kab->ijab", torch.randn(m, n, bank), bank_matrices) if bank
                     else torch.randn(m, n, rank, rank))
            w = (u0 @ cores @ v0.t()).permute(0, 2, 1, 3).reshape(m * HIDDEN, n * HIDDEN)
            set_weight_(module, w)
            weights[name] = w
    return model, weights


@pytest.mark.parametrize("bank", [None, 5], ids=["III", "IV"])
def test_tensor_decomposition_is_exact_for_shared_low_rank_slices(bank):
    model, weights = _shared_rank_model(rank=6, bank=bank)
    tensor_(model, TensorConfig(rank=6, bank=bank))
    for name, w in weights.items():
        module = model.bert.get_submodule(name)
        assert isinstance(module, TuckerLinear)
        assert torch.allclose(dense(module), w, atol=1e-4), name
    assert "pofa_shared_basis.u.weight" in dict(model.bert.named_parameters())


def test_tensor_decomposition_error_shrinks_with_rank_and_slices_tile_the_weight():
    w = torch.arange(2 * HIDDEN * HIDDEN, dtype=torch.float32).reshape(2 * HIDDEN, HIDDEN)
    assert torch.equal(slices(w, HIDDEN)[1, 0], w[HIDDEN:])
    errors = []
    for rank in (8, 16, 32):
        model = tiny_bert()
        originals = {n: m.weight.detach().clone() for n, m in model.bert.named_modules()
                     if type(m) is nn.Linear and ".layer." in f".{n}"}
        tensor_(model, TensorConfig(rank=rank))
        errors.append(sum(torch.linalg.norm(dense(model.bert.get_submodule(n)) - w) ** 2 for n, w in originals.items()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-6  # full width: exact


# --- structured (ROSITA) ----------------------------------------------------------------------------------------


def test_structured_pruning_keeps_the_strongest_heads_and_neurons_and_still_runs():
    model = tiny_bert()
    attention = model.bert.encoder.layer[0].attention
    with torch.no_grad():
        attention.self.query.weight[16:24] *= 50  # head 2 (of 4, size 8) is the most important
    prune_structured_(model, StructuredConfig(heads=0.25, ffn=0.5))
    record = model.config.pofa_decomposition["structured"]["modules"]
    assert record["encoder.layer.0"] == {"heads": [2], "ffn": HIDDEN}
    assert attention.self.query.out_features == 8 and attention.output.dense.in_features == 8
    assert model.bert.encoder.layer[1].intermediate.dense.out_features == HIDDEN
    assert model(input_ids=torch.randint(0, 100, (2, 5))).logits.shape == (2, 5, 100)


# --- save / load, ONNX, masks -----------------------------------------------------------------------------------

VERBS = {
    "lowrank": lambda m: low_rank_(m, LowRankConfig(rank=8, embeddings=True)),
    "kronecker": lambda m: kronecker_(m, KroneckerConfig(terms=2)),
    "tensor": lambda m: tensor_(m, TensorConfig(rank=16, bank=8)),
    "rosita": lambda m: low_rank_(prune_structured_(m, StructuredConfig(heads=0.5, ffn=0.5)), LowRankConfig(rank=4)),
}


@pytest.mark.parametrize("technique", sorted(VERBS))
def test_save_and_load_round_trip_under_any_head(technique, tmp_path):
    model = VERBS[technique](tiny_bert())
    ids = torch.randint(0, 100, (2, 9))
    model.save_pretrained(tmp_path)
    assert is_decomposed(tmp_path)
    loaded = load_decomposed(tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    base = load_decomposed(tmp_path, AutoModel)
    assert torch.equal(base(input_ids=ids).last_hidden_state, model.bert(input_ids=ids).last_hidden_state)
    classifier = load_decomposed(tmp_path, AutoModelForSequenceClassification, num_labels=3)
    assert classifier(input_ids=ids).logits.shape == (2, 3)
    assert is_decomposed(classifier.config)


def test_load_refuses_a_folder_missing_factors(tmp_path):
    from safetensors.torch import load_file, save_file

    VERBS["kronecker"](tiny_bert()).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if "layer.1.output.dense" not in k}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layer.1.output.dense"):
        load_decomposed(tmp_path)


@pytest.mark.parametrize("technique", sorted(VERBS))
def test_float_onnx_export_matches_pytorch(technique, tmp_path):
    from pofa.quant import export_onnx
    from pofa.quant.export import check_onnx_parity

    model = VERBS[technique](tiny_bert())
    batches = [{"input_ids": torch.randint(5, 100, (3, 12)), "attention_mask": torch.ones(3, 12, dtype=torch.long),
                "token_type_ids": torch.zeros(3, 12, dtype=torch.long)}]
    path = export_onnx(model, batches[0], tmp_path / "model.onnx", int8=False)
    report = check_onnx_parity(model, path, batches)
    assert report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("technique", ["lowrank", "kronecker", "tensor"])
def test_pruning_targets_are_the_factors_and_masks_hold_through_training(technique):
    from pofa.families import pruning_targets
    from pofa.sparsity import MaskGuard, MaskStore, check_masks, magnitude_masks, select_targets

    model = VERBS[technique](tiny_bert()).train()
    targets = select_targets(model.named_parameters(), pruning_targets(model))
    expected = {"lowrank": ("first.weight", "second.weight"), "kronecker": ("left.weight", "right.weight"),
                "tensor": ("mix.weight",)}[technique]
    assert targets and all(name.endswith(expected) for name in targets)
    params = dict(model.named_parameters())
    store = MaskStore(magnitude_masks({n: params[n].detach() for n in targets}, 0.5))
    guard = MaskGuard(model, store)
    guard.enforce_()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard.enforce_(optimizer)
    for _ in range(3):
        model(input_ids=torch.randint(0, 100, (2, 8)), labels=torch.randint(0, 100, (2, 8))).loss.backward()
        guard.mask_gradients_()
        optimizer.step()
        optimizer.zero_grad()
    check_masks(model, store)
    for name in targets:
        assert torch.equal(params[name] != 0, store[name]), name
        assert math.isclose(float((params[name] == 0).float().mean()), 0.5, abs_tol=0.02)
