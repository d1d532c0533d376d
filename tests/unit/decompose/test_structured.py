"""Structured pruning of heads and FFN neurons in every registered family: a prune that keeps everything computes
the original logits through the slicing path, a real prune computes what the unpruned model computes with the
removed heads' and neurons' outputs zeroed, the model shrinks, and a save / load round trip is exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForMaskedLM

from pofa.decompose import (LowRankConfig, LowRankLinear, StructuredConfig, load_decomposed, low_rank_,
                            parameter_count, prune_structured_)
from pofa.decompose.common import base_of
from pofa.decompose.structured import BLOCKS, encoder_blocks, layout_of, neuron_scores, top
from pofa.families import FAMILIES, family_of
from tests._tiny_families import MODEL_TYPES, tiny_config


def tiny(model_type: str, heads: int = 4) -> nn.Module:
    torch.manual_seed(0)
    sizes = dict(n_heads=heads) if model_type == "distilbert" else dict(num_attention_heads=heads)
    config = tiny_config(model_type)
    for key, value in sizes.items():
        setattr(config, key, value)
    return AutoModelForMaskedLM.from_config(config).eval()


def inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    ids = torch.randint(5, 100, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: the mask reaches the pruned attention too
    return {"input_ids": ids, "attention_mask": mask}


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs()).logits


def test_every_family_but_none_is_mapped():
    assert {f.name for f in FAMILIES} == set(BLOCKS)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_keeping_everything_goes_through_the_slicing_and_changes_nothing(model_type):
    model = tiny(model_type)
    reference = logits(model)
    prune_structured_(model, StructuredConfig(heads=1.0, ffn=1.0))
    assert set(model.config.pofa_decomposition["structured"]["modules"]) == set(encoder_blocks(model))
    torch.testing.assert_close(logits(model), reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pruning_equals_zeroing_the_removed_heads_and_neurons_and_survives_save_load(model_type, tmp_path):
    model = tiny(model_type)
    reference = tiny(model_type)  # same seed: same weights
    layout, head_size = layout_of(model), model.config.hidden_size // 4
    base, ref_base = base_of(model), base_of(reference)
    kept_neurons = {}
    for block in encoder_blocks(model):  # the neurons the prune will keep, from the same scores
        f_in = base.get_submodule(f"{block}.{layout.ffn_rows[0]}").weight
        f_out = base.get_submodule(f"{block}.{layout.ffn_columns}").weight
        kept_neurons[block] = top(neuron_scores(f_in, f_out, layout.ffn_rows[1]), f_out.shape[1] // 2)
    before = parameter_count(model)

    prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.5))

    table = model.config.pofa_decomposition["structured"]["modules"]
    with torch.no_grad():
        for block, kept in table.items():
            assert len(kept["heads"]) == 2 and kept["ffn"] == 32
            out = ref_base.get_submodule(f"{block}.{layout.head_columns}")
            for head in set(range(4)) - set(kept["heads"]):
                out.weight[:, head * head_size:(head + 1) * head_size] = 0
            ffn_out = ref_base.get_submodule(f"{block}.{layout.ffn_columns}")
            dropped = torch.ones(ffn_out.weight.shape[1], dtype=torch.bool)
            dropped[kept_neurons[block]] = False
            ffn_out.weight[:, dropped] = 0
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-4, atol=1e-5)
    assert parameter_count(model) < before
    model.save_pretrained(tmp_path)
    loaded = load_decomposed(tmp_path)
    assert torch.equal(logits(loaded), logits(model))


def test_modernbert_slices_its_fused_qkv_and_gated_input_by_chunk():
    model = tiny("modernbert")
    prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.25))
    layer = model.model.layers[0]
    assert layer.attn.Wqkv.out_features == 3 * 2 * 8 and layer.attn.Wo.in_features == 16
    assert layer.mlp.Wi.out_features == 2 * 16 and layer.mlp.Wo.in_features == 16


def test_mpnet_layers_read_their_own_heads_of_the_shared_position_bias():
    model = tiny("mpnet")
    prune_structured_(model, StructuredConfig(heads=0.5))
    kept = [model.config.pofa_decomposition["structured"]["modules"][b]["heads"] for b in encoder_blocks(model)]
    attention = model.mpnet.encoder.layer[0].attention.attn
    assert attention.pofa_heads.tolist() == kept[0] and attention.num_attention_heads == 2
    assert "pofa_heads" not in model.state_dict().keys()  # rebuilt from the record, not saved


def test_a_second_prune_counts_from_the_original_model_and_keeps_original_head_indices():
    model = tiny("bert")
    prune_structured_(model, StructuredConfig(heads=0.75, ffn=0.75))
    first = model.config.pofa_decomposition["structured"]["modules"]["encoder.layer.0"]["heads"]
    prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.5))
    second = model.config.pofa_decomposition["structured"]["modules"]["encoder.layer.0"]
    assert len(first) == 3 and len(second["heads"]) == 2 and set(second["heads"]) <= set(first)
    assert second["ffn"] == 32 and model.bert.encoder.layer[0].intermediate.dense.out_features == 32


def test_low_rank_linears_are_pruned_through_their_outer_factors():
    model = low_rank_(tiny("bert"), LowRankConfig(rank=8))
    query = model.bert.encoder.layer[0].attention.self.query
    prune_structured_(model, StructuredConfig(heads=0.5, ffn=0.5))
    query = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query, LowRankLinear) and query.second.out_features == 16 and query.rank == 8
    assert model.bert.encoder.layer[0].output.dense.first.in_features == 32
    assert logits(model).shape == (2, 11, 100)


def test_an_unmapped_family_is_refused_by_name():
    from pofa.families import FamilyError

    model = tiny("bert")
    saved = BLOCKS.pop(family_of(model).name)
    try:
        with pytest.raises(FamilyError, match="BERT blocks are not mapped"):
            prune_structured_(model, StructuredConfig(heads=0.5))
    finally:
        BLOCKS["BERT"] = saved
