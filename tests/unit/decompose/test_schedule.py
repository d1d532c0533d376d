"""ROSITA's iterative schedule: its values by hand, the events on a model with a live optimizer (whose state follows
the sliced weights), rank truncation of trained factors, and QAT / int8 ONNX on decomposed models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertForSequenceClassification

from pofa.decompose import (Decomposer, KroneckerConfig, LowRankConfig, LowRankEmbedding, LowRankLinear,
                            StructuredConfig, TensorConfig, kronecker_, load_decomposed, low_rank_, parameter_count,
                            prune_structured_, tensor_)
from pofa.decompose.lowrank import refactor, shrink_embedding, shrink_low_rank, svd_factors
from pofa.decompose.schedule import is_event, kept_fraction, progress, scheduled_rank
from pofa.loop import build_optimizer
from pofa.recipe import DecompositionConfig, FinetuneRecipe, PretrainRecipe, RecipeError, recipe_from_dict

HIDDEN = 32


def tiny_bert(heads: int = 4, cls=BertForMaskedLM, **extra) -> nn.Module:
    torch.manual_seed(0)
    return cls(BertConfig(vocab_size=100, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=heads,
                          intermediate_size=2 * HIDDEN, max_position_embeddings=64, **extra))


def train_steps(model: nn.Module, optimizer, steps: int = 2) -> None:
    model.train()
    for _ in range(steps):
        ids = torch.randint(5, 100, (4, 10))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


# --- the schedule, by hand ------------------------------------------------------------------------------------------


def test_kept_fraction_is_linear_from_one_to_the_target_between_start_and_end():
    at = dict(start_step=10, end_step=30)
    assert [kept_fraction(s, final=0.5, **at) for s in (0, 10, 15, 20, 30, 99)] == [1.0, 1.0, 0.875, 0.75, 0.5, 0.5]
    assert progress(25, **at) == 0.75
    with pytest.raises(ValueError, match="end_step"):
        progress(5, start_step=10, end_step=10)
    with pytest.raises(ValueError, match="final"):
        kept_fraction(5, final=0.0, **at)


def test_rosita_mapping_removes_one_head_per_event():
    # BERT-base's 12 heads to 6 (ROSITA's width pruning): 6 events, every 100 steps from 0 to 600
    events = [s for s in range(0, 1000) if is_event(s, start_step=0, frequency=100, end_step=600)]
    assert events == [0, 100, 200, 300, 400, 500, 600]
    heads = [max(1, round(12 * kept_fraction(s, final=0.5, start_step=0, end_step=600))) for s in events]
    assert heads == [12, 11, 10, 9, 8, 7, 6]
    # and the FFN width linearly, 3072 -> 2048 (ROSITA's ffn_hidden_dim)
    assert [round(3072 * kept_fraction(s, final=2 / 3, start_step=0, end_step=600)) for s in (0, 300, 600)] == \
        [3072, 2560, 2048]


def test_scheduled_rank_goes_from_the_dense_rank_to_the_target():
    ranks = [scheduled_rank(s, full=768, final=128, start_step=0, end_step=4) for s in range(6)]
    assert ranks == [768, 608, 448, 288, 128, 128]
    assert scheduled_rank(2, full=64, final=128, start_step=0, end_step=4) == 64  # a target above full: full


# --- truncating trained factors ---------------------------------------------------------------------------------------


def test_refactor_is_the_svd_of_the_product_without_forming_it():
    torch.manual_seed(3)
    left, right = torch.randn(40, 12), torch.randn(12, 30)
    product = left @ right
    a, b = refactor(left, right, rank=5)
    expected_left, expected_right = svd_factors(product, rank=5)
    torch.testing.assert_close(a @ b, expected_left @ expected_right, rtol=1e-4, atol=1e-4)
    a, b = refactor(left, right, rank=12)
    torch.testing.assert_close(a @ b, product, rtol=1e-4, atol=1e-4)


def test_a_dense_linear_is_factorized_once_it_pays_and_a_factorized_one_truncated():
    model = tiny_bert()
    ranks = iter([30, 12, 8])  # 30 x (32 + 32) > 32 x 32: stays dense; 12: factorized; 8: truncated
    for want in ranks:
        shrink_low_rank(model, None, rank=lambda full, want=want: want)
        query = model.bert.encoder.layer[0].attention.self.query
        if want == 30:
            assert type(query) is nn.Linear
    assert isinstance(query, LowRankLinear) and query.rank == 8
    assert model.config.pofa_decomposition["lowrank"]["modules"]["encoder.layer.0.attention.self.query"] == 8
    shrink_low_rank(model, None, rank=lambda full: 30, final=True)  # never grows
    assert model.bert.encoder.layer[0].attention.self.query.rank == 8


def test_the_word_embedding_shrinks_with_its_tied_decoder():
    model = tiny_bert().eval()
    ids = torch.randint(5, 100, (2, 7))
    shrink_embedding(model, rank=HIDDEN)  # full rank: nothing to do
    assert type(model.get_input_embeddings()) is nn.Embedding
    shrink_embedding(model, rank=16)
    embedding = model.get_input_embeddings()
    assert isinstance(embedding, LowRankEmbedding) and embedding.rank == 16
    shrink_embedding(model, rank=8)
    assert model.get_input_embeddings() is embedding and embedding.rank == 8
    assert model.cls.predictions.decoder.embedding is embedding
    assert model(input_ids=ids).logits.shape == (2, 7, 100)


# --- events with a live optimizer -----------------------------------------------------------------------------------


def section(**fields) -> DecompositionConfig:
    values = dict(schedule="iterative", start_step=0, end_step=4, frequency=2)
    return DecompositionConfig(**{**values, **fields})


def test_an_event_slices_the_optimizer_state_with_the_weights():
    model = tiny_bert()
    optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.01)
    train_steps(model, optimizer)
    query = model.bert.encoder.layer[0].attention.self.query
    moments = optimizer.state[query.weight]["exp_avg"].clone()
    decomposer = Decomposer(section(heads=0.5, ffn=0.5), model)

    line = decomposer.apply(4, optimizer)

    assert "heads 2 of 4" in line and "FFN neurons 32 of 64" in line
    kept = model.config.pofa_decomposition["structured"]["modules"]["encoder.layer.0"]["heads"]
    rows = torch.cat([torch.arange(h * 8, (h + 1) * 8) for h in kept])
    new_query = model.bert.encoder.layer[0].attention.self.query
    assert torch.equal(optimizer.state[new_query.weight]["exp_avg"], moments[rows])
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in model.parameters()}
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert all((id(p) in decayed) == (p.dim() >= 2) for p in model.parameters())
    assert all(state["exp_avg"].shape == p.shape for p, state in optimizer.state.items())
    train_steps(model, optimizer)  # the optimizer steps the new parameters


def test_iterative_events_shrink_heads_neurons_and_ranks_to_the_targets(tmp_path):
    model = tiny_bert()
    optimizer = build_optimizer(model, learning_rate=1e-3, weight_decay=0.01)
    decomposer = Decomposer(section(heads=0.5, ffn=0.25, method="lowrank", rank=8, embeddings=True,
                                    embedding_rank=8), model)
    shapes = []
    for step in range(6):
        if decomposer.is_event(step):
            decomposer.apply(step, optimizer)
            layer = model.bert.encoder.layer[1]
            shapes.append((layer.attention.output.dense.in_features // 8, layer.output.dense.in_features))
        train_steps(model, optimizer, 1)
    assert shapes == [(4, 64), (3, 40), (2, 16)]  # heads 4 -> 2, neurons 64 -> 16, one event in two steps
    ranks = {m.rank for m in model.modules() if isinstance(m, LowRankLinear)}
    assert ranks == {8} and model.get_input_embeddings().rank == 8
    assert not decomposer.is_event(4)  # applied already
    model.eval()
    ids = torch.randint(5, 100, (2, 9))
    model.save_pretrained(tmp_path)
    loaded = load_decomposed(tmp_path)
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert parameter_count(loaded) == parameter_count(model) < parameter_count(tiny_bert())


def test_a_checkpoint_restores_the_structure_and_the_last_event(tmp_path):
    model = tiny_bert()
    decomposer = Decomposer(section(heads=0.5, method="lowrank", rank=8), model)
    decomposer.apply(2, build_optimizer(model, learning_rate=1e-3, weight_decay=0.0))
    decomposer.save(tmp_path)
    fresh = tiny_bert()
    again = Decomposer(section(heads=0.5, method="lowrank", rank=8), fresh)
    again.restore_(tmp_path)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    assert all(fresh.state_dict()[k].shape == v.shape for k, v in model.state_dict().items())
    again.load(tmp_path)
    assert again.last_event == 2 and not again.is_event(2) and again.is_event(4)


# --- the recipe -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fields, key", [
    ({"end_step": 4}, "decomposition.end_step"),  # oneshot reads no schedule key
    ({"schedule": "iterative", "heads": 0.5, "end_step": 5, "frequency": 2}, "decomposition.end_step"),
    ({"schedule": "iterative", "heads": 0.5, "end_step": 0}, "decomposition.end_step"),
    ({"schedule": "iterative", "heads": 0.5, "end_step": 4, "frequency": 0}, "decomposition.frequency"),
    ({"schedule": "iterative", "end_step": 4}, "decomposition.schedule"),  # nothing to shrink
    ({"schedule": "iterative", "method": "kronecker", "end_step": 4}, "decomposition.schedule"),
    ({"schedule": "iterative", "heads": 0.5, "end_step": 400}, "decomposition.end_step"),  # beyond max_steps
])
def test_schedule_keys_are_range_checked_by_name(fields, key):
    with pytest.raises(RecipeError, match=key.replace(".", r"\.")):
        recipe_from_dict(PretrainRecipe, {"training": {"max_steps": 100}, "decomposition": fields})


def test_the_iterative_schedule_refuses_masks_and_qat():
    iterative = {"schedule": "iterative", "heads": 0.5, "end_step": 4, "frequency": 2}
    with pytest.raises(RecipeError, match="pruning.enabled"):
        recipe_from_dict(PretrainRecipe, {"decomposition": iterative,
                                          "pruning": {"enabled": True, "end_step": 4, "frequency": 2}})
    with pytest.raises(RecipeError, match="sparsity.masks: none"):
        recipe_from_dict(FinetuneRecipe, {"decomposition": iterative})
    with pytest.raises(RecipeError, match="QAT"):
        recipe_from_dict(FinetuneRecipe, {"decomposition": iterative, "sparsity": {"masks": "none"},
                                          "quantization": {"enabled": True}})
    recipe_from_dict(FinetuneRecipe, {"decomposition": iterative, "sparsity": {"masks": "none"}})


def test_several_processes_are_refused():
    run = SimpleNamespace(accelerator=SimpleNamespace(num_processes=2, distributed_type="MULTI_GPU"), resuming=False)
    with pytest.raises(RecipeError, match="one process"):
        Decomposer.for_stage(section(heads=0.5), tiny_bert(), run)
    assert Decomposer.for_stage(DecompositionConfig(heads=0.5), tiny_bert(), run) is None  # oneshot


# --- QAT and int8 ONNX ----------------------------------------------------------------------------------------------

BATCH = {"input_ids": torch.randint(5, 100, (8, 12)), "attention_mask": torch.ones(8, 12, dtype=torch.long),
         "token_type_ids": torch.zeros(8, 12, dtype=torch.long)}


@pytest.mark.parametrize("technique", ["lowrank", "rosita"])
def test_low_rank_factors_are_quantized_and_export_to_int8_onnx_with_parity(technique, tmp_path):
    from pofa.quant import QATConfig, export_onnx, prepare_qat_
    from pofa.quant.export import check_onnx_parity
    from pofa.quant.qat import FakeQuantLinear, qat_modules

    model = tiny_bert(cls=BertForSequenceClassification, num_labels=3)
    if technique == "rosita":
        prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.5))
    low_rank_(model, LowRankConfig(rank=8, embeddings=True))
    prepare_qat_(model, QATConfig(weight_bits=7))  # 7 bits: exact on AVX2-only CPUs (pofa.quant.export_onnx)
    quantized = [n for n, m in qat_modules(model).items() if isinstance(m, FakeQuantLinear)]
    assert len(quantized) == 24 and all(n.endswith((".first", ".second")) for n in quantized)
    model.train()
    for _ in range(3):  # the activation observers see data
        model(**BATCH, labels=torch.randint(0, 3, (8,))).loss.backward()
    path = export_onnx(model, BATCH, tmp_path / "model.onnx", int8=True)
    report = check_onnx_parity(model, path, [BATCH])
    assert report["quantized_file"] and report["agreement"] == 1.0 and report["max_abs_diff"] < 1e-4


@pytest.mark.parametrize("technique", ["kronecker", "tensor"])
def test_qat_refuses_kronecker_and_tensor_factors_with_the_reason(technique):
    from pofa.quant import prepare_qat_

    model = tiny_bert(cls=BertForSequenceClassification)
    select = lambda module, fqn: ".attention.self." in fqn  # noqa: E731 - Linears remain elsewhere
    if technique == "kronecker":
        kronecker_(model, KroneckerConfig(terms=2), select)
    else:
        tensor_(model, TensorConfig(rank=16), select)
    with pytest.raises(ValueError, match="not Linears"):
        prepare_qat_(model)
