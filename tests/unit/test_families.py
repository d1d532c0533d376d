"""The model-family registry: each entry checked on a tiny random config of its family."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from pofa.families import (FAMILIES, ENCODER_BLOCK, FamilyError, UnknownFamilyError, encoder_linear_weights,
                           family_of, pruning_targets)
from pofa.modeling import MaskedLM, attach_pooler_
from pofa.quant import prepare_qat_, qat_modules
from pofa.sparsity import DEFAULT_TARGETS, MaskStore, select_targets
from tests._tiny_families import MODEL_TYPES, tiny_config

# Linear layers per encoder block: what each family's modelling code builds (counted by hand from it).
LINEARS_PER_BLOCK = {"bert": 6, "roberta": 6, "xlm-roberta": 6, "distilbert": 6, "electra": 6,
                     "deberta-v2": 8,  # query/key/value_proj, pos_key/pos_query_proj, output, intermediate, output
                     "modernbert": 4,  # Wqkv, Wo, Wi, Wo
                     "mpnet": 6}


def tiny_mlm(model_type: str) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForMaskedLM.from_config(tiny_config(model_type)).eval()


def linear_weights_in_blocks(model: nn.Module) -> list[str]:
    """Every Linear weight whose module sits under a numbered child of the encoder's layer list, by module type."""
    layer_lists = [name for name, module in model.named_modules()
                   if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layer", "layers")]
    return [f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(name.startswith(f"{prefix}.") for prefix in layer_lists)]


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_targets_are_exactly_the_linear_layers_of_the_encoder_blocks(model_type):
    model = tiny_mlm(model_type)
    expected = linear_weights_in_blocks(model)
    assert len(expected) == 2 * LINEARS_PER_BLOCK[model_type]
    assert encoder_linear_weights(model) == expected
    assert select_targets(model.named_parameters(), pruning_targets(model)) == expected
    # the name-only default agrees, so mask files and state dicts select the same weights
    assert select_targets(model.named_parameters(), DEFAULT_TARGETS) == expected


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_masked_logits_equal_the_models_own_logits(model_type):
    model = tiny_mlm(model_type)
    family = family_of(model)
    input_ids = torch.randint(5, 100, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    selected = torch.zeros_like(input_ids, dtype=torch.bool)
    selected[0, [1, 4]] = selected[1, 2] = True
    labels = torch.where(selected, input_ids, -100)
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits[selected]
        hidden = getattr(model, model.base_model_prefix)(input_ids=input_ids, attention_mask=attention_mask)[0]
        masked = family.masked_logits(model, hidden[selected])
        loss, logits, _ = MaskedLM(model)(input_ids, attention_mask, labels)
    assert masked.shape == (3, 100)
    torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, nn.functional.cross_entropy(full, input_ids[selected]))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_token_type_ids_reach_only_the_families_that_read_them(model_type):
    model = tiny_mlm(model_type)
    input_ids = torch.randint(5, 100, (1, 8))
    labels = input_ids.clone()
    segments = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    with torch.no_grad():
        plain = MaskedLM(model)(input_ids, torch.ones_like(input_ids), labels)[1]
        with_segments = MaskedLM(model)(input_ids, torch.ones_like(input_ids), labels, token_type_ids=segments)[1]
    reads_segments = "token_type_ids" in family_of(model).input_names
    assert reads_segments == (model.config.model_type in ("bert", "electra", "deberta-v2"))
    assert torch.equal(plain, with_segments) != reads_segments


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_qat_fake_quantizes_exactly_the_encoder_linears(model_type):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=3))
    expected = {name.removesuffix(".weight") for name in encoder_linear_weights(model)}
    prepare_qat_(model)
    assert set(qat_modules(model)) == expected


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_pooler_exists_where_the_registry_says(model_type):
    model = tiny_mlm(model_type)
    family = family_of(model)
    attached = attach_pooler_(model, {})
    assert attached == (family.pooler is not None)
    names = [name for name, _ in model.named_parameters()]
    if family.pooler is None:
        with pytest.raises(FamilyError, match=r"pruning\.pooler: .* have no pre-trained pooler"):
            pruning_targets(model, pooler=True)
    else:
        targets = select_targets(model.named_parameters(), pruning_targets(model, pooler=True))
        assert [n for n in names if re.search(family.pooler, n)] == [t for t in targets if "pooler" in t]


def test_a_target_set_that_forgets_encoder_linears_is_an_error_listing_them():
    model = tiny_mlm("deberta-v2")
    old_bert_patterns = [r"encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight$",
                         r"encoder\.layer\.\d+\.(intermediate|output)\.dense\.weight$",
                         r"encoder\.layer\.\d+\.attention\.output\.dense\.weight$"]
    with pytest.raises(FamilyError) as error:
        pruning_targets(model, old_bert_patterns, section="sparsity")
    message = str(error.value)
    assert "sparsity.include leaves encoder Linear weights of this DeBERTa-v2 model dense" in message
    assert "deberta.encoder.layer.0.attention.self.query_proj.weight" in message
    assert "sparsity.exclude" in message
    # excluding them explicitly is a choice, and is accepted
    exclude = [r"\.(query|key|value|pos_key|pos_query)_proj\.weight$"]
    patterns = pruning_targets(model, old_bert_patterns, exclude, section="sparsity")
    store = MaskStore.dense(model.named_parameters(), include=patterns, exclude=exclude)
    assert len(store) == 2 * 3


def test_an_unknown_family_names_its_model_type_and_how_to_add_it():
    class Config:
        model_type = "my-encoder"

    with pytest.raises(UnknownFamilyError) as error:
        family_of(Config())
    assert "'my-encoder'" in str(error.value)
    assert "pofa/families.py" in str(error.value) and "tests/unit/test_families.py" in str(error.value)
    model = nn.Linear(2, 2)
    model.config = Config()
    with pytest.raises(UnknownFamilyError):
        MaskedLM(model)


def test_the_registry_is_consistent():
    model_types = [t for family in FAMILIES for t in family.model_types]
    assert len(model_types) == len(set(model_types))
    assert {family_of(t).name for t in MODEL_TYPES} == {family.name for family in FAMILIES}
    for family in FAMILIES:
        assert family.input_names[:2] == ("input_ids", "attention_mask")
        assert ENCODER_BLOCK.search("x." + family.blocks.replace(r"(^|\.)", "").replace(r"\d+", "3")
                                    .replace("\\", ""))


def test_the_readme_table_lists_every_family_and_model_type():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("### Model families", 1)[1].split("###", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for family in FAMILIES:
        name = "DeBERTa-v2/v3" if family.name == "DeBERTa-v2" else family.name
        assert name in rows, f"README's family table has no row for {family.name}"
        for model_type in family.model_types:
            assert f"`{model_type}`" in rows[name], f"{model_type} missing from the {family.name} row"
        assert ("ids, mask, segments" in rows[name]) == ("token_type_ids" in family.input_names)
        assert rows[name].rstrip(" |").endswith("yes" if family.pooler else "no")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_the_sparse_int8_runtime_fuses_what_the_registry_says(model_type):
    # The pair names, in every block, a Linear whose output alone goes through the activation module: the runtime
    # computes the GELU in the Linear's kernel call, drops the module; blocks of BERT's layout run the short path;
    # the runtime still computes the QAT model's logits.
    import copy

    from pofa.runtime import SparseInt8Linear, compiler_available, sparse_int8_
    from pofa.runtime.blocks import ShortBertBlock

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=3))
    family = family_of(model)
    prefixes = sorted({name[:found.end()] for name, _ in model.named_modules()
                       if (found := family.block_pattern.search(name))})
    assert prefixes
    if family.feed_forward_activation is None:
        return
    linear_name, activation_name = family.feed_forward_activation
    for prefix in prefixes:
        assert isinstance(model.get_submodule(prefix + linear_name), nn.Linear), prefix + linear_name
        assert isinstance(model.get_submodule(prefix + activation_name), nn.Module), prefix + activation_name
    if not compiler_available():
        pytest.skip("no C compiler for the sparse int8 kernel")
    prepare_qat_(model).train()
    ids = torch.randint(5, 90, (3, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    model.eval()
    runtime = sparse_int8_(copy.deepcopy(model))
    short = [prefix for prefix in prefixes if isinstance(runtime.get_submodule(prefix[:-1]).__dict__.get("forward"),
                                                         ShortBertBlock)]
    assert short == (prefixes if family.bert_blocks else [])  # BERT's layout: every block on the short path
    for prefix in prefixes:
        assert runtime.get_submodule(prefix + linear_name).activation == "gelu"
        assert type(runtime.get_submodule(prefix + activation_name)) is nn.Identity
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = runtime(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert sum(isinstance(m, SparseInt8Linear) for m in runtime.modules()) == len(qat_modules(model))
